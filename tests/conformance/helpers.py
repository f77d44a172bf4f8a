"""What the conformance scenarios share: disks, jobs, the worker run on a target, and looks at
the target's images."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.conformance.conftest import Target, sandbox_target
from tests.fixtures.cli import WORKER_CLI
from worker.clients.glance import GlanceClient
from worker.config import CloudSettings, load_cloud_settings
from worker.core.machine import Policies
from worker.core.model import DiskSpec, JobSpec
from worker.core.policy import PollPolicy, RetryPolicy
from worker.errors import MigrationError
from worker.intake.manifest import load_manifest
from worker.run.app import run_worker
from worker.run.consumer import RunSummary
from worker.run.settings import WorkerSettings
from worker.sandbox import SandboxConfig
from worker.store.store import ResultRow, open_store

PROJECT_ROOT = Path(__file__).resolve().parents[2]


MIB = 1 << 20


VIRTUAL_SIZE_BYTES = 64 * MIB


FAST = Policies(
    retry=RetryPolicy(base_delay_s=0.2, max_delay_s=1.0, quota_delay_s=0.5),
    poll=PollPolicy(first_delay_s=0.05, max_delay_s=0.25, tasks_every_s=0.3),
)


BATCH_TIMEOUT_S = 90.0


POLL_INTERVAL_S = 0.02


SETTLE_TIMEOUT_S = 30.0


# Big enough that staging it to the real Glance on loopback takes a moment to interrupt.
KILLED_DISK_DATA_BYTES = 256 * MIB


KILLED_DISK_VIRTUAL_BYTES = 512 * MIB


# The sandbox's token lifetime for the renewal scenario; the real stack's comes from run.py.
SANDBOX_TOKEN_TTL_S = 6.0


LONGEST_TOKEN_S = 300.0


def qemu_vmdk(path: Path, subformat: str, *, data_bytes: int, virtual_bytes: int) -> Path:
    """A VMDK of `subformat` made by qemu-img from a raw disk whose first bytes are random."""
    raw = path.with_suffix(".raw")
    with raw.open("wb") as out:
        out.truncate(virtual_bytes)
        for _ in range(0, data_bytes, MIB):
            out.write(os.urandom(min(MIB, data_bytes)))
    convert = ["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}"]
    subprocess.run([*convert, str(raw), str(path)], check=True, capture_output=True)
    raw.unlink()
    return path


def create_type(path: Path) -> str:
    """The subformat qemu-img reads back from the file's own descriptor."""
    info = subprocess.run(
        ["qemu-img", "info", "--output", "json", str(path)],
        check=True,
        capture_output=True,
        text=True,
    )
    return str(json.loads(info.stdout)["format-specific"]["data"]["create-type"])


def sha512_of(path: Path) -> str:
    digest = hashlib.sha512()
    with path.open("rb") as source:
        while chunk := source.read(4 * MIB):
            digest.update(chunk)
    return digest.hexdigest()


def unique(stem: str) -> str:
    """An image name no other scenario or earlier run uses."""
    return f"conformance-{stem}-{uuid.uuid4().hex[:8]}"


def cloud_of(target: Target) -> CloudSettings:
    return load_cloud_settings(
        {},
        overrides={
            "auth_url": target.auth_url,
            "username": target.username,
            "password": target.password,
            "user_domain_name": target.domain,
            "project_name": target.project_name,
            "project_domain_name": target.domain,
        },
    )


