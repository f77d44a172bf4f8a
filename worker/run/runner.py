"""Performs the commands of one image's state machine against Glance and records every step."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, assert_never

from worker.clients.glance import GlanceClient, Image, Task
from worker.core.changes import Finished, Noted
from worker.core.events import Event
from worker.core.machine import (
    CheckStaged,
    Command,
    Created,
    CreateImage,
    Deleted,
    DeleteImage,
    Errored,
    Hashed,
    HashSource,
    ImageFacts,
    ImageState,
    ImportAccepted,
    Inspected,
    InspectImage,
    Outcome,
    Policies,
    Polled,
    PollImport,
    RequestImport,
    StageChecked,
    Staged,
    StageData,
    Step,
    TaskFacts,
    begin,
    cancel,
    decide,
)
from worker.core.model import WEB_DOWNLOAD, DiskSpec, Phase
from worker.errors import MigrationError
from worker.intake.digest import check_expected_digest, with_expected_digest
from worker.intake.remote import RemoteSources, is_url
from worker.intake.source import LocalHandle, SourceHandle, hash_source
from worker.observe.bus import bound, publisher
from worker.run.gate import StageGate
from worker.run.outage import Outages, Service
from worker.run.watch import ImportWatch
from worker.store.store import Claim, ResultRow, StepEvent, Store

events = publisher(__name__)

_PROGRESS_EVERY_S = 1.0


class RunnerSettings(Protocol):
    """What the image runner reads of the worker's settings (worker/run/settings.py)."""

    @property
    def worker_id(self) -> str: ...
    @property
    def hash_algo(self) -> str: ...
    @property
    def verify_md5(self) -> bool: ...
    @property
    def policies(self) -> Policies: ...


