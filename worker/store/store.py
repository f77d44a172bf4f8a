"""The PostgreSQL store: jobs, the results table that is also the work queue, and the event log."""

from __future__ import annotations

import asyncio
import enum
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields, replace
from datetime import UTC, date, datetime
from typing import Any, TypeVar, assert_never, cast
from uuid import UUID

import asyncpg

from worker.core import changes
from worker.core.events import Event
from worker.core.model import (
    DiskSpec,
    JobSpec,
    Phase,
    Verification,
    image_id_for,
    next_image_id,
)
from worker.errors import ConfigError
from worker.intake.vms import VmCounts, group_vms
from worker.observe.bus import publisher
from worker.store.problems import DATABASE_ERRORS, database_reason, describe_database_error
from worker.store.sql import QUERIES, load_migrations

events = publisher(__name__)
T = TypeVar("T")

# What a lost server looks like: refused or reset sockets, a connection the server closed
# (restart, pg_terminate_backend), a server still starting up or out of connection slots.
CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
)

# Statements PostgreSQL aborts to break a lock cycle or a serialization conflict.
_CONFLICT_ERRORS: tuple[type[Exception], ...] = (
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
)

# The DiskSpec attributes kept in results.spec (the rest have columns of their own).
SPEC_FIELDS = (
    "source_auth",
    "import_method",
    "disk_format",
    "container_format",
    "visibility",
    "min_disk",
    "min_ram",
    "protected",
    "tags",
    "properties",
    "stores",
    "all_stores",
    "all_stores_must_succeed",
)


@dataclass(frozen=True)
class StepEvent:
    """What every step's write carries besides its change: the event and who writes it."""

    worker_id: str
    event: Event
    phase: Phase | None = None  # the phase the row enters; None keeps it
    request_id: str | None = None  # Glance's request id of the step, kept in request_ids
    detail: Mapping[str, object] | None = None  # the event's detail


class LeaseLost(Exception):
    """The row is no longer leased by this worker: released, reclaimed by another, or never held."""


@dataclass(frozen=True)
class ResultRow:
    """One row of the results table, one attribute per column."""

    id: int
    job_id: UUID
    disk_index: int
    image_name: str
    source_path: str
    source_size_bytes: int
    spec: Mapping[str, Any]
    phase: Phase
    glance_image_id: UUID
    attempts: int
    bytes_staged: int
    submitted_at: datetime
    claimed_at: datetime | None
    image_created_at: datetime | None
    staged_at: datetime | None
    import_requested_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    glance_status: str | None
    glance_size: int | None
    glance_virtual_size: int | None
    glance_checksum: str | None
    glance_os_hash_algo: str | None
    glance_os_hash_value: str | None
    source_hash_algo: str | None
    source_hash_value: str | None
    verification: Verification | None
    error_code: str | None
    error_message: str | None
    worker_id: str | None
    lease_expires_at: datetime | None
    next_attempt_at: datetime
    import_request_id: str | None
    request_ids: tuple[str, ...]
    cleanup: str | None
    source_md5: str | None
    cleanup_settled_at: datetime | None
    glance_stores: tuple[str, ...] | None
    glance_failed_stores: tuple[str, ...] | None

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ResultRow:
        """Build from a query row that holds every results column (extra columns are ignored)."""
        values = {name: record[name] for name in RESULT_COLUMNS}
        values["phase"] = Phase(values["phase"])
        if values["verification"] is not None:
            values["verification"] = Verification(values["verification"])
        values["request_ids"] = tuple(values["request_ids"])
        for name in ("glance_stores", "glance_failed_stores"):
            if values[name] is not None:
                values[name] = tuple(values[name])
        return cls(**values)

    def disk_spec(self) -> DiskSpec:
        """The disk as the manifest described it."""
        extra = {name: self.spec[name] for name in SPEC_FIELDS if name in self.spec}
        for name in ("tags", "stores"):
            if name in extra:
                extra[name] = tuple(extra[name])
        return DiskSpec(
            disk_index=self.disk_index,
            name=self.image_name,
            source=self.spec.get("source_url", self.source_path),
            size_bytes=self.source_size_bytes,
            source_identity=self.spec.get("source_identity"),
            appliance=self.spec.get("appliance"),
            expected_digest=self.spec.get("expected_digest"),
            **extra,
        )


