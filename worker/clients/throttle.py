"""A token bucket on bytes, shared by every upload of a process, whose rate can change any time."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator

# A waiter re-reads the rate at least this often, so a lowered or raised limit applies at once
# rather than after a sleep computed under the old one.
_RECHECK_S = 0.1
# Slices a throttled chunk is sent in, as a share of one second at the current rate: smooth
# enough for the link, coarse enough that the per-slice overhead does not show.
_SLICE_S = 0.05
_MIN_SLICE_BYTES = 16 << 10


class Throttle:
    """Bytes per second for all who share it, in order of asking; `None` means no limit.

    Fairness and rate changes come from positions rather than per-caller sleeps: every
    reservation takes the next `n` bytes of one cumulative count, and waits until the bytes
    allowed so far (which grow at the current rate) reach its end.
    """

    def __init__(
        self,
        rate_bytes_per_s: float | None = None,
        *,
        burst_s: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self._burst_s = burst_s
        self._rate: float | None = None
        self._issued_bytes = 0.0  # reserved so far, by every caller together
        self._allowed_bytes = 0.0  # the rate has let this many through so far
        self._updated_at = clock()
        self.streams = 0  # uploads sending through this throttle now (see `sending`)
        self.set_rate(rate_bytes_per_s)

    @property
    def rate_bytes_per_s(self) -> float | None:
        return self._rate

    def set_rate(self, rate_bytes_per_s: float | None) -> None:
        """Change the limit; waiters see it within a tenth of a second. None or 0: no limit."""
        self._advance()
        if rate_bytes_per_s is not None and rate_bytes_per_s < 0:
            raise ValueError(f"a rate cannot be negative: {rate_bytes_per_s}")
        self._rate = rate_bytes_per_s or None

    @contextlib.contextmanager
    def sending(self) -> Iterator[None]:
        """Count one upload for as long as the block runs (the share of a worker follows it)."""
        self.streams += 1
        try:
            yield
        finally:
            self.streams -= 1

    def slice_bytes(self, chunk_bytes: int) -> int:
        """How many bytes of a chunk to send at a time under the current rate."""
        if self._rate is None:
            return chunk_bytes
        return max(_MIN_SLICE_BYTES, min(chunk_bytes, int(self._rate * _SLICE_S)))

    def reserve(self, size_bytes: int) -> float:
        """Take the next `size_bytes`; return the position to wait for (see `delay_s`)."""
        self._advance()
        self._issued_bytes += size_bytes
        if self._rate is None:
            self._allowed_bytes = self._issued_bytes
        return self._issued_bytes

    def delay_s(self, position: float) -> float:
        """Seconds until the bytes up to `position` may go, at the current rate; 0 when now."""
        self._advance()
        missing = position - self._allowed_bytes
        # Under a byte is rounding, not waiting: sleeping for it could never end on a clock
        # whose resolution is coarser than the delay.
        if missing < 1.0 or self._rate is None:
            return 0.0
        return missing / self._rate

    async def acquire(self, size_bytes: int) -> None:
        """Wait until `size_bytes` more may be sent."""
        position = self.reserve(size_bytes)
        while (delay_s := self.delay_s(position)) > 0:
            await self._sleep(min(delay_s, _RECHECK_S))

    def _advance(self) -> None:
        now = self._clock()
        elapsed_s = max(0.0, now - self._updated_at)
        self._updated_at = now
        if self._rate is None:
            self._allowed_bytes = self._issued_bytes
            return
        # Idle time builds up a little credit (the burst), never more.
        ceiling = self._issued_bytes + self._rate * self._burst_s
        self._allowed_bytes = min(self._allowed_bytes + self._rate * elapsed_s, ceiling)
