"""`status --watch` shows each job's bytes moved, rate and ETA as the dashboard does."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import pytest
from rich.console import Console

from tests.fixtures.views import WORKER, Disk, seed_job
from worker.core.model import Phase
from worker.fleet import format_fleet, render_fleet
from worker.progress import fleet_snapshot
from worker.rates import JobRates
from worker.store import Store
from worker.store.views import Views

MIB = 1 << 20
GIB = 1 << 30


@pytest.fixture
async def views(database_url: str) -> AsyncIterator[Views]:
    opened = await Views.connect(database_url, max_size=1, application_name="test-fleet")
    yield opened
    await opened.close()


async def test_the_fleet_shows_the_rate_of_bytes_moved_and_the_eta_in_iec_units(
    store: Store, views: Views
) -> None:
    seeded = await seed_job(
        store, "big", [Disk("disk-1", 100 * GIB, Phase.STAGING), Disk("disk-2", 100 * GIB)]
    )
    uploading = next(r for r in await store.result_rows(seeded.job_id) if r.image_name == "disk-1")
    now = [0.0]
    rates = JobRates(clock=lambda: now[0])
    await rates.sample(views)
    for second in (1, 2):  # 30 MiB a second, sampled each second
        await store.set_progress(uploading.id, worker_id=WORKER, bytes_staged=second * 30 * MIB)
        now[0] = float(second)
        await rates.sample(views)

    snapshot = await fleet_snapshot(store)
    text = format_fleet(snapshot, rates)

    # 200 GiB - 60 MiB left at 30 MiB/s: 6824 s.
    figures = "60.0 MiB of 200.0 GiB moved (0.0%)  rate 30.0 MiB/s  ETA 1 h 53 min"
    assert f"job big {seeded.job_id}: 2 image(s) pending=1 staging=1  {figures}" in text
    assert "  viewtest:1  big/disk-1  staging  60.0 MiB of 100.0 GiB (0%)" in text
    assert "1 image(s) in flight on 1 worker(s)" in text

    console = Console(file=io.StringIO(), width=160, force_terminal=True, record=True)
    console.print(render_fleet(snapshot, rates))
    drawn = console.export_text()
    assert figures in drawn
    assert "viewtest:1  big/disk-1  staging" in drawn