@dataclass
class ImageRunner:
    """Runs one claimed image to a terminal phase; the only writer of that image's row."""

    glance: GlanceClient
    store: Store
    settings: RunnerSettings
    stage_slots: StageGate | asyncio.Semaphore  # admits uploads (the gate adapts its limit)
    clock: Callable[[], float] = time.time
    jitter: Callable[[], float] = random.random
    on_progress: Callable[[int, int], None] | None = None  # (result_id, bytes so far)
    # The process's breakers: a step that failed because its service is down waits and is
    # tried again, spending no attempt. The default has no probes: every failure is the image's.
    outages: Outages = field(default_factory=lambda: Outages({}))
    # Shares one list call among all importing images; without it each polls with its own GET.
    watch: ImportWatch | None = None
    # Level of the per-step lines (created, staged, ...): debug while bars show the progress.
    step_log_level: int = logging.INFO
    # Reads URL sources, at most --source-concurrency at once from each host.
    remote_sources: RemoteSources = field(default_factory=RemoteSources)
    # The Glance image each row in flight works on now, kept when its run is cut off.
    _images: dict[int, uuid.UUID] = field(default_factory=dict, init=False)
    _progress_writes: set[asyncio.Future[None]] = field(default_factory=set, init=False)

    async def run(self, claim: Claim, cancelled: asyncio.Event | None = None) -> ResultRow:
        """Drive the image from wherever its row stands to `done` or `failed`.

        When `cancelled` is set (or the claim says the job was cancelled) the command in
        flight is abandoned and the image is cleaned up as for a permanent failure.
        """
        cancelled = cancelled or asyncio.Event()
        if claim.cancelled:
            cancelled.set()
        state = initial_state(
            claim,
            hash_algo=self.settings.hash_algo,
            verify_md5=self.settings.verify_md5,
        )
        started = self.clock()
        with bound(**claim.context(), worker_id=self.settings.worker_id):
            cleaning_up = cancelled.is_set()
            step = cancel(state, now=self.clock()) if cleaning_up else begin(state)
            row = await self._record(claim, state.phase, step, request_id=None)
            while (command := step.command) is not None:
                previous_phase = step.state.phase
                performed = await self._perform_unless(
                    claim, step.state, command, None if cleaning_up else cancelled
                )
                if performed is None:
                    cleaning_up = True
                    step = cancel(step.state, now=self.clock())
                    row = await self._record(claim, previous_phase, step, request_id=None)
                    continue
                outcome, request_id = performed
                step = decide(
                    step.state,
                    command,
                    outcome,
                    now=self.clock(),
                    jitter=self.jitter(),
                    policies=self.settings.policies,
                )
                row = await self._record(claim, previous_phase, step, request_id=request_id)
            self._images.pop(claim.row.id, None)
            if self.watch is not None:
                self.watch.forget(str(state.image_id))
            self._summarise(row, duration_s=self.clock() - started)
            return row

    def take_image_of(self, result_id: int) -> uuid.UUID | None:
        """The image a run that was cut off worked on last (once: it is forgotten here)."""
        return self._images.pop(result_id, None)

    # --- performing ---------------------------------------------------------------------------

    async def _perform_unless(
        self, claim: Claim, state: ImageState, command: Command, cancelled: asyncio.Event | None
    ) -> tuple[Outcome, str | None] | None:
        """Wait the command's delay and perform it; None when `cancelled` was set first."""

        async def delayed() -> tuple[Outcome, str | None]:
            # A watched poll waits inside the watch, which may hand the image over sooner.
            watched = isinstance(command, PollImport) and self.watch is not None
            if command.delay_s > 0 and not watched:
                await asyncio.sleep(command.delay_s)
            return await self._perform(claim, state, command)

        if cancelled is None:
            return await delayed()
        work = asyncio.ensure_future(delayed())
        stop = asyncio.ensure_future(cancelled.wait())
        try:
            await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # The whole image is being stopped (lease lost, shutdown): it ends only once its
            # step has, so that nothing of it still runs when the row is taken up again.
            work.cancel()
            await asyncio.wait({work})
            raise
        finally:
            stop.cancel()
        if work.done():
            return work.result()
        work.cancel()  # an upload in flight is cut off; Glance puts the image back to queued
        with contextlib.suppress(asyncio.CancelledError):
            await work
        events.warning(
            Event.IMAGE_CANCELLING,
            image_id=str(state.image_id),
            phase=str(state.phase),
            step=command.name,
        )
        return None

    async def _perform(
        self, claim: Claim, state: ImageState, command: Command
    ) -> tuple[Outcome, str | None]:
        """Perform `command`; while its service is down, wait and perform it again."""
        while True:
            await self._wait_out_outage(state, command)
            try:
                return await self._dispatch(claim, state, command)
            except MigrationError as error:
                if not await self.outages.holds(error, failed_at=self.outages.now()):
                    return Errored(error), error.request_id
                command = replace(command, delay_s=0.0)  # waited out: perform it at once
                events.log(
                    self.step_log_level,
                    Event.IMAGE_WAITING,
                    image_id=str(state.image_id),
                    phase=str(state.phase),
                    step=command.name,
                    error_code=error.code,
                    error=str(error),
                )

    async def _wait_out_outage(self, state: ImageState, command: Command) -> None:
        if self.outages.describe() is None:
            return
        await self.outages.wait_clear()
        events.info(
            Event.IMAGE_RESUMING,
            image_id=str(state.image_id),
            phase=str(state.phase),
            step=command.name,
        )

    async def _dispatch(
        self, claim: Claim, state: ImageState, command: Command
    ) -> tuple[Outcome, str | None]:
        """Perform one command; it answers with its own outcome (a failure is raised)."""
        image_id = str(state.image_id)
        match command:
            case CreateImage():
                image = await self.glance.create_image(claim.spec.create_body(state.image_id))
                return Created(image_facts(image)), image.request_id
            case InspectImage():
                image = await self.glance.get_image(image_id)
                return Inspected(image_facts(image)), image.request_id
            case StageData():
                return await self._stage(claim, state)
            case CheckStaged():
                image = await self.glance.get_image(image_id)
                return StageChecked(image_facts(image)), image.request_id
            case RequestImport():
                spec = claim.spec
                echoed = await self.glance.import_image(
                    image_id,
                    request_id=command.request_id,
                    method=spec.import_method,
                    uri=spec.source if spec.import_method == WEB_DOWNLOAD else None,
                    stores=spec.stores,
                    all_stores=spec.all_stores,
                    all_stores_must_succeed=spec.all_stores_must_succeed,
                )
                pace = self.watch.pace if self.watch is not None else None
                expected_s = None if pace is None else pace.expect_s(state.size_bytes)
                return ImportAccepted(command.request_id, expected_s), echoed
            case PollImport():
                return await self._poll(state, command)
            case HashSource():
                return await self._hash(claim, state), None
            case DeleteImage():
                await self.glance.delete_image(image_id)
                return Deleted(then_recreate=command.then_recreate), None
            case _:
                assert_never(command)

    async def _hash(self, claim: Claim, state: ImageState) -> Hashed:
        algorithms = with_expected_digest(claim.spec, _hash_algos(state))
        async with self._source(claim.spec) as source:
            digests = await hash_source(source, algorithms, size_bytes=claim.spec.size_bytes)
        check_expected_digest(claim.spec, digests)
        return Hashed(digests[state.hash_algo], digests.get("md5"))

    @contextlib.asynccontextmanager
    async def _source(
        self, spec: DiskSpec, *, reinspect: bool = False
    ) -> AsyncIterator[SourceHandle]:
        """The disk's source, ready to read; a URL's holds one of its host's read slots."""
        if is_url(spec.source):
            async with self.remote_sources.reading(
                spec.source,
                size_bytes=spec.size_bytes,
                identity=spec.source_identity,
                auth_name=spec.source_auth,
            ) as handle:
                yield handle
            return
        yield LocalHandle(
            Path(spec.source),
            size_bytes=spec.size_bytes,
            identity=spec.source_identity,
            reinspect=reinspect,
        )

    async def _stage(self, claim: Claim, state: ImageState) -> tuple[Staged, str | None]:
        last_report = 0.0
        last_bytes = 0

        def progress(done_bytes: int) -> None:
            nonlocal last_report, last_bytes
            if isinstance(self.stage_slots, StageGate):
                self.stage_slots.sent(max(0, done_bytes - last_bytes))
            last_bytes = done_bytes
            if self.on_progress is not None:
                self.on_progress(claim.row.id, done_bytes)
            now = self.clock()
            if now - last_report >= _PROGRESS_EVERY_S:
                last_report = now
                write = asyncio.ensure_future(self._save_progress(claim.row.id, done_bytes))
                self._progress_writes.add(write)
                write.add_done_callback(self._progress_writes.discard)

        # Only a disk inspected at submit is inspected again (a row with no identity recorded
        # was queued past the manifest checks).
        reinspect = claim.spec.disk_format == "vmdk" and claim.spec.source_identity is not None
        # The source's slot first: a busy datastore host must not hold upload slots that
        # disks on other hosts could use.
        async with self._source(claim.spec, reinspect=reinspect) as source, self.stage_slots:
            events.log(
                self.step_log_level,
                Event.IMAGE_STAGING,
                image_id=str(state.image_id),
                phase=Phase.STAGING,
            )
            result = await self.glance.stage(
                str(state.image_id),
                source,
                size_bytes=claim.spec.size_bytes,
                hash_algos=with_expected_digest(claim.spec, _hash_algos(state)),
                progress=progress,
            )
        digests = result.digests
        check_expected_digest(claim.spec, digests)
        staged = Staged(result.size_bytes, digests[state.hash_algo], digests.get("md5"))
        return staged, result.request_id

    async def _save_progress(self, result_id: int, done_bytes: int) -> None:
        try:
            await self.store.set_progress(
                result_id, worker_id=self.settings.worker_id, bytes_staged=done_bytes
            )
        except Exception as exc:  # progress is advisory; the stage must not fail for it
            events.warning(Event.IMAGE_PROGRESS_NOT_SAVED, error=str(exc))

    async def _poll(self, state: ImageState, command: PollImport) -> tuple[Polled, str | None]:
        image_id = str(state.image_id)
        if self.watch is None:
            image = await self.glance.get_image(image_id)
        else:
            image = await self.watch.look(
                image_id,
                delay_s=command.delay_s,
                seen_status=state.last_status,
                size_bytes=state.size_bytes,
                accepted_at=state.import_accepted_at,
            )
        with_tasks = command.with_tasks
        # An outage of Glance since the import began may have killed it, and one of Keystone
        # may have failed it: look at its task.
        outage = self._outage_since(Service.IMAGE, state.import_accepted_at)
        cloud_outage = max(
            (
                found
                for found in (
                    outage,
                    self._outage_since(Service.IDENTITY, state.import_accepted_at),
                )
                if found is not None
            ),
            key=lambda found: found[1],
            default=None,
        )
        tasks: tuple[TaskFacts, ...] | None = None
        if (with_tasks and image.status == "importing") or (
            cloud_outage is not None and image.status in ("uploading", "importing")
        ):
            tasks = tuple(task_facts(t) for t in await self.glance.image_tasks(image_id))
        polled = Polled(image_facts(image), tasks, image_outage=outage, cloud_outage=cloud_outage)
        return polled, image.request_id

    def _outage_since(
        self, service: Service, accepted_at: float | None
    ) -> tuple[float, float] | None:
        """The last outage of `service`, if it ended after the import was accepted."""
        outage = self.outages.last_ended(service)
        if outage is None or accepted_at is None or outage[1] < accepted_at:
            return None
        return outage

    # --- recording ----------------------------------------------------------------------------

    async def _record(
        self, claim: Claim, previous_phase: Phase, step: Step, *, request_id: str | None
    ) -> ResultRow:
        """Persist the step (its change of the row + an event) and log it, before the next
        command runs."""
        if step.state.image_exists or step.command is not None:
            self._images[claim.row.id] = step.state.image_id
        detail = dict(step.detail)
        if step.error is not None:
            detail.update(error_code=step.error.code, error=step.error.message)
        phase = step.state.phase if step.state.phase != previous_phase else None
        if step.event is None and phase is None and isinstance(step.change, Noted):
            return claim.row  # a quiet poll: nothing changed worth a row update
        written = StepEvent(
            worker_id=self.settings.worker_id,
            event=step.event or Event.entered(step.state.phase),
            phase=phase,
            request_id=request_id,
            detail=detail or None,
        )
        row = await self.store.apply(claim.row.id, step.change, written)
        # The end of the image is published once, with its outcome, by _summarise.
        if step.event is not None and step.event != Event.IMAGE_FINISHED:
            fields: dict[str, Any] = {"phase": str(step.state.phase), **detail}
            level = _level_of(step, self.step_log_level)
            events.log(level, step.event, image_id=str(step.state.image_id), **fields)
        return row

    def _summarise(self, row: ResultRow, *, duration_s: float) -> None:
        """The image's one `image.finished`, with its outcome: what webhooks, metrics and
        progress count."""
        events.log(
            logging.WARNING if row.phase == Phase.FAILED else logging.INFO,
            Event.IMAGE_FINISHED,
            phase=row.phase,
            image_id=str(row.glance_image_id),
            size_bytes=row.source_size_bytes,
            duration_s=round(duration_s, 3),
            attempts=row.attempts,
            glance_status=row.glance_status,
            glance_stores=row.glance_stores,
            glance_failed_stores=row.glance_failed_stores,
            verification=row.verification,
            error_code=row.error_code,
            error=row.error_message,
        )


