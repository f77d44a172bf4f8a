"""True progress for the dashboard and `status --watch`: the rate of bytes moved, and the ETA.

The database keeps how many bytes each job has moved (dashboard.job_bytes), not how that
number grew, so the reader samples it a second or so apart and keeps a moving average:
the bytes moved over the last RATE_WINDOW_S seconds of samples, divided by the time they
span. It follows a change of the bandwidth cap within that window, whatever happened before.
The ETA is the bytes still to move at the current rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from uuid import UUID

from worker.run.outage import format_duration
from worker.store.problems import DATABASE_ERRORS
from worker.store.views import Views

# The moving average spans this much sample time: short enough to follow a new cap within
# it, long enough to smooth out the chunk-by-chunk steps of the uploads.
RATE_WINDOW_S = 3.0
SAMPLE_EVERY_S = 1.0


class ByteRate:
    """Bytes per second of a growing total, averaged over the samples of the last window.

    A total that shrinks (an image failed or started over, taking its staged bytes along)
    counts as no progress for that step rather than as a negative rate.
    """

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, int]] = deque()
        self._gained: deque[int] = deque()  # bytes gained from the previous sample to each

    def add(self, at_s: float, total_bytes: int) -> None:
        """A sample of the total taken at `at_s` seconds (any clock, as long as it is one)."""
        if self._samples and at_s <= self._samples[-1][0]:
            return  # a sample out of order, or twice at one moment, tells nothing
        gained = max(0, total_bytes - self._samples[-1][1]) if self._samples else 0
        self._samples.append((at_s, total_bytes))
        self._gained.append(gained)
        # Keep the samples of the window and the one just before it (the base when the
        # window holds only the latest sample); older ones no longer count.
        while len(self._samples) > 2 and self._samples[1][0] <= at_s - self.window_s:
            self._samples.popleft()
            self._gained.popleft()

    @property
    def rate_bytes_per_s(self) -> float | None:
        """The moving average; None before two samples."""
        if len(self._samples) < 2:
            return None
        latest_at = self._samples[-1][0]
        # The oldest sample within the window is the base; a window holding only the latest
        # sample (samples further apart than the window) reaches back to the one before.
        base = next(
            (i for i, (at, _) in enumerate(self._samples) if at >= latest_at - self.window_s),
            len(self._samples) - 1,
        )
        base = min(base, len(self._samples) - 2)
        span_s = latest_at - self._samples[base][0]
        gained = sum(list(self._gained)[base + 1 :])
        return gained / span_s


def eta_s(bytes_left: int, rate_bytes_per_s: float | None) -> float | None:
    """Seconds until `bytes_left` have moved at this rate: 0 when none are left, None when
    nothing moves (or the rate is not known yet)."""
    if bytes_left <= 0:
        return 0.0
    if not rate_bytes_per_s:
        return None
    return bytes_left / rate_bytes_per_s


class JobRates:
    """One ByteRate per job, fed from samples of dashboard.job_bytes."""

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, window_s: float = RATE_WINDOW_S
    ) -> None:
        self._clock = clock
        self._window_s = window_s
        self._rates: dict[UUID, ByteRate] = {}
        self.latest: dict[UUID, dict[str, Any]] = {}  # each job's last job_bytes row

    async def sample(self, views: Views) -> None:
        """Read every job's bytes moved once, at the clock's time."""
        self.observe(await views.job_bytes(), self._clock())

    def observe(self, rows: Iterable[Mapping[str, Any]], at_s: float) -> None:
        """Feed job_bytes rows read at `at_s`; jobs no longer listed are forgotten."""
        latest = {row["job_id"]: dict(row) for row in rows}
        for job_id in set(self._rates) - set(latest):
            del self._rates[job_id]
        for job_id, row in latest.items():
            rate = self._rates.setdefault(job_id, ByteRate(self._window_s))
            rate.add(at_s, int(row["bytes_moved"]))
        self.latest = latest

    def rate_bytes_per_s(self, job_id: UUID) -> float | None:
        """The job's current rate of bytes moved; None before two samples of it."""
        rate = self._rates.get(job_id)
        return rate.rate_bytes_per_s if rate is not None else None

    def eta_s(self, job_id: UUID, bytes_to_move: int) -> float | None:
        """Seconds until the job's `bytes_to_move` have moved at its current rate."""
        return eta_s(bytes_to_move, self.rate_bytes_per_s(job_id))

    async def run(self, views: Views, every_s: float = SAMPLE_EVERY_S) -> None:
        """Sample every `every_s` from now until cancelled (the caller took the first sample);
        a failed read is skipped, not fatal."""
        while True:
            await asyncio.sleep(every_s)
            # The database away for a moment: the rate spans the gap at the next sample.
            with contextlib.suppress(*DATABASE_ERRORS):
                await self.sample(views)


def format_bytes(count: float | None) -> str:
    """'1.5 GiB' style (IEC units), or '–' when unknown."""
    if count is None:
        return "–"
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(count) >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count:.0f} B"


def format_rate(rate_bytes_per_s: float | None) -> str:
    """'30.0 MiB/s' style (IEC units), or '–' when unknown."""
    return "–" if rate_bytes_per_s is None else format_bytes(rate_bytes_per_s) + "/s"


def format_eta(seconds: float | None) -> str:
    """'45 s', '3 min 20 s', '2 h 5 min', or '–' when unknown."""
    return "–" if seconds is None else format_duration(seconds)
