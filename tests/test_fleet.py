"""`status --watch` shows each job's bytes moved, rate and ETA as the dashboard does."""

from __future__ import annotations

import asyncio
import io
import re
import signal
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from rich.console import Console

from tests.fixtures.batch import submit
from tests.fixtures.cli import PROJECT, cloud_env
from tests.fixtures.views import WORKER, Disk, seed_job
from worker.cli.fleet import fleet_snapshot, format_fleet, render_fleet
from worker.core.model import Phase
from worker.observe.rates import JobRates
from worker.sandbox import Sandbox
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


async def two_workers_mid_upload(store: Store, database_url: str, tmp_path: Path) -> str:
    """Rows held by two workers, each part-way through its upload."""
    job_id, _ = await submit(database_url, tmp_path, ["d0", "d1", "d2"])
    for worker_id, done_bytes in (("worker-a", 4096), ("worker-b", 8192)):
        (claim,) = await store.claim(worker_id=worker_id, limit=1, lease_s=60)
        await store.set_progress(claim.row.id, worker_id=worker_id, bytes_staged=done_bytes)
    return job_id


async def test_the_fleet_view_shows_every_workers_images_in_flight(
    store: Store, database_url: str, tmp_path: Path
) -> None:
    job_id = await two_workers_mid_upload(store, database_url, tmp_path)

    snapshot = await fleet_snapshot(store)

    assert [str(job.job_id) for job in snapshot.jobs] == [job_id]
    held = {(f.worker_id, f.row.image_name, f.row.bytes_staged) for f in snapshot.in_flight}
    assert held == {("worker-a", "d0", 4096), ("worker-b", "d1", 8192)}
    text = format_fleet(snapshot, JobRates())
    assert f"job test-job {job_id}: 3 image(s) pending=3  0 B of " in text
    assert "  worker-a  test-job/d0  pending  4.0 KiB of " in text
    assert "  worker-b  test-job/d1  pending  8.0 KiB of " in text

    console = Console(file=io.StringIO(), width=140, force_terminal=True, record=True)
    console.print(render_fleet(snapshot, JobRates()))
    drawn = console.export_text()
    assert "worker-a  test-job/d0  pending" in drawn
    assert "worker-b  test-job/d1  pending" in drawn
    assert "2 image(s) in flight on 2 worker(s)" in drawn


async def status_watch(sandbox: Sandbox, database_url: str) -> asyncio.subprocess.Process:
    """`status --watch` redrawing every 0.2 s, its output piped (so: plain snapshots)."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "status", "--watch", "--interval", "0.2",
        env={**cloud_env(sandbox, database_url), "COLUMNS": "120"},
        cwd=PROJECT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def test_status_watch_prints_snapshots_off_a_terminal(
    store: Store, database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    await two_workers_mid_upload(store, database_url, tmp_path)
    process = await status_watch(sandbox, database_url)
    # Interrupt once two snapshots are out, however long the start took on a loaded machine.
    assert process.stdout is not None
    seen: list[bytes] = []
    while sum(line.startswith(b"fleet at") for line in seen) < 2:
        line = await asyncio.wait_for(process.stdout.readline(), timeout=60)
        assert line, "status --watch ended before its second snapshot"
        seen.append(line)
    process.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(process.communicate(), timeout=10)

    assert process.returncode == 0, err.decode()
    text = b"".join(seen).decode() + out.decode()
    assert text.count("fleet at") >= 2
    assert "2 image(s) in flight on 2 worker(s)" in text
    assert "worker-a  test-job/d0" in text


async def test_status_watch_shows_a_workers_pause_in_each_frame(
    store: Store, database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    await two_workers_mid_upload(store, database_url, tmp_path)
    since = datetime.now(UTC) - timedelta(seconds=200)
    await store.set_pause(worker_id="worker-a", service="image", reason="unreachable", since=since)
    pause = re.compile(r"paused: image service unreachable for 3 min \d+ s \(worker worker-a\)")

    process = await status_watch(sandbox, database_url)
    assert process.stdout is not None
    frame: list[str] = []
    try:  # the first frame, up to its first image in flight (the pauses come before them)
        while not frame or not frame[-1].startswith("  worker-"):
            line = await asyncio.wait_for(process.stdout.readline(), timeout=60)
            assert line, f"status --watch ended before its first frame: {frame}"
            frame.append(line.decode().rstrip("\n"))
    finally:
        process.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(process.communicate(), timeout=10)

    assert process.returncode == 0, err.decode()
    assert frame[0].startswith("fleet at ")
    paused = [line for line in frame if line.startswith("paused:")]
    assert len(paused) == 1, frame
    assert pause.fullmatch(paused[0]), frame

    # On a terminal, the same line heads the bars.
    console = Console(file=io.StringIO(), width=140, force_terminal=True, record=True)
    console.print(render_fleet(await fleet_snapshot(store), JobRates()))
    assert pause.search(console.export_text())
