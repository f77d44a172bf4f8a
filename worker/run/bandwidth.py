"""Run-time controls from the database (the bandwidth cap), followed by every worker each second.

The cap is for all workers together. Each worker reports how many uploads it is sending and
takes the share of the cap its uploads make of all live workers' uploads, so one worker alone
gets the whole cap, and two equally busy workers get half each. The split follows the reports
of the last second, so right after an upload starts or ends the total may overshoot briefly.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from worker.background import alongside
from worker.clients.throttle import Throttle
from worker.core.events import Event
from worker.observe import rates
from worker.observe.bus import publisher
from worker.store.controls import Controls, open_controls
from worker.store.problems import DATABASE_ERRORS

events = publisher(__name__)

FOLLOW_EVERY_S = 1.0
# A worker that has not reported for this long is gone (or stuck) and gets no share.
LIVE_WITHIN_S = 5.0

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}
_RATE = re.compile(r"^\s*(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[a-z]*)\s*(?:/\s*s)?\s*$", re.I)


def parse_rate(text: str) -> int | None:
    """Bytes per second from '50MiB/s', '200 MB/s', '1.5GiB', '1000000'; None for 'off'."""
    if text.strip().lower() in ("off", "none", "unlimited"):
        return None
    match = _RATE.match(text)
    unit = match["unit"].lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"not a rate: {text!r} (try 50MiB/s, 200MB/s or off)")
    rate = int(float(match["number"]) * _UNITS[unit])
    if rate <= 0:
        raise ValueError(f"a rate must be above zero: {text!r}")
    return rate


def format_rate(rate_bytes_per_s: float | None) -> str:
    """The cap as `limit` shows it: '50.0 MiB/s' style (IEC units), or 'off'."""
    return "off" if rate_bytes_per_s is None else rates.format_rate(rate_bytes_per_s)


async def get_bandwidth_limit(database_url: str) -> int | None:
    """The cap of all workers together, in bytes per second; None when there is none."""
    async with open_controls(database_url) as controls:
        return await controls.bandwidth_limit()


async def set_bandwidth_limit(
    database_url: str, rate_bytes_per_s: int | None, *, updated_by: str | None = None
) -> None:
    """Set (or with None, lift) the cap; running workers follow within a second or two."""
    async with open_controls(database_url) as controls:
        await controls.set_bandwidth_limit(rate_bytes_per_s, updated_by=updated_by)


def worker_share(limit_bytes_per_s: int | None, *, mine: int, others: int) -> float | None:
    """This worker's part of the cap: in proportion to the uploads it sends (all of it if alone)."""
    if limit_bytes_per_s is None:
        return None
    if mine == 0:
        # Nothing to send now; an upload that starts before the next report takes a fair part.
        return limit_bytes_per_s / (1 + min(others, 1))
    return limit_bytes_per_s * mine / (mine + others)


@dataclass
class BandwidthFollower:
    """Keeps a Throttle at this worker's share of the cap from the database.

    A report that fails (the database restarting, the link down) leaves the rate as it was,
    so a hiccup never lifts the cap; the next report opens a new connection.
    """

    database_url: str
    worker_id: str
    throttle: Throttle
    every_s: float = FOLLOW_EVERY_S
    _controls: Controls | None = field(default=None, init=False, repr=False)

    async def run(self) -> None:
        try:
            while True:
                await self.follow_once()
                await asyncio.sleep(self.every_s)
        finally:
            await self.stop()

    async def follow_once(self) -> None:
        """Report this worker's uploads and take its share of the cap; on failure keep the
        last known rate."""
        mine = self.throttle.streams
        try:
            if self._controls is None:
                self._controls = await Controls.connect(self.database_url)
            report = await self._controls.report_streams(
                self.worker_id, mine, live_within_s=LIVE_WITHIN_S
            )
        except DATABASE_ERRORS as exc:
            events.warning(Event.WORKER_CONTROLS_UNREAD, error=str(exc))
            await self._drop_connection()
            return
        share = worker_share(report.limit_bytes_per_s, mine=mine, others=report.others)
        if share != self.throttle.rate_bytes_per_s:
            events.info(
                Event.WORKER_BANDWIDTH_CHANGED,
                limit_bytes_per_s=report.limit_bytes_per_s,
                share_bytes_per_s=share,
            )
            self.throttle.set_rate(share)

    async def stop(self) -> None:
        """Take this worker out of the split and close the connection."""
        if self._controls is not None:
            with contextlib.suppress(*DATABASE_ERRORS):
                await self._controls.forget_streams(self.worker_id)
        await self._drop_connection()

    async def _drop_connection(self) -> None:
        controls, self._controls = self._controls, None
        if controls is not None:
            with contextlib.suppress(*DATABASE_ERRORS):
                await controls.close()


@contextlib.asynccontextmanager
async def following_bandwidth(
    database_url: str, *, worker_id: str, every_s: float = FOLLOW_EVERY_S
) -> AsyncIterator[Throttle]:
    """A Throttle for every upload of this process, kept at its share of the cap meanwhile."""
    throttle = Throttle()
    follower = BandwidthFollower(database_url, worker_id, throttle, every_s=every_s)
    async with alongside(follower.run(), name="bandwidth"):
        yield throttle