def _level_of(step: Step, step_level: int) -> int:
    """Failures and retries are warnings; a cleanup that failed for good is an error."""
    if step.event in (Event.IMAGE_RETRY_SCHEDULED, Event.IMAGE_FAILING, Event.IMAGE_RECREATING):
        return logging.WARNING
    if step.state.phase is Phase.FAILED:
        kept = isinstance(step.change, Finished) and step.change.cleanup == "kept"
        refused = kept and not step.state.keep_on_failure
        return logging.ERROR if refused else logging.WARNING
    return step_level


def initial_state(claim: Claim, *, hash_algo: str, verify_md5: bool = False) -> ImageState:
    """The machine's view of a claimed row, whatever phase a previous run left it in."""
    row = claim.row
    phase = Phase(row.phase)
    algo_matches = row.source_hash_algo == hash_algo
    return ImageState(
        job_id=row.job_id,
        disk_index=row.disk_index,
        phase=phase,
        image_id=row.glance_image_id,
        size_bytes=claim.spec.size_bytes,
        disk_format=claim.spec.disk_format,
        asks_for_rewrite=claim.spec.asks_for_rewrite,
        keep_on_failure=claim.on_failure == "keep",
        web_download=claim.spec.import_method == WEB_DOWNLOAD,
        expected_digest=None
        if claim.spec.expected_digest is None
        else (claim.spec.expected_digest["algorithm"], claim.spec.expected_digest["value"]),
        all_stores_must_succeed=claim.spec.all_stores_must_succeed,
        hash_algo=hash_algo,
        source_hash=row.source_hash_value if algo_matches else None,
        verify_md5=verify_md5,
        source_md5=row.source_md5,
        image_exists=phase is not Phase.PENDING,
        import_request_id=row.import_request_id,
        import_accepted_at=row.import_requested_at.timestamp()
        if row.import_requested_at is not None
        else None,
    )