def os_environment(target: Target, database_url: str | None = None) -> dict[str, str]:
    """This process's environment with OS_* pointing at the target, as an operator sets it."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("OS_")}
    env.update(
        OS_AUTH_URL=target.auth_url,
        OS_USERNAME=target.username,
        OS_PASSWORD=target.password,
        OS_PROJECT_NAME=target.project_name,
        OS_USER_DOMAIN_NAME=target.domain,
        OS_PROJECT_DOMAIN_NAME=target.domain,
    )
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    return env


def write_manifest(directory: Path, job: str, disks: Mapping[str, Path]) -> Path:
    manifest = {
        "job": job,
        # No virtio rewrite: the sandbox would change the bytes, upstream Glance never does.
        "defaults": {"es_virtio_enabled": "no"},
        "disks": [{"source": str(path), "name": name} for name, path in disks.items()],
    }
    path = directory / f"{job}.json"
    path.write_text(json.dumps(manifest))
    return path


async def submit(database_url: str, directory: Path, disks: Mapping[str, Path]) -> uuid.UUID:
    """Queue the disks as one job through the manifest checks, as `vmdk-migrate submit` does."""
    return await _submit_file(database_url, write_manifest(directory, unique("job"), disks))


async def submit_document(
    database_url: str, directory: Path, manifest: Mapping[str, Any]
) -> uuid.UUID:
    """Queue a manifest written out as it is, through the manifest checks."""
    path = directory / f"{manifest['job']}.json"
    path.write_text(json.dumps(manifest))
    return await _submit_file(database_url, path)


async def _submit_file(database_url: str, path: Path) -> uuid.UUID:
    # In a thread: a URL source's checks ask a server that may run on this event loop.
    loaded = await asyncio.to_thread(load_manifest, path)
    async with open_store(database_url) as store:
        return await store.submit_job(
            loaded.job, manifest=loaded.document, manifest_sha256=loaded.sha256
        )


async def queue_unchecked(
    database_url: str, name: str, path: Path, size: int, *, job_stem: str = "unchecked"
) -> uuid.UUID:
    """Straight into the queue, past the manifest checks (which would refuse the file)."""
    job = JobSpec(
        name=unique(job_stem),
        disks=(
            DiskSpec(
                disk_index=0,
                name=name,
                source=str(path),
                size_bytes=size,
                properties={"es_virtio_enabled": "no"},
            ),
        ),
    )
    async with open_store(database_url) as store:
        return await store.submit_job(
            job,
            manifest={"job": job.name, "disks": [{"source": str(path), "name": name}]},
            manifest_sha256=hashlib.sha256(name.encode()).hexdigest(),
        )


async def rows_of(database_url: str, job_id: uuid.UUID) -> dict[str, ResultRow]:
    async with open_store(database_url) as store:
        return {row.image_name: row for row in await store.result_rows(job_id)}


async def run_batch(database_url: str, target: Target, **settings: Any) -> RunSummary:
    """One `run --once` in this process; a batch that hangs fails the scenario."""
    options: dict[str, Any] = {
        "once": True,
        "idle_poll_s": 0.1,
        "heartbeat_s": 1.0,
        "policies": FAST,
        "progress": "off",
        **settings,
    }
    async with asyncio.timeout(BATCH_TIMEOUT_S):
        return await run_worker(
            database_url=database_url,
            cloud=cloud_of(target),
            settings=WorkerSettings(**options),
            stop=asyncio.Event(),
        )


async def images_named(target: Target, name: str) -> list[dict[str, Any]]:
    async with (
        target.session() as http,
        http.get(target.glance("/v2/images"), params={"name": name}) as answer,
    ):
        assert answer.status == 200, await answer.text()
        body = await answer.json(content_type=None)
    return list(body["images"])


async def image_answer(target: Target, image_id: object) -> tuple[int, dict[str, Any]]:
    async with (
        target.session() as http,
        http.get(target.glance(f"/v2/images/{image_id}")) as answer,
    ):
        body = await answer.json(content_type=None) if answer.status == 200 else {}
        return answer.status, body


async def run_python_module(
    module: str,
    *args: str,
    env: Mapping[str, str],
    timeout_s: float,
    merge_stderr: bool = False,
) -> tuple[int, str, str]:
    """`python -m MODULE ARGS` from the project root, waited for: its exit code, stdout and
    stderr (with `merge_stderr`, stderr goes into stdout in the order written, and is "")."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        env=dict(env),
        cwd=PROJECT_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT if merge_stderr else asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=timeout_s)
    assert process.returncode is not None
    return process.returncode, out.decode(), (err or b"").decode()


async def start_worker(
    env: Mapping[str, str], log_path: Path, *args: str
) -> asyncio.subprocess.Process:
    """`python -m worker run ...` with JSON logs into `log_path` (a pipe nobody reads would
    fill up and stall a worker that runs for a minute)."""
    with log_path.open("ab") as log:
        return await asyncio.create_subprocess_exec(
            *WORKER_CLI,
            "run",
            "--metrics-port",
            "0",
            "--progress",
            "off",
            *args,
            env=dict(env),
            cwd=PROJECT_ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=log,
        )


