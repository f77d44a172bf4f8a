"""Several workers, one database: every image is worked on by one worker at a time."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.fixtures.batch import FAST, cloud_for, submit_disks
from worker.run.app import run_worker
from worker.run.settings import WorkerSettings
from worker.sandbox import Sandbox, SandboxConfig


def overlapping_tenures(events: list[dict[str, Any]]) -> list[int]:
    """Results whose events interleave two workers (A, B, A): two holders at once.

    A worker's tenure on a result runs from its claim to its last event there; after a
    tenure ends another worker may claim, but the first may never write again.
    """
    seen: dict[int, list[str]] = {}
    for event in events:
        if event["result_id"] is None or event["worker_id"] is None:
            continue
        holders = seen.setdefault(event["result_id"], [])
        if not holders or holders[-1] != event["worker_id"]:
            holders.append(event["worker_id"])
    return [result for result, holders in seen.items() if len(holders) != len(set(holders))]


@pytest.mark.parametrize("sandbox_config", [SandboxConfig(import_latency_s=0.05)], indirect=True)
async def test_three_workers_on_200_disks_never_share_an_image(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    await submit_disks(database_url, tmp_path, 200)
    workers = [
        WorkerSettings(
            worker_id=f"worker-{n}",
            concurrency=8,
            once=True,
            idle_poll_s=0.05,
            lease_s=5.0,
            heartbeat_s=1.0,
            policies=FAST,
        )
        for n in range(3)
    ]

    summaries = await asyncio.gather(
        *(
            run_worker(
                database_url=database_url,
                cloud=cloud_for(sandbox),
                settings=settings,
                stop=asyncio.Event(),
            )
            for settings in workers
        )
    )

    assert sum(s.by_phase["done"] for s in summaries) == 200
    assert all(s.by_phase["done"] >= 20 for s in summaries)  # all three did a share
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT id, phase, attempts, glance_image_id FROM results")
        events = [dict(e) for e in await conn.fetch("SELECT * FROM events ORDER BY id")]
    finally:
        await conn.close()
    assert {row["phase"] for row in rows} == {"done"}
    # Database: each image was claimed once, by one worker, and only that worker wrote it.
    assert {row["attempts"] for row in rows} == {1}
    claims = Counter(e["result_id"] for e in events if e["event"] == "image.claimed")
    assert set(claims.values()) == {1}
    assert len(claims) == 200
    assert overlapping_tenures(events) == []
    writers: dict[int, set[str]] = {e["result_id"]: set() for e in events if e["result_id"]}
    for event in events:
        if event["result_id"] is not None:
            writers[event["result_id"]].add(event["worker_id"])
    assert {len(w) for w in writers.values()} == {1}
    # Cloud: each image was created and staged exactly once.
    ids = {str(row["glance_image_id"]) for row in rows}
    assert {image["id"] for image in sandbox.images()} == ids
    creates = sum(
        1 for r in sandbox.requests if r.method == "POST" and r.path == "/image/v2/images"
    )
    stages = [r for r in sandbox.requests if r.method == "PUT" and r.path.endswith("/stage")]
    assert creates == 200
    assert Counter(r.path for r in stages).most_common(1)[0][1] == 1
    assert len(stages) == 200


def test_overlap_check_catches_an_interleaved_holder() -> None:
    events = [
        {"result_id": 1, "worker_id": "a"},
        {"result_id": 1, "worker_id": "b"},
        {"result_id": 2, "worker_id": "a"},
        {"result_id": 1, "worker_id": "a"},  # a writes after b took over
    ]
    assert overlapping_tenures(events) == [1]
    assert overlapping_tenures(events[:3]) == []
