"""Claims images from PostgreSQL into an asyncio.Queue and runs them with bounded concurrency.

One feeder claims rows (FOR UPDATE SKIP LOCKED, with a lease) only when a pipeline is free;
N pipelines run one image each; a heartbeat keeps the leases of images in flight, stops an
image whose job was cancelled, and stops an image whose lease it could not renew in time
(so another worker that reclaims it never works beside this one). On stop, nothing new is
claimed, images in flight get a grace period, and what is left is released for another
worker rather than left to expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from worker.core.changes import Finished
from worker.core.events import Event
from worker.core.model import Phase
from worker.observe.bus import bound, publisher
from worker.run.outage import Outages, Service
from worker.store.problems import database_reason
from worker.store.store import CONNECTION_ERRORS, Claim, LeaseLost, ResultRow, StepEvent, Store

events = publisher(__name__)


class ConsumerSettings(Protocol):
    """What the consumer reads of the worker's settings (worker/run/settings.py has each one)."""

    @property
    def worker_id(self) -> str: ...
    @property
    def concurrency(self) -> int: ...
    @property
    def lease_s(self) -> float: ...
    @property
    def heartbeat_s(self) -> float: ...
    @property
    def idle_poll_s(self) -> float: ...
    @property
    def grace_s(self) -> float: ...
    @property
    def once(self) -> bool: ...


@dataclass
class RunSummary:
    """What one `run` did, by final phase."""

    by_phase: Counter[str] = field(default_factory=Counter)
    lost: int = 0  # leases lost to another worker (the image goes on there)
    released: int = 0  # images given back unfinished at shutdown
    gave_up: str | None = None  # the outage that outlasted --max-outage, when one did

    @property
    def finished(self) -> int:
        return self.by_phase[Phase.DONE] + self.by_phase[Phase.FAILED]


@dataclass
class _Running:
    """An image in flight: what it was claimed with, and the event that asks it to stop."""

    claim: Claim
    cancel_request: asyncio.Event = field(default_factory=asyncio.Event)


# Runs one image; the event asks it to stop and clean up (its job was cancelled).
RunImage = Callable[[Claim, asyncio.Event], Awaitable[ResultRow]]
# Told of a row this worker lost in mid-work (the row's id): its image may need cleaning up.
OnLost = Callable[[int], Awaitable[None]]


