"""The Store against a real PostgreSQL: submit, claim, leases, the steps' writes, summaries."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from unittest.mock import ANY
from uuid import UUID, uuid4

import asyncpg
import pytest

from tests.fixtures.db import wait_for
from worker.core import changes
from worker.core.events import Event
from worker.core.model import DiskSpec, JobSpec, Phase, Verification, image_id_for
from worker.store import LeaseLost, StepEvent, Store
from worker.store.sql import QUERIES, load_migrations
from worker.store.store import job_state


def make_job(disk_count: int, *, name: str = "job", size_bytes: int = 100) -> JobSpec:
    disks = tuple(
        DiskSpec(
            disk_index=i,
            name=f"{name}-disk-{i}",
            source=f"/srv/vmdk/{name}/{i}.vmdk",
            size_bytes=size_bytes,
            tags=("migrated", f"n{i}"),
            properties={"os_type": "linux", "hw_disk_bus": "scsi"},
            min_disk=i % 3,
        )
        for i in range(disk_count)
    )
    return JobSpec(name=name, disks=disks, on_failure="keep")


async def submit(store: Store, job: JobSpec, **kwargs: object) -> UUID:
    return await store.submit_job(
        job,
        manifest={"name": job.name, "disks": len(job.disks)},
        manifest_sha256="ab" * 32,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection to the test database, for assertions and for what no API does."""
    connection = await asyncpg.connect(database_url)
    yield connection
    await connection.close()


async def count(conn: asyncpg.Connection, table: str) -> int:
    return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))


# submit_job


async def test_submit_writes_the_job_a_pending_row_per_disk_and_an_event(
    store: Store, conn: asyncpg.Connection
) -> None:
    job = make_job(3)
    job_id = await submit(store, job, submitted_by="ops")

    rows = await store.result_rows(job_id)
    assert [r.disk_index for r in rows] == [0, 1, 2]
    assert {r.phase for r in rows} == {Phase.PENDING}
    assert [r.glance_image_id for r in rows] == [image_id_for(job_id, i) for i in range(3)]
    assert [r.attempts for r in rows] == [0, 0, 0]
    assert rows[1].spec["tags"] == ["migrated", "n1"]
    assert rows[1].disk_spec() == job.disks[1]

    jobs = await conn.fetch("SELECT * FROM jobs")
    assert len(jobs) == 1
    assert (jobs[0]["disk_count"], jobs[0]["total_bytes"], jobs[0]["on_failure"]) == (
        3,
        300,
        "keep",
    )
    assert jobs[0]["submitted_by"] == "ops"
    events = await store.events(job_id=job_id)
    assert [(e["event"], e["result_id"]) for e in events] == [("job.submitted", None)]


async def test_submit_of_ten_thousand_disks_in_one_call_writes_every_row(
    store: Store, conn: asyncpg.Connection
) -> None:
    job_id = await submit(store, make_job(10_000))

    rows = await store.result_rows(job_id)
    assert len(rows) == 10_000
    assert [r.disk_index for r in rows] == list(range(10_000))
    assert len({r.glance_image_id for r in rows}) == 10_000
    assert await count(conn, "results") == 10_000
    (summary,) = await store.job_summaries(str(job_id))
    assert summary.counts["pending"] == 10_000
    assert summary.total_bytes == 1_000_000


async def test_a_failing_submit_writes_nothing(store: Store, conn: asyncpg.Connection) -> None:
    good = make_job(3)
    # Two disks with one name break unique(job_id, image_name) after the job row is inserted.
    twin = DiskSpec(disk_index=3, name=good.disks[0].name, source="/srv/other.vmdk", size_bytes=1)
    clash = JobSpec(name="clash", disks=(*good.disks, twin))
    with pytest.raises(asyncpg.UniqueViolationError):
        await submit(store, clash)

    assert await count(conn, "jobs") == 0
    assert await count(conn, "results") == 0
    assert await count(conn, "events") == 0


# claim


async def test_claim_takes_oldest_job_first_in_disk_order_and_rebuilds_the_spec(
    store: Store,
) -> None:
    first = await submit(store, make_job(2, name="first"))
    second_job = make_job(2, name="second")
    await submit(store, second_job)

    claims = await store.claim(worker_id="w1", limit=3, lease_s=30)

    assert [(c.row.job_id == first, c.row.disk_index) for c in claims] == [
        (True, 0),
        (True, 1),
        (False, 0),
    ]
    assert claims[2].spec == second_job.disks[0]
    assert claims[2].on_failure == "keep"
    assert all(c.row.worker_id == "w1" and c.row.attempts == 1 for c in claims)
    assert all(c.row.lease_expires_at is not None for c in claims)
    events = await store.events(result_id=claims[0].row.id)
    assert [(e["event"], e["worker_id"]) for e in events] == [("image.claimed", "w1")]


