"""Migration scenarios run by the real worker (run_worker and the CLI) on both targets alike."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
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
from worker.clients.glance import GlanceClient, open_glance
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

pytestmark = pytest.mark.conformance

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


# ---- disks, jobs, targets -----------------------------------------------------------------


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
    loaded = load_manifest(write_manifest(directory, unique("job"), disks))
    async with open_store(database_url) as store:
        return await store.submit_job(
            loaded.job, manifest=loaded.document, manifest_sha256=loaded.sha256
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


@pytest.fixture
async def made(target: Target) -> AsyncIterator[list[str]]:
    """Names of the images a scenario makes; whatever is left of them is deleted after."""
    names: list[str] = []
    yield names
    async with target.session() as http:
        for name in names:
            for image in await images_named(target, name):
                async with http.delete(target.glance(f"/v2/images/{image['id']}")):
                    pass


# ---- worker processes ---------------------------------------------------------------------


async def start_worker(
    env: Mapping[str, str], log_path: Path, *args: str
) -> asyncio.subprocess.Process:
    """`python -m worker run ...` with JSON logs into `log_path` (a pipe nobody reads would
    fill up and stall a worker that runs for a minute)."""
    with log_path.open("ab") as log:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "worker",
            "--log-format",
            "json",
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


# ---- scenarios ----------------------------------------------------------------------------


async def test_a_batch_of_qemu_img_disks_ends_done_with_sizes_and_hashes_verified(
    target: Target, database_url: str, tmp_path: Path, made: list[str]
) -> None:
    subformats = ["monolithicSparse", "streamOptimized", "monolithicSparse", "streamOptimized"]
    disks = {}
    for number, subformat in enumerate(subformats):
        name = unique(f"batch-{number}")
        disks[name] = qemu_vmdk(
            tmp_path / f"{name}.vmdk",
            subformat,
            data_bytes=(number + 1) * MIB,
            virtual_bytes=VIRTUAL_SIZE_BYTES,
        )
        assert create_type(disks[name]) == subformat
    made.extend(disks)
    job_id = await submit(database_url, tmp_path, disks)

    # One image at a time, so that this also holds on the SQLite fallback, where two imports
    # at once can hang an import task for good; test_production.py runs batches at
    # --concurrency 8 when Glance is on MariaDB.
    summary = await run_batch(database_url, target, concurrency=1)

    assert summary.by_phase == {"done": len(disks)}
    rows = await rows_of(database_url, job_id)
    for name, path in disks.items():
        row, digest = rows[name], sha512_of(path)
        assert (row.phase, row.verification, row.error_code) == ("done", "verified", None)
        assert row.glance_size == row.source_size_bytes == path.stat().st_size
        assert row.source_hash_value == row.glance_os_hash_value == digest
        assert row.glance_os_hash_algo == "sha512"
        status, image = await image_answer(target, row.glance_image_id)
        assert status == 200
        assert (image["name"], image["status"]) == (name, "active")
        assert image["os_hash_value"] == digest
        assert image["virtual_size"] == VIRTUAL_SIZE_BYTES


async def test_a_non_vmdk_file_forced_past_preflight_fails_with_import_failed(
    target: Target, database_url: str, tmp_path: Path, made: list[str]
) -> None:
    name = unique("not-vmdk")
    made.append(name)
    path = tmp_path / "random.vmdk"
    path.write_bytes(os.urandom(MIB))
    # Straight into the queue: the manifest checks would refuse this file before a byte moved.
    job = JobSpec(
        name=unique("forced"),
        disks=(
            DiskSpec(
                disk_index=0,
                name=name,
                source=str(path),
                size_bytes=MIB,
                properties={"es_virtio_enabled": "no"},
            ),
        ),
    )
    async with open_store(database_url) as store:
        job_id = await store.submit_job(
            job,
            manifest={"job": job.name, "disks": [{"source": str(path), "name": name}]},
            manifest_sha256=hashlib.sha256(name.encode()).hexdigest(),
        )

    summary = await run_batch(database_url, target)

    assert summary.by_phase == {"failed": 1}
    row = (await rows_of(database_url, job_id))[name]
    assert (row.phase, row.error_code, row.cleanup) == ("failed", "import_failed", "deleted")
    assert row.error_message
    assert (await image_answer(target, row.glance_image_id))[0] == 404
    assert await images_named(target, name) == []


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


async def test_glance_client_maps_each_refusal_to_its_error_class(
    target: Target, tmp_path: Path, made: list[str]
) -> None:
    name = unique("refusals")
    made.append(name)
    disk = qemu_vmdk(
        tmp_path / "disk.vmdk", "monolithicSparse", data_bytes=MIB, virtual_bytes=VIRTUAL_SIZE_BYTES
    )
    size_bytes = disk.stat().st_size
    outcomes = {}
    async with open_glance(cloud_of(target)) as glance:
        body = {"name": name, "disk_format": "vmdk", "container_format": "bare"}
        image_id = (await glance.create_image(body)).id
        request_id = f"req-{uuid.uuid4()}"
        outcomes["import never staged"] = await refusal(
            glance.import_image(image_id, request_id=request_id)
        )
        await glance.stage(image_id, disk, size_bytes=size_bytes)
        # Its own session: real Glance refuses this upload before reading the body and then
        # drops the connection, which aiohttp has already pooled; the next request sent on it
        # would fail as ConnectionFailed (retryable, so the worker copes) whatever its answer.
        async with open_glance(cloud_of(target)) as once:
            outcomes["stage after stage"] = await refusal(
                once.stage(image_id, disk, size_bytes=size_bytes)
            )
        await glance.import_image(image_id, request_id=f"req-{uuid.uuid4()}")
        await settled_active(glance, image_id)
        outcomes["import after active"] = await refusal(
            glance.import_image(image_id, request_id=f"req-{uuid.uuid4()}")
        )
        await glance.delete_image(image_id)
        outcomes["delete twice"] = await refusal(glance.delete_image(image_id))

    assert outcomes == {
        "import never staged": ("Conflict", 409),
        "stage after stage": ("Conflict", 409),
        "import after active": ("Conflict", 409),
        "delete twice": ("NotFound", 404),
    }


@pytest.fixture(scope="module")
def big_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A monolithicSparse VMDK with 256 MiB of random data, made once for both targets."""
    directory = tmp_path_factory.mktemp("big")
    return qemu_vmdk(
        directory / "big.vmdk",
        "monolithicSparse",
        data_bytes=KILLED_DISK_DATA_BYTES,
        virtual_bytes=KILLED_DISK_VIRTUAL_BYTES,
    )