RESULT_COLUMNS = tuple(f.name for f in fields(ResultRow))


@dataclass(frozen=True)
class Claim:
    """A row this worker now holds a lease on, with what it needs to migrate the disk."""

    row: ResultRow
    spec: DiskSpec
    on_failure: str
    cancelled: bool = False  # the job was cancelled: clean up, do not go on
    job_name: str = ""

    def context(self) -> dict[str, object]:
        """What every log line about this row's image carries, besides the worker's id."""
        return {
            "job": self.job_name,
            "job_id": str(self.row.job_id),
            "image": self.spec.name,
            "result_id": self.row.id,
        }


# What `vmdk-migrate jobs` says of a job, in the order a job goes through them.
JOB_STATES = ("scheduled", "running", "paused", "finished", "cancelled")


@dataclass(frozen=True)
class JobSummary:
    """Progress of one job: row counts by phase, bytes staged and done so far, its state.

    `state` is one of JOB_STATES: scheduled (no disk started yet), running, paused (started,
    but not_before or the maintenance window holds its pending disks back), finished (every
    disk done or failed) or cancelled.
    """

    job_id: UUID
    name: str
    submitted_at: datetime
    disk_count: int
    total_bytes: int
    bytes_staged: int
    counts: Mapping[str, int]
    cancelled: bool
    bytes_done: int
    state: str
    cleanups_owed: int = 0  # failed images whose deletion is still to be made


@dataclass(frozen=True)
class CancelResult:
    """What `cancel_job` did: rows failed before they started, rows left to their workers."""

    not_started: int
    in_flight: int


@dataclass(frozen=True)
class Pause:
    """A worker waiting out an outage of one service."""

    worker_id: str
    service: str
    reason: str
    since: datetime
    paused_s: float