async def test_concurrent_claims_on_one_pool_never_share_a_row(store: Store) -> None:
    await submit(store, make_job(10))

    batches = await asyncio.gather(
        *(store.claim(worker_id=f"w{i}", limit=3, lease_s=30) for i in range(5))
    )

    ids = [c.row.id for batch in batches for c in batch]
    assert len(ids) == 10
    assert len(set(ids)) == 10


async def _drain(store: Store, worker_id: str) -> list[int]:
    taken: list[int] = []
    while claims := await store.claim(worker_id=worker_id, limit=7, lease_s=30):
        taken.extend(c.row.id for c in claims)
    return taken


async def test_two_pools_claiming_until_empty_split_the_rows_without_overlap(
    store: Store, database_url: str
) -> None:
    await submit(store, make_job(300))
    other = await Store.connect(database_url)
    try:
        taken = await asyncio.gather(
            _drain(store, "a"), _drain(store, "b"), _drain(other, "c"), _drain(other, "d")
        )
    finally:
        await other.close()

    all_ids = [i for ids in taken for i in ids]
    assert len(all_ids) == 300
    assert len(set(all_ids)) == 300


async def test_expired_leases_are_reclaimed_and_the_old_holder_loses_the_row(
    store: Store,
) -> None:
    await submit(store, make_job(2))
    held = await store.claim(worker_id="w1", limit=2, lease_s=0.2)
    assert await store.claim(worker_id="w2", limit=2, lease_s=30) == []

    await asyncio.sleep(0.3)
    taken = await store.claim(worker_id="w2", limit=2, lease_s=30)

    assert sorted(c.row.id for c in taken) == sorted(c.row.id for c in held)
    assert {c.row.attempts for c in taken} == {2}
    row_id = held[0].row.id
    with pytest.raises(LeaseLost):
        await store.note(row_id, StepEvent("w1", Event.IMAGE_CREATING, Phase.CREATING))
    with pytest.raises(LeaseLost):
        await store.set_progress(row_id, worker_id="w1", bytes_staged=1)
    assert await store.heartbeat(worker_id="w1", result_ids=[row_id], lease_s=30) == set()


async def test_an_expired_lease_nobody_reclaimed_is_still_the_holders(store: Store) -> None:
    await submit(store, make_job(1))
    (claim,) = await store.claim(worker_id="w1", limit=1, lease_s=0.1)
    await asyncio.sleep(0.2)

    assert await store.heartbeat(worker_id="w1", result_ids=[claim.row.id], lease_s=30) == {
        claim.row.id
    }
    assert await store.claim(worker_id="w2", limit=1, lease_s=30) == []


async def test_a_claim_whose_answer_was_lost_is_handed_back_to_the_same_worker(
    store: Store,
) -> None:
    await submit(store, make_job(2))
    (lost,) = await store.claim(worker_id="w1", limit=1, lease_s=60)  # answer never arrived

    (again,) = await store.claim(worker_id="w1", limit=1, lease_s=60, working_on=[])
    assert again.row.id == lost.row.id
    # Not to another worker, and not while the worker says it is working on it.
    (other,) = await store.claim(worker_id="w2", limit=1, lease_s=60)
    assert other.row.id != lost.row.id
    assert await store.claim(worker_id="w1", limit=1, lease_s=60, working_on=[lost.row.id]) == []


async def test_a_worker_never_claims_a_row_it_runs_and_its_own_expired_lease_is_no_attempt(
    store: Store, conn: asyncpg.Connection
) -> None:
    await submit(store, make_job(2))
    (running,) = await store.claim(worker_id="w1", limit=1, lease_s=30)
    # The lease ran out in a database outage, before a heartbeat could renew it.
    await conn.execute("UPDATE results SET lease_expires_at = now() - interval '1 s'")

    (other,) = await store.claim(worker_id="w1", limit=1, lease_s=30, working_on=[running.row.id])
    assert other.row.id != running.row.id

    # Stopped, then taken up again by the same worker: the same attempt.
    await conn.execute("UPDATE results SET lease_expires_at = now() - interval '1 s'")
    (again,) = await store.claim(worker_id="w1", limit=1, lease_s=30, working_on=[other.row.id])
    assert (again.row.id, again.row.attempts) == (running.row.id, 1)