class Consumer:
    """Feeds claimed rows to a fixed number of image pipelines until stopped or drained."""

    def __init__(
        self,
        store: Store,
        run_image: RunImage,
        settings: ConsumerSettings,
        *,
        outages: Outages | None = None,
        on_lost: OnLost | None = None,
    ) -> None:
        self._store = store
        self._run_image = run_image
        self._settings = settings
        self._outages = outages or Outages({})
        self._on_lost = on_lost
        self._lost_checks: set[asyncio.Task[None]] = set()
        self._abandoned: dict[int, float] = {}  # result id -> when its lease has run out
        # Rows stopped because the database was away when their leases ran out: settled
        # before the next claim, so that the outage counts no attempt.
        self._fenced_in_outage: set[int] = set()
        self._beat_failed = False
        self._queue: asyncio.Queue[Claim | None] = asyncio.Queue(maxsize=settings.concurrency)
        self._in_flight: dict[int, asyncio.Task[None]] = {}
        # What each image in flight was claimed with, and the event that asks it to stop.
        self._running: dict[int, _Running] = {}
        # Monotonic time after which an image's lease may have ended in the database: a
        # heartbeat or claim started at t makes it t + lease - one heartbeat of margin.
        self._held_until: dict[int, float] = {}
        self._idle = asyncio.Semaphore(settings.concurrency)
        # Set when an image ends: a --once run with nothing left to claim exits then, not
        # at the next idle poll.
        self._image_ended = asyncio.Event()
        self._summary = RunSummary()
        self._grace_s = settings.grace_s

    async def run(self, stop: asyncio.Event) -> RunSummary:
        """Work until `stop` is set (or, with `once`, until nothing is left to claim)."""
        settings = self._settings
        events.info(
            Event.WORKER_STARTED, worker_id=settings.worker_id, concurrency=settings.concurrency
        )
        pipelines = [
            asyncio.create_task(self._pipeline(), name=f"pipeline-{n}")
            for n in range(settings.concurrency)
        ]
        heartbeat = asyncio.create_task(self._heartbeat(), name="heartbeat")
        # An outage past --max-outage ends the run as a stop with no grace: nothing can finish.
        giving_up = asyncio.create_task(self._give_up_on_outage(stop), name="outage-bound")
        unfinished: dict[int, asyncio.Task[None]] = {}
        try:
            await self._feed(stop)
            await self._drain(pipelines)
        finally:
            # Taken before the pipelines stop: each one forgets its image as it ends.
            unfinished = {rid: task for rid, task in self._in_flight.items() if not task.done()}
            heartbeat.cancel()
            giving_up.cancel()
            for task in pipelines:
                task.cancel()
            await asyncio.gather(heartbeat, giving_up, *pipelines, return_exceptions=True)
            await self._release_unfinished(unfinished)
            await asyncio.gather(*self._lost_checks, return_exceptions=True)
        events.info(
            Event.WORKER_STOPPED,
            worker_id=settings.worker_id,
            **self._summary.by_phase,
            released=self._summary.released,
            lost=self._summary.lost,
        )
        return self._summary

    async def _give_up_on_outage(self, stop: asyncio.Event) -> None:
        await self._outages.give_up.wait()
        self._summary.gave_up = self._outages.explain() or "an outage"
        self._grace_s = 0.0
        stop.set()

    async def _feed(self, stop: asyncio.Event) -> None:
        settings = self._settings
        while await _acquire_unless_stopped(self._idle, stop):  # a pipeline is free
            if not await _clear_unless_stopped(self._outages, stop):
                self._idle.release()
                return
            asked_at = time.monotonic()
            # Cleared before asking, so an image that ends during the claim (and may leave a
            # row claimable again) is seen below rather than missed.
            self._image_ended.clear()
            await self._settle_fenced()
            claims = await self._store.claim(
                worker_id=settings.worker_id,
                limit=1,
                lease_s=settings.lease_s,
                working_on=[*self._held_until, *self._in_flight, *self._still_abandoned()],
            )
            if not claims:
                self._idle.release()
                drained = not self._in_flight and self._queue.empty()
                if settings.once and drained and not self._image_ended.is_set():
                    return
                await _wait(
                    stop, settings.idle_poll_s, self._image_ended if settings.once else None
                )
                continue
            self._held_until[claims[0].row.id] = asked_at + self._lease_margin_s()
            await self._queue.put(claims[0])

    async def _settle_fenced(self) -> None:
        """Once the database answers again: no attempt counted for the rows stopped while it
        was away (those still ours are handed back), and the orphan check they missed."""
        # A stopped image whose task has not wound down yet is settled at the next claim.
        ids = sorted(i for i in self._fenced_in_outage if i not in self._in_flight)
        if not ids:
            return
        await self._store.refund_stopped(worker_id=self._settings.worker_id, result_ids=ids)
        self._fenced_in_outage.difference_update(ids)
        for result_id in ids:
            self._abandoned.pop(result_id, None)  # handed back: claimable as any row
            self._check_lost(result_id)  # was the row deleted meanwhile?

    def _still_abandoned(self) -> list[int]:
        now = time.monotonic()
        for result_id, until in list(self._abandoned.items()):
            if now >= until:
                del self._abandoned[result_id]
        return list(self._abandoned)

    def _lease_margin_s(self) -> float:
        """How long after asking for a lease this worker may rely on holding it."""
        settings = self._settings
        return settings.lease_s - min(settings.heartbeat_s, settings.lease_s / 2)

    async def _drain(self, pipelines: list[asyncio.Task[None]]) -> None:
        """Let images in flight finish within the grace period, then stop the pipelines."""
        for _ in pipelines:
            await self._queue.put(None)
        if self._grace_s <= 0:
            return
        _, pending = await asyncio.wait(pipelines, timeout=self._grace_s)
        if pending:
            events.warning(Event.WORKER_GRACE_EXPIRED, unfinished=len(self._in_flight))

    async def _pipeline(self) -> None:
        while (claim := await self._queue.get()) is not None:
            result_id = claim.row.id
            running = _Running(claim)
            self._running[result_id] = running
            task = asyncio.create_task(self._run_one(running))
            self._in_flight[result_id] = task
            try:
                # Not `await task`: cancelling the pipeline (shutdown) must leave the image to
                # its grace. Not `shield`: it would pass a stopped image's cancellation on and
                # end this pipeline with it, one fewer for every lease lost.
                await asyncio.wait({task})
            finally:
                self._in_flight.pop(result_id, None)
                self._running.pop(result_id, None)
                self._held_until.pop(result_id, None)
                self._idle.release()
                self._image_ended.set()

    async def _run_one(self, running: _Running) -> None:
        """Run one image; whatever goes wrong stays with this image and never stops the others."""
        with bound(**running.claim.context(), worker_id=self._settings.worker_id):
            await self._run_guarded(running.claim, running.cancel_request)

    async def _run_guarded(self, claim: Claim, cancel_request: asyncio.Event) -> None:
        try:
            row = await self._run_image(claim, cancel_request)
            self._summary.by_phase[row.phase] += 1
        except LeaseLost:
            self._summary.lost += 1
            events.warning(Event.IMAGE_LEASE_LOST)
            self._check_lost(claim.row.id)
        except asyncio.CancelledError:
            raise
        except CONNECTION_ERRORS as exc:
            # The database stayed away past the store's patience: nothing can be recorded;
            # the lease runs out and another worker resumes the image from its real status.
            # Until then it is not ours to take back as a claim whose answer was lost.
            self._abandoned[claim.row.id] = time.monotonic() + self._settings.lease_s
            self._fenced_in_outage.add(claim.row.id)  # settled once the database is back
            events.error(Event.IMAGE_ABANDONED, error=str(exc))
        except Exception as exc:
            events.exception(Event.IMAGE_CRASHED)
            await self._record_crash(claim, exc)

    async def _record_crash(self, claim: Claim, exc: Exception) -> None:
        """An unexpected error is this image's failure, recorded, not the worker's.

        It ends like any failed image: one `image.finished`, which webhooks, metrics,
        progress and the completion check follow.
        """
        message = f"{type(exc).__name__}: {exc}"
        try:
            row = await self._store.finish(
                claim.row.id,
                Finished(Phase.FAILED, error_code="internal_error", error_message=message),
                StepEvent(worker_id=self._settings.worker_id, event=Event.IMAGE_FINISHED),
            )
        except Exception:
            events.exception(Event.IMAGE_CRASH_NOT_RECORDED)
            return
        self._summary.by_phase[Phase.FAILED] += 1
        events.warning(
            Event.IMAGE_FINISHED,
            image_id=str(row.glance_image_id),
            phase=row.phase,
            size_bytes=row.source_size_bytes,
            attempts=row.attempts,
            error_code=row.error_code,
            error=message,
        )

    async def _heartbeat(self) -> None:
        settings = self._settings
        while True:
            await asyncio.sleep(settings.heartbeat_s)
            ids = list(self._in_flight)
            if ids:
                await self._beat(ids)
            self._fence(time.monotonic())

    async def _beat(self, ids: list[int]) -> None:
        """Extend the leases of `ids`; stop images lost to another worker or cancelled."""
        settings = self._settings
        asked_at = time.monotonic()
        try:
            async with asyncio.timeout(settings.heartbeat_s):
                held = await self._store.heartbeat(
                    worker_id=settings.worker_id, result_ids=ids, lease_s=settings.lease_s
                )
                cancelled = await self._store.cancelled_results(list(held))
        except Exception as exc:  # the database is away: the fence decides what to stop
            self._beat_failed = True
            events.warning(
                Event.WORKER_HEARTBEAT_FAILED, images=len(ids), error=database_reason(exc)
            )
            return
        self._beat_failed = False
        for result_id in held:
            if result_id in self._held_until:
                self._held_until[result_id] = asked_at + self._lease_margin_s()
        for result_id in set(ids) - held:
            # Another worker reclaimed the row: stop, it is theirs now.
            self._stop_image(result_id, Event.IMAGE_LEASE_LOST)
        for result_id in cancelled:
            running = self._running.get(result_id)
            if running is not None and not running.cancel_request.is_set():
                events.info(Event.IMAGE_CANCEL_REQUESTED, **running.claim.context())
                running.cancel_request.set()

    def _fence(self, now: float) -> None:
        """Stop images whose lease may have run out unrenewed: another worker may take them."""
        database_away = self._beat_failed or self._outages.is_open(Service.DATABASE)
        for result_id, held_until in list(self._held_until.items()):
            if now >= held_until:
                self._held_until.pop(result_id, None)
                stopped = self._stop_image(
                    result_id, Event.IMAGE_LEASE_EXPIRED, check_lost=not database_away
                )
                if stopped and database_away:
                    self._fenced_in_outage.add(result_id)

    def _stop_image(self, result_id: int, event: Event, *, check_lost: bool = True) -> bool:
        """Cancel the image of `result_id` if it runs; whether it did."""
        task = self._in_flight.get(result_id)
        if task is None or task.done():
            return False
        task.cancel()
        self._summary.lost += 1
        running = self._running.get(result_id)
        events.warning(event, **(running.claim.context() if running else {"result_id": result_id}))
        if check_lost:
            self._check_lost(result_id)
        return True

    def _check_lost(self, result_id: int) -> None:
        if self._on_lost is None:
            return
        check = asyncio.ensure_future(self._on_lost(result_id))
        self._lost_checks.add(check)
        check.add_done_callback(self._lost_checks.discard)

    async def _release_unfinished(self, unfinished: dict[int, asyncio.Task[None]]) -> None:
        for task in unfinished.values():
            task.cancel()
        await asyncio.gather(*unfinished.values(), return_exceptions=True)
        if unfinished:
            # Given back because of an outage, a claim did not count as an attempt.
            refund = self._summary.gave_up is not None
            # A lease that cannot be given back within its own length has expired anyway.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._settings.lease_s):
                    await self._store.release(
                        worker_id=self._settings.worker_id,
                        result_ids=list(unfinished),
                        refund_attempt=refund,
                    )
            self._summary.released += len(unfinished)
            events.info(Event.WORKER_RELEASED, images=len(unfinished), attempt_refunded=refund)


async def _acquire_unless_stopped(slots: asyncio.Semaphore, stop: asyncio.Event) -> bool:
    """Take a slot, or give up as soon as a stop is requested."""
    if stop.is_set():
        return False
    acquire = asyncio.ensure_future(slots.acquire())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({acquire, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if stop.is_set():
        if acquire.done() and not acquire.cancelled():
            slots.release()
        acquire.cancel()
        return False
    return True


async def _clear_unless_stopped(outages: Outages, stop: asyncio.Event) -> bool:
    """Wait until no breaker is open; False when a stop is requested first."""
    if outages.describe() is None:
        return True
    clear = asyncio.ensure_future(outages.wait_clear())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({clear, stopped}, return_when=asyncio.FIRST_COMPLETED)
    clear.cancel()
    stopped.cancel()
    return not stop.is_set()


async def _wait(stop: asyncio.Event, timeout_s: float, also: asyncio.Event | None = None) -> None:
    """Wait until `stop` (or `also`) is set, or `timeout_s` has passed."""
    awaited = [stop] if also is None else [stop, also]
    waiters = [asyncio.ensure_future(event.wait()) for event in awaited]
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