async def finished(process: asyncio.subprocess.Process, timeout_s: float = BATCH_TIMEOUT_S) -> int:
    try:
        return await asyncio.wait_for(process.wait(), timeout=timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise


def log_events(log_path: Path) -> list[dict[str, Any]]:
    events = []
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


async def wait_for_row(
    database_url: str, name: str, condition: str, *, timeout_s: float
) -> asyncpg.Record:
    """Poll the image's row until the SQL `condition` on it holds; the row as it was then."""
    query = f"SELECT *, ({condition}) AS reached FROM results WHERE image_name = $1"
    conn = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            row = await conn.fetchrow(query, name)
            if row is not None and row["reached"]:
                return row
            assert time.monotonic() < deadline, f"{name}: never {condition}; row: {row}"
            await asyncio.sleep(POLL_INTERVAL_S)
    finally:
        await conn.close()


async def refusal(call: Awaitable[object]) -> tuple[str, int | None]:
    """The error class and HTTP status a call raised, or ("no error", None)."""
    try:
        await call
    except MigrationError as exc:
        return type(exc).__name__, exc.status
    return "no error", None


async def settled_active(glance: GlanceClient, image_id: str) -> None:
    """Wait until the image is active and Glance has also closed its import task and lock
    (it flips the status first; a request racing those last writes can fail on SQLite)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        image = await glance.get_image(image_id)
        tasks = await glance.image_tasks(image_id)
        ended = bool(tasks) and tasks[-1].status in ("success", "failure")
        if image.status == "active" and ended and "os_glance_import_task" not in image.properties:
            return
        assert time.monotonic() < deadline, f"import did not settle: {image}, {tasks}"
        await asyncio.sleep(POLL_INTERVAL_S * 5)


@asynccontextmanager
async def short_lived_tokens(target: Target) -> AsyncIterator[tuple[Target, float]]:
    """The target with the token lifetime it issues: a sandbox of its own with a short TTL,
    or the real stack, whose Keystone run.py starts with a short `[token] expiration`."""
    if target.name == "sandbox":
        async with sandbox_target(SandboxConfig(token_ttl_s=SANDBOX_TOKEN_TTL_S)) as sandbox:
            yield sandbox, SANDBOX_TOKEN_TTL_S
        return
    lifetime_s = float(target.extra.get("REAL_GLANCE_TOKEN_EXPIRATION_S", "86400"))
    if lifetime_s > LONGEST_TOKEN_S:
        pytest.skip(f"Keystone issues {lifetime_s:g} s tokens: run with --token-expiration-s 60")
    yield target, lifetime_s


async def submit_small(database_url: str, tmp_path: Path, name: str) -> uuid.UUID:
    disk = qemu_vmdk(
        tmp_path / f"{name}.vmdk",
        "streamOptimized",
        data_bytes=MIB,
        virtual_bytes=VIRTUAL_SIZE_BYTES,
    )
    job_id = await submit(database_url, tmp_path, {name: disk})
    await wait_for_row(database_url, name, "phase IN ('done', 'failed')", timeout_s=60.0)
    return job_id


def first_token_expiry(log_path: Path) -> datetime:
    issued = [e for e in log_events(log_path) if e["event"] == "auth.token_issued"]
    assert issued, "the worker logged no auth.token_issued"
    return datetime.fromisoformat(issued[0]["expires_at"])


def info_requests(target: Target) -> dict[str, int] | None:
    """How often the real Glance's access log shows the worker's GET of each /v2/info path
    (None for the sandbox, which keeps no access log)."""
    base_dir = target.extra.get("REAL_GLANCE_BASE_DIR")
    if not base_dir:
        return None
    log = (Path(base_dir) / "log" / "glance-api-access.log").read_text(errors="replace")
    ours = [line for line in log.splitlines() if "vmdk-migrate/" in line]
    return {
        path: sum(f'"GET {path} ' in line for line in ours)
        for path in ("/v2/info/import", "/v2/info/stores", "/v2/info/usage")
    }


def preflight_table(text: str) -> dict[str, tuple[str, str]]:
    """check -> (status, detail), read from the columns of the table `validate --online` prints."""
    lines = text.splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith("CHECK "))
    status_at, detail_at = lines[start].index("STATUS"), lines[start].index("DETAIL")
    return {
        line[:status_at].strip(): (line[status_at:detail_at].strip(), line[detail_at:])
        for line in lines[start + 1 : -1]
    }
