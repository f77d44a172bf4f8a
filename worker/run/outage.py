"""Systemic faults: one circuit breaker per service, shared by every image of the process.

A failure says something about one image only if the service it came from still answers. So
when a call fails the way a down service makes calls fail (refused or dropped connections,
timeouts, 5xx, rejected credentials), the breaker of that service probes it once. If the probe
fails too, the breaker opens: the fault is systemic. Then

- images wait at their current step and spend no attempt (`wait_clear`),
- the consumer claims nothing new,
- one probe per backoff interval (a few seconds, growing to a minute) watches for the end,
- a warning is logged each minute with the outage's duration, and
- `give_up` is set once an outage outlasts `max_outage_s`, if a bound is set (`run --once`).

If the probe answers, the failure belongs to the image and its retry budget, as before.

    image call fails ─► systemic kind? ─no──► the image's own retry policy
                             │yes
                             ▼
                     breaker open? ─yes─► wait until every breaker is closed, then redo the step
                             │no
                             ▼
                        probe now ─fails─► open the breaker of the failing service ─► (wait)
                             │answers
                             ▼
                     the image's own retry policy
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from worker.core.events import Event
from worker.core.policy import OutagePolicy
from worker.errors import (
    AuthExpired,
    AuthFailed,
    CloudUnavailable,
    ConnectionFailed,
    MigrationError,
    RequestTimeout,
    os_reason,
)
from worker.observe.bus import publisher

events = publisher(__name__)

# The operation name the identity client gives to its errors.
AUTHENTICATE = "authenticate"
# Failures a service that is down (or refuses us as a whole) makes every call fail with.
_SYSTEMIC_KINDS = (ConnectionFailed, RequestTimeout, CloudUnavailable, AuthFailed, AuthExpired)


class Service(StrEnum):
    """What a breaker watches."""

    IDENTITY = "identity"
    IMAGE = "image"
    DATABASE = "database"

    @property
    def label(self) -> str:
        return _LABELS[self]


_LABELS = {
    Service.IDENTITY: "identity service",
    Service.IMAGE: "image service",
    Service.DATABASE: "database",
}


@dataclass(frozen=True)
class Outage:
    """One open breaker: which service, why, since when, and its last failure in words."""

    service: Service
    reason: str
    started_at: datetime
    started_mono: float
    error: str = ""

    def duration_s(self, now_mono: float) -> float:
        return max(0.0, now_mono - self.started_mono)

    def describe(self, now_mono: float) -> str:
        """E.g. 'image service unreachable for 3 min 20 s'."""
        return (
            f"{self.service.label} {self.reason} for {format_duration(self.duration_s(now_mono))}"
        )

    def explain(self, now_mono: float) -> str:
        """`describe` with the last failure: '... for 2 s (cannot connect to URL: connection
        refused)'."""
        described = self.describe(now_mono)
        return f"{described} ({self.error})" if self.error else described


Probe = Callable[[], Awaitable[object]]


class OutageTooLong(Exception):
    """An outage outlasted `--max-outage`: the worker stops and leaves its rows pending."""


def is_systemic_kind(error: BaseException) -> bool:
    """Whether `error` is how calls fail while their service is down."""
    return isinstance(error, _SYSTEMIC_KINDS)


def service_of(error: MigrationError) -> Service:
    """The service an error of a cloud call came from."""
    return Service.IDENTITY if error.operation == AUTHENTICATE else Service.IMAGE


def reason_of(error: MigrationError) -> str:
    """How an operator would say it: 'unreachable', 'answering 503', 'refusing credentials'."""
    if isinstance(error, AuthFailed | AuthExpired):
        return "refusing the credentials"
    if isinstance(error, CloudUnavailable) and error.status is not None:
        return f"answering {error.status}"
    if isinstance(error, RequestTimeout):
        return "not answering in time"
    return "unreachable"


def error_text(error: BaseException) -> str:
    """A failure in an operator's words: our errors' message, an OS error's reason."""
    if isinstance(error, MigrationError):
        return error.message
    if isinstance(error, OSError):
        return os_reason(error)
    return str(error) or "no reason given"


def format_duration(seconds: float) -> str:
    """'45 s', '3 min 20 s', '2 h 5 min'."""
    whole = int(seconds)
    if whole < 60:
        return f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


