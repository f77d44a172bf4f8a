"""The same batch of VMDKs into a real Glance by every way an operator has at hand.

The sandbox benchmarks measure the client alone; this one measures what an operator sees: a
real Keystone and Glance (tests/conformance/realstack.py: Glance 33 on MariaDB with two API
workers) on loopback, fed N streamOptimized disks by the vendor's curl recipe (sequential and
under `xargs -P 8`), by python-glanceclient (8 at a time) and by the worker (defaults, and
16/16). Contenders run one after another in interleaved rounds, the order rotated each round,
so that a disturbance on a shared machine does not always fall on the same one.

Each contender runs under a small Python parent that reports the user+sys CPU seconds and the
largest peak RSS of the whole process tree (getrusage(RUSAGE_CHILDREN) after it has waited for
every child): the figures belong to the contender, not to this process or to Glance.

Sizes come from the environment so that a quick run is cheap: VMDK_BENCH_REAL_DISKS (16),
VMDK_BENCH_REAL_MIB (128, random data per disk), VMDK_BENCH_REAL_ROUNDS (2). The ports
(VMDK_BENCH_REAL_KEYSTONE_PORT 15100, VMDK_BENCH_REAL_GLANCE_PORT 19392) differ from the
conformance run's defaults, so both may run at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from tests.benchmarks.scale import fresh_database
from tests.benchmarks.throughput import BENCH_DIR, glanceclient_env, install_glanceclient
from tests.conformance.realstack import RealStack, new_run_dir

MIB = 1 << 20
PARALLEL = 8  # what an operator types after xargs -P, and python-glanceclient's fan-out here
POLL_S = 0.5
ACTIVE_TIMEOUT_S = 1800.0
DELETE_TRIES = 5

# One disk by the vendor's recipe: create, stage with curl -T, import, poll each half second.
# The token comes from the caller, once for the batch, as an operator's script would do it.
RECIPE_ONE = r"""
set -eu
file=$1
name=$PREFIX$(basename "$file" .vmdk)
id=$(curl -sf -H "X-Auth-Token: $TOKEN" -H 'Content-Type: application/json' \
     -d "{\"name\": \"$name\", \"disk_format\": \"vmdk\", \"container_format\": \"bare\",
          \"es_virtio_enabled\": \"no\"}" \
     "$IMAGE_URL/v2/images" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
curl -sf -o /dev/null -H "X-Auth-Token: $TOKEN" -H 'Content-Type: application/octet-stream' \
     -T "$file" "$IMAGE_URL/v2/images/$id/stage"
curl -sf -o /dev/null -H "X-Auth-Token: $TOKEN" -H 'Content-Type: application/json' \
     -d '{"method": {"name": "glance-direct"}}' "$IMAGE_URL/v2/images/$id/import"
while :; do
  status=$(curl -sf -H "X-Auth-Token: $TOKEN" "$IMAGE_URL/v2/images/$id" \
           | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')
  case $status in
    active) break ;;
    killed|deleted) echo "$name: $status" >&2; exit 1 ;;
  esac
  sleep 0.5
done
"""

# The batch around it: a token from Keystone, then every disk in turn or PARALLEL at a time.
RECIPE_BATCH = r"""
set -eu
TOKEN=$(curl -sf -i -H 'Content-Type: application/json' -d "$AUTH_BODY" "$OS_AUTH_URL/auth/tokens" \
        | tr -d '\r' | awk 'tolower($1)=="x-subject-token:" {print $2}')
export TOKEN
one=$1; parallel=$2; shift 2
if [ "$parallel" = 1 ]; then
  for file in "$@"; do bash "$one" "$file"; done
else
  printf '%s\n' "$@" | xargs -P "$parallel" -I{} bash "$one" {}
fi
"""

# python-glanceclient creates, stages and imports, and returns before the image is active:
# the wait for active is this benchmark's (Glance.wait_active). Its stdin must be closed
# (<&-), not /dev/null: any stdin that is not a terminal counts as image data, and with --file
# too it refuses to run ("You cannot use both --file and stdin").
GLANCECLIENT_BATCH = r"""
set -eu
glance=$1; parallel=$2; shift 2
printf '%s\n' "$@" | xargs -P "$parallel" -I{} sh -c '
  "$0" image-create-via-import --disk-format vmdk --container-format bare \
    --import-method glance-direct --property es_virtio_enabled=no \
    --file "$1" --name "$PREFIX$(basename "$1" .vmdk)" <&- > /dev/null' "$glance" {}
