"""The dashboard views: counts, bytes, throughput, ETA and failures, from rows the Store wrote."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
import pytest

from tests.fixtures.batch import migrate, submit
from tests.fixtures.views import WORKER, Disk, seed_job
from worker.core.model import Phase
from worker.sandbox import Sandbox, SandboxConfig
from worker.store import Store

VIEWS = (
    "job_progress",
    "job_phase_counts",
    "job_failures_by_code",
    "failures_by_code",
    "image_progress",
    "throughput_per_minute",
    "job_bytes",
)


async def fetch(database_url: str, sql: str, *args: object) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(database_url)
    try:
        return [dict(record) for record in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


async def job_progress(database_url: str, job_id: UUID) -> dict[str, Any]:
    rows = await fetch(
        database_url, "SELECT *, now() AS now FROM dashboard.job_progress WHERE job_id = $1", job_id
    )
    assert len(rows) == 1
    return rows[0]


async def test_a_finished_job_has_its_counts_bytes_throughput_and_no_time_left(
    store: Store, database_url: str
) -> None:
    seeded = await seed_job(
        store,
        "finished-job",
        [
            Disk("a", 100, Phase.DONE, finish_after_s=10),
            Disk("b", 200, Phase.DONE, finish_after_s=20),
            Disk("c", 300, Phase.FAILED, "virtio_failed", finish_after_s=30),
            Disk("d", 400, Phase.FAILED, "import_timeout", finish_after_s=40),
        ],
    )
    job = await job_progress(database_url, seeded.job_id)

    assert seeded.started_at is not None
    # The last claim came a little after the first: the job ends 40 s after it.
    last_finished = job["last_finished_at"]
    running_s = (last_finished - seeded.started_at).total_seconds()
    assert 40 <= running_s < 45
    assert {k: job[k] for k in ("name", "state", "disk_count", "total_bytes")} == {
        "name": "finished-job",
        "state": "finished",
        "disk_count": 4,
        "total_bytes": 1000,
    }
    assert [job[p] for p in ("pending", "in_progress", "done", "failed", "finished")] == [
        0,
        0,
        2,
        2,
        4,
    ]
    assert (job["bytes_done"], job["bytes_failed"], job["bytes_left"]) == (300, 700, 0)
    assert job["finished_percent"] == 100.0
    assert job["started_at"] == seeded.started_at
    assert job["finished_at"] == last_finished
    assert job["running_s"] == pytest.approx(running_s)
    assert job["throughput_bytes_per_s"] == pytest.approx(300 / running_s)
    assert job["images_per_hour"] == pytest.approx(2 * 3600 / running_s)
    assert (job["eta_s"], job["eta_at"]) == (0.0, last_finished)
    assert (job["leased"], job["workers"]) == (0, 0)


async def test_a_running_job_estimates_the_time_left_from_its_throughput(
    store: Store, database_url: str
) -> None:
    seeded = await seed_job(
        store,
        "running-job",
        [
            Disk("done", 1000, Phase.DONE),
            Disk("uploading", 1000, Phase.STAGING, bytes_staged=250),
            Disk("waiting-1", 1000),
            Disk("waiting-2", 1000),
        ],
    )
    job = await job_progress(database_url, seeded.job_id)

    assert seeded.started_at is not None
    running_s = (job["now"] - seeded.started_at).total_seconds()
    assert job["state"] == "running"
    assert [job[p] for p in ("pending", "staging", "in_progress", "done", "failed")] == [
        2,
        1,
        1,
        1,
        0,
    ]
    assert (job["bytes_done"], job["bytes_left"], job["bytes_staged_in_progress"]) == (
        1000,
        3000,
        250,
    )
    assert job["finished_percent"] == 25.0
    assert job["finished_at"] is None
    assert job["running_s"] == pytest.approx(running_s)
    assert job["throughput_bytes_per_s"] == pytest.approx(1000 / running_s)
    # 3000 bytes left at 1000 bytes per running_s.
    assert job["eta_s"] == pytest.approx(3 * running_s)
    eta_at_s = (job["eta_at"] - job["now"]).total_seconds()
    assert eta_at_s == pytest.approx(3 * running_s, abs=1e-3)
    assert (job["leased"], job["workers"]) == (1, 1)


async def test_jobs_not_started_have_no_rates_and_say_why(store: Store, database_url: str) -> None:
    later = datetime.now().astimezone() + timedelta(hours=1)
    waiting = await seed_job(store, "tonight", [Disk("x", 10)], not_before=later)
    queued = await seed_job(store, "queued", [Disk("y", 10), Disk("z", 20)])
    cancelled = await seed_job(store, "cancelled", [Disk("w", 10)], not_before=later)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("UPDATE jobs SET cancelled_at = now() WHERE id = $1", cancelled.job_id)
    finally:
        await conn.close()

    jobs = {
        j.job_id: await job_progress(database_url, j.job_id) for j in (waiting, queued, cancelled)
    }

    assert [jobs[j.job_id]["state"] for j in (waiting, queued, cancelled)] == [
        "waiting",
        "queued",
        "cancelled",
    ]
    for job in jobs.values():
        assert job["started_at"] is None
        assert job["running_s"] is None
        assert job["throughput_bytes_per_s"] is None
        assert job["eta_s"] is None
        assert job["eta_at"] is None
        assert job["finished_percent"] == 0.0
    assert (jobs[queued.job_id]["pending"], jobs[queued.job_id]["bytes_left"]) == (2, 30)


async def test_job_bytes_count_what_moved_during_uploads_too(
    store: Store, database_url: str
) -> None:
    seeded = await seed_job(
        store,
        "mixed",
        [
            Disk("done", 1000, Phase.DONE, bytes_staged=1000),
            Disk("uploading", 1000, Phase.STAGING, bytes_staged=250),
            Disk("importing", 1000, Phase.IMPORTING, bytes_staged=1000),
            Disk("failed", 1000, Phase.FAILED, "import_timeout", bytes_staged=600),
            Disk("creating", 1000, Phase.CREATING),
            Disk("waiting", 1000),
        ],
    )
    (job,) = await fetch(
        database_url, "SELECT * FROM dashboard.job_bytes WHERE job_id = $1", seeded.job_id
    )

    assert job["total_bytes"] == 6000
    # All of what is done or staged, and the staged part of the upload in progress.
    assert (job["bytes_moved"], job["bytes_done"], job["bytes_in_flight"]) == (2250, 1000, 1250)
    # A failed image's upload does not count; its bytes will not move unless retried.
    assert (job["bytes_failed"], job["bytes_to_move"]) == (1000, 2750)
    assert job["bytes_moved"] + job["bytes_failed"] + job["bytes_to_move"] == job["total_bytes"]
    assert job["moved_percent"] == 37.5

    # An upload that goes on moves the job's bytes with it, before any image finishes.
    (claim,) = [c for c in await store.result_rows(seeded.job_id) if c.image_name == "uploading"]
    await store.set_progress(claim.id, worker_id=WORKER, bytes_staged=900)
    (job,) = await fetch(
        database_url, "SELECT * FROM dashboard.job_bytes WHERE job_id = $1", seeded.job_id
    )
    assert (job["bytes_moved"], job["bytes_to_move"]) == (2900, 2100)


async def test_phase_counts_list_every_phase_of_every_job(store: Store, database_url: str) -> None:
    seeded = await seed_job(
        store,
        "phases",
        [
            Disk("d1", 10, Phase.DONE),
            Disk("d2", 20, Phase.DONE),
            Disk("f", 40, Phase.FAILED, "checksum_mismatch"),
            Disk("i", 80, Phase.IMPORTING),
            Disk("p", 160),
        ],
    )
    rows = await fetch(
        database_url,
        """SELECT phase, images, bytes FROM dashboard.job_phase_counts
           WHERE job_id = $1 ORDER BY phase_order""",
        seeded.job_id,
    )
    assert [(r["phase"], r["images"], r["bytes"]) for r in rows] == [
        ("pending", 1, 160),
        ("creating", 0, 0),
        ("staging", 0, 0),
        ("importing", 1, 80),
        ("verifying", 0, 0),
        ("done", 2, 30),
        ("failed", 1, 40),
    ]


async def test_failures_are_counted_by_code_per_job_and_overall(
    store: Store, database_url: str
) -> None:
    first = await seed_job(
        store,
        "first",
        [
            Disk("a", 1, Phase.FAILED, "virtio_failed", finish_after_s=1),
            Disk("b", 2, Phase.FAILED, "virtio_failed", finish_after_s=2),
            Disk("c", 4, Phase.FAILED, "import_timeout", finish_after_s=3),
            Disk("d", 8, Phase.DONE),
        ],
    )
    second = await seed_job(
        store, "second", [Disk("e", 16, Phase.FAILED, "virtio_failed", finish_after_s=60)]
    )

    per_job = await fetch(
        database_url,
        """SELECT job_id, job_name, error_code, images, bytes, last_message
           FROM dashboard.job_failures_by_code ORDER BY job_name, error_code""",
    )
    overall = await fetch(
        database_url,
        """SELECT error_code, images, jobs, bytes, last_message
           FROM dashboard.failures_by_code ORDER BY 1""",
    )

    assert [tuple(r.values()) for r in per_job] == [
        (first.job_id, "first", "import_timeout", 1, 4, "c: import_timeout"),
        (first.job_id, "first", "virtio_failed", 2, 3, "b: virtio_failed"),
        (second.job_id, "second", "virtio_failed", 1, 16, "e: virtio_failed"),
    ]
    assert [tuple(r.values()) for r in overall] == [
        ("import_timeout", 1, 1, 4, "c: import_timeout"),
        ("virtio_failed", 3, 2, 19, "e: virtio_failed"),
    ]


async def test_image_progress_shows_upload_share_and_errors(
    store: Store, database_url: str
) -> None:
    seeded = await seed_job(
        store,
        "images",
        [
            Disk("staged-quarter", 1000, Phase.STAGING, bytes_staged=250),
            Disk("done", 1000, Phase.DONE, finish_after_s=5, bytes_staged=1000),
            Disk("failed", 1000, Phase.FAILED, "stage_size_mismatch", finish_after_s=7),
            Disk("pending", 1000),
        ],
    )
    rows = await fetch(
        database_url,
        """SELECT image_name, phase, phase_order, staged_percent, attempts, leased, elapsed_s,
                  error_code
           FROM dashboard.image_progress WHERE job_id = $1 ORDER BY disk_index""",
        seeded.job_id,
    )
    by_name = {r.pop("image_name"): r for r in rows}

    assert by_name["staged-quarter"]["staged_percent"] == 25.0
    assert by_name["staged-quarter"]["leased"] is True
    assert by_name["done"] == {
        "phase": "done",
        "phase_order": 6,
        "staged_percent": 100.0,
        "attempts": 1,
        "leased": False,
        "elapsed_s": 5.0,
        "error_code": None,
    }
    assert by_name["failed"]["error_code"] == "stage_size_mismatch"
    assert by_name["failed"]["elapsed_s"] == 7.0
    assert by_name["pending"]["staged_percent"] == 0.0
    assert by_name["pending"]["elapsed_s"] is None
    assert by_name["pending"]["attempts"] == 0


async def test_throughput_per_minute_buckets_finished_images(
    store: Store, database_url: str
) -> None:
    seeded = await seed_job(
        store,
        "minutes",
        [
            Disk("a", 100, Phase.DONE, finish_after_s=0),
            Disk("b", 200, Phase.DONE, finish_after_s=120),
            Disk("c", 400, Phase.FAILED, "import_failed", finish_after_s=120),
        ],
    )
    rows = await fetch(
        database_url,
        """SELECT minute, images_done, images_failed, bytes_done
           FROM dashboard.throughput_per_minute WHERE job_id = $1 ORDER BY minute""",
        seeded.job_id,
    )
    assert seeded.started_at is not None
    first_minute = seeded.started_at.replace(second=0, microsecond=0)
    # Claims all happen within a second, so 120 s later is two minutes on (or three).
    assert rows[0] == {
        "minute": first_minute,
        "images_done": 1,
        "images_failed": 0,
        "bytes_done": 100,
    }
    assert len(rows) == 2
    assert (rows[1]["minute"] - first_minute) in (timedelta(minutes=2), timedelta(minutes=3))
    assert (rows[1]["images_done"], rows[1]["images_failed"], rows[1]["bytes_done"]) == (1, 1, 200)


async def test_every_view_and_column_is_commented(database_url: str) -> None:
    views = await fetch(
        database_url,
        """SELECT c.relname, obj_description(c.oid, 'pg_class') AS comment
           FROM pg_class AS c
           WHERE c.relnamespace = 'dashboard'::regnamespace AND c.relkind = 'v'""",
    )
    uncommented = await fetch(
        database_url,
        """SELECT c.relname, a.attname
           FROM pg_class AS c JOIN pg_attribute AS a ON a.attrelid = c.oid
           WHERE c.relnamespace = 'dashboard'::regnamespace AND c.relkind = 'v'
             AND a.attnum > 0 AND col_description(c.oid, a.attnum) IS NULL""",
    )
    assert sorted(v["relname"] for v in views) == sorted(VIEWS)
    assert all(v["comment"] for v in views)
    assert uncommented == []


@pytest.mark.parametrize(
    "sandbox_config",
    [SandboxConfig(import_latency_s=0.02, virtio_fail_names=("bad-virtio",))],
    indirect=True,
)
async def test_the_views_agree_with_a_batch_run_against_the_sandbox(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    job_ref, paths = await submit(
        database_url, tmp_path, ["good-1", "bad-virtio", "good-2"], es_virtio_enabled="yes"
    )
    await migrate(database_url, sandbox, concurrency=3)

    job = await job_progress(database_url, UUID(job_ref))
    failures = await fetch(
        database_url,
        "SELECT error_code, images FROM dashboard.job_failures_by_code WHERE job_id = $1",
        UUID(job_ref),
    )
    sizes = {name: path.stat().st_size for name, path in paths.items()}
    assert (job["state"], job["done"], job["failed"], job["finished_percent"]) == (
        "finished",
        2,
        1,
        100.0,
    )
    assert job["bytes_done"] == sizes["good-1"] + sizes["good-2"]
    assert job["bytes_failed"] == sizes["bad-virtio"]
    assert job["throughput_bytes_per_s"] > 0
    assert job["eta_s"] == 0.0
    assert failures == [{"error_code": "virtio_failed", "images": 1}]
    assert job["name"] == "test-job"