class Outages:
    """The breakers of one worker process; every image and the consumer consult the same one."""

    def __init__(
        self,
        probes: dict[Service, Probe],
        *,
        policy: OutagePolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[Outage, bool], None] | None = None,
    ) -> None:
        self._probes = probes
        self.policy = policy or OutagePolicy()
        self._clock = clock
        self._on_change = on_change
        self._open: dict[Service, Outage] = {}
        self._clear = asyncio.Event()
        self._clear.set()
        self.give_up = asyncio.Event()
        self._probe_lock = asyncio.Lock()
        self._last_answer: dict[Service, float] = {}
        self._watchers: dict[Service, asyncio.Task[None]] = {}
        self._ended: dict[Service, tuple[float, float]] = {}

    def now(self) -> float:
        return self._clock()

    @property
    def current(self) -> list[Outage]:
        """The open breakers, oldest first."""
        return sorted(self._open.values(), key=lambda outage: outage.started_mono)

    def is_open(self, service: Service) -> bool:
        return service in self._open

    def last_ended(self, service: Service) -> tuple[float, float] | None:
        """(start, end) in epoch seconds of the last outage of `service` that ended."""
        return self._ended.get(service)

    def describe(self) -> str | None:
        """'paused: image service unreachable for 3 min 20 s (cannot connect to URL:
        connection refused)', or None when all is well."""
        explained = self.explain()
        return None if explained is None else f"paused: {explained}"

    def explain(self) -> str | None:
        """Each open breaker with its duration and last failure, oldest first; None if none."""
        outages = self.current
        if not outages:
            return None
        now = self._clock()
        return "; ".join(outage.explain(now) for outage in outages)

    async def wait_clear(self) -> None:
        """Return once no breaker is open (at once, when none is)."""
        while not self._clear.is_set():
            await self._clear.wait()

    async def holds(self, error: MigrationError, *, failed_at: float) -> bool:
        """After a call failed at `failed_at` with `error`: is its service down?

        True when a breaker is open (or opens now, because a probe failed too): the caller
        waits with `wait_clear` and tries the same step again, spending no attempt. False when
        the service answered after the failure: the error is the image's own.
        """
        if not is_systemic_kind(error):
            return False
        service = service_of(error)
        if self._open:
            return True
        async with self._probe_lock:  # one probe answers for every image that failed meanwhile
            if self._open:
                return True
            if self._last_answer.get(service, float("-inf")) > failed_at:
                return False
            failure = await self._probe(service)
            if failure is None:
                return False
            self.open(service_of(failure) if service is Service.IMAGE else service, failure)
            return True

    def open(self, service: Service, error: MigrationError | BaseException) -> None:
        """Mark `service` down (idempotent) and start watching for its return."""
        if service in self._open:
            return
        reason = reason_of(error) if isinstance(error, MigrationError) else "unreachable"
        outage = Outage(service, reason, datetime.now(UTC), self._clock(), error_text(error))
        self._open[service] = outage
        self._clear.clear()
        events.warning(
            Event.OUTAGE_STARTED,
            service=str(service),
            reason=reason,
            since=outage.started_at.isoformat(),
            error=str(error) if isinstance(error, MigrationError) else outage.error,
            message=outage.describe(outage.started_mono),
        )
        if self._on_change is not None:
            self._on_change(outage, True)
        if service in self._probes:
            self._watchers[service] = asyncio.create_task(
                self._watch(outage), name=f"outage-{service}"
            )

    def close(self, service: Service) -> None:
        """Mark `service` back (idempotent); images go on once no other breaker is open."""
        outage = self._open.pop(service, None)
        self._last_answer[service] = self._clock()
        if outage is None:
            return
        duration_s = outage.duration_s(self._clock())
        self._ended[service] = (outage.started_at.timestamp(), time.time())
        events.info(
            Event.OUTAGE_ENDED,
            service=str(service),
            reason=outage.reason,
            since=outage.started_at.isoformat(),
            duration_s=round(duration_s, 3),
            message=f"{service.label} back after {format_duration(duration_s)}",
        )
        if self._on_change is not None:
            self._on_change(outage, False)
        if not self._open:
            self._clear.set()

    async def aclose(self) -> None:
        """Stop the probing tasks."""
        watchers = list(self._watchers.values())
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)

    async def _probe(self, service: Service) -> MigrationError | None:
        """None when `service` answered; else the failure that says it is down."""
        probe = self._probes.get(service)
        if probe is None:
            return None
        try:
            await probe()
        except MigrationError as exc:
            if is_systemic_kind(exc):
                return exc
            events.warning(Event.OUTAGE_PROBE_REFUSED, service=str(service), error=str(exc))
            return None
        self._last_answer[service] = self._clock()
        return None

    async def _watch(self, outage: Outage) -> None:
        """Probe an open breaker until its service answers; warn each minute; enforce the bound."""
        policy = self.policy
        delay_s = policy.probe_first_s
        warned_at = outage.started_mono
        try:
            while outage.service in self._open:
                await self._sleep_bounded(outage, delay_s)
                if self._outlasted(outage):
                    return
                failure = await self._probe(outage.service)
                if failure is None:
                    self.close(outage.service)
                    return
                outage = self._failed_again(outage, failure)
                now = self._clock()
                if now - warned_at >= policy.warn_every_s:
                    warned_at = now
                    events.warning(
                        Event.OUTAGE_ONGOING,
                        service=str(outage.service),
                        reason=outage.reason,
                        duration_s=round(outage.duration_s(now), 1),
                        error=str(failure),
                        message=outage.describe(now),
                    )
                    if self._on_change is not None:
                        self._on_change(outage, True)  # still on: refresh what others see
                delay_s = min(policy.probe_max_s, delay_s * policy.probe_factor)
        finally:
            self._watchers.pop(outage.service, None)

    def _failed_again(self, outage: Outage, failure: MigrationError) -> Outage:
        """Keep the probe's failure as the outage's last error (what `explain` says)."""
        if outage.service not in self._open:
            return outage
        again = dataclasses.replace(outage, error=error_text(failure))
        self._open[outage.service] = again
        return again

    async def _sleep_bounded(self, outage: Outage, delay_s: float) -> None:
        """Sleep `delay_s`, or less when the outage bound falls due sooner."""
        bound = self.policy.max_outage_s
        if bound is not None:
            left_s = bound - outage.duration_s(self._clock())
            delay_s = max(0.0, min(delay_s, left_s))
        await asyncio.sleep(delay_s)

    def _outlasted(self, outage: Outage) -> bool:
        bound = self.policy.max_outage_s
        if bound is None or outage.duration_s(self._clock()) < bound:
            return False
        events.error(
            Event.OUTAGE_GAVE_UP,
            service=str(outage.service),
            reason=outage.reason,
            max_outage_s=bound,
            message=f"{outage.explain(self._clock())}: longer than --max-outage",
        )
        self.give_up.set()
        return True

    def report_database(self, error: BaseException | None) -> None:
        """The store's hook: its connection was lost (`error`) or works again (None)."""
        if error is None:
            if Service.DATABASE in self._open:
                self.close(Service.DATABASE)
        else:
            self.open(Service.DATABASE, error)