class Store:
    """Every database access of the worker; one method per query of queries.sql.

    The worker's own calls (claim, the steps' writes, release) outlast a lost server: they wait,
    reconnect with backoff and try again for up to `reconnect_patience_s`.
    """

    def __init__(self, pool: asyncpg.Pool, *, reconnect_patience_s: float = 300.0) -> None:
        self._pool = pool
        self._patience_s = reconnect_patience_s
        # Told of a lost server (the error) and of its return (None): the worker's breaker.
        self.on_connection: Callable[[BaseException | None], None] | None = None

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        reconnect_patience_s: float = 300.0,
    ) -> Store:
        pool = await asyncpg.create_pool(
            dsn, min_size=min_size, max_size=max_size, init=_init_connection
        )
        return cls(pool, reconnect_patience_s=reconnect_patience_s)

    async def _patiently(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        """Run `call`; while the server is unreachable, back off and run it again."""
        started = time.monotonic()
        failures = 0
        while True:
            try:
                result = await call()
            except _CONFLICT_ERRORS as exc:
                # PostgreSQL rolled the statement back to break a cycle of locks (an operator
                # deleting a job while it runs, say): it is safe to send it again.
                failures += 1
                if failures > _MAX_CONFLICT_RETRIES:
                    raise
                events.warning(Event.DB_CONFLICT_RETRIED, operation=operation, error=str(exc))
                await asyncio.sleep(_RECONNECT_BASE_DELAY_S * failures)
                continue
            except CONNECTION_ERRORS as exc:
                failures += 1
                if self.on_connection is not None:
                    self.on_connection(exc)
                waited_s = time.monotonic() - started
                if waited_s >= self._patience_s:
                    raise
                delay_s = min(_RECONNECT_MAX_DELAY_S, _RECONNECT_BASE_DELAY_S * 2.0**failures)
                events.warning(
                    Event.DB_RECONNECTING,
                    operation=operation,
                    attempt=failures,
                    waited_s=round(waited_s, 2),
                    error=database_reason(exc),
                )
                await asyncio.sleep(delay_s)
            else:
                if failures and self.on_connection is not None:
                    self.on_connection(None)
                return result

    async def close(self) -> None:
        await self._pool.close()

    async def upgrade(self) -> list[int]:
        """Apply the pending migrations in order; concurrent callers wait, then find none left."""
        applied: list[int] = []
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(QUERIES["upgrade_lock"])
            done: set[int] = set()
            if await conn.fetchval(QUERIES["upgrade_schema_exists"]):
                records = await conn.fetch(QUERIES["upgrade_applied_versions"])
                done = {record["version"] for record in records}
            for migration in load_migrations():
                if migration.version in done:
                    continue
                await conn.execute(migration.sql)
                await conn.execute(
                    QUERIES["upgrade_record_version"], migration.version, migration.name
                )
                applied.append(migration.version)
        return applied

    async def submit_job(
        self,
        job: JobSpec,
        *,
        manifest: Mapping[str, object],
        manifest_sha256: str,
        submitted_by: str | None = None,
        not_before: datetime | None = None,
    ) -> UUID:
        """Write the job, a pending row per disk and a job.submitted event in one statement.

        `not_before` defaults to the manifest's; its `window` is kept in jobs.window.
        """
        return await self._insert_job(
            self._pool,
            job,
            manifest=manifest,
            manifest_sha256=manifest_sha256,
            submitted_by=submitted_by,
            not_before=not_before,
        )

    async def submit_job_once(
        self,
        job: JobSpec,
        *,
        manifest: Mapping[str, object],
        manifest_sha256: str,
        submitted_by: str | None = None,
        not_before: datetime | None = None,
    ) -> tuple[UUID, bool]:
        """Submit unless a job with the same normalized manifest exists; (job id, created).

        Submissions are serialized, so two at once of one manifest make a single job.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(QUERIES["submit_job_lock"])
            existing = await conn.fetchval(QUERIES["submit_job_same_manifest"], dict(manifest))
            if existing is not None:
                return existing, False
            job_id = await self._insert_job(
                conn,
                job,
                manifest=manifest,
                manifest_sha256=manifest_sha256,
                submitted_by=submitted_by,
                not_before=not_before,
            )
            return job_id, True

    @staticmethod
    async def _insert_job(
        conn: asyncpg.Pool | asyncpg.Connection,
        job: JobSpec,
        *,
        manifest: Mapping[str, object],
        manifest_sha256: str,
        submitted_by: str | None,
        not_before: datetime | None,
    ) -> UUID:
        job_id = uuid.uuid4()
        disks = [_disk_row(job_id, disk) for disk in job.disks]
        if not_before is None and isinstance(manifest.get("not_before"), str):
            not_before = datetime.fromisoformat(str(manifest["not_before"]))
        await conn.fetchval(
            QUERIES["submit_job"],
            job_id,
            job.name,
            submitted_by,
            dict(manifest),
            manifest_sha256,
            len(job.disks),
            job.total_bytes,
            job.on_failure,
            not_before,
            disks,
        )
        return job_id

    async def claim(
        self,
        *,
        worker_id: str,
        limit: int,
        lease_s: float,
        working_on: Sequence[int] | None = None,
    ) -> list[Claim]:
        """Lease up to `limit` claimable rows, oldest job first; concurrent claimers never share.

        A worker that passes `working_on` (the rows it already runs) also gets back any other
        row still leased to it: one whose claim answer was lost with its connection.
        """
        if limit <= 0:
            return []
        held = None if working_on is None else list(working_on)
        records = await self._patiently(
            "claim",
            lambda: self._pool.fetch(QUERIES["claim"], worker_id, limit, float(lease_s), held),
        )
        claims = []
        for record in records:
            row = ResultRow.from_record(record)
            claims.append(
                Claim(
                    row=row,
                    spec=row.disk_spec(),
                    on_failure=record["job_on_failure"],
                    cancelled=record["job_cancelled"],
                    job_name=record["job_name"],
                )
            )
        return claims

    async def apply(self, result_id: int, change: changes.Change, step: StepEvent) -> ResultRow:
        """Write one step: `change` by the statement of its kind, with the step's event.

        See `note` for what every step's write shares.
        """
        match change:
            case changes.Noted():
                return await self.note(result_id, step)
            case changes.ImageCreated():
                return await self.mark_created(result_id, change, step)
            case changes.DataStaged():
                return await self.mark_staged(result_id, change, step)
            case changes.SourceHashed():
                return await self.mark_hashed(result_id, change, step)
            case changes.ImportRequesting():
                return await self.mark_import_requesting(result_id, change, step)
            case changes.ImportRequested():
                return await self.mark_import_requested(result_id, change, step)
            case changes.ImageReplaced():
                return await self.mark_replaced(result_id, change, step)
            case changes.Failing():
                return await self.mark_failing(result_id, change, step)
            case changes.Finished():
                return await self.finish(result_id, change, step)
            case _:
                assert_never(change)

    async def note(self, result_id: int, step: StepEvent) -> ResultRow:
        """Append a step's event to a held row, which enters `step.phase` (None keeps it).

        What every step's write shares (this one's and the `mark_*` and `finish` ones'):
        the row is updated and the event appended in one statement, and the new row returned.
        The row is held while this worker's lease on it was neither released nor taken over by
        another worker's claim (an expired lease nobody claimed yet still counts). A row this
        worker took to done or failed stays writable by it, for a later cleanup note.
        `request_id` (Glance's, of the step) is appended to request_ids. A lost connection is
        waited out and the step written again under the same key, so it is recorded exactly
        once. Raises LeaseLost when the row is not held. Only `finish` takes a row to done or
        failed (to its change's phase): a terminal `step.phase` elsewhere is a ValueError.
        """
        return await self._step("note", result_id, step)

    async def mark_created(
        self, result_id: int, change: changes.ImageCreated, step: StepEvent
    ) -> ResultRow:
        """Glance made the image (see `note` for what every step's write shares)."""
        return await self._step("mark_created", result_id, step, _moment(change.at))

    async def mark_staged(
        self, result_id: int, change: changes.DataStaged, step: StepEvent
    ) -> ResultRow:
        """The source is staged, hashed on the way (see `note`)."""
        hashes = change.hashes
        return await self._step(
            "mark_staged",
            result_id,
            step,
            change.bytes_staged,
            _moment(change.at),
            hashes.algo,
            hashes.value,
            hashes.md5,
        )

    async def mark_hashed(
        self, result_id: int, change: changes.SourceHashed, step: StepEvent
    ) -> ResultRow:
        """The source was hashed again (see `note`)."""
        hashes = change.hashes
        return await self._step(
            "mark_hashed", result_id, step, hashes.algo, hashes.value, hashes.md5
        )

    async def mark_import_requesting(
        self, result_id: int, change: changes.ImportRequesting, step: StepEvent
    ) -> ResultRow:
        """The import is about to be asked for under our request id (see `note`)."""
        return await self._step("mark_import_requesting", result_id, step, change.request_id)

    async def mark_import_requested(
        self, result_id: int, change: changes.ImportRequested, step: StepEvent
    ) -> ResultRow:
        """Glance accepted the import (see `note`)."""
        return await self._step(
            "mark_import_requested", result_id, step, change.request_id, _moment(change.at)
        )

    async def mark_replaced(
        self, result_id: int, change: changes.ImageReplaced, step: StepEvent
    ) -> ResultRow:
        """The image is made again under a new id; the old one's progress is cleared (see
        `note`)."""
        return await self._step("mark_replaced", result_id, step, change.image_id)

    async def mark_failing(
        self, result_id: int, change: changes.Failing, step: StepEvent
    ) -> ResultRow:
        """The image failed for good; its error is kept while it is cleaned up (see `note`)."""
        return await self._step(
            "mark_failing",
            result_id,
            step,
            change.error_code,
            change.error_message,
            _text(change.verification),
            *_glance_values(change.glance),
        )

    async def finish(self, result_id: int, change: changes.Finished, step: StepEvent) -> ResultRow:
        """The row reaches done or failed: its lease ends, finished_at is set (see `note`)."""
        return await self._step(
            "finish",
            result_id,
            replace(step, phase=change.phase),
            _moment(change.at),
            change.error_code,
            change.error_message,
            change.cleanup,
            _text(change.verification),
            *_glance_values(change.glance),
        )

    async def _step(
        self,
        query: str,
        result_id: int,
        step: StepEvent,
        *values: object,
    ) -> ResultRow:
        """Run one step's statement under a fresh key (kept across reconnects)."""
        phase = step.phase
        if phase is not None and phase.terminal and query != "finish":
            raise ValueError(f"{query} cannot take a row to {phase}: finish does")
        step_key = uuid.uuid4()
        record = await self._patiently(
            query,
            lambda: self._pool.fetchrow(
                QUERIES[query],
                result_id,
                step.worker_id,
                step.event,
                phase.value if phase is not None else None,
                step.request_id,
                dict(step.detail) if step.detail is not None else None,
                step_key,
                *values,
            ),
        )
        if record is None:
            raise LeaseLost(f"result {result_id} is not held by worker {step.worker_id}")
        return ResultRow.from_record(record)

    async def set_progress(self, result_id: int, *, worker_id: str, bytes_staged: int) -> None:
        """Store upload progress without an event; raises LeaseLost when the row is not held."""
        status = await self._pool.execute(
            QUERIES["set_progress"], result_id, worker_id, bytes_staged
        )
        if status == "UPDATE 0":
            raise LeaseLost(f"result {result_id} is not held by worker {worker_id}")

    async def heartbeat(
        self, *, worker_id: str, result_ids: Sequence[int], lease_s: float
    ) -> set[int]:
        """Extend the leases on these rows; return the ids this worker still holds.

        A row this worker took to done or failed counts as held (it has no lease to extend);
        a released row or one another worker claimed does not.
        """
        if not result_ids:
            return set()
        records = await self._pool.fetch(
            QUERIES["heartbeat"], worker_id, list(result_ids), float(lease_s)
        )
        return {record["id"] for record in records}

    async def release(
        self, *, worker_id: str, result_ids: Sequence[int], refund_attempt: bool = False
    ) -> None:
        """Give unfinished rows back so any worker may claim them at once (shutdown).

        With `refund_attempt` the claim does not count as an attempt (an outage stopped it).
        """
        if result_ids:
            await self._patiently(
                "release",
                lambda: self._pool.execute(
                    QUERIES["release"], worker_id, list(result_ids), refund_attempt
                ),
            )

    async def refund_stopped(self, *, worker_id: str, result_ids: Sequence[int]) -> None:
        """Rows stopped because their leases ran out while the database was away cost no
        attempt: one another worker took over has that takeover's attempt taken back; one
        still leased to this worker is handed back with its attempt taken back (see
        queries.sql). Sent again after a lost answer, it refunds nothing twice."""
        if result_ids:
            key = uuid.uuid4()
            await self._patiently(
                "refund_stopped",
                lambda: self._pool.execute(
                    QUERIES["refund_stopped"], worker_id, list(result_ids), key
                ),
            )

    async def cancelled_results(self, result_ids: Sequence[int]) -> set[int]:
        """Those of these rows whose job was cancelled."""
        if not result_ids:
            return set()
        records = await self._pool.fetch(QUERIES["cancelled_results"], list(result_ids))
        return {record["id"] for record in records}

    async def cancel_job(self, job_id: UUID, *, by: str | None = None) -> CancelResult | None:
        """Cancel a job: rows not started fail at once, started ones are stopped and cleaned
        up by their workers. None when there is no such job. Cancelling twice is harmless."""
        record = await self._pool.fetchrow(QUERIES["cancel_job"], job_id, by)
        if record is None:
            return None
        return CancelResult(not_started=record["not_started"], in_flight=record["in_flight"])

    async def retry_job(self, job_id: UUID, *, by: str | None = None) -> int | None:
        """Send a job's failed rows back to the queue (never its done rows); lift a
        cancellation. Returns how many rows were re-queued, None when there is no such job."""
        async with self._pool.acquire() as conn, conn.transaction():
            failed = await conn.fetch(QUERIES["retry_job_failed_rows"], job_id)
            renamed = {
                row["id"]: next_image_id(row["glance_image_id"])
                for row in failed
                if row["cleanup"] == "deleted"
            }
            requeued = await conn.fetchval(
                QUERIES["retry_job"], job_id, by, list(renamed), list(renamed.values())
            )
        return None if requeued is None else int(requeued)

    async def job_summaries(self, job_ref: str | None = None) -> list[JobSummary]:
        """Summaries of the jobs with this id or name (every job when None), newest first."""
        name, job_id = _job_ref_params(job_ref)
        records = await self._pool.fetch(QUERIES["job_summaries"], name, job_id)
        return [_summary(record) for record in records]

    async def result_rows(self, job_id: UUID) -> list[ResultRow]:
        """Every row of a job in manifest order."""
        records = await self._pool.fetch(QUERIES["result_rows"], job_id)
        return [ResultRow.from_record(record) for record in records]

    async def job_vms(self, job_id: UUID) -> list[VmCounts]:
        """The VMs of a job's OVA and OVF sources, each with its disks counted by phase."""
        records = await self._pool.fetch(QUERIES["job_vms"], job_id)
        return group_vms((record["spec"], record["phase"]) for record in records)

    async def result_page(
        self, job_id: UUID, *, phases: Sequence[str] | None = None, limit: int | None = None
    ) -> tuple[list[ResultRow], int]:
        """The first `limit` rows of a job in these phases (all when None), and how many match.

        `limit`, when given, is at least 1.
        """
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        wanted = None if phases is None else [Phase(phase).value for phase in phases]
        records = await self._pool.fetch(QUERIES["result_page"], job_id, wanted, limit)
        matched = int(records[0]["matched"]) if records else 0
        return [ResultRow.from_record(record) for record in records], matched

    async def find_job_ids(self, job_ref: str) -> list[UUID]:
        """Ids of the jobs with this id or name, newest first."""
        name, job_id = _job_ref_params(job_ref)
        records = await self._pool.fetch(QUERIES["find_job_ids"], name, job_id)
        return [record["id"] for record in records]

    async def events(
        self, *, job_id: UUID | None = None, result_id: int | None = None
    ) -> list[dict[str, object]]:
        """Events of a job and/or one image (every event when neither is given), oldest first."""
        records = await self._pool.fetch(QUERIES["events"], job_id, result_id)
        return [dict(record) for record in records]

    async def ping(self) -> None:
        """One round trip; raises one of CONNECTION_ERRORS while the server is away."""
        await self._pool.fetchval(QUERIES["ping"])

    async def result_exists(self, result_id: int) -> bool:
        """Whether the row is still there (an operator may have deleted its job)."""
        return bool(await self._pool.fetchval(QUERIES["result_exists"], result_id))

    async def set_pause(
        self, *, worker_id: str, service: str, reason: str, since: datetime
    ) -> None:
        """Say that this worker waits for `service` (shown by `status`)."""
        await self._pool.execute(QUERIES["set_pause"], worker_id, service, reason, since)

    async def clear_pause(self, *, worker_id: str, service: str | None = None) -> None:
        """The worker no longer waits for `service` (None: for anything)."""
        await self._pool.execute(QUERIES["clear_pause"], worker_id, service)

    async def pauses(self) -> list[Pause]:
        """Workers waiting out an outage now, oldest outage first."""
        records = await self._pool.fetch(QUERIES["pauses"])
        return [
            Pause(
                worker_id=r["worker_id"],
                service=r["service"],
                reason=r["reason"],
                since=r["since"],
                paused_s=r["paused_for"].total_seconds(),
            )
            for r in records
        ]

    async def owed_cleanups(self, *, limit: int = 100) -> list[tuple[int, UUID]]:
        """(result id, Glance image id) of failed rows whose image must still be deleted."""
        records = await self._pool.fetch(QUERIES["owed_cleanups"], limit)
        return [(r["id"], r["glance_image_id"]) for r in records]

    async def cleanup_done(self, result_id: int, *, worker_id: str) -> None:
        """An owed deletion happened: the row says `deleted` from now on."""
        await self._pool.execute(QUERIES["cleanup_done"], result_id, worker_id)

    async def outstanding(self) -> int:
        """How many unfinished rows remain in jobs that are not cancelled."""
        return cast(int, await self._pool.fetchval(QUERIES["outstanding"]))


_RECONNECT_BASE_DELAY_S = 0.05
_MAX_CONFLICT_RETRIES = 10
_RECONNECT_MAX_DELAY_S = 2.0


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb", encoder=_json_dumps, decoder=json.loads, schema="pg_catalog", format="text"
    )


def _json_dumps(value: object) -> str:
    return json.dumps(value, default=_json_default)


def _json_default(value: object) -> object:
    """Encode the few non-JSON values our details carry; anything else is a bug to surface."""
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    raise TypeError(f"cannot store {type(value).__name__} as JSON")


def _disk_row(job_id: UUID, disk: DiskSpec) -> dict[str, object]:
    spec = {name: getattr(disk, name) for name in SPEC_FIELDS}
    spec["tags"] = list(disk.tags)
    spec["properties"] = dict(disk.properties)
    spec["stores"] = list(disk.stores)
    if disk.source_identity is not None:
        spec["source_identity"] = dict(disk.source_identity)
    for name in ("appliance", "expected_digest"):  # disks of OVAs and OVFs only
        if getattr(disk, name) is not None:
            spec[name] = dict(getattr(disk, name))
    if disk.shown_source != disk.source:  # kept for reading, out of the column shown
        spec["source_url"] = disk.source
    return {
        "disk_index": disk.disk_index,
        "image_name": disk.name,
        "source_path": disk.shown_source,
        "source_size_bytes": disk.size_bytes,
        "spec": spec,
        "glance_image_id": str(image_id_for(job_id, disk.disk_index)),
    }


def _moment(at: float | None) -> datetime | None:
    """Epoch seconds, the machine's clock, as the timestamptz PostgreSQL stores."""
    return None if at is None else datetime.fromtimestamp(at, tz=UTC)


def _text(value: enum.Enum | None) -> str | None:
    return None if value is None else str(value.value)


def _glance_values(glance: changes.GlanceRecord | None) -> tuple[object, ...]:
    """The glance_* columns' values, in their statements' order (all None: keep them)."""
    if glance is None:
        return (None,) * 8
    return (
        glance.status,
        glance.size,
        glance.virtual_size,
        glance.checksum,
        glance.os_hash_algo,
        glance.os_hash_value,
        None if glance.stores is None else list(glance.stores),
        None if glance.failed_stores is None else list(glance.failed_stores),
    )


def _job_ref_params(job_ref: str | None) -> tuple[str | None, UUID | None]:
    if job_ref is None:
        return None, None
    try:
        return job_ref, UUID(job_ref)
    except ValueError:
        return job_ref, None


def _summary(record: Mapping[str, Any]) -> JobSummary:
    """A job_summaries row as JobSummary: each column read by its field's name."""
    counts = {phase.value: int(record["counts"].get(phase.value, 0)) for phase in Phase}
    state = job_state(
        counts,
        cancelled=record["cancelled"],
        started=record["started"],
        may_start=record["may_start"],
    )
    read = {f.name for f in fields(JobSummary)} - {"counts", "state"}
    return JobSummary(**{name: record[name] for name in read}, counts=counts, state=state)


def job_state(counts: Mapping[str, int], *, cancelled: bool, started: bool, may_start: bool) -> str:
    """One of JOB_STATES, from the job's counts by phase and whether its disks may start now."""
    if cancelled:
        return "cancelled"
    if not any(n for phase, n in counts.items() if not Phase(phase).terminal):
        return "finished"
    if not started:
        return "scheduled"
    in_flight = sum(
        n for phase, n in counts.items() if phase != Phase.PENDING and not Phase(phase).terminal
    )
    if not in_flight and not may_start:
        return "paused"
    return "running"


@asynccontextmanager
async def open_store(database_url: str, *, max_size: int = 10) -> AsyncIterator[Store]:
    """A connected store with the schema brought up to date (migrations run on start).

    A database that cannot be reached or used is a ConfigError naming DATABASE_URL.
    """
    try:
        store = await Store.connect(database_url, max_size=max_size)
    except DATABASE_ERRORS as exc:
        raise ConfigError(describe_database_error(exc, database_url)) from exc
    try:
        try:
            applied = await store.upgrade()
        except DATABASE_ERRORS as exc:
            raise ConfigError(describe_database_error(exc, database_url)) from exc
        if applied:
            events.info(Event.DB_UPGRADED, versions=applied)
        yield store
    finally:
        await store.close()