def image_facts(image: Image) -> ImageFacts:
    """Reduce a Glance image to what decisions need."""
    props = image.properties

    def text(key: str) -> str | None:
        value = props.get(key)
        return str(value) if value not in (None, "") else None

    return ImageFacts(
        status=image.status,
        size=image.size,
        virtual_size=image.virtual_size,
        checksum=image.checksum,
        os_hash_algo=image.os_hash_algo,
        os_hash_value=image.os_hash_value,
        disk_format=image.disk_format,
        es_failed_reason=text("os_glance_es_failed_reason"),
        failed_import=text("os_glance_failed_import"),
        import_locked=text("os_glance_import_task") is not None,
        stores=text("stores"),
        importing_to_stores=text("os_glance_importing_to_stores"),
    )


def task_facts(task: Task) -> TaskFacts:
    return TaskFacts(
        status=task.status,
        request_id=task.request_id,
        message=task.message,
        updated_at=_epoch(task.updated_at),
    )


def _epoch(text: str | None) -> float | None:
    """Glance's ISO time (UTC, with or without a zone) as epoch seconds."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _hash_algos(state: ImageState) -> tuple[str, ...]:
    """The hashes to compute of the source: the cloud's algorithm, and md5 when asked for."""
    return (state.hash_algo, "md5") if state.verify_md5 else (state.hash_algo,)