async def test_a_takeover_of_a_row_stopped_in_a_database_outage_is_refunded(
    store: Store, conn: asyncpg.Connection
) -> None:
    await submit(store, make_job(1))
    (held,) = await store.claim(worker_id="w1", limit=1, lease_s=30)
    await conn.execute("UPDATE results SET lease_expires_at = now() - interval '1 s'")
    (taken,) = await store.claim(worker_id="w2", limit=1, lease_s=30)
    assert taken.row.attempts == 2

    await store.refund_stopped(worker_id="w1", result_ids=[held.row.id])

    row = await conn.fetchrow("SELECT * FROM results WHERE id = $1", held.row.id)
    assert (row["attempts"], row["worker_id"]) == (1, "w2")
    assert row["lease_expires_at"] is not None  # still w2's
    events = await store.events(result_id=held.row.id)
    (refunded,) = [e for e in events if e["event"] == "image.attempt_refunded"]
    assert (refunded["worker_id"], refunded["detail"]) == ("w1", {"handed_back": False})


async def test_a_row_refunded_before_another_worker_takes_it_over_costs_that_worker_none(
    store: Store, conn: asyncpg.Connection
) -> None:
    await submit(store, make_job(1))
    (held,) = await store.claim(worker_id="w1", limit=1, lease_s=30)
    # w1 stopped the image in an outage; its lease has not run out yet when it settles.

    await store.refund_stopped(worker_id="w1", result_ids=[held.row.id])
    (taken,) = await store.claim(worker_id="w2", limit=1, lease_s=30)

    assert taken.row.id == held.row.id
    assert taken.row.attempts == 1  # the attempt of the first claim, not a second one
    events = await store.events(result_id=held.row.id)
    assert [(e["event"], e["worker_id"], e["detail"]) for e in events][1:] == [
        ("image.attempt_refunded", "w1", {"handed_back": True}),
        ("image.claimed", "w2", {"attempts": 1, "lease_expires_at": ANY}),
    ]


async def test_a_refund_sent_again_after_a_lost_answer_is_made_once(
    store: Store, conn: asyncpg.Connection
) -> None:
    await submit(store, make_job(2))
    held = await store.claim(worker_id="w1", limit=2, lease_s=30)
    ids = [claim.row.id for claim in held]
    await conn.execute("UPDATE results SET lease_expires_at = now() - interval '1 s'")
    (taken,) = await store.claim(worker_id="w2", limit=1, lease_s=30)
    key = uuid4()

    # The second run is what Store.refund_stopped sends when the first one's answer was lost.
    for _ in range(2):
        await conn.execute(QUERIES["refund_stopped"], "w1", ids, key)

    attempts = dict(await conn.fetch("SELECT id, attempts FROM results"))
    assert attempts == {taken.row.id: 1, next(i for i in ids if i != taken.row.id): 0}
    assert (
        await conn.fetchval("SELECT count(*) FROM events WHERE event = 'image.attempt_refunded'")
        == 2
    )


async def test_claim_skips_cancelled_jobs_future_jobs_and_backed_off_rows(
    store: Store, conn: asyncpg.Connection
) -> None:
    cancelled = await submit(store, make_job(1, name="cancelled"))
    await conn.execute("UPDATE jobs SET cancelled_at = now() WHERE id = $1", cancelled)
    await submit(
        store, make_job(1, name="later"), not_before=datetime.now(UTC) + timedelta(hours=1)
    )
    ready = await submit(store, make_job(2, name="ready"))
    (claim,) = await store.claim(worker_id="w1", limit=1, lease_s=30)
    await conn.execute(
        "UPDATE results SET next_attempt_at = now() + interval '1 hour' WHERE id = $1",
        claim.row.id,
    )
    await store.release(worker_id="w1", result_ids=[claim.row.id])

    claims = await store.claim(worker_id="w2", limit=10, lease_s=30)

    assert [(c.row.job_id, c.row.disk_index) for c in claims] == [(ready, 1)]
    # Not cancelled and not finished: 'later' (1) and both rows of 'ready'.
    assert await store.outstanding() == 3


# the steps' writes: one statement per kind of change