async def test_a_worker_killed_mid_stage_finishes_the_image_after_a_restart(
    target: Target, database_url: str, big_disk: Path, tmp_path: Path, made: list[str]
) -> None:
    name = unique("killed")
    made.append(name)
    job_id = await submit(database_url, tmp_path, {name: big_disk})
    env = os_environment(target, database_url)
    log_path = tmp_path / "worker.log"

    # A short lease, so that the restarted worker may take the image over within seconds.
    first = await start_worker(env, log_path, "--once", "--lease", "2")
    try:
        mid_stage = await wait_for_row(
            database_url, name, "phase = 'staging' AND bytes_staged > 0", timeout_s=60.0
        )
    finally:
        first.send_signal(signal.SIGKILL)
        await first.wait()
    assert first.returncode == -signal.SIGKILL
    killed = await wait_for_row(database_url, name, "true", timeout_s=1.0)
    assert killed["phase"] == "staging", f"the stage ended before the kill: {dict(killed)}"
    assert 0 < mid_stage["bytes_staged"] < killed["source_size_bytes"]

    await wait_for_row(database_url, name, "lease_expires_at < now()", timeout_s=10.0)
    second = await start_worker(env, log_path, "--once")
    assert await finished(second) == 0, log_path.read_text()[-3000:]

    row = (await rows_of(database_url, job_id))[name]
    assert (row.phase, row.verification, row.attempts) == ("done", "verified", 2)
    assert row.glance_os_hash_value == sha512_of(big_disk)
    images = await images_named(target, name)
    assert [(image["id"], image["status"]) for image in images] == [
        (str(row.glance_image_id), "active")
    ]


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


async def test_a_token_that_expires_mid_batch_is_renewed(
    target: Target, database_url: str, tmp_path: Path, made: list[str]
) -> None:
    names = [unique(f"token-{number}") for number in range(5)]
    made.extend(names)
    log_path = tmp_path / "worker.log"
    async with short_lived_tokens(target) as (cloud, lifetime_s):
        worker = await start_worker(os_environment(cloud, database_url), log_path)
        try:
            job_ids = [await submit_small(database_url, tmp_path, names[0])]
            expiry = first_token_expiry(log_path)
            # Small disks paced over the first token's life; the last comes after it expired,
            # so only a renewed token can migrate it.
            for name, before_expiry_s in zip(
                names[1:],
                [0.75 * lifetime_s, 0.5 * lifetime_s, 0.25 * lifetime_s, -1.0],
                strict=True,
            ):
                due_s = expiry.timestamp() - before_expiry_s
                await asyncio.sleep(max(0.0, due_s - time.time()))
                job_ids.append(await submit_small(database_url, tmp_path, name))
        finally:
            worker.send_signal(signal.SIGTERM)
            assert await finished(worker, timeout_s=30.0) == 0, log_path.read_text()[-3000:]

    rows = [row for job_id in job_ids for row in (await rows_of(database_url, job_id)).values()]
    assert [(row.phase, row.verification) for row in rows] == [("done", "verified")] * 5
    events = [e["event"] for e in log_events(log_path)]
    assert events.count("auth.token_issued") == 1
    assert events.count("auth.token_renewed") >= 1, events
    assert rows[-1].finished_at is not None
    assert rows[-1].finished_at > expiry


async def test_validate_online_reads_the_cloud_and_exits_0(target: Target, tmp_path: Path) -> None:
    name = unique("validate")
    disk = qemu_vmdk(
        tmp_path / "disk.vmdk", "streamOptimized", data_bytes=MIB, virtual_bytes=VIRTUAL_SIZE_BYTES
    )
    manifest = write_manifest(tmp_path, name, {name: disk})
    requests_before = info_requests(target)

    done = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "validate",
        "--online",
        str(manifest),
        env=os_environment(target),
        cwd=PROJECT_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(done.communicate(), timeout=60)

    text = out.decode()
    assert done.returncode == 0, text + err.decode()
    findings = preflight_table(text)
    assert all(status != "BLOCKING" for status, _ in findings.values()), text
    assert findings["import method"] == (
        "ok",
        "glance-direct is enabled (glance-direct, web-download, copy-image)",
    )
    assert findings["stores"] == ("ok", "1 store(s): fs (default)")
    assert findings["quota"] == ("ok", "no unified limits reported: Glance enforces no quota")
    assert text.rstrip().endswith("the cloud can take this job")
    if requests_before is not None:
        after = info_requests(target)
        assert after is not None
        assert {path: after[path] - requests_before[path] for path in after} == {
            "/v2/info/import": 1,
            "/v2/info/stores": 1,
            "/v2/info/usage": 1,
        }


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
