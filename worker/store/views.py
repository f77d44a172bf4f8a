"""Read-only access to the dashboard views, for the web dashboard and `status --watch`.

Its connections are read-only: the server refuses any write a query might attempt. Each
method runs the query of views.sql of the same name and returns plain dicts, ready for JSON.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID

import asyncpg

from worker.intake.vms import VmCounts, group_vms
from worker.store.sql import load_queries

VIEW_QUERIES = load_queries("views.sql")


class Views:
    """The dashboard schema's views through a small read-only pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def connect(cls, dsn: str, *, max_size: int = 4, application_name: str) -> Views:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=1,
            max_size=max_size,
            server_settings={
                "default_transaction_read_only": "on",
                "application_name": application_name,
            },
        )
        return cls(pool)

    async def close(self) -> None:
        await self._pool.close()

    async def jobs(self, *, limit: int) -> list[dict[str, Any]]:
        """Up to `limit` rows of dashboard.job_progress, newest job first."""
        return [dict(r) for r in await self._pool.fetch(VIEW_QUERIES["jobs"], limit)]

    async def job_failures(self, job_ids: Sequence[UUID]) -> list[dict[str, Any]]:
        """Failed images of these jobs by error code (job_id, error_code, images, last_message)."""
        records = await self._pool.fetch(VIEW_QUERIES["job_failures"], list(job_ids))
        return [dict(r) for r in records]

    async def job_vms(self, job_ids: Sequence[UUID]) -> dict[UUID, list[VmCounts]]:
        """The VMs of these jobs' OVA and OVF sources, each with its disks counted by phase."""
        records = await self._pool.fetch(VIEW_QUERIES["job_vms"], list(job_ids))
        by_job: dict[UUID, list[tuple[Mapping[str, object], str]]] = {}
        for record in records:
            spec = json.loads(record["spec"])  # this pool reads jsonb as text
            by_job.setdefault(record["job_id"], []).append((spec, record["phase"]))
        return {job_id: group_vms(rows) for job_id, rows in by_job.items()}

    async def job_exists(self, job_id: UUID) -> bool:
        """Whether there is a job with this id."""
        return bool(await self._pool.fetchval(VIEW_QUERIES["job_exists"], job_id))

    async def images(self, job_id: UUID, *, phase: str | None, limit: int) -> list[dict[str, Any]]:
        """The first `limit` rows of dashboard.image_progress of a job (in `phase` if given)."""
        records = await self._pool.fetch(VIEW_QUERIES["images"], job_id, phase, limit)
        return [dict(r) for r in records]

    async def image_count(self, job_id: UUID, *, phase: str | None) -> int:
        """How many images of the job there are (in `phase` if given)."""
        return int(await self._pool.fetchval(VIEW_QUERIES["image_count"], job_id, phase))

    async def job_bytes(self) -> list[dict[str, Any]]:
        """Every row of dashboard.job_bytes: bytes moved, in flight, failed and to move."""
        return [dict(r) for r in await self._pool.fetch(VIEW_QUERIES["job_bytes"])]
