"""Live progress: the fleet view from the rows, and a worker's throttled progress lines."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import signal
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from rich.console import Console
from structlog.testing import capture_logs

from tests.fixtures.batch import migrate, rows_of, submit
from tests.fixtures.cli import PROJECT, cloud_env
from tests.fixtures.events import record
from worker.core.events import Event
from worker.progress import (
    FleetBars,
    IecSpeedColumn,
    RunProgress,
    fleet_snapshot,
    format_fleet,
    iec_rate,
    new_bars,
)
from worker.sandbox import Sandbox, SandboxConfig
from worker.store import Store


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
    text = format_fleet(snapshot)
    assert f"job test-job {job_id}: 3 image(s) pending=3 12288/" in text
    assert "  worker-a  test-job/d0  pending  4096/" in text
    assert "  worker-b  test-job/d1  pending  8192/" in text

    console = Console(file=io.StringIO(), width=140, force_terminal=True, record=True)
    console.print(FleetBars(console).update(snapshot))
    drawn = console.export_text()
    assert "worker-a test-job/d0 [pending]" in drawn
    assert "worker-b test-job/d1 [pending]" in drawn
    assert "2 image(s) in flight on 2 worker(s)" in drawn


async def test_off_a_terminal_a_worker_logs_throttled_progress_lines(store: Store) -> None:
    progress = RunProgress(store, mode="log", log_every_s=0.1)
    progress.observe(record(Event.IMAGE_CREATING, result_id=1, phase="creating"))
    progress.observe(record(Event.IMAGE_STAGING, result_id=2, phase="staging"))
    progress.observe(record(Event.IMAGE_FINISHED, result_id=3, phase="done"))

    with capture_logs() as logs:
        async with progress.showing():
            progress.on_progress(2, 1000)
            await asyncio.sleep(0.15)
            progress.on_progress(2, 3000)
            await asyncio.sleep(0.1)
            await asyncio.sleep(0.25)  # nothing changed: no new line

    lines = [line for line in logs if line["event"] == "worker.progress"]
    assert [line["bytes_staged"] for line in lines] == [1000, 3000]
    assert lines[0]["images"] == {"creating": 1, "staging": 1, "done": 1}
    assert lines[0]["stages_in_flight"] == 1
    assert 15_000 <= lines[1]["rate_bytes_per_s"] <= 25_000  # 2000 bytes in ~0.1 s


async def test_status_watch_prints_snapshots_off_a_terminal(
    store: Store, database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    await two_workers_mid_upload(store, database_url, tmp_path)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "status",
        "--watch",
        "--interval",
        "0.2",
        env={**cloud_env(sandbox, database_url), "COLUMNS": "120"},
        cwd=PROJECT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
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

    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "status", "--watch", "--interval", "0.2",
        env={**cloud_env(sandbox, database_url), "COLUMNS": "120"},
        cwd=PROJECT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
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
    console.print(FleetBars(console).update(await fleet_snapshot(store)))
    assert pause.search(console.export_text())


MiB = 1024**2


def test_the_rate_shown_follows_a_cap_change_within_three_seconds() -> None:
    now = [0.0]
    bars = new_bars(Console(file=io.StringIO()), clock=lambda: now[0])
    size = 4096 * MiB
    task = bars.add_task("d0", total=size)
    moved = 0

    def upload(seconds: float, rate: int) -> str:
        """Feed the bar as the upload hook does (4 times a second); the rate then shown."""
        nonlocal moved
        for _ in range(int(seconds * 4)):
            now[0] += 0.25
            moved += rate // 4
            bars.update(task, completed=moved)
        return IecSpeedColumn().render(bars.tasks[0]).plain

    assert upload(10, 40 * MiB) == "40.0 MiB/s"
    # `limit --bandwidth 20MiB/s`: three seconds later the bar says so, in the cap's unit.
    assert upload(3, 20 * MiB) == "20.0 MiB/s"
    # The ETA is the bytes left at the current rate.
    assert bars.tasks[0].time_remaining == pytest.approx((size - moved) / (20 * MiB), abs=1)


def test_rates_are_in_iec_units() -> None:
    assert [iec_rate(r) for r in (512, 3 * 1024, 44.6 * MiB, 1.5 * 1024**3)] == [
        "512 B/s",
        "3.0 KiB/s",
        "44.6 MiB/s",
        "1.5 GiB/s",
    ]


@pytest.mark.parametrize(
    "sandbox_config", [SandboxConfig(virtio_fail_names=("bad-*",))], indirect=True
)
async def test_the_last_frame_of_the_bars_agrees_with_the_result_table(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    job_id, _ = await submit(
        database_url, tmp_path, ["good-0", "bad-0", "good-1"], es_virtio_enabled="yes"
    )
    drawn = io.StringIO()
    with contextlib.redirect_stderr(drawn):  # the bars are drawn on stderr
        await migrate(database_url, sandbox, progress="bars")

    table = Counter(row.phase for row in (await rows_of(database_url, job_id)).values())
    assert dict(table) == {"done": 2, "failed": 1}
    last_frame = drawn.getvalue().strip().splitlines()[-1]
    assert last_frame.startswith("batch 3/3 images  done=2 failed=1 ")
