"""Whole-pipeline benchmarks against the sandbox in its own process: scale, and the curl recipe.

The worker runs in this process with every Store method counted (one method is one SQL
statement, by the store's design), the sandbox in a child that reports every request it saw.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import wraps
from pathlib import Path
from typing import Any

from tests.fixtures.db import create_database, drop_database, dsn_with_database, unique_name
from worker.config import load_cloud_settings
from worker.core.machine import Policies
from worker.core.policy import PollPolicy
from worker.intake.manifest import load_manifest
from worker.intake.sampledisks import write_monolithic_sparse
from worker.run.app import run_worker
from worker.run.settings import WorkerSettings
from worker.store.store import Store, open_store

# Polls as often as a busy operator would want to know, not more: the ideal counts only the
# import latency, so a poll that lands late shows up honestly in the wall time.
BENCH_POLICIES = Policies(poll=PollPolicy(first_delay_s=0.5, factor=1.0, max_delay_s=0.5))
ROOT = Path(__file__).resolve().parents[2]
# The sandbox's import flow starts latency/2 after the 202 (as Glance's task pool does), then
# takes the latency: one import lasts 1.5 × import_latency_s, and that is the fixed cost.
SANDBOX_IMPORT_FACTOR = 1.5


@dataclass
class SandboxProcess:
    """The sandbox child: its URL while it runs, its request counts once it has stopped."""

    base_url: str
    requests: Counter[str] = field(default_factory=Counter)

    @property
    def auth_url(self) -> str:
        return f"{self.base_url}/identity/v3"

    @property
    def image_url(self) -> str:
        return f"{self.base_url}/image"


@asynccontextmanager
async def sandbox_process(import_latency_s: float) -> AsyncIterator[SandboxProcess]:
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.benchmarks.sandbox_child",
        str(import_latency_s),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    assert child.stdout is not None
    assert child.stdin is not None
    port = int((await child.stdout.readline()).decode())
    running = SandboxProcess(f"http://127.0.0.1:{port}")
    try:
        yield running
    finally:
        child.stdin.close()
        last = await child.stdout.readline()
        await child.wait()
        if last:
            running.requests.update(json.loads(last))


@asynccontextmanager
async def fresh_database(server_dsn: str) -> AsyncIterator[str]:
    name = unique_name("vmdk_bench")
    await create_database(server_dsn, name)
    url = dsn_with_database(server_dsn, name)
    try:
        async with open_store(url):
            pass
        yield url
    finally:
        await drop_database(server_dsn, name)


# Store methods that run no statement of their own: `apply` hands each step to the method of
# its kind (mark_staged, finish, ...), which is counted.
_DISPATCHERS = frozenset({"apply"})


def count_store_calls() -> tuple[Counter[str], Callable[[], None]]:
    """Wrap every public async Store method to count its calls; returns the counts and undo."""
    counts: Counter[str] = Counter()
    originals: dict[str, Any] = {}
    for name in dir(Store):
        method = getattr(Store, name)
        if name.startswith("_") or name in _DISPATCHERS or not asyncio.iscoroutinefunction(method):
            continue
        originals[name] = method

        def counted(method: Any = method, name: str = name) -> Any:
            @wraps(method)
            async def call(self: Store, *args: Any, **kwargs: Any) -> Any:
                counts[name] += 1
                return await method(self, *args, **kwargs)

            return call

        setattr(Store, name, counted())

    def undo() -> None:
        for name, method in originals.items():
            setattr(Store, name, method)

    return counts, undo


def cloud_env(sandbox: SandboxProcess) -> dict[str, str]:
    return {
        "OS_AUTH_URL": sandbox.auth_url,
        "OS_USERNAME": "admin",
        "OS_PASSWORD": "secret",
        "OS_USER_DOMAIN_NAME": "Default",
        "OS_PROJECT_NAME": "admin",
        "OS_PROJECT_DOMAIN_NAME": "Default",
    }


async def submit(database_url: str, workdir: Path, sources: list[Path], job: str) -> None:
    manifest = {
        "job": job,
        "defaults": {"es_virtio_enabled": "no"},
        "disks": [{"source": str(p), "name": f"{job}-{n:05d}"} for n, p in enumerate(sources)],
    }
    path = workdir / f"{job}.json"
    path.write_text(json.dumps(manifest))
    loaded = await asyncio.to_thread(load_manifest, path)
    async with open_store(database_url) as store:
        await store.submit_job(loaded.job, manifest=loaded.document, manifest_sha256=loaded.sha256)


@dataclass(frozen=True)
class ScaleFigures:
    disks: int
    import_latency_s: float
    concurrency: int
    stage_concurrency: int
    wall_s: float
    done: int
    requests: Counter[str]
    statements: Counter[str]

    @property
    def import_s(self) -> float:
        """How long one import really takes in the sandbox at this latency setting."""
        return self.import_latency_s * SANDBOX_IMPORT_FACTOR

    @property
    def ideal_s(self) -> float:
        return self.disks * self.import_s / self.concurrency

    @property
    def requests_per_image(self) -> float:
        return sum(self.requests.values()) / self.disks

    @property
    def statements_per_image(self) -> float:
        return sum(self.statements.values()) / self.disks


async def run_scale(
    server_dsn: str,
    workdir: Path,
    *,
    disks: int,
    import_latency_s: float,
    concurrency: int,
    stage_concurrency: int,
) -> ScaleFigures:
    """`disks` small disks through create, stage, import, poll and verify, timed end to end."""
    source = workdir / "small.vmdk"
    write_monolithic_sparse(source, virtual_size_bytes=1 << 20, data=b"\x01" * 4096)
    async with fresh_database(server_dsn) as database_url:
        await submit(database_url, workdir, [source] * disks, f"scale{disks}")
        async with sandbox_process(import_latency_s) as sandbox:
            cloud = load_cloud_settings(cloud_env(sandbox))
            settings = WorkerSettings(
                concurrency=concurrency,
                stage_concurrency=stage_concurrency,
                once=True,
                idle_poll_s=0.2,
                policies=BENCH_POLICIES,
            )
            statements, undo = count_store_calls()
            started = time.perf_counter()
            try:
                summary = await run_worker(
                    database_url=database_url, cloud=cloud, settings=settings, stop=asyncio.Event()
                )
            finally:
                undo()
            wall_s = time.perf_counter() - started
    return ScaleFigures(
        disks=disks,
        import_latency_s=import_latency_s,
        concurrency=concurrency,
        stage_concurrency=stage_concurrency,
        wall_s=wall_s,
        done=summary.by_phase["done"],
        requests=sandbox.requests,
        statements=statements,
    )


RECIPE = r"""
set -eu
token=$(curl -sf -i -H 'Content-Type: application/json' -d "$AUTH_BODY" "$OS_AUTH_URL/auth/tokens" \
        | tr -d '\r' | awk 'tolower($1)=="x-subject-token:" {print $2}')
