"""`vmdk-migrate status --watch`: every job's true progress, and the images in flight.

Each job shows its bytes moved of its total (uploads in progress included), the rate of
bytes moved (a moving average of the last few seconds of samples, worker/observe/rates.py) and the
ETA at that rate: the same figures as the web dashboard. Images in flight come from the rows
the workers hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from worker.cli.report import pause_lines
from worker.core.model import Phase
from worker.observe.logs import printable
from worker.observe.progress import unfinished
from worker.observe.rates import JobRates, format_bytes, format_eta, format_rate
from worker.store.store import JobSummary, Pause, ResultRow, Store
from worker.store.views import Views

_BAR_WIDTH = 30


_RECENT_FINISHED_JOBS = 5  # also shown: this many finished jobs


@dataclass(frozen=True)
class InFlight:
    """An image some worker holds a lease on."""

    worker_id: str
    job_name: str
    row: ResultRow


@dataclass(frozen=True)
class FleetSnapshot:
    """Every job's counts, and the images in flight on every worker, read at one moment."""

    jobs: Sequence[JobSummary]
    in_flight: Sequence[InFlight]
    older_jobs: int = 0  # finished jobs left out of `jobs`
    pauses: Sequence[Pause] = ()  # workers waiting out an outage


async def fleet_snapshot(store: Store) -> FleetSnapshot:
    """Unfinished jobs, the latest finished ones, and the rows workers hold right now."""
    summaries = await store.job_summaries()
    running = [s for s in summaries if unfinished(s)]
    finished = [s for s in summaries if not unfinished(s)]
    in_flight: list[InFlight] = []
    for summary in running:
        for row in await store.result_rows(summary.job_id):
            if row.lease_expires_at is not None and not Phase(row.phase).terminal:
                in_flight.append(InFlight(row.worker_id or "?", summary.name, row))
    in_flight.sort(key=lambda f: (f.worker_id, f.job_name, f.row.disk_index))
    shown = running + finished[:_RECENT_FINISHED_JOBS]
    return FleetSnapshot(
        shown,
        in_flight,
        older_jobs=len(finished[_RECENT_FINISHED_JOBS:]),
        pauses=await store.pauses(),
    )


def _counts_text(job: JobSummary) -> str:
    return " ".join(f"{phase}={n}" for phase, n in job.counts.items() if n)


def _job_figures(job: JobSummary, rates: JobRates) -> tuple[int, int, str]:
    """Bytes moved, total bytes, and 'X of Y moved (p%)  rate R  ETA E' for one job."""
    row = rates.latest.get(job.job_id)
    moved = int(row["bytes_moved"]) if row else 0
    total = int(row["total_bytes"]) if row else job.total_bytes
    to_move = int(row["bytes_to_move"]) if row else total
    percent = row["moved_percent"] if row else 0.0
    text = (
        f"{format_bytes(moved)} of {format_bytes(total)} moved ({percent:.1f}%)  "
        f"rate {format_rate(rates.rate_bytes_per_s(job.job_id))}  "
        f"ETA {format_eta(rates.eta_s(job.job_id, to_move))}"
    )
    return moved, total, text


def _header(snapshot: FleetSnapshot) -> str:
    workers = {f.worker_id for f in snapshot.in_flight}
    return (
        f"{len(snapshot.jobs)} job(s), {len(snapshot.in_flight)} image(s) in flight on "
        f"{len(workers)} worker(s)"
    )


def _flight_lines(snapshot: FleetSnapshot) -> list[str]:
    lines = []
    for flight in snapshot.in_flight:
        row = flight.row
        size = row.source_size_bytes
        percent = 100 * row.bytes_staged // size if size else 100
        lines.append(
            f"  {flight.worker_id}  {flight.job_name}/{row.image_name}  {row.phase}  "
            f"{format_bytes(row.bytes_staged)} of {format_bytes(size)} ({percent}%)"
        )
    return lines


def format_fleet(snapshot: FleetSnapshot, rates: JobRates) -> str:
    """A plain-text snapshot for a pipe or a log file."""
    lines = [f"fleet at {time.strftime('%Y-%m-%d %H:%M:%S')}: {_header(snapshot)}"]
    for job in snapshot.jobs:
        _, _, figures = _job_figures(job, rates)
        lines.append(
            f"job {job.name} {job.job_id}: {job.disk_count} image(s) {_counts_text(job)}  "
            + figures
        )
    if snapshot.older_jobs:
        lines.append(f"(+{snapshot.older_jobs} older finished job(s))")
    lines.extend(pause_lines(snapshot.pauses))
    lines.extend(_flight_lines(snapshot))
    return "\n".join(printable(line) for line in lines)


def render_fleet(snapshot: FleetSnapshot, rates: JobRates) -> RenderableType:
    """The same on a terminal: a bar of bytes moved per job, then the images in flight."""
    header = _header(snapshot) + (f"; +{snapshot.older_jobs} older" if snapshot.older_jobs else "")
    header += "".join(f"\n{line}" for line in pause_lines(snapshot.pauses))
    jobs = Table.grid(padding=(0, 1))
    for job in snapshot.jobs:
        moved, total, figures = _job_figures(job, rates)
        jobs.add_row(
            Text(printable(f"{job.name} {str(job.job_id)[:8]} {_counts_text(job)}"), "bold"),
            ProgressBar(total=total or None, completed=moved, width=_BAR_WIDTH),
            Text(figures),
        )
    images = Text("\n".join(printable(line) for line in _flight_lines(snapshot)))
    return Group(Text(printable(header), style="dim"), jobs, images)


async def watch_fleet(
    store: Store,
    views: Views,
    *,
    interval_s: float,
    stop: asyncio.Event,
    stream: TextIO | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Redraw the fleet in place on a terminal, or print a snapshot every `interval_s`.

    Each redraw samples every job's bytes moved first, so the rate is known from the second
    redraw on.
    """
    stream = stream or sys.stdout
    rates = JobRates(clock=clock)
    if not stream.isatty():
        while not stop.is_set():
            await rates.sample(views)
            print(format_fleet(await fleet_snapshot(store), rates), file=stream, flush=True)
            await _wait(stop, interval_s)
        return
    console = Console(file=stream)
    with Live(console=console, auto_refresh=False) as live:
        while not stop.is_set():
            await rates.sample(views)
            live.update(render_fleet(await fleet_snapshot(store), rates), refresh=True)
            await _wait(stop, interval_s)


async def _wait(stop: asyncio.Event, timeout_s: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=timeout_s)