def at(text: str) -> float:
    """Epoch seconds of a UTC moment, as the machine's clock gives them."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


async def test_each_kind_of_change_writes_its_columns_and_an_event(store: Store) -> None:
    await submit(store, make_job(1))
    (claim,) = await store.claim(worker_id="w1", limit=1, lease_s=30)
    row_id = claim.row.id
    old_image = claim.row.glance_image_id
    new_image = uuid4()

    created = await store.apply(
        row_id,
        changes.ImageCreated(at=at("2024-05-01T12:00:00")),
        StepEvent("w1", Event.IMAGE_CREATED, Phase.STAGING, request_id="req-1"),
    )
    assert (created.phase, created.image_created_at) == (Phase.STAGING, utc("2024-05-01T12:00:00"))
    staged = await store.apply(
        row_id,
        changes.DataStaged(
            100, at("2024-05-01T12:01:00"), changes.SourceHashes("sha512", "h1", "m1")
        ),
        StepEvent("w1", Event.IMAGE_STAGED, request_id="req-2", detail={"bytes": 100}),
    )
    assert (staged.bytes_staged, staged.staged_at) == (100, utc("2024-05-01T12:01:00"))
    assert (staged.source_hash_algo, staged.source_hash_value, staged.source_md5) == (
        "sha512",
        "h1",
        "m1",
    )
    hashed = await store.apply(
        row_id,
        changes.SourceHashed(changes.SourceHashes("sha256", "h2")),
        StepEvent("w1", Event.IMAGE_HASHED),
    )
    # No md5 this time: the one recorded before is kept.
    assert (hashed.source_hash_algo, hashed.source_hash_value, hashed.source_md5) == (
        "sha256",
        "h2",
        "m1",
    )
    requesting = await store.apply(
        row_id,
        changes.ImportRequesting("req-ours"),
        StepEvent("w1", Event.IMAGE_IMPORT_REQUESTING, Phase.IMPORTING),
    )
    assert (requesting.phase, requesting.import_request_id) == (Phase.IMPORTING, "req-ours")
    requested = await store.apply(
        row_id,
        changes.ImportRequested("req-ours", at=at("2024-05-01T12:02:00")),
        StepEvent("w1", Event.IMAGE_IMPORT_REQUESTED, request_id="req-3"),
    )
    assert requested.import_requested_at == utc("2024-05-01T12:02:00")
    replaced = await store.apply(
        row_id,
        changes.ImageReplaced(new_image),
        StepEvent("w1", Event.IMAGE_CREATING, Phase.CREATING),
    )
    assert (replaced.phase, replaced.glance_image_id) == (Phase.CREATING, new_image)
    assert (replaced.bytes_staged, replaced.staged_at) == (0, None)
    assert (replaced.import_requested_at, replaced.import_request_id) == (None, None)
    assert replaced.source_hash_value == "h2"  # the source is the same
    noted = await store.apply(
        row_id,
        changes.Noted(),
        StepEvent("w1", Event.IMAGE_RETRY_SCHEDULED, detail={"delay_s": 1.5}),
    )
    assert noted.phase is Phase.CREATING
    failing = await store.apply(
        row_id,
        changes.Failing(
            "checksum_mismatch",
            "hashes differ",
            verification=Verification.MISMATCH,
            glance=changes.GlanceRecord(
                "active", size=100, os_hash_algo="sha512", os_hash_value="g"
            ),
        ),
        StepEvent("w1", Event.IMAGE_FAILING, detail={"error": "hashes differ"}),
    )
    assert (failing.error_code, failing.error_message) == ("checksum_mismatch", "hashes differ")
    assert (failing.verification, failing.glance_status, failing.glance_size) == (
        Verification.MISMATCH,
        "active",
        100,
    )
    assert (failing.glance_os_hash_value, failing.glance_checksum) == ("g", None)
    assert failing.lease_expires_at is not None
    finished = await store.apply(
        row_id,
        changes.Finished(Phase.FAILED, at=at("2024-05-01T12:03:00"), cleanup="deleted"),
        StepEvent("w1", Event.IMAGE_FINISHED),
    )
    # What the failing step wrote stays: a finish leaves None alone.
    assert (finished.phase, finished.cleanup, finished.error_code) == (
        Phase.FAILED,
        "deleted",
        "checksum_mismatch",
    )
    assert (finished.verification, finished.glance_size) == (Verification.MISMATCH, 100)
    assert finished.finished_at == utc("2024-05-01T12:03:00")
    assert finished.lease_expires_at is None
    assert finished.request_ids == ("req-1", "req-2", "req-3")
    assert old_image != new_image

    events = await store.events(result_id=row_id)
    assert [(e["event"], e["phase_from"], e["phase_to"]) for e in events] == [
        ("image.claimed", "pending", "pending"),
        ("image.created", "pending", "staging"),
        ("image.staged", "staging", "staging"),
        ("image.hashed", "staging", "staging"),
        ("image.import_requesting", "staging", "importing"),
        ("image.import_requested", "importing", "importing"),
        ("image.creating", "importing", "creating"),
        ("image.retry_scheduled", "creating", "creating"),
        ("image.failing", "creating", "creating"),
        ("image.finished", "creating", "failed"),
    ]
    assert events[2]["detail"] == {"bytes": 100}
    assert events[7]["detail"] == {"delay_s": 1.5}
    assert (events[8]["error_code"], events[8]["message"]) == ("checksum_mismatch", "hashes differ")
    assert (events[9]["error_code"], events[9]["message"]) == (None, None)  # none given
    assert {e["worker_id"] for e in events} == {"w1"}


async def test_a_finished_image_records_what_glance_said_and_the_verdict(store: Store) -> None:
    await submit(store, make_job(1))
    (claim,) = await store.claim(worker_id="w1", limit=1, lease_s=30)
    glance = changes.GlanceRecord("active", 100, 400, "c" * 32, "sha512", "h" * 128)

    row = await store.finish(
        claim.row.id,
        changes.Finished(Phase.DONE, verification=Verification.VERIFIED, glance=glance),
        StepEvent("w1", Event.IMAGE_FINISHED),
    )

    assert (row.phase, row.verification, row.error_code) == (
        Phase.DONE,
        Verification.VERIFIED,
        None,
    )
    assert (
        row.glance_status,
        row.glance_size,
        row.glance_virtual_size,
        row.glance_checksum,
        row.glance_os_hash_algo,
        row.glance_os_hash_value,
    ) == ("active", 100, 400, "c" * 32, "sha512", "h" * 128)
    assert row.finished_at is not None  # the database's clock, when the step gives none
    assert row.lease_expires_at is None


async def test_a_write_by_another_worker_raises_lease_lost_and_changes_nothing(
    store: Store,
) -> None:
    job_id = await submit(store, make_job(1))
    (claim,) = await store.claim(worker_id="w1", limit=1, lease_s=30)

    with pytest.raises(LeaseLost):
        await store.mark_created(
            claim.row.id, changes.ImageCreated(at=0.0), StepEvent("w2", Event.IMAGE_CREATED)
        )
    with pytest.raises(LeaseLost):
        await store.finish(
            claim.row.id, changes.Finished(Phase.DONE), StepEvent("w2", Event.IMAGE_FINISHED)
        )

    (row,) = await store.result_rows(job_id)
    assert (row.phase, row.worker_id, row.image_created_at) == (Phase.PENDING, "w1", None)
    assert [e["event"] for e in await store.events(result_id=claim.row.id)] == ["image.claimed"]


async def test_only_finish_takes_a_row_to_a_terminal_phase(store: Store) -> None:
    job_id = await submit(store, make_job(1))
    (claim,) = await store.claim(worker_id="w1", limit=1, lease_s=30)

    with pytest.raises(ValueError, match="finish"):
        await store.note(claim.row.id, StepEvent("w1", Event.IMAGE_FINISHED, Phase.DONE))
    with pytest.raises(ValueError, match="done or failed"):
        changes.Finished(Phase.STAGING)

    (row,) = await store.result_rows(job_id)
    assert row.updated_at == claim.row.updated_at


async def test_a_terminal_phase_clears_the_lease_and_sets_finished_at(store: Store) -> None:
    await submit(store, make_job(2))
    done, failed = await store.claim(worker_id="w1", limit=2, lease_s=30)
    finished = datetime(2024, 5, 1, 13, 0, tzinfo=UTC)

    done_row = await store.finish(
        done.row.id,
        changes.Finished(Phase.DONE, at=finished.timestamp()),
        StepEvent("w1", Event.IMAGE_FINISHED),
    )
    failed_row = await store.finish(
        failed.row.id,
        changes.Finished(
            Phase.FAILED, error_code="checksum_mismatch", error_message="hashes differ"
        ),
        StepEvent("w1", Event.IMAGE_FAILED),
    )

    assert done_row.lease_expires_at is None
    assert done_row.finished_at == finished
    assert failed_row.lease_expires_at is None
    assert failed_row.finished_at is not None
    assert (failed_row.error_code, failed_row.error_message) == (
        "checksum_mismatch",
        "hashes differ",
    )
    (event,) = [
        e for e in await store.events(result_id=failed.row.id) if e["event"] == "image.failed"
    ]
    assert (event["error_code"], event["message"]) == ("checksum_mismatch", "hashes differ")
    assert await store.outstanding() == 0
    # Finished rows stay the finisher's: a heartbeat racing the finish must not report them lost.
    assert await store.heartbeat(worker_id="w1", result_ids=[done.row.id], lease_s=30) == {
        done.row.id
    }
    assert await store.heartbeat(worker_id="w2", result_ids=[done.row.id], lease_s=30) == set()
    (done_now,) = [r for r in await store.result_rows(done.row.job_id) if r.id == done.row.id]
    assert done_now.lease_expires_at is None
    # The finisher may still note what it did with the half-made image; nobody else may.
    noted = await store.finish(
        failed.row.id,
        changes.Finished(Phase.FAILED, cleanup="kept"),
        StepEvent("w1", Event.IMAGE_CLEANUP_DONE),
    )
    assert (noted.cleanup, noted.phase) == ("kept", Phase.FAILED)
    assert noted.finished_at == failed_row.finished_at  # it finished when it did
    with pytest.raises(LeaseLost):
        await store.finish(
            failed.row.id,
            changes.Finished(Phase.FAILED, cleanup="deleted"),
            StepEvent("w2", Event.IMAGE_CLEANUP_DONE),
        )
    await asyncio.sleep(0.01)
    assert await store.claim(worker_id="w2", limit=5, lease_s=30) == []


async def test_settling_an_owed_cleanup_says_when(store: Store) -> None:
    await submit(store, make_job(2))
    owed, kept = await store.claim(worker_id="w1", limit=2, lease_s=30)
    failed = StepEvent("w1", Event.IMAGE_FINISHED)
    await store.finish(owed.row.id, changes.Finished(Phase.FAILED, cleanup="owed"), failed)
    await store.finish(kept.row.id, changes.Finished(Phase.FAILED, cleanup="kept"), failed)
    assert [result_id for result_id, _ in await store.owed_cleanups()] == [owed.row.id]

    await store.cleanup_done(owed.row.id, worker_id="w2")
    await store.cleanup_done(kept.row.id, worker_id="w2")  # nothing was owed: no change

    rows = {row.id: row for row in await store.result_rows(owed.row.job_id)}
    settled = rows[owed.row.id]
    assert settled.cleanup == "deleted"
    assert settled.cleanup_settled_at is not None
    assert settled.finished_at is not None
    assert settled.cleanup_settled_at >= settled.finished_at
    assert (rows[kept.row.id].cleanup, rows[kept.row.id].cleanup_settled_at) == ("kept", None)
    assert await store.owed_cleanups() == []
    # Settled once: a second round finds nothing owed and leaves the time as it was.
    await store.cleanup_done(owed.row.id, worker_id="w2")
    (again,) = [row for row in await store.result_rows(owed.row.job_id) if row.id == owed.row.id]
    assert again.cleanup_settled_at == settled.cleanup_settled_at
    events = [e["event"] for e in await store.events(result_id=owed.row.id)]
    assert events.count("image.cleanup_done") == 1


# progress, heartbeat, release


async def test_set_progress_updates_bytes_without_an_event(store: Store) -> None:
    job_id = await submit(store, make_job(1))
    (claim,) = await store.claim(worker_id="w1", limit=1, lease_s=30)

    await store.set_progress(claim.row.id, worker_id="w1", bytes_staged=42)

    (row,) = await store.result_rows(job_id)
    assert row.bytes_staged == 42
    assert [e["event"] for e in await store.events(result_id=claim.row.id)] == ["image.claimed"]


async def test_heartbeat_extends_only_the_leases_still_held(store: Store) -> None:
    job_id = await submit(store, make_job(3))
    mine = await store.claim(worker_id="w1", limit=2, lease_s=5)
    (theirs,) = await store.claim(worker_id="w2", limit=1, lease_s=5)
    ids = [c.row.id for c in mine]

    held = await store.heartbeat(worker_id="w1", result_ids=[*ids, theirs.row.id], lease_s=600)

    assert held == set(ids)
    rows = {r.id: r for r in await store.result_rows(job_id)}
    for claim in mine:
        lease = rows[claim.row.id].lease_expires_at
        assert lease is not None
        assert claim.row.lease_expires_at is not None
        assert lease - claim.row.lease_expires_at > timedelta(seconds=500)
    assert rows[theirs.row.id].lease_expires_at == theirs.row.lease_expires_at


# A session of this database runs the statement $1 and waits for a lock.
WAITING_FOR_A_LOCK = """SELECT count(*) > 0 FROM pg_stat_activity
    WHERE datname = current_database() AND wait_event_type = 'Lock' AND query = $1"""


async def test_a_row_whose_finish_commits_during_a_heartbeat_is_still_held(
    store: Store, conn: asyncpg.Connection, database_url: str
) -> None:
    await submit(store, make_job(1))
    (claim,) = await store.claim(worker_id="w1", limit=1, lease_s=30)
    # The finish holds the row's lock while the heartbeat starts, and commits while it waits.
    finisher = await asyncpg.connect(database_url)
    try:
        transaction = finisher.transaction()
        await transaction.start()
        await finisher.execute(
            "UPDATE results SET phase = 'done', lease_expires_at = NULL WHERE id = $1",
            claim.row.id,
        )
        beat = asyncio.create_task(
            store.heartbeat(worker_id="w1", result_ids=[claim.row.id], lease_s=30)
        )
        await wait_for(conn, WAITING_FOR_A_LOCK, QUERIES["heartbeat"])
        await transaction.commit()
        held = await beat
    finally:
        await finisher.close()

    assert held == {claim.row.id}


async def test_release_gives_rows_back_at_once_and_logs_it(store: Store) -> None:
    await submit(store, make_job(2))
    claims = await store.claim(worker_id="w1", limit=2, lease_s=600)
    ids = [c.row.id for c in claims]

    await store.release(worker_id="w2", result_ids=ids)
    assert await store.claim(worker_id="w2", limit=2, lease_s=30) == []
    await store.release(worker_id="w1", result_ids=ids)

    retaken = await store.claim(worker_id="w2", limit=2, lease_s=30)
    assert sorted(c.row.id for c in retaken) == sorted(ids)
    events = await store.events(result_id=ids[0])
    assert [(e["event"], e["worker_id"]) for e in events] == [
        ("image.claimed", "w1"),
        ("image.released", "w1"),
        ("image.claimed", "w2"),
    ]
    with pytest.raises(LeaseLost):
        await store.note(ids[0], StepEvent("w1", Event.IMAGE_RESUMED))


# summaries and lookups


async def test_job_summaries_count_by_phase_and_find_jobs_by_name_or_id(
    store: Store, conn: asyncpg.Connection
) -> None:
    older = await submit(store, make_job(3, name="nightly"))
    newer = await submit(store, make_job(2, name="nightly"))
    other = await submit(store, make_job(1, name="other"))
    await conn.execute("UPDATE jobs SET cancelled_at = now() WHERE id = $1", other)
    first, second = await store.claim(worker_id="w1", limit=2, lease_s=30)
    await store.set_progress(first.row.id, worker_id="w1", bytes_staged=70)
    await store.set_progress(second.row.id, worker_id="w1", bytes_staged=100)
    await store.finish(
        second.row.id, changes.Finished(Phase.DONE), StepEvent("w1", Event.IMAGE_FINISHED)
    )

    by_name = await store.job_summaries("nightly")
    by_id = await store.job_summaries(str(older).upper())
    everything = await store.job_summaries()

    assert [s.job_id for s in by_name] == [newer, older]
    assert [s.job_id for s in by_id] == [older]
    assert [s.job_id for s in everything] == [other, newer, older]
    summary = by_id[0]
    assert (summary.name, summary.disk_count, summary.total_bytes) == ("nightly", 3, 300)
    assert summary.bytes_staged == 170
    assert dict(summary.counts) == {
        "pending": 2,
        "creating": 0,
        "staging": 0,
        "importing": 0,
        "verifying": 0,
        "done": 1,
        "failed": 0,
    }
    assert [s.cancelled for s in everything] == [True, False, False]
    assert await store.find_job_ids("nightly") == [newer, older]
    assert await store.find_job_ids(str(other)) == [other]
    assert await store.find_job_ids("missing") == []
    assert await store.job_summaries("missing") == []


async def test_outstanding_counts_unfinished_rows_of_live_jobs(store: Store) -> None:
    assert await store.outstanding() == 0
    await submit(store, make_job(3))
    (claim,) = await store.claim(worker_id="w1", limit=1, lease_s=30)
    assert await store.outstanding() == 3

    await store.finish(
        claim.row.id, changes.Finished(Phase.FAILED), StepEvent("w1", Event.IMAGE_FAILED)
    )

    assert await store.outstanding() == 2


# job states and idempotent submission


@pytest.mark.parametrize(
    ("counts", "cancelled", "started", "may_start", "state"),
    [
        ({"pending": 3}, False, False, True, "scheduled"),
        ({"pending": 3}, False, False, False, "scheduled"),
        ({"pending": 2, "staging": 1}, False, True, True, "running"),
        ({"pending": 2, "staging": 1}, False, True, False, "running"),  # in flight goes on
        ({"pending": 2, "done": 1}, False, True, True, "running"),
        ({"pending": 2, "done": 1}, False, True, False, "paused"),
        ({"done": 2, "failed": 1}, False, True, True, "finished"),
        ({"done": 1, "failed": 2}, True, True, True, "cancelled"),
    ],
)
def test_job_state(
    counts: dict[str, int], cancelled: bool, started: bool, may_start: bool, state: str
) -> None:
    full = {phase.value: counts.get(phase.value, 0) for phase in Phase}
    assert job_state(full, cancelled=cancelled, started=started, may_start=may_start) == state


async def test_a_job_outside_its_window_after_it_started_is_paused(
    store: Store, conn: asyncpg.Connection
) -> None:
    job_id = await submit(store, make_job(2))
    await store.claim(worker_id="w", limit=1, lease_s=30)
    (summary,) = await store.job_summaries(str(job_id))
    assert summary.state == "running"
    closed = {"start": "00:00", "end": "00:00", "time_zone": "UTC", "days": []}
    await conn.execute(
        "UPDATE jobs SET manifest = manifest || jsonb_build_object('window', $2::jsonb) "
        "WHERE id = $1",
        job_id,
        json.dumps(closed),
    )
    await conn.execute(
        "UPDATE results SET phase = 'done', lease_expires_at = NULL WHERE disk_index = 0"
    )
    (summary,) = await store.job_summaries(str(job_id))
    assert (summary.state, summary.bytes_done) == ("paused", 100)


async def test_submitting_one_manifest_twice_at_once_makes_one_job(store: Store) -> None:
    job = make_job(2)
    manifest = {"job": job.name, "disks": [{"source": d.source} for d in job.disks]}

    results = await asyncio.gather(
        *(
            store.submit_job_once(job, manifest=manifest, manifest_sha256="cd" * 32)
            for _ in range(4)
        )
    )

    assert len({job_id for job_id, _ in results}) == 1
    assert sorted(created for _, created in results) == [False, False, False, True]
    reordered = {"disks": manifest["disks"], "job": job.name}
    assert await store.submit_job_once(job, manifest=reordered, manifest_sha256="ef" * 32) == (
        results[0][0],
        False,
    )
    assert len(await store.job_summaries()) == 1


# A URL source: stored for reading with its credentials masked -----------------------------------

PRESIGNED = "https://s3.example/b/d.vmdk?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=ab12"


async def test_a_url_source_is_stored_masked_and_read_back_as_given(store: Store) -> None:
    disk = DiskSpec(disk_index=0, name="d", source=PRESIGNED, size_bytes=100)
    await submit(store, JobSpec(name="url", disks=(disk,), on_failure="keep"))

    (claim,) = await store.claim(worker_id="w1", limit=1, lease_s=30)

    assert (
        claim.row.source_path
        == "https://s3.example/b/d.vmdk?X-Amz-Credential=***&X-Amz-Signature=***"
    )
    assert claim.row.disk_spec().source == PRESIGNED


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        (PRESIGNED, "https://s3.example/b/d.vmdk?X-Amz-Credential=***&X-Amz-Signature=***"),
        (
            "https://root:pw@esxi01/folder/d.vmdk?dcPath=ha-datacenter&dsName=ds1",
            "https://esxi01/folder/d.vmdk?dcPath=ha-datacenter&dsName=ds1",
        ),
        ("https://web.example/d.vmdk", "https://web.example/d.vmdk"),
        ("/srv/vmdk/d.vmdk", "/srv/vmdk/d.vmdk"),
    ],
    ids=["presigned", "userinfo", "plain-url", "file"],
)
async def test_rows_stored_before_masking_are_masked_by_its_migration(
    store: Store, conn: asyncpg.Connection, given: str, shown: str
) -> None:
    await submit(store, make_job(1))
    # As a row stored before the migration held it: the source as given, no source_url.
    await conn.execute("UPDATE results SET source_path = $1, spec = spec - 'source_url'", given)

    await conn.execute(next(m for m in load_migrations() if m.name == "shown_sources").sql)

    (claim,) = await store.claim(worker_id="w1", limit=1, lease_s=30)
    assert claim.row.source_path == shown
    assert claim.row.disk_spec().source == given
