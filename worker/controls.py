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
from dataclasses import dataclass

import asyncpg
import structlog

from worker.clients.throttle import Throttle
from worker.core.events import Event

log = structlog.get_logger(__name__)

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

_GET_LIMIT = "SELECT bandwidth_bytes_per_s FROM controls WHERE id"
_SET_LIMIT = """
UPDATE controls SET bandwidth_bytes_per_s = $1, updated_at = now(), updated_by = $2 WHERE id
"""
# One statement a second per worker: report our uploads, read the cap and everyone's uploads.
_REPORT = """
WITH reported AS (
    INSERT INTO worker_streams (worker_id, streams, seen_at) VALUES ($1, $2, now())
    ON CONFLICT (worker_id) DO UPDATE SET streams = EXCLUDED.streams, seen_at = now()
)
SELECT (SELECT bandwidth_bytes_per_s FROM controls WHERE id) AS limit_bytes_per_s,
       (SELECT coalesce(sum(streams), 0) FROM worker_streams
         WHERE worker_id <> $1 AND seen_at > now() - make_interval(secs => $3)) AS others
"""
_FORGET = "DELETE FROM worker_streams WHERE worker_id = $1"


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
    """'50 MiB/s' style, or 'off'."""
    if rate_bytes_per_s is None:
        return "off"
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if rate_bytes_per_s >= size:
            return f"{rate_bytes_per_s / size:g} {unit}/s"
    return f"{rate_bytes_per_s:g} B/s"


async def get_bandwidth_limit(database_url: str) -> int | None:
    """The cap of all workers together, in bytes per second; None when there is none."""
    conn = await asyncpg.connect(database_url)
    try:
        value = await conn.fetchval(_GET_LIMIT)
    finally:
        await conn.close()
    return int(value) if value is not None else None


async def set_bandwidth_limit(
    database_url: str, rate_bytes_per_s: int | None, *, updated_by: str | None = None
) -> None:
    """Set (or with None, lift) the cap; running workers follow within a second or two."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(_SET_LIMIT, rate_bytes_per_s, updated_by)
    finally:
        await conn.close()


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
    """Keeps a Throttle at this worker's share of the cap from the database."""

    database_url: str
    worker_id: str
    throttle: Throttle
    every_s: float = FOLLOW_EVERY_S

    async def run(self) -> None:
        conn = await asyncpg.connect(self.database_url)
        try:
            while True:
                await self._follow_once(conn)
                await asyncio.sleep(self.every_s)
        finally:
            with contextlib.suppress(Exception):
                await conn.execute(_FORGET, self.worker_id)
            await conn.close()

    async def _follow_once(self, conn: asyncpg.Connection) -> None:
        mine = self.throttle.streams
        try:
            record = await conn.fetchrow(_REPORT, self.worker_id, mine, LIVE_WITHIN_S)
        except (asyncpg.PostgresError, OSError) as exc:
            # Keep the last known rate: a database hiccup must not lift the cap.
            log.warning(Event.WORKER_CONTROLS_UNREAD, error=str(exc))
            return
        share = worker_share(record["limit_bytes_per_s"], mine=mine, others=record["others"])
        if share != self.throttle.rate_bytes_per_s:
            log.info(
                Event.WORKER_BANDWIDTH_CHANGED,
                limit_bytes_per_s=record["limit_bytes_per_s"],
                share_bytes_per_s=share,
            )
            self.throttle.set_rate(share)


@contextlib.asynccontextmanager
async def following_bandwidth(
    database_url: str, *, worker_id: str, every_s: float = FOLLOW_EVERY_S
) -> AsyncIterator[Throttle]:
    """A Throttle for every upload of this process, kept at its share of the cap meanwhile."""
    throttle = Throttle()
    follower = BandwidthFollower(database_url, worker_id, throttle, every_s=every_s)
    task = asyncio.create_task(follower.run(), name="bandwidth")
    try:
        yield throttle
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
