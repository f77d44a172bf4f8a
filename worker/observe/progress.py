"""Live progress: rich bars on a terminal, throttled `worker.progress` lines elsewhere."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO
from uuid import UUID

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from worker.background import alongside
from worker.core.events import LEFT_THIS_WORKER, Event, EventRecord
from worker.core.model import Phase
from worker.observe.bus import publisher
from worker.observe.logs import printable
from worker.observe.rates import format_rate
from worker.store.store import JobSummary, Store

events = publisher(__name__)

LOG_EVERY_S = 10.0  # off a terminal, at most one worker.progress line this often
_REDRAW_S = 0.25
RATE_WINDOW_S = 3.0  # the bars' rate is the bytes moved over this many seconds
_REFRESH_DB_S = 1.0


def wants_bars(mode: str, stream: TextIO) -> bool:
    """mode auto|bars|log|off: auto draws bars when `stream` is a terminal."""
    return mode == "bars" or (mode == "auto" and stream.isatty())


class IecSpeedColumn(ProgressColumn):
    """The bar's current rate, in MiB/s (rich's own column says MB/s)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text("" if task.finished else "?", style="progress.data.speed")
        return Text(format_rate(speed), style="progress.data.speed")


def new_bars(console: Console, *, clock: Callable[[], float] | None = None) -> Progress:
    """The bar layout shared by `run` and `status --watch`: bytes, rate and ETA.

    The rate is the bytes moved over the last RATE_WINDOW_S seconds, so that it follows a
    change of the bandwidth cap within that; the ETA is the bytes left at that rate.
    """
    return Progress(
        TextColumn("{task.description}", style="bold"),
        BarColumn(bar_width=30),
        DownloadColumn(binary_units=True),
        IecSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        auto_refresh=False,
        expand=False,
        speed_estimate_period=RATE_WINDOW_S,
        get_time=clock,
    )


def _sync_bar(
    bars: Progress, tasks: dict[Any, TaskID], key: Any, text: str, done: int, total: int
) -> None:
    text = escape(printable(text))  # image names are data: not rich markup, nor terminal codes
    task = tasks.get(key)
    if task is None:
        tasks[key] = bars.add_task(text, total=total or None, completed=done)
    else:
        bars.update(task, description=text, completed=done, total=total or None)


def _drop_bars(bars: Progress, tasks: dict[Any, TaskID], keep: set[Any]) -> None:
    for key in set(tasks) - keep:
        bars.remove_task(tasks.pop(key))


def _counts_text(counts: Mapping[str, int]) -> str:
    return " ".join(f"{phase}={counts[phase]}" for phase in Phase if counts.get(phase))


# --- one worker: `vmdk-migrate run` ----------------------------------------------------------


@dataclass
class _Stage:
    job_id: str
    image: str
    done_bytes: int = 0