"""

# Glance's ingest ceiling: only the PUT /stage of images created beforehand, PARALLEL at once.
STAGE_ONLY = r"""
set -eu
parallel=$1; shift
printf '%s\n' "$@" | xargs -P "$parallel" -n 2 sh -c '
  curl -sf -o /dev/null -H "X-Auth-Token: $TOKEN" -H "Content-Type: application/octet-stream" \
       -T "$1" "$IMAGE_URL/v2/images/$0/stage"'
"""

# The parent every contender runs under: it waits for the whole tree, then reports its usage.
MEASURE = r"""
import json, resource, subprocess, sys
code = subprocess.run(sys.argv[2:], stdin=subprocess.DEVNULL).returncode
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "w") as out:
    json.dump({"cpu_s": usage.ru_utime + usage.ru_stime, "max_rss_kib": usage.ru_maxrss}, out)
sys.exit(code)
"""


@dataclass(frozen=True)
class Settings:
    disks: int
    disk_mib: int
    rounds: int
    keystone_port: int
    glance_port: int
    server_dsn: str

    @classmethod
    def from_env(cls, server_dsn: str) -> Settings:
        env = os.environ
        return cls(
            disks=int(env.get("VMDK_BENCH_REAL_DISKS", "16")),
            disk_mib=int(env.get("VMDK_BENCH_REAL_MIB", "128")),
            rounds=int(env.get("VMDK_BENCH_REAL_ROUNDS", "2")),
            keystone_port=int(env.get("VMDK_BENCH_REAL_KEYSTONE_PORT", "15100")),
            glance_port=int(env.get("VMDK_BENCH_REAL_GLANCE_PORT", "19392")),
            server_dsn=server_dsn,
        )


@dataclass(frozen=True)
class Disk:
    path: Path
    name: str  # the image name without the run's prefix
    size: int
    sha512: str


@dataclass
class Run:
    """One contender's pass over the batch."""

    wall_s: float
    cpu_s: float
    peak_rss_mib: float
    glance_requests: int
    active_to_done_s: list[float] = field(default_factory=list)


@dataclass
class Contender:
    key: str
    label: str
    peer: bool  # one of the tools the worker is measured against
    runs: list[Run] = field(default_factory=list)

    def median(self, pick: Callable[[Run], float]) -> float:
        return statistics.median(pick(run) for run in self.runs)


# ---- the disks ------------------------------------------------------------------------------


def make_disks(count: int, mib: int) -> list[Disk]:
    """`count` streamOptimized VMDKs of `mib` MiB of random data each, made once by qemu-img
    and kept (a later run of the same size reuses them), then read once into the page cache."""
    folder = BENCH_DIR / f"real-glance-{mib}m"
    folder.mkdir(parents=True, exist_ok=True)
    disks = []
    for n in range(count):
        path = folder / f"disk-{n:03d}.vmdk"
        if not path.exists():
            raw = folder / f"disk-{n:03d}.raw"
            with raw.open("wb") as out:
                for _ in range(mib):
                    out.write(os.urandom(MIB))
            partial = path.with_suffix(".partial")
            subprocess.run(
                ["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o",
                 "subformat=streamOptimized", str(raw), str(partial)],
                check=True,
            )  # fmt: skip
            raw.unlink()
            partial.rename(path)  # a run killed mid-convert leaves no half disk behind
        digest = hashlib.sha512()
        with path.open("rb") as source:
            while chunk := source.read(4 * MIB):
                digest.update(chunk)
        disks.append(Disk(path, path.stem, path.stat().st_size, digest.hexdigest()))
    return disks


# ---- Glance, as this benchmark sees it ------------------------------------------------------


