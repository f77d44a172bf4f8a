"""Stage throughput against its peers, and a worker's peak memory, all against the discard sink.

Every peer runs as a process of its own against the same sink, on the same page-cached file,
interleaved round by round; each figure is the best of its rounds (the least disturbed by the
other work on a shared machine).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = ROOT / ".cache" / "bench"
GLANCECLIENT_VENV = BENCH_DIR / "glanceclient-venv"
GIB = 1 << 30


@dataclass(frozen=True)
class Peer:
    name: str
    what: str
    run: Callable[[], float]  # seconds for one pass over the source


@contextmanager
def sink() -> Iterator[str]:
    """The discard sink in its own process; yields its base URL."""
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.benchmarks.sink"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        yield f"http://127.0.0.1:{int(child.stdout.readline())}"
    finally:
        child.terminate()
        child.wait()


def source_file(size_bytes: int = 2 * GIB) -> Path:
    """A random file of `size_bytes`, read once so that it is in the page cache."""
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    path = BENCH_DIR / f"source-{size_bytes >> 20}m.bin"
    if not path.exists() or path.stat().st_size != size_bytes:
        with path.open("wb") as out, open("/dev/urandom", "rb") as noise:
            for _ in range(size_bytes >> 24):
                out.write(noise.read(1 << 24))
    with path.open("rb") as warm:
        while warm.read(1 << 24):
            pass
    return path


def install_glanceclient() -> Path:
    """python-glanceclient from PyPI in a venv of its own (never the project's)."""
    glance = GLANCECLIENT_VENV / "bin" / "glance"
    if not glance.exists():
        subprocess.run([sys.executable, "-m", "venv", str(GLANCECLIENT_VENV)], check=True)
        pip = GLANCECLIENT_VENV / "bin" / "pip"
        subprocess.run([str(pip), "install", "--quiet", "python-glanceclient"], check=True)
    return glance


def glanceclient_env(target: str) -> dict[str, str]:
    """This environment with a home of `target`'s own for python-glanceclient.

    glanceclient caches the first server's schemas in ~/.glanceclient and trusts them after:
    the sink's minimal ones would strip the real Glance's options (--disk-format, ...), and
    the operator's home is not the benchmark's to write in.
    """
    home = BENCH_DIR / "glanceclient-home" / target
    home.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "HOME": str(home)}


def _timed(command: list[str], env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=ROOT, env=env)
    return time.perf_counter() - started


def memory_sender(url: str, size_bytes: int) -> float:
    """The sink's own ceiling: one PUT whose body is sent from memory, no file, no hashing."""
    host, port = url.removeprefix("http://").split(":")
    block = memoryview(bytes(1 << 20))
    with socket.create_connection((host, int(port))) as conn:
        started = time.perf_counter()
        head = (
            f"PUT /v2/images/{uuid.uuid4()}/stage HTTP/1.1\r\nHost: {host}\r\n"
            "Content-Type: application/octet-stream\r\n"
            f"Content-Length: {size_bytes}\r\n\r\n"
        )
        conn.sendall(head.encode())
        for _ in range(size_bytes >> 20):
            conn.sendall(block)
        answer = conn.recv(4096)
        elapsed_s = time.perf_counter() - started
    if not answer.startswith(b"HTTP/1.1 204"):
        raise RuntimeError(f"the sink answered {answer[:40]!r}")
    return elapsed_s


def worker_stage(url: str, files: list[Path], *, verify: bool) -> dict[str, float]:
    """One worker process staging `files` at once; its JSON figures (seconds, peak RSS)."""
    command = [sys.executable, "-m", "tests.benchmarks.stage_child", url, *map(str, files)]
    if verify:
        command.append("--verify")
    done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
    figures: dict[str, float] = json.loads(done.stdout)
    return figures


def peers(url: str, source: Path, glance: Path) -> list[Peer]:
    image = f"{url}/v2/images/{uuid.uuid4()}/stage"
    curl = ["curl", "-sf", "-o", "/dev/null", "-H", "Content-Type: application/octet-stream"]
    glance_cmd = [str(glance), "--os-image-url", url, "--os-auth-token", "bench"]
    size = source.stat().st_size
    return [
        Peer("sink ceiling", "PUT from memory, raw socket", lambda: memory_sender(url, size)),
        Peer("curl -T", "C client, no hashing", lambda: _timed([*curl, "-T", str(source), image])),
        Peer("sha512sum", "hashing alone, no network", lambda: _timed(["sha512sum", str(source)])),
        Peer(
            "glance image-stage",
            "python-glanceclient, no hashing",
            lambda: _timed(
                [*glance_cmd, "image-stage", "--file", str(source), str(uuid.uuid4())],
                glanceclient_env("sink"),
            ),
        ),
        Peer(
            "worker, verification off",
            "GlanceClient.stage, no hash",
            lambda: worker_stage(url, [source], verify=False)["seconds"],
        ),
        Peer(
            "worker, verification on",
            "GlanceClient.stage, sha512 while sending",
            lambda: worker_stage(url, [source], verify=True)["seconds"],
        ),
    ]


def measure_throughput(rounds: int = 3) -> tuple[int, dict[str, tuple[str, float]]]:
    """Bytes per second of every peer (best of `rounds`, interleaved), by name."""
    source = source_file()
    glance = install_glanceclient()
    best: dict[str, float] = {}
    whats: dict[str, str] = {}
    with sink() as url:
        for _ in range(rounds):
            for peer in peers(url, source, glance):
                seconds = peer.run()
                best[peer.name] = min(best.get(peer.name, seconds), seconds)
                whats[peer.name] = peer.what
    size = source.stat().st_size
    return size, {name: (whats[name], size / seconds) for name, seconds in best.items()}


def sparse_files(count: int, size_bytes: int = GIB) -> list[Path]:
    folder = BENCH_DIR / "sparse"
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for number in range(count):
        path = folder / f"disk-{number:02d}.raw"
        with path.open("wb") as out:
            out.truncate(size_bytes)
        files.append(path)
    return files


def measure_memory() -> dict[int, dict[str, float]]:
    """Peak RSS of one worker process with 1 and with 16 concurrent 1 GiB stages (sha512 on)."""
    files = sparse_files(16)
    with sink() as url:
        return {count: worker_stage(url, files[:count], verify=True) for count in (1, 16)}