@dataclass
class RunProgress:
    """This worker's images, fed by the image runner's progress hook and by the run's bus."""

    store: Store
    mode: str = "auto"  # auto | bars | log | off
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    log_every_s: float = LOG_EVERY_S
    clock: Callable[[], float] = time.monotonic
    _phases: dict[int, str] = field(default_factory=dict, init=False)
    _finished: Counter[str] = field(default_factory=Counter, init=False)
    _stages: dict[int, _Stage] = field(default_factory=dict, init=False)
    _last_bytes: dict[int, int] = field(default_factory=dict, init=False)
    _jobs: set[str] = field(default_factory=set, init=False)
    bytes_staged: int = field(default=0, init=False)

    def on_progress(self, result_id: int, done_bytes: int) -> None:
        """Bytes of the current upload so far (the image runner's on_progress hook)."""
        previous = self._last_bytes.get(result_id, 0)
        self.bytes_staged += max(0, done_bytes - previous)
        self._last_bytes[result_id] = done_bytes
        stage = self._stages.get(result_id)
        if stage is not None:
            stage.done_bytes = done_bytes

    def observe(self, event: EventRecord) -> None:
        """Follow each image's phase from the image.* events of the run's bus."""
        result_id = event.result_id
        if not event.event.startswith("image.") or result_id is None:
            return
        if event.event == Event.IMAGE_PROGRESS_NOT_SAVED:
            return
        job_id = str(event.get("job_id", ""))
        self._jobs.add(job_id)
        self._stages.pop(result_id, None)
        if event.event == Event.IMAGE_STAGING:
            self._stages[result_id] = _Stage(job_id, str(event.get("image", result_id)))
            self._last_bytes[result_id] = 0
        phase = event.get("phase")
        if event.event in LEFT_THIS_WORKER:
            self._phases.pop(result_id, None)
            self._last_bytes.pop(result_id, None)
            if event.event == Event.IMAGE_FINISHED:  # said exactly once per image ended here
                self._finished[str(phase)] += 1
        elif isinstance(phase, str) and phase and not Phase(phase).terminal:
            self._phases[result_id] = phase

    def by_phase(self) -> dict[str, int]:
        """Images of this run by phase: those in flight and those it finished."""
        counts = Counter(self._phases.values()) + self._finished
        return {phase.value: counts[phase] for phase in Phase if counts[phase]}

    @asynccontextmanager
    async def showing(self) -> AsyncIterator[None]:
        """Draw bars (terminal) or log throttled progress lines while the block runs."""
        if self.mode == "off":
            yield
            return
        show = self._bars() if wants_bars(self.mode, self.stream) else self._log_lines()
        async with alongside(show, name="progress"):
            yield

    async def _log_lines(self) -> None:
        last_bytes, last_at, last_line = 0, self.clock(), None
        while True:
            await asyncio.sleep(self.log_every_s)
            now = self.clock()
            line = (self.by_phase(), self.bytes_staged)
            if line != last_line:
                rate = (self.bytes_staged - last_bytes) / max(now - last_at, 1e-9)
                events.info(
                    Event.WORKER_PROGRESS,
                    images=line[0],
                    bytes_staged=self.bytes_staged,
                    rate_bytes_per_s=round(rate),
                    stages_in_flight=len(self._stages),
                )
            last_bytes, last_at, last_line = self.bytes_staged, now, line

    async def _bars(self) -> None:
        console = Console(file=self.stream)
        bars = new_bars(console, clock=self.clock)
        overall = bars.add_task("batch", total=None)
        tasks: dict[int, TaskID] = {}
        sizes: dict[int, int] = {}
        known_jobs: set[str] = set()
        with Live(bars, console=console, auto_refresh=False, redirect_stderr=True) as live:
            self._jobs.update(await _unfinished_job_ids(self.store))
            # Log lines go to sys.stderr as it is when written (worker/observe/logs.py): Live has
            # swapped it for a proxy that prints them above the bars.
            try:
                await self._draw(live, bars, overall, tasks, sizes, known_jobs)
            finally:
                # The last frame stays on the terminal: it must show how the run ended.
                _drop_bars(bars, tasks, set())
                with contextlib.suppress(Exception):
                    await self._refresh_batch(bars, overall, sizes, known_jobs)
                    live.refresh()

    async def _draw(
        self,
        live: Live,
        bars: Progress,
        overall: TaskID,
        tasks: dict[int, TaskID],
        sizes: dict[int, int],
        known_jobs: set[str],
    ) -> None:
        refreshed = 0.0
        while True:
            if self.clock() - refreshed >= _REFRESH_DB_S:
                refreshed = self.clock()
                await self._refresh_batch(bars, overall, sizes, known_jobs)
            for result_id, stage in self._stages.items():
                size = sizes.get(result_id, 0)
                _sync_bar(bars, tasks, result_id, f"  {stage.image}", stage.done_bytes, size)
            _drop_bars(bars, tasks, set(self._stages))
            live.refresh()
            await asyncio.sleep(_REDRAW_S)

    async def _refresh_batch(
        self, bars: Progress, overall: TaskID, sizes: dict[int, int], known_jobs: set[str]
    ) -> None:
        """The overall bar: every job this run has touched or found unfinished, from the rows."""
        summaries = []
        for job_id in sorted(self._jobs - {""}):
            summaries += await self.store.job_summaries(job_id)
            if job_id not in known_jobs:
                known_jobs.add(job_id)
                rows = await self.store.result_rows(UUID(job_id))
                sizes.update({row.id: row.source_size_bytes for row in rows})
        counts: Counter[str] = Counter()
        for summary in summaries:
            counts.update(summary.counts)
        images = sum(s.disk_count for s in summaries)
        finished = counts[Phase.DONE] + counts[Phase.FAILED]
        text = f"batch {finished}/{images} images  {_counts_text(counts)}"
        staged = sum(s.bytes_staged for s in summaries)
        bars.update(
            overall,
            description=text,
            completed=staged,
            total=sum(s.total_bytes for s in summaries) or None,
        )


async def _unfinished_job_ids(store: Store) -> list[str]:
    return [str(s.job_id) for s in await store.job_summaries() if unfinished(s)]


def unfinished(summary: JobSummary) -> bool:
    """Whether some image of the job has not ended yet."""
    return any(n for phase, n in summary.counts.items() if not Phase(phase).terminal)
