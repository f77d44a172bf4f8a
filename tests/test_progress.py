"""A worker's live progress: its bars, their rate and ETA, and throttled progress lines."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections import Counter
from pathlib import Path

import pytest
from rich.console import Console
from structlog.testing import capture_logs

from tests.fixtures.batch import migrate, rows_of, submit
from tests.fixtures.events import record
from worker.core.events import Event
from worker.observe.progress import IecSpeedColumn, RunProgress, new_bars
from worker.sandbox import Sandbox, SandboxConfig
from worker.store import Store


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