class Glance:
    """Just the image API calls the benchmark needs around the contenders, with one token."""

    def __init__(self, stack: RealStack) -> None:
        self.stack = stack
        self.token = stack.issue_token()

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        headers = {"X-Auth-Token": self.token, "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(
            f"{self.stack.image_url}{path}", data=data, headers=headers, method=method
        )
        with urllib.request.urlopen(request, timeout=60) as answer:
            raw = answer.read()
        return json.loads(raw) if raw else None

    def images(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        path = "/v2/images?limit=100"
        while path:
            page = self._call("GET", path)
            found += page["images"]
            path = page.get("next", "")
        return found

    def create(self, name: str) -> str:
        body = {"name": name, "disk_format": "vmdk", "container_format": "bare"}
        return str(self._call("POST", "/v2/images", body | {"es_virtio_enabled": "no"})["id"])

    def delete_all(self) -> None:
        """Delete every image of the project, so that each contender starts from nothing.

        Glance 33 on MariaDB may answer a DELETE right after `active` with a 500 (its import
        task is still writing image_properties: "expected to update 1 row(s); 0 were
        matched"); a second try a moment later succeeds, so each delete gets a few."""
        for image in self.images():
            for attempt in range(DELETE_TRIES):
                try:
                    self._call("DELETE", f"/v2/images/{image['id']}")
                    break
                except urllib.error.HTTPError as exc:
                    if exc.code == 404:
                        break
                    if exc.code < 500 or attempt == DELETE_TRIES - 1:
                        raise
                    time.sleep(1.0)

    def requests_seen(self) -> int:
        """Requests in Glance's access log so far, less this benchmark's own (urllib's)."""
        log = self.stack.base_dir / "log" / "glance-api-access.log"
        with log.open(errors="replace") as lines:
            return sum(1 for line in lines if "Python-urllib/" not in line)

    def wait_active(self, prefix: str, count: int) -> list[dict[str, Any]]:
        """Poll until `count` images named `prefix`… are active (a failed one raises)."""
        deadline = time.monotonic() + ACTIVE_TIMEOUT_S
        while True:
            mine = [i for i in self.images() if str(i.get("name") or "").startswith(prefix)]
            failed = [i["name"] for i in mine if i["status"] in ("killed", "deleted")]
            if failed:
                raise RuntimeError(f"images failed in Glance: {failed}")
            if len(mine) >= count and all(i["status"] == "active" for i in mine):
                return mine
            if time.monotonic() > deadline:
                states = sorted((i["name"], i["status"]) for i in mine)
                raise RuntimeError(f"{prefix}: not all active after {ACTIVE_TIMEOUT_S} s: {states}")
            time.sleep(POLL_S)


def check_images(images: list[dict[str, Any]], prefix: str, disks: list[Disk]) -> None:
    """Every disk is one active image whose os_hash_value is the sha512 of the file: with
    es_virtio_enabled "no" the cloud keeps the bytes as sent."""
    by_name = {str(i["name"]): i for i in images}
    wrong = []
    for disk in disks:
        image = by_name.get(prefix + disk.name)
        if image is None or len([i for i in images if i["name"] == prefix + disk.name]) != 1:
            wrong.append(f"{disk.name}: not exactly one image")
        elif image["status"] != "active" or image.get("os_hash_value") != disk.sha512:
            wrong.append(f"{disk.name}: {image['status']}, hash {image.get('os_hash_value')}")
    if wrong:
        raise RuntimeError(f"{prefix}: wrong images: {wrong}")


# ---- the contenders -------------------------------------------------------------------------


def _auth_body(stack: RealStack) -> str:
    domain = {"name": stack.domain}
    user = {"name": stack.username, "domain": domain, "password": stack.password}
    return json.dumps(
        {
            "auth": {
                "identity": {"methods": ["password"], "password": {"user": user}},
                "scope": {"project": {"name": stack.project_name, "domain": domain}},
            }
        }
    )


def os_env(stack: RealStack) -> dict[str, str]:
    """The OS_* variables python-glanceclient and the worker read to find the stack."""
    return {
        "OS_AUTH_URL": stack.auth_url,
        "OS_USERNAME": stack.username,
        "OS_PASSWORD": stack.password,
        "OS_PROJECT_NAME": stack.project_name,
        "OS_USER_DOMAIN_NAME": stack.domain,
        "OS_PROJECT_DOMAIN_NAME": stack.domain,
        "OS_REGION_NAME": stack.region,
        "OS_IDENTITY_API_VERSION": "3",
        "OS_IMAGE_API_VERSION": "2",
    }


def measured(argv: list[str], env: dict[str, str], workdir: Path, log: Path) -> tuple[float, float]:
    """Run `argv` under the measuring parent; its tree's CPU seconds and peak RSS in MiB."""
    usage_file = workdir / "usage.json"
    with log.open("ab") as out:
        done = subprocess.run(
            [sys.executable, "-c", MEASURE, str(usage_file), *argv],
            env=env, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, check=False,
        )  # fmt: skip
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"{argv[0]} … {argv[-1]} exited {done.returncode}; log tail:\n{tail}")
    usage = json.loads(usage_file.read_text())
    return float(usage["cpu_s"]), usage["max_rss_kib"] / 1024


