"""The run-time controls in the database: the bandwidth cap, and the uploads that share it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg

from worker.store.sql import load_queries

CONTROL_QUERIES = load_queries("controls.sql")


@dataclass(frozen=True)
class StreamsReport:
    """What one report of a worker's uploads reads back: the cap, and the others' uploads."""

    limit_bytes_per_s: int | None
    others: int


class Controls:
    """The controls table and worker_streams over one connection; one method per query of
    controls.sql. A failed call leaves the connection to the caller to close and open anew."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    @classmethod
    async def connect(cls, dsn: str, *, timeout_s: float = 10.0) -> Controls:
        return cls(await asyncpg.connect(dsn, timeout=timeout_s))

    async def close(self) -> None:
        await self._conn.close()

    async def bandwidth_limit(self) -> int | None:
        """The cap of all workers together, in bytes per second; None when there is none."""
        value = await self._conn.fetchval(CONTROL_QUERIES["bandwidth_limit"])
        return int(value) if value is not None else None

    async def set_bandwidth_limit(
        self, rate_bytes_per_s: int | None, *, updated_by: str | None = None
    ) -> None:
        """Set (or with None, lift) the cap."""
        await self._conn.execute(
            CONTROL_QUERIES["set_bandwidth_limit"], rate_bytes_per_s, updated_by
        )

    async def report_streams(
        self, worker_id: str, streams: int, *, live_within_s: float, timeout_s: float = 5.0
    ) -> StreamsReport:
        """Say how many uploads this worker sends; read the cap and the uploads of the other
        workers that reported within `live_within_s`. No answer in `timeout_s` is TimeoutError."""
        record = await self._conn.fetchrow(
            CONTROL_QUERIES["report_streams"],
            worker_id,
            streams,
            live_within_s,
            timeout=timeout_s,
        )
        limit = record["limit_bytes_per_s"]
        return StreamsReport(
            limit_bytes_per_s=int(limit) if limit is not None else None,
            others=int(record["others"]),
        )

    async def forget_streams(self, worker_id: str) -> None:
        """Take this worker's uploads out of the split (it stops)."""
        await self._conn.execute(CONTROL_QUERIES["forget_streams"], worker_id)


@asynccontextmanager
async def open_controls(dsn: str) -> AsyncIterator[Controls]:
    """Controls on a connection of their own, closed after the block."""
    controls = await Controls.connect(dsn)
    try:
        yield controls
    finally:
        await controls.close()
