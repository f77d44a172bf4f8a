"""Every injected fault ends its image `done` (transient) or `failed` with the right code
(permanent), with every retry in the events table and no stray image left in the cloud."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs

from tests.fixtures.batch import FAST, cloud_for, migrate, rows_of, submit
from tests.fixtures.cli import run_cli as vmdk_migrate
from tests.fixtures.cli import submit as submit_cli
from tests.fixtures.cli import write_job
from tests.fixtures.db import wait_for
from tests.fixtures.dblink import DatabaseLink
from worker.core.model import next_image_id
from worker.run.app import run_worker
from worker.run.consumer import RunSummary
from worker.run.settings import WorkerSettings
from worker.sandbox import Fault, Sandbox, SandboxConfig
from worker.store.problems import database_reason
from worker.store.sql import QUERIES
from worker.store.store import ResultRow, open_store

STAGE = r"/v2/images/[^/]+/stage"
IMPORT = r"/v2/images/[^/]+/import"
IMAGE = r"/v2/images/[^/]+"
CREATE = r"/v2/images"


async def only_row(database_url: str, job_id: str) -> ResultRow:
    (row,) = (await rows_of(database_url, job_id)).values()
    return row


async def events_of(database_url: str, job_id: str, name: str) -> list[dict[str, Any]]:
    async with open_store(database_url) as store:
        (job,) = await store.find_job_ids(job_id)
        return [e for e in await store.events(job_id=job) if e["event"] == name]


def assert_only_image_is(sandbox: Sandbox, row: ResultRow) -> None:
    """The row's image is the one image in the cloud, active, with the source's size and hash."""
    (image,) = sandbox.images()
    assert image["id"] == str(row.glance_image_id)
    assert image["status"] == "active"
    assert image["size"] == row.source_size_bytes
    assert image["os_hash_value"] == row.source_hash_value


# --- transient faults: the image ends done -----------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", CREATE, 500),
        ("PUT", STAGE, 502),
        ("POST", IMPORT, 503),
        ("GET", IMAGE, 504),
    ],
)
async def test_server_errors_on_any_call_are_retried_to_done(
    database_url: str, sandbox: Sandbox, tmp_path: Path, method: str, path: str, status: int
) -> None:
    job_id, _ = await submit(database_url, tmp_path, ["flaky"])
    sandbox.inject(Fault(method, path, status=status, times=2))

    summary = await migrate(database_url, sandbox)

    assert summary.by_phase == {"done": 1}
    row = await only_row(database_url, job_id)
    assert row.verification == "verified"
    assert_only_image_is(sandbox, row)
    retries = await events_of(database_url, job_id, "image.retry_scheduled")
    assert [e["detail"]["error_code"] for e in retries] == ["cloud_unavailable"] * 2
    assert all(e["detail"]["reason"].startswith("cloud_unavailable") for e in retries)


async def test_connection_reset_in_the_middle_of_a_stage_is_staged_again(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    job_id, paths = await submit(database_url, tmp_path, ["reset"])
    size = paths["reset"].stat().st_size
    sandbox.inject(Fault("PUT", STAGE, reset_after_bytes=size // 3, times=1))

    summary = await migrate(database_url, sandbox)

    assert summary.by_phase == {"done": 1}
    row = await only_row(database_url, job_id)
    assert_only_image_is(sandbox, row)
    # The first stage was cut off unanswered (status 0); a second one carried the data.
    stages = [r for r in sandbox.requests if r.method == "PUT" and r.path.endswith("/stage")]
    assert [r.status for r in stages] == [0, 204]
    retries = await events_of(database_url, job_id, "image.retry_scheduled")
    assert [e["detail"]["error_code"] for e in retries] == ["connection_failed"]
    assert row.bytes_staged == size


async def test_a_stage_whose_answer_is_lost_is_not_sent_twice_but_imported(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    job_id, _ = await submit(database_url, tmp_path, ["lost-answer"])
    sandbox.inject(Fault("PUT", STAGE, drop_response=True, times=1))

    summary = await migrate(database_url, sandbox)

    assert summary.by_phase == {"done": 1}
    row = await only_row(database_url, job_id)
    assert_only_image_is(sandbox, row)
    # The data arrived once; whatever was sent again was refused (409) and the worker
    # looked at the image, found it staged with the right size, and imported it.
    stages = [r for r in sandbox.requests if r.method == "PUT" and r.path.endswith("/stage")]
    first, *again = [r.status for r in stages]
    assert first == 0
    assert again
    assert set(again) == {409}
    assert await events_of(database_url, job_id, "image.conflict_inspecting")
    # The hash of the upload was lost with the answer: the source was hashed again.
    assert await events_of(database_url, job_id, "image.hashed")
    assert row.verification == "verified"


async def test_rate_limit_waits_as_long_as_retry_after_says(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    job_id, _ = await submit(database_url, tmp_path, ["limited"])
    sandbox.inject(Fault("POST", IMPORT, status=429, retry_after_s=0.4, times=1))

    summary = await migrate(database_url, sandbox)

    assert summary.by_phase == {"done": 1}
    assert_only_image_is(sandbox, await only_row(database_url, job_id))
    (retry,) = await events_of(database_url, job_id, "image.retry_scheduled")
    assert retry["detail"]["error_code"] == "rate_limited"
    # FAST's backoff is at most 0.2 s: the 0.4 s came from the cloud.
    assert retry["detail"]["delay_s"] == pytest.approx(0.4)
    assert "Retry-After 0.4 s" in retry["detail"]["reason"]


async def test_a_server_that_stalls_times_out_and_is_asked_again(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    job_id, _ = await submit(database_url, tmp_path, ["stalled"])
    sandbox.inject(Fault("POST", IMPORT, stall_s=1.5, times=1))
    # The read timeout (OS_... or clouds.yaml; 300 s by default), shortened for the test.
    summary = await migrate(database_url, sandbox, cloud_overrides={"read_timeout_s": 0.5})

    assert summary.by_phase == {"done": 1}
    assert_only_image_is(sandbox, await only_row(database_url, job_id))
    retries = await events_of(database_url, job_id, "image.retry_scheduled")
    assert [e["detail"]["error_code"] for e in retries] == ["request_timeout"]


async def test_quota_413_on_stage_is_back_pressure_and_retried(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    job_id, _ = await submit(database_url, tmp_path, ["waits"])
    quota_text = (
        "The request returned a 413 Request Entity Too Large. Resource image_stage_total is"
        " over limit of 100 due to current usage 100 and delta 1"
    )
    sandbox.inject(Fault("PUT", STAGE, status=413, body=quota_text, times=1))

    summary = await migrate(database_url, sandbox)

    assert summary.by_phase == {"done": 1}
    assert_only_image_is(sandbox, await only_row(database_url, job_id))
    (retry,) = await events_of(database_url, job_id, "image.retry_scheduled")
    assert retry["detail"]["error_code"] == "quota_exceeded"
    assert retry["detail"]["delay_s"] >= FAST.retry.quota_delay_s


async def test_409_on_stage_means_stale_staged_data_and_the_image_is_made_again(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    job_id, _ = await submit(database_url, tmp_path, ["stale"])
    first_id = (await only_row(database_url, job_id)).glance_image_id
    sandbox.inject(Fault("PUT", STAGE, status=409, times=1))

    summary = await migrate(database_url, sandbox)

    assert summary.by_phase == {"done": 1}
    row = await only_row(database_url, job_id)
    # Glance keeps a refused image's stale staged file: the worker deleted it and made a
    # new one under the next id of its own choosing, stored before it was used.
    assert row.glance_image_id == next_image_id(first_id)
    assert_only_image_is(sandbox, row)
    assert await events_of(database_url, job_id, "image.recreating")


@pytest.mark.parametrize(
    "sandbox_config",
    [SandboxConfig(token_ttl_s=1.0, stage_rate_bytes_per_s=128 << 10, import_latency_s=0.1)],
    indirect=True,
)
async def test_a_stage_that_outlives_its_token_completes_and_the_next_call_renews(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    job_id, paths = await submit(database_url, tmp_path, ["slow"])
    # ~2 s of upload at the sandbox's slow link, twice the token's life.
    assert paths["slow"].stat().st_size / (128 << 10) > 1.5

    summary = await migrate(database_url, sandbox)

    assert summary.by_phase == {"done": 1}
    assert_only_image_is(sandbox, await only_row(database_url, job_id))
    stages = [r for r in sandbox.requests if r.method == "PUT" and r.path.endswith("/stage")]
    assert [r.status for r in stages] == [204]  # one stage, never cut off or repeated
    assert sandbox.issued_tokens >= 2
    assert await events_of(database_url, job_id, "image.retry_scheduled") == []


# --- permanent faults: the image fails with its code and leaves nothing behind ------------------


async def test_size_cap_413_is_permanent_and_the_image_is_deleted(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    job_id, _ = await submit(database_url, tmp_path, ["huge"])
    sandbox.inject(Fault("PUT", STAGE, status=413, body="The incoming image is too large"))

    summary = await migrate(database_url, sandbox)

    assert summary.by_phase == {"failed": 1}
    row = await only_row(database_url, job_id)
    assert (row.error_code, row.cleanup) == ("image_too_large", "deleted")
    assert sandbox.images() == []
    assert await events_of(database_url, job_id, "image.retry_scheduled") == []


async def test_server_errors_that_never_stop_exhaust_the_attempts(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    job_id, _ = await submit(database_url, tmp_path, ["down"])
    sandbox.inject(Fault("POST", IMPORT, status=503, times=100))

    summary = await migrate(database_url, sandbox)

    assert summary.by_phase == {"failed": 1}
    row = await only_row(database_url, job_id)
    assert (row.error_code, row.cleanup) == ("cloud_unavailable", "deleted")
    assert sandbox.images() == []
    retries = await events_of(database_url, job_id, "image.retry_scheduled")
    assert len(retries) == FAST.retry.max_attempts - 1


IMPORT_FAILURES = SandboxConfig(
    import_latency_s=0.05,
    virtio_fail_names=("virtio",),
    import_fail_names=("task",),
    revert_names=("revert",),
    rewrite_virtio=False,
)


@pytest.mark.parametrize("sandbox_config", [IMPORT_FAILURES], indirect=True)
@pytest.mark.parametrize(
    ("name", "code"),
    [("virtio", "virtio_failed"), ("task", "import_failed"), ("revert", "import_reverted")],
)
@pytest.mark.parametrize("on_failure", ["delete", "keep"])
async def test_import_failures_fail_with_their_code_and_clean_up_as_asked(
    database_url: str, sandbox: Sandbox, tmp_path: Path, name: str, code: str, on_failure: str
) -> None:
    job_id, _ = await submit(database_url, tmp_path, [name], es_virtio_enabled="yes")
    if on_failure == "keep":
        async with open_store(database_url) as store:
            (job,) = await store.find_job_ids(job_id)
        conn = await _connect(database_url)
        await conn.execute("UPDATE jobs SET on_failure = 'keep' WHERE id = $1", job)
        await conn.close()

    summary = await migrate(database_url, sandbox)

    assert summary.by_phase == {"failed": 1}
    row = await only_row(database_url, job_id)
    assert row.error_code == code
    if on_failure == "delete":
        assert row.cleanup == "deleted"
        assert sandbox.images() == []
    else:
        # Kept on purpose, and the row says so: the one image left is the row's own.
        assert row.cleanup == "kept"
        assert [image["id"] for image in sandbox.images()] == [str(row.glance_image_id)]


async def _connect(database_url: str) -> asyncpg.Connection:
    return await asyncpg.connect(database_url)


# --- operator controls ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sandbox_config", [SandboxConfig(stage_rate_bytes_per_s=64 << 10)], indirect=True
)
async def test_cancel_stops_images_in_flight_cleans_them_up_and_starts_nothing_new(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    names = [f"c{n}" for n in range(6)]
    job_id, _ = await submit(database_url, tmp_path, names)
    async with running_worker(database_url, sandbox, concurrency=2) as worker:
        conn = await _connect(database_url)
        try:
            await wait_for(conn, "SELECT count(*) = 2 FROM results WHERE phase = 'staging'")
            async with open_store(database_url) as store:
                (job,) = await store.find_job_ids(job_id)
                result = await store.cancel_job(job, by="operator")
            await wait_for(
                conn, "SELECT count(*) = 0 FROM results WHERE phase NOT IN ('done', 'failed')"
            )
        finally:
            await conn.close()
        worker.stop.set()

    assert result is not None
    assert (result.not_started, result.in_flight) == (4, 2)
    rows = await rows_of(database_url, job_id)
    assert {row.phase for row in rows.values()} == {"failed"}
    assert {row.error_code for row in rows.values()} == {"cancelled"}
    in_flight = [row for row in rows.values() if row.cleanup is not None]
    assert [row.cleanup for row in in_flight] == ["deleted", "deleted"]
    assert sandbox.images() == []
    assert sandbox.count("POST", "/image" + CREATE) == 2  # nothing new started after the cancel


async def test_retry_requeues_failed_rows_only_and_never_migrates_a_done_row_twice(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    job_id, _ = await submit(database_url, tmp_path, ["good", "unlucky"])
    sandbox.inject(Fault("POST", IMPORT, status=400, times=1))  # permanent: one image fails
    first = await migrate(database_url, sandbox, concurrency=1)
    assert first.by_phase == {"done": 1, "failed": 1}
    before = await rows_of(database_url, job_id)
    done_name = next(name for name, row in before.items() if row.phase == "done")
    creates_before = sandbox.count("POST", "/image" + CREATE)

    async with open_store(database_url) as store:
        (job,) = await store.find_job_ids(job_id)
        assert await store.retry_job(job, by="operator") == 1
    second = await migrate(database_url, sandbox)

    assert second.by_phase == {"done": 1}
    after = await rows_of(database_url, job_id)
    assert {row.phase for row in after.values()} == {"done"}
    assert after[done_name].finished_at == before[done_name].finished_at  # untouched
    assert (
        sandbox.count("POST", "/image" + CREATE) == creates_before + 1
    )  # only the failed one again
    assert sorted(image["name"] for image in sandbox.images()) == ["good", "unlucky"]
    assert len(await events_of(database_url, job_id, "image.requeued")) == 1


@dataclasses.dataclass
class RunningWorker:
    stop: asyncio.Event
    task: asyncio.Task[RunSummary]


@contextlib.asynccontextmanager
async def running_worker(
    database_url: str, sb: Sandbox, **settings: Any
) -> AsyncIterator[RunningWorker]:
    """A worker running in this process until the block ends (stop is set, or on exit)."""
    stop = asyncio.Event()
    options: dict[str, Any] = {"idle_poll_s": 0.05, "heartbeat_s": 0.2, "policies": FAST}
    options.update(settings)
    task = asyncio.create_task(
        run_worker(
            database_url=database_url,
            cloud=cloud_for(sb),
            settings=WorkerSettings(**options),
            stop=stop,
        )
    )
    worker = RunningWorker(stop, task)
    try:
        yield worker
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)


# --- the database goes away ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "sandbox_config", [SandboxConfig(stage_rate_bytes_per_s=256 << 10)], indirect=True
)
async def test_database_outage_mid_run_is_waited_out_and_no_outcome_is_lost(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    names = [f"pg{n}" for n in range(6)]
    job_id, _ = await submit(database_url, tmp_path, names)
    link = DatabaseLink(database_url)
    await link.up()
    conn = await _connect(database_url)
    try:
        with capture_logs() as logs:
            run = asyncio.create_task(migrate(link.dsn, sandbox, concurrency=3))
            await wait_for(conn, "SELECT count(*) >= 2 FROM results WHERE phase = 'staging'")
            await link.down()  # as if PostgreSQL restarted: every connection reset
            await asyncio.sleep(2.0)  # while the uploads go on and finish
            await link.up()
            summary = await asyncio.wait_for(run, timeout=60)
    finally:
        await conn.close()
        await link.down()

    assert summary.by_phase == {"done": 6}
    reconnecting = [entry for entry in logs if entry["event"] == "db.reconnecting"]
    assert reconnecting
    # Said in an operator's words, never as an exception's class name.
    assert not [e["error"] for e in reconnecting if re.search(r"[a-z]Error\b", e["error"])]
    rows = await rows_of(database_url, job_id)
    assert {row.phase for row in rows.values()} == {"done"}
    images = {image["id"]: image for image in sandbox.images()}
    assert sorted(images) == sorted(str(row.glance_image_id) for row in rows.values())
    for row in rows.values():
        assert images[str(row.glance_image_id)]["os_hash_value"] == row.source_hash_value
    # Each step was written once, even those whose answer was lost with the connection.
    for name in ("image.staged", "image.finished"):
        assert len(await events_of(database_url, job_id, name)) == 6


async def test_a_statement_cut_off_by_an_outage_is_told_as_a_lost_connection(
    database_url: str,
) -> None:
    link = DatabaseLink(database_url)
    await link.up()
    watcher = await _connect(database_url)
    cut = await asyncpg.connect(link.dsn)
    try:
        sleeping = asyncio.create_task(cut.fetchval("SELECT pg_sleep(30)"))
        await wait_for(
            watcher,
            "SELECT count(*) > 0 FROM pg_stat_activity"
            " WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'",
        )
        await link.down()
        with pytest.raises(asyncpg.ConnectionDoesNotExistError) as caught:
            await sleeping
    finally:
        cut.terminate()
        await watcher.close()

    # Not "PostgreSQL said": the client noticed, the server said nothing.
    assert database_reason(caught.value) == (
        "connection lost (connection was closed in the middle of operation)"
    )


async def test_a_step_written_again_under_its_key_is_recorded_once(
    database_url: str, tmp_path: Path
) -> None:
    job_id, _ = await submit(database_url, tmp_path, ["once"])
    conn = await _connect(database_url)
    try:
        async with open_store(database_url) as store:
            (claim,) = await store.claim(worker_id="w1", limit=1, lease_s=30)
        key = uuid.uuid4()
        args = (claim.row.id, "w1", "image.staged", "staging", "req-1", None, key)
        staged = (5, None, "sha512", "h", None)
        # The second run is what Store.mark_staged sends when the first one's answer was lost.
        first = await conn.fetchrow(QUERIES["mark_staged"], *args, *staged)
        second = await conn.fetchrow(QUERIES["mark_staged"], *args, *staged)
    finally:
        await conn.close()

    assert first is not None
    assert second is not None
    assert (second["phase"], second["bytes_staged"]) == ("staging", 5)
    assert list(second["request_ids"]) == ["req-1"]
    assert len(await events_of(database_url, job_id, "image.staged")) == 1


async def test_cancel_and_retry_commands_from_the_command_line(
    database_url: str, sandbox: Sandbox, env: dict[str, str], tmp_path: Path
) -> None:
    job_id = await submit_cli(write_job(tmp_path, 3), env=env)

    assert (await vmdk_migrate("cancel", "no-such-job", env=env))[0] == 2
    code, out, _ = await vmdk_migrate("cancel", job_id, env=env)
    assert code == 0
    assert "3 image(s) will not start, 0 in flight" in out
    assert (await vmdk_migrate("run", "--once", env=env))[0] == 0  # nothing to do
    assert sandbox.images() == []

    code, out, _ = await vmdk_migrate("retry", "cli-job", env=env)
    assert code == 0
    assert "3 failed image(s) queued again" in out
    assert (await vmdk_migrate("run", "--once", env=env))[0] == 0
    rows = await rows_of(database_url, job_id)
    assert {row.phase for row in rows.values()} == {"done"}
    assert len(sandbox.images()) == 3