for file in "$@"; do
  name=$(basename "$file")
  id=$(curl -sf -H "X-Auth-Token: $token" -H 'Content-Type: application/json' \
       -d "{\"name\": \"$name\", \"disk_format\": \"vmdk\", \"container_format\": \"bare\"}" \
       "$IMAGE_URL/v2/images" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
  curl -sf -X PUT -H "X-Auth-Token: $token" -H 'Content-Type: application/octet-stream' \
       --data-binary "@$file" "$IMAGE_URL/v2/images/$id/stage"
  curl -sf -H "X-Auth-Token: $token" -H 'Content-Type: application/json' \
       -d '{"method": {"name": "glance-direct"}}' "$IMAGE_URL/v2/images/$id/import"
  while :; do
    status=$(curl -sf -H "X-Auth-Token: $token" "$IMAGE_URL/v2/images/$id" \
             | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')
    [ "$status" = active ] && break
    sleep 1
  done
done
"""


def _auth_body() -> str:
    return json.dumps(
        {
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {
                        "user": {
                            "name": "admin",
                            "domain": {"name": "Default"},
                            "password": "secret",
                        }
                    },
                },
                "scope": {"project": {"name": "admin", "domain": {"name": "Default"}}},
            }
        }
    )


@dataclass(frozen=True)
class RecipeFigures:
    disks: int
    disk_bytes: int
    recipe_s: float
    worker_s: float
    worker_done: int


def _batch_sources(workdir: Path, disks: int, disk_bytes: int) -> list[Path]:
    folder = workdir / "batch"
    folder.mkdir(exist_ok=True)
    sources = []
    for n in range(disks):
        path = folder / f"disk-{n:02d}.vmdk"
        data = os.urandom(disk_bytes - (128 << 10))  # leaves room for the sparse header
        write_monolithic_sparse(path, virtual_size_bytes=disk_bytes, data=data, seed=n)
        sources.append(path)
    return sources


async def run_recipe_against_worker(
    server_dsn: str, workdir: Path, *, disks: int, disk_bytes: int, import_latency_s: float
) -> RecipeFigures:
    """The vendor's curl recipe in a sequential loop, then the worker, on the same files."""
    sources = await asyncio.to_thread(_batch_sources, workdir, disks, disk_bytes)
    async with sandbox_process(import_latency_s) as sandbox:
        env = {**os.environ, **cloud_env(sandbox), "IMAGE_URL": sandbox.image_url}
        env["AUTH_BODY"] = _auth_body()
        started = time.perf_counter()
        shell = await asyncio.create_subprocess_exec(
            "bash", "-c", RECIPE, "recipe", *map(str, sources), env=env
        )
        if await shell.wait() != 0:
            raise RuntimeError("the curl recipe failed")
        recipe_s = time.perf_counter() - started
    async with fresh_database(server_dsn) as database_url:
        await submit(database_url, workdir, sources, "batch")
        async with sandbox_process(import_latency_s) as sandbox:
            settings = WorkerSettings(once=True, idle_poll_s=0.2)
            started = time.perf_counter()
            summary = await run_worker(
                database_url=database_url,
                cloud=load_cloud_settings(cloud_env(sandbox)),
                settings=settings,
                stop=asyncio.Event(),
            )
            worker_s = time.perf_counter() - started
    return RecipeFigures(disks, disk_bytes, recipe_s, worker_s, summary.by_phase["done"])