def _manifest(workdir: Path, job: str, prefix: str, disks: list[Disk]) -> Path:
    manifest = {
        "job": job,
        "defaults": {"es_virtio_enabled": "no"},
        "disks": [{"source": str(d.path), "name": prefix + d.name} for d in disks],
    }
    path = workdir / f"{job}.json"
    path.write_text(json.dumps(manifest))
    return path


async def _active_to_done(database_url: str, images: list[dict[str, Any]]) -> list[float]:
    """Per image: the row's finished_at minus Glance's updated_at once active (one-second
    precision on MariaDB, so each figure is up to 1 s longer than the truth)."""
    updated = {i["id"]: datetime.fromisoformat(i["updated_at"]) for i in images}
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch("SELECT glance_image_id, finished_at FROM results")
    finally:
        await connection.close()
    return [(row["finished_at"] - updated[str(row["glance_image_id"])]).total_seconds()
            for row in rows if str(row["glance_image_id"]) in updated]  # fmt: skip


class Bench:
    """The stack, the disks and the contenders of one section run."""

    def __init__(self, settings: Settings, stack: RealStack, disks: list[Disk], workdir: Path):
        self.settings = settings
        self.stack = stack
        self.disks = disks
        self.workdir = workdir
        self.glance = Glance(stack)
        self.glance_bin = str(install_glanceclient())
        self.log = workdir / "contenders.log"
        self.env = {
            **glanceclient_env("real-glance"),
            **os_env(stack),
            "IMAGE_URL": stack.image_url,
            "AUTH_BODY": _auth_body(stack),
        }
        (workdir / "recipe-one.sh").write_text(RECIPE_ONE)
        self.contenders = [
            Contender("recipe", "vendor curl recipe, sequential", peer=True),
            Contender("recipe8", f"vendor curl recipe, xargs -P {PARALLEL}", peer=True),
            Contender("glanceclient", f"glance image-create-via-import × {PARALLEL}", peer=True),
            Contender("worker", "vmdk-migrate run (defaults: 8 / 4)", peer=False),
            Contender("worker16", "vmdk-migrate run --concurrency 16 --stage-concurrency 16",
                      peer=False),
        ]  # fmt: skip
        self.ceiling_mb_s: list[float] = []

    def _files(self) -> list[str]:
        return [str(d.path) for d in self.disks]

    async def run_contender(self, contender: Contender, round_no: int) -> Run:
        prefix = f"rg{round_no}-{contender.key}-"
        env = {**self.env, "PREFIX": prefix}
        files = self._files()
        if contender.key.startswith("worker"):
            return await self._run_worker(contender, prefix, env)
        if contender.key == "glanceclient":
            argv = ["bash", "-c", GLANCECLIENT_BATCH, "glance", self.glance_bin, str(PARALLEL)]
        else:
            parallel = "1" if contender.key == "recipe" else str(PARALLEL)
            argv = ["bash", "-c", RECIPE_BATCH, "recipe", "recipe-one.sh", parallel]
        requests_before = self.glance.requests_seen()
        started = time.perf_counter()
        cpu_s, rss = await asyncio.to_thread(measured, argv + files, env, self.workdir, self.log)
        images = await asyncio.to_thread(self.glance.wait_active, prefix, len(self.disks))
        wall_s = time.perf_counter() - started
        check_images(images, prefix, self.disks)
        return Run(wall_s, cpu_s, rss, self.glance.requests_seen() - requests_before)

    async def _run_worker(self, contender: Contender, prefix: str, env: dict[str, str]) -> Run:
        async with fresh_database(self.settings.server_dsn) as database_url:
            manifest = _manifest(self.workdir, f"{prefix}job", prefix, self.disks)
            command = [
                "vmdk-migrate", "run", "--once", "--progress", "off", "--metrics-port", "0",
            ]  # fmt: skip
            if contender.key == "worker16":
                command += ["--concurrency", "16", "--stage-concurrency", "16"]
            script = f'vmdk-migrate submit "$1" >/dev/null && exec {" ".join(command)}'
            argv = ["bash", "-c", script, "worker", str(manifest)]
            bin_dir = str(Path(sys.executable).parent)
            env = {**env, "DATABASE_URL": database_url, "PATH": f"{bin_dir}:{env['PATH']}"}
            requests_before = self.glance.requests_seen()
            started = time.perf_counter()
            cpu_s, rss = await asyncio.to_thread(measured, argv, env, self.workdir, self.log)
            images = await asyncio.to_thread(self.glance.wait_active, prefix, len(self.disks))
            wall_s = time.perf_counter() - started
            check_images(images, prefix, self.disks)
            requests = self.glance.requests_seen() - requests_before
            gaps = await _active_to_done(database_url, images)
        return Run(wall_s, cpu_s, rss, requests, gaps)

    def measure_ceiling(self, round_no: int) -> float:
        """MB/s of PARALLEL concurrent `curl -T` stages of the batch: Glance's ingest alone."""
        pairs = []
        for disk in self.disks:
            pairs += [self.glance.create(f"rg{round_no}-stage-{disk.name}"), str(disk.path)]
        env = {**self.env, "TOKEN": self.glance.token}
        started = time.perf_counter()
        measured(
            ["bash", "-c", STAGE_ONLY, "stage", str(PARALLEL), *pairs], env, self.workdir, self.log
        )
        wall_s = time.perf_counter() - started
        return sum(d.size for d in self.disks) / wall_s / 1e6

    async def run(self) -> None:
        await asyncio.to_thread(self.glance.delete_all)
        for round_no in range(self.settings.rounds):
            shift = round_no % len(self.contenders)
            for contender in self.contenders[shift:] + self.contenders[:shift]:
                run = await self.run_contender(contender, round_no)
                contender.runs.append(run)
                print(
                    f"  round {round_no + 1}: {contender.label}: {run.wall_s:.1f} s, "
                    f"{run.cpu_s:.1f} CPU s, {run.peak_rss_mib:.0f} MiB",
                    flush=True,
                )
                await asyncio.to_thread(self.glance.delete_all)
            self.ceiling_mb_s.append(await asyncio.to_thread(self.measure_ceiling, round_no))
            print(f"  round {round_no + 1}: ingest ceiling {self.ceiling_mb_s[-1]:.0f} MB/s")
            await asyncio.to_thread(self.glance.delete_all)


async def run_bench(settings: Settings) -> tuple[Bench, str]:
    """Start the stack on its own ports, run every round, stop the stack and drop its
    database however the run ends; the bench and a line describing the stack."""
    disks = await asyncio.to_thread(make_disks, settings.disks, settings.disk_mib)
    stack = RealStack(
        new_run_dir(), keystone_port=settings.keystone_port, glance_port=settings.glance_port
    )
    # running() stops the servers and drops Glance's database however the block ends.
    with tempfile.TemporaryDirectory() as workdir, stack.running():
        description = (
            f"Glance on {'MariaDB' if stack.database_kind == 'mariadb' else 'SQLite'}, "
            f"{stack.glance_workers} API worker process(es)"
        )
        bench = Bench(settings, stack, disks, Path(workdir))
        await bench.run()
    return bench, description
