"""Schedules: not_before and maintenance windows, from the manifest to the claim query."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from tests.fixtures.batch import FAST, cloud_for, make_disks, rows_of
from tests.fixtures.cli import run_cli as vmdk_migrate
from tests.fixtures.cli import write_job
from worker.errors import InvalidManifest
from worker.intake.manifest import load_manifest, parse_manifest
from worker.run.app import run_worker
from worker.run.settings import WorkerSettings
from worker.sandbox import Sandbox
from worker.store import Store
from worker.store.store import open_store

WINDOW_OPENS_IN_S = 10
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def manifest_text(tmp_path: Path, **schedule: Any) -> str:
    (source,) = make_disks(tmp_path / "disks", ["one"])
    return json.dumps({"job": "scheduled", "disks": [{"source": str(source)}], **schedule})


def problems(tmp_path: Path, **schedule: Any) -> dict[str, str]:
    with pytest.raises(InvalidManifest) as caught:
        parse_manifest(manifest_text(tmp_path, **schedule), base_dir=tmp_path, fmt="json")
    return {problem.location: problem.message for problem in caught.value.problems}


def test_bad_schedules_are_reported_with_their_place(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        not_before="2025-03-01 22:00",
        window={"start": "25:00", "end": "6:00", "time_zone": "Europe/Berln", "days": ["fun"]},
    )
    assert "RFC 3339" in found["not_before"]
    assert "offset" in found["not_before"]
    assert found["window.start"].startswith("must be a string matching")
    assert found["window.end"].startswith("must be a string matching")
    assert found["window.time_zone"].startswith("unknown time zone 'Europe/Berln'")
    assert "did you mean 'Europe/Berlin'" in found["window.time_zone"]
    assert found["window.days[0]"].startswith('must be one of "mon"')


def test_a_window_needs_start_end_and_time_zone(tmp_path: Path) -> None:
    text = manifest_text(tmp_path, window={"start": "22:00", "days": []})
    with pytest.raises(InvalidManifest) as caught:
        parse_manifest(text, base_dir=tmp_path, fmt="json")
    assert sorted((p.location, p.message) for p in caught.value.problems) == [
        ("window", "missing required key 'end'"),
        ("window", "missing required key 'time_zone'"),
        ("window.days", "must list at least 1 item(s)"),
    ]


def test_yaml_times_are_read_as_written(tmp_path: Path) -> None:
    (source,) = make_disks(tmp_path / "disks", ["one"])
    path = tmp_path / "job.yaml"
    path.write_text(
        f"job: y\nnot_before: 2030-01-02T03:04:05+01:00\n"
        f'window: {{start: "22:00", end: "06:00", time_zone: UTC}}\n'
        f"disks:\n  - source: {source}\n"
    )
    loaded = load_manifest(path)
    assert loaded.not_before == datetime(2030, 1, 2, 2, 4, 5, tzinfo=UTC)
    assert loaded.window == {"start": "22:00", "end": "06:00", "time_zone": "UTC"}
    assert loaded.document["not_before"] == "2030-01-02T03:04:05+01:00"


@pytest.mark.parametrize(
    ("window", "at", "inside"),
    [
        ({"start": "09:00", "end": "17:00", "time_zone": "UTC"}, "2024-06-05T08:59:59Z", False),
        ({"start": "09:00", "end": "17:00", "time_zone": "UTC"}, "2024-06-05T09:00:00Z", True),
        ({"start": "09:00", "end": "17:00", "time_zone": "UTC"}, "2024-06-05T17:00:00Z", False),
        # 22:00-06:00 Berlin (UTC+2 in June), opening on Fridays only.
        (
            {"start": "22:00", "end": "06:00", "time_zone": "Europe/Berlin", "days": ["fri"]},
            "2024-06-07T20:00:00Z",  # Friday 22:00 local
            True,
        ),
        (
            {"start": "22:00", "end": "06:00", "time_zone": "Europe/Berlin", "days": ["fri"]},
            "2024-06-08T03:59:00Z",  # Saturday 05:59 local: Friday's window still open
            True,
        ),
        (
            {"start": "22:00", "end": "06:00", "time_zone": "Europe/Berlin", "days": ["fri"]},
            "2024-06-08T20:30:00Z",  # Saturday 22:30 local: no window opens on Saturday
            False,
        ),
        (
            {"start": "22:00", "end": "06:00", "time_zone": "Europe/Berlin", "days": ["fri"]},
            "2024-06-07T01:00:00Z",  # Friday 03:00 local: Thursday opened none
            False,
        ),
        (
            {"start": "00:00", "end": "00:00", "time_zone": "UTC", "days": ["sat", "sun"]},
            "2024-06-08T12:00:00Z",
            True,
        ),
        (
            {"start": "00:00", "end": "00:00", "time_zone": "UTC", "days": ["sat", "sun"]},
            "2024-06-07T12:00:00Z",
            False,
        ),
    ],
)
async def test_inside_the_window_is_computed_in_the_jobs_time_zone(
    database_url: str, window: dict[str, Any], at: str, inside: bool
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        result = await conn.fetchval(
            "SELECT job_window_open($1::jsonb, $2::timestamptz)",
            json.dumps(window),
            datetime.fromisoformat(at),
        )
    finally:
        await conn.close()
    assert result is inside


async def submit_scheduled(store: Store, tmp_path: Path, names: list[str], **schedule: Any) -> str:
    paths = make_disks(tmp_path / "disks", names)
    document = {
        "job": "scheduled",
        "defaults": {"es_virtio_enabled": "no"},
        "disks": [{"source": str(p), "name": n} for n, p in zip(names, paths, strict=True)],
        **schedule,
    }
    loaded = parse_manifest(json.dumps(document), base_dir=tmp_path, fmt="json")
    job_id = await store.submit_job(
        loaded.job, manifest=loaded.document, manifest_sha256=loaded.sha256
    )
    return str(job_id)


def window_around(now: datetime, *, opens_in_s: float, zone: str) -> dict[str, Any]:
    local = now.astimezone(ZoneInfo(zone))
    start = local + timedelta(seconds=opens_in_s)
    end = start + timedelta(hours=1)
    return {
        "start": start.strftime("%H:%M:%S"),
        "end": end.strftime("%H:%M:%S"),
        "time_zone": zone,
        "days": [DAYS[start.weekday()]],
    }


async def test_outside_its_window_a_job_is_not_claimed_but_a_started_image_is(
    store: Store, database_url: str, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    closed = window_around(now, opens_in_s=3600, zone="Asia/Kathmandu")
    job_id = await submit_scheduled(store, tmp_path, ["a", "b"], window=closed)
    assert await store.claim(worker_id="w1", limit=5, lease_s=30) == []

    # An image started earlier and given back (a worker stopped) may finish outside.
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE results SET phase = 'staging' WHERE job_id = $1 AND image_name = 'b'", job_id
        )
    finally:
        await conn.close()
    claims = await store.claim(worker_id="w1", limit=5, lease_s=30)
    assert [claim.row.image_name for claim in claims] == ["b"]

    opened = window_around(now, opens_in_s=-60, zone="Asia/Kathmandu")
    await submit_scheduled(store, tmp_path / "open", ["c"], window=opened)
    claims = await store.claim(worker_id="w1", limit=5, lease_s=30)
    assert [claim.row.image_name for claim in claims] == ["c"]


async def test_a_job_whose_window_opens_later_starts_no_image_before_it(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    window = window_around(now, opens_in_s=WINDOW_OPENS_IN_S, zone="America/St_Johns")
    opens_at = now + timedelta(seconds=WINDOW_OPENS_IN_S)
    async with open_store(database_url) as store:
        job_id = await submit_scheduled(store, tmp_path, ["w-1", "w-2", "w-3"], window=window)

    stop = asyncio.Event()
    settings = WorkerSettings(idle_poll_s=0.1, heartbeat_s=0.5, policies=FAST, progress="off")
    worker = asyncio.create_task(
        run_worker(
            database_url=database_url, cloud=cloud_for(sandbox), settings=settings, stop=stop
        )
    )
    try:
        for _ in range(300):
            rows = await rows_of(database_url, job_id)
            if all(row.phase == "done" for row in rows.values()):
                break
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await worker
    rows = await rows_of(database_url, job_id)
    assert {row.phase for row in rows.values()} == {"done"}
    # Window times are whole seconds: the window opens at the start of its second.
    opens_at = opens_at.replace(microsecond=0)
    for row in rows.values():
        assert row.claimed_at is not None
        assert row.claimed_at >= opens_at
        assert row.image_created_at is not None
        assert row.image_created_at >= opens_at


async def test_submit_at_sets_not_before_and_run_waits_for_it(
    database_url: str, env: dict[str, str], tmp_path: Path
) -> None:
    manifest = write_job(tmp_path, 1)

    code, out, err = await vmdk_migrate(
        "submit", "--at", "2999-01-01T00:00:00Z", str(manifest), env=env
    )
    assert code == 0, err
    job_id = out.strip()
    code, _, err = await vmdk_migrate("submit", "--at", "tomorrow", str(manifest), env=env)
    assert code == 2
    assert "--at" in err

    code, _, _ = await vmdk_migrate("run", "--once", "--metrics-port", "0", env=env)
    assert code == 0
    conn = await asyncpg.connect(database_url)
    try:
        not_before = await conn.fetchval("SELECT not_before FROM jobs WHERE id = $1", job_id)
        phases = await conn.fetch("SELECT phase FROM results WHERE job_id = $1", job_id)
    finally:
        await conn.close()
    assert not_before == datetime(2999, 1, 1, tzinfo=UTC)
    assert [row["phase"] for row in phases] == ["pending"]
