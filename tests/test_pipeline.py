"""The whole worker end to end: manifest -> PostgreSQL -> sandbox cloud over HTTP -> rows."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any, cast

import asyncpg
import pytest
from structlog.testing import capture_logs

from tests.fixtures.batch import migrate, rows_of, sha512_of, submit
from worker.core.changes import Finished
from worker.core.events import Event
from worker.core.model import Phase
from worker.run.consumer import Consumer
from worker.run.settings import WorkerSettings
from worker.sandbox import Fault, Sandbox, SandboxConfig
from worker.store.store import Claim, ResultRow, StepEvent, Store, open_store


async def migrate_all(
    database_url: str, sandbox: Sandbox, tmp_path: Path, count: int, **settings: Any
) -> tuple[str, dict[str, Path]]:
    """Submit `count` disks (disk-0, disk-1, ...) and migrate them with `settings`: all end
    done. Returns the job id and each disk's path."""
    names = [f"disk-{n}" for n in range(count)]
    job_id, paths = await submit(database_url, tmp_path, names)

    summary = await migrate(database_url, sandbox, **settings)

    assert summary.by_phase == {"done": count}
    return job_id, paths


async def test_a_batch_ends_active_with_sizes_and_hashes_verified(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    job_id, paths = await migrate_all(
        database_url, sandbox, tmp_path, 6, concurrency=3, stage_concurrency=2
    )

    rows = await rows_of(database_url, job_id)
    images = {image["name"]: image for image in sandbox.images()}
    for name, path in paths.items():
        row = rows[name]
        assert row.phase == "done"
        assert row.verification == "verified"
        assert row.glance_status == "active"
        assert row.glance_size == row.source_size_bytes == path.stat().st_size
        assert row.source_hash_algo == "sha512"
        assert row.source_hash_value == row.glance_os_hash_value == sha512_of(path)
        assert row.glance_checksum == hashlib.md5(path.read_bytes()).hexdigest()
        assert row.bytes_staged == row.source_size_bytes
        assert row.claimed_at
        assert row.image_created_at
        assert row.staged_at
        assert row.import_requested_at
        assert row.finished_at
        assert row.import_request_id
        assert row.import_request_id in row.request_ids
        assert images[name]["id"] == str(row.glance_image_id)
        assert images[name]["status"] == "active"
    assert len(sandbox.images()) == 6
    # Imports are watched with shared list calls: an image is looked at alone only once, to
    # check its staged size.
    assert sandbox.count("GET", r"/image/v2/images/[^/]+") == 6
    assert sandbox.count("GET", r"/image/v2/images") >= 1


@pytest.mark.parametrize(
    "sandbox_config",
    [
        SandboxConfig(
            import_latency_s=0.05,
            virtio_fail_names=("bad-virtio",),
            import_fail_names=("bad-import",),
            revert_names=("bad-revert",),
            rewrite_virtio=False,
        )
    ],
    indirect=True,
)
async def test_each_failure_signal_fails_its_image_only_and_leaves_no_image(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    names = ["good-1", "bad-virtio", "bad-import", "bad-revert", "good-2"]
    job_id, _ = await submit(database_url, tmp_path, names, es_virtio_enabled="yes")

    summary = await migrate(database_url, sandbox, concurrency=5)

    rows = await rows_of(database_url, job_id)
    assert summary.by_phase == {"done": 2, "failed": 3}
    assert {n: rows[n].error_code for n in names} == {
        "good-1": None,
        "bad-virtio": "virtio_failed",
        "bad-import": "import_failed",
        "bad-revert": "import_reverted",
        "good-2": None,
    }
    for name in ("bad-virtio", "bad-import", "bad-revert"):
        assert rows[name].phase == "failed"
        assert rows[name].cleanup == "deleted"
        assert rows[name].error_message
    # The half-made images were deleted: only the good ones are left in the cloud.
    assert sorted(image["name"] for image in sandbox.images()) == ["good-1", "good-2"]


# A slow link (each stage takes ~0.3 s) so that, unbounded, all the stages would overlap.
@pytest.mark.parametrize(
    "sandbox_config", [SandboxConfig(stage_rate_bytes_per_s=1 << 20)], indirect=True
)
async def test_stages_in_flight_never_exceed_the_limit(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    await migrate_all(database_url, sandbox, tmp_path, 8, concurrency=8, stage_concurrency=2)

    # Seen from the cloud's side: never more than two uploads at once, and two did overlap.
    assert sandbox.peak_concurrent_stages == 2


async def test_bad_files_fail_alone_and_the_rest_of_the_batch_finishes(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    names = ["fine", "unreadable", "vanished", "shrinks"]
    job_id, paths = await submit(database_url, tmp_path, names)
    # A directory where the file was: unreadable even for root, unlike chmod 0.
    paths["unreadable"].unlink()
    paths["unreadable"].mkdir()
    paths["vanished"].unlink()
    original = paths["shrinks"].read_bytes()
    paths["shrinks"].write_bytes(original[: len(original) // 2])

    summary = await migrate(database_url, sandbox, concurrency=4)

    rows = await rows_of(database_url, job_id)
    assert summary.by_phase == {"done": 1, "failed": 3}
    assert rows["fine"].phase == "done"
    for name in ("unreadable", "vanished", "shrinks"):
        assert rows[name].phase == "failed"
        assert rows[name].error_code == "source_error"
    assert [image["name"] for image in sandbox.images()] == ["fine"]


@pytest.mark.parametrize(
    "sandbox_config", [SandboxConfig(token_ttl_s=1.0, import_latency_s=0.4)], indirect=True
)
async def test_tokens_that_expire_mid_batch_are_renewed(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    await migrate_all(database_url, sandbox, tmp_path, 4, concurrency=2, stage_concurrency=1)

    assert sandbox.issued_tokens >= 2


async def test_transient_cloud_errors_are_retried_and_recorded(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    job_id, _ = await submit(database_url, tmp_path, ["flaky"])
    sandbox.inject(Fault("POST", r"/v2/images$", status=503, times=2))
    sandbox.inject(Fault("PUT", r"/v2/images/[^/]+/stage", reset_after_bytes=4096, times=1))

    summary = await migrate(database_url, sandbox)

    assert summary.by_phase == {"done": 1}
    async with open_store(database_url) as store:
        ids = await store.find_job_ids(job_id)
        events = await store.events(job_id=ids[0])
    retries = [e for e in events if e["event"] == "image.retry_scheduled"]
    assert len(retries) == 3
    assert {e["detail"]["error_code"] for e in retries} == {  # type: ignore[index]
        "cloud_unavailable",
        "connection_failed",
    }


@pytest.mark.parametrize(
    "sandbox_config", [SandboxConfig(password="pw-7Qx2-distinctive")], indirect=True
)
async def test_secrets_reach_no_log_line_and_no_table(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    _job_id, _ = await submit(database_url, tmp_path, ["one", "two"])
    with capture_logs() as logs:
        summary = await migrate(database_url, sandbox)
    assert summary.by_phase == {"done": 2}

    text = json.dumps(logs, default=str)
    assert sandbox.password not in text
    assert "X-Auth-Token" not in text
    conn = await asyncpg.connect(database_url)
    try:
        dump = []
        for table in ("jobs", "results", "events"):
            dump += [str(dict(r)) for r in await conn.fetch(f"SELECT * FROM {table}")]
    finally:
        await conn.close()
    assert dump
    assert not any(sandbox.password in line for line in dump)
    for token in sandbox.token_values():
        assert token not in text
        assert not any(token in line for line in dump)


async def test_a_once_run_ends_when_its_last_image_does_not_at_the_next_idle_poll(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    names = [f"drained-{n}" for n in range(3)]
    await submit(database_url, tmp_path, names)
    # An idle poll an hour away: only the end of the last image can end the run in time.
    summary = await asyncio.wait_for(
        migrate(database_url, sandbox, concurrency=2, idle_poll_s=3600.0), timeout=60
    )
    assert summary.by_phase == {"done": 3}


class _ImageEndsDuringTheEmptyClaim:
    """A store whose first claim that finds nothing lets the image in flight end meanwhile."""

    def __init__(self, store: Store, image_may_end: asyncio.Event, image_ended: asyncio.Event):
        self._store = store
        self._image_may_end = image_may_end
        self._image_ended = image_ended

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def claim(self, **kwargs: Any) -> list[Claim]:
        claims = await self._store.claim(**kwargs)
        if not claims and not self._image_may_end.is_set():
            self._image_may_end.set()
            await self._image_ended.wait()
            await asyncio.sleep(0.2)  # the consumer takes note of the end meanwhile
        return claims


async def test_a_once_run_takes_a_row_left_claimable_by_an_image_that_ended_during_a_claim(
    database_url: str, tmp_path: Path
) -> None:
    # The image gives its row back (as one whose lease ran out would) while the worker asks
    # for more work: the empty answer is stale, and the run must not end on it.
    job_id, _ = await submit(database_url, tmp_path, ["given-back"])
    image_may_end, image_ended = asyncio.Event(), asyncio.Event()
    attempts = 0

    async with open_store(database_url) as store:

        async def run_image(claim: Claim, _: asyncio.Event) -> ResultRow:
            nonlocal attempts
            attempts += 1
            if attempts == 1:
                await image_may_end.wait()
                await store.release(worker_id="w-once", result_ids=[claim.row.id])
                image_ended.set()
                return claim.row
            return await store.finish(
                claim.row.id, Finished(Phase.DONE), StepEvent("w-once", Event.IMAGE_FINISHED)
            )

        consumer = Consumer(
            cast(Store, _ImageEndsDuringTheEmptyClaim(store, image_may_end, image_ended)),
            run_image,
            WorkerSettings(worker_id="w-once", concurrency=2, once=True, idle_poll_s=3600.0),
        )
        await asyncio.wait_for(consumer.run(asyncio.Event()), timeout=60)

    rows = await rows_of(database_url, job_id)
    assert rows["given-back"].phase == "done"
