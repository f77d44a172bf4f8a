"""The worker's one event stream: code publishes what happened, subscribers follow it.

A module says what happened through its `Publisher` (`events = publisher(__name__)`, then
`events.warning(Event.IMAGE_FINISHED, phase="failed", ...)`). Each call becomes one frozen
`EventRecord` with the context bound around it (`bound(job=..., image=...)`), handed to
every subscriber of the bus of the run it belongs to, in the order they subscribed.

`run_worker` (worker/run/app.py) builds one bus per run: metrics, progress and webhooks
subscribe to it, and so does the bus it runs inside, whose log writer writes the log
(outside a run, the process's bus only writes the log). None of them reads log lines.
Subscribers see every record, whatever --log-level says; only the log writer filters by
level. Two runs in one process (tests do that) each have their own bus.

The events table is not a subscriber: each of its rows is written by the same SQL
statement as the row change it records, so that the two never disagree and a step written
twice after a lost connection is recorded once. Its names come from the same `Event` enum.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any

import structlog

from worker.core.events import Event, EventRecord

Subscriber = Callable[[EventRecord], None]


def write_log(record: EventRecord) -> None:
    """The log writer: one structlog line per record, at its level (structlog filters it)."""
    extra: dict[str, Any] = {} if record.exception is None else {"exc_info": record.exception}
    logger = structlog.get_logger(record.source)
    logger.log(record.level, record.event.value, **record.fields, **extra)


class EventBus:
    """Hands each published record to every subscriber; a subscriber's bug stays its own."""

    def __init__(self, subscribers: Iterable[Subscriber] = (write_log,)) -> None:
        self._subscribers = list(subscribers)

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.remove(subscriber)

    @contextmanager
    def subscribed(self, subscriber: Subscriber) -> Iterator[None]:
        """`subscriber` follows the bus while the block runs."""
        self.subscribe(subscriber)
        try:
            yield
        finally:
            self.unsubscribe(subscriber)

    def publish(self, record: EventRecord) -> None:
        for subscriber in tuple(self._subscribers):
            try:
                subscriber(record)
            except Exception as exc:  # a watcher's bug must not break the worker
                print(f"event subscriber failed on {record.event}: {exc!r}", file=sys.stderr)

    @contextmanager
    def active(self) -> Iterator[EventBus]:
        """Publishers in this task, and in the tasks it starts, publish here in the block."""
        token = _current_bus.set(self)
        try:
            yield self
        finally:
            _current_bus.reset(token)


# The bus of the run the current task belongs to (tasks inherit it from the task that
# started them), and the context bound around the current code.
_current_bus: ContextVar[EventBus | None] = ContextVar("event_bus", default=None)
_LOG_ONLY = EventBus()  # the bus outside a run
_NOTHING_BOUND: Mapping[str, Any] = MappingProxyType({})
_context: ContextVar[Mapping[str, Any]] = ContextVar("event_context", default=_NOTHING_BOUND)


def current_bus() -> EventBus:
    """The bus records published here go to."""
    return _current_bus.get() or _LOG_ONLY


@contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """Every record published in the block (and in tasks started in it) carries `fields`."""
    token = _context.set(MappingProxyType({**_context.get(), **fields}))
    try:
        yield
    finally:
        _context.reset(token)


class Publisher:
    """What a module says happened, with the methods of a logger: one record per call."""

    __slots__ = ("source",)

    def __init__(self, source: str) -> None:
        self.source = source

    def log(
        self,
        level: int,
        event: Event,
        *,
        exception: BaseException | None = None,
        **fields: Any,
    ) -> None:
        record = EventRecord(
            event,
            level,
            MappingProxyType({**_context.get(), **fields}),
            source=self.source,
            exception=exception,
        )
        current_bus().publish(record)

    def debug(self, event: Event, **fields: Any) -> None:
        self.log(logging.DEBUG, event, **fields)

    def info(self, event: Event, **fields: Any) -> None:
        self.log(logging.INFO, event, **fields)

    def warning(self, event: Event, **fields: Any) -> None:
        self.log(logging.WARNING, event, **fields)

    def error(self, event: Event, **fields: Any) -> None:
        self.log(logging.ERROR, event, **fields)

    def exception(self, event: Event, **fields: Any) -> None:
        """An error, with the exception being handled (its traceback goes to the log)."""
        self.log(logging.ERROR, event, exception=sys.exc_info()[1], **fields)


def publisher(source: str) -> Publisher:
    """The publisher of module `source` (call with `__name__`)."""
    return Publisher(source)
