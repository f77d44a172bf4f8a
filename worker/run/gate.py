"""How many uploads to send at once: a limit that adapts to the server, within the maximum.

Glance serves uploads and every small call (the staged-size check, the import request, the
polls) from the same request threads. Past the point where its disks or CPUs are busy, one
more upload adds no throughput: it only makes the small calls wait behind the uploads, and
the imports start later. So the limit starts low and grows one upload at a time while the
aggregate upload rate grows with it, and halves when small calls turn slow or the cloud
answers 503/429 (additive increase, multiplicative decrease).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

START = 4  # uploads at first, when the maximum allows (the default stage concurrency)
WINDOW_S = 5.0  # how long each limit is tried before it is judged
SLOW_S = 2.0  # small calls slower than this (median of a window): the server is saturated
GAIN = 1.05  # a window must move this much more than the last to count as growth


@dataclass(frozen=True)
class Window:
    """What one window at one limit showed."""

    limit: int
    rate: float  # bytes uploaded per second
    busy: bool  # every slot was taken at some moment, with uploads waiting for one
    slow: bool  # the median small call took longer than SLOW_S
    throttled: bool  # the cloud answered 503 or 429


def next_limit(window: Window, previous_rate: float | None, maximum: int) -> int:
    """The limit to try next, judged by the window just ended (a pure decision).

    `previous_rate` is the rate of the window before a step up, when this window is the
    step's trial.
    """
    if window.slow or window.throttled:
        return max(1, window.limit // 2)
    if not window.busy:
        return window.limit  # nothing waits for a slot: the limit is not what holds us back
    if previous_rate is None or window.rate >= previous_rate * GAIN:
        return min(maximum, window.limit + 1)
    return max(1, window.limit - 1)  # the last step up added nothing: take it back


class StageGate:
    """Admits uploads up to `limit`, and moves the limit by what each window showed."""

    def __init__(
        self,
        maximum: int,
        *,
        start: int = START,
        adaptive: bool = True,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.maximum = max(1, maximum)
        self.limit = self.maximum if not adaptive else max(1, min(start, self.maximum))
        self._adaptive = adaptive
        self._window_s = window_s
        self._clock = clock
        self._in_use = 0
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._window_start = clock()
        self._bytes = 0
        self._latencies: list[float] = []
        self._busy = False
        self._throttled = False
        self._trial_of: float | None = None  # the rate before the step up now on trial
        self._hold_until = 0.0  # after a step was taken back, no step up before this

    async def __aenter__(self) -> None:
        if self._in_use >= self.limit or self._waiting:
            self._busy = True
            ticket = asyncio.get_running_loop().create_future()
            self._waiting.append(ticket)
            try:
                await ticket
            except asyncio.CancelledError:
                if ticket.done() and not ticket.cancelled():
                    self._in_use -= 1  # admitted as it was cancelled: give the slot back
                    self._admit()
                raise
        else:
            self._in_use += 1

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._in_use -= 1
        self._admit()

    def _admit(self) -> None:
        """Hand free slots to the uploads waiting longest."""
        while self._waiting and self._in_use < self.limit:
            ticket = self._waiting.popleft()
            if not ticket.done():
                self._in_use += 1
                ticket.set_result(None)

    def sent(self, nbytes: int) -> None:
        """Bytes of an upload went out."""
        self._bytes += nbytes
        self._judge()

    def answered(self, seconds: float, status: int) -> None:
        """A small call (not an upload) was answered after `seconds`, with `status`."""
        self._latencies.append(seconds)
        if status in (429, 503):
            self._throttled = True
        self._judge()

    def _judge(self) -> None:
        now = self._clock()
        elapsed = now - self._window_start
        if not self._adaptive or elapsed < self._window_s:
            return
        window = Window(
            limit=self.limit,
            rate=self._bytes / elapsed,
            busy=self._busy,
            slow=bool(self._latencies) and statistics.median(self._latencies) > SLOW_S,
            throttled=self._throttled,
        )
        limit = next_limit(window, self._trial_of, self.maximum)
        if limit > window.limit and now < self._hold_until:
            limit = window.limit
        if limit == window.limit - 1 and self._trial_of is not None:
            self._hold_until = now + 6 * self._window_s  # probe again later, not every window
        self._trial_of = window.rate if limit > window.limit else None
        self._window_start, self._bytes, self._latencies = now, 0, []
        self._busy = self._throttled = False
        self.limit = limit
        self._admit()
