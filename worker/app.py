"""Composition root: builds the HTTP session, clients, store, runner and consumer."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, MutableMapping
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import structlog

from worker.clients.glance import GlanceClient
from worker.clients.http import new_session
from worker.clients.keystone import authenticator_for
from worker.clients.throttle import Throttle
from worker.config import CloudSettings
from worker.consumer import Consumer, ConsumerSettings, RunSummary
from worker.controls import following_bandwidth
from worker.core.machine import Policies
from worker.errors import ConfigError
from worker.executor import ExecutorSettings, ImageRunner
from worker.metrics import WorkerMetrics, serving_metrics
from worker.notify import WebhookNotifier, WebhookSettings, notifying
from worker.progress import RunProgress
from worker.store.problems import DATABASE_ERRORS, describe_database_error
from worker.store.store import Store

log = structlog.get_logger(__name__)


def default_worker_id() -> str:
    """host:pid identifies a worker process in rows, events and logs."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class WorkerSettings:
    """Everything `vmdk-migrate run` needs besides the cloud and the database."""

    worker_id: str = field(default_factory=default_worker_id)
    concurrency: int = 8  # images in flight
    stage_concurrency: int = 4  # of those, how many may be sending bytes at once
    chunk_bytes: int = 1 << 20
    hash_algorithm: str = "sha512"
    verify_md5: bool = False  # also compare Glance's legacy md5 `checksum`
    lease_s: float = 60.0
    heartbeat_s: float = 15.0
    idle_poll_s: float = 2.0
    grace_s: float = 60.0
    once: bool = False
    policies: Policies = field(default_factory=Policies)
    progress: str = "auto"  # auto (bars on a terminal, else log lines) | bars | log | off
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None  # None: no endpoint; 0: any free port
    webhook: WebhookSettings | None = None


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
            log.info("db.upgraded", versions=applied)
        yield store
    finally:
        await store.close()


@asynccontextmanager
async def open_glance(
    cloud: CloudSettings,
    *,
    chunk_bytes: int = 1 << 20,
    connections: int = 16,
    throttle: Throttle | None = None,
) -> AsyncIterator[GlanceClient]:
    """A Glance client with its own HTTP session, closed on exit."""
    async with new_session(cloud, connections=connections) as session:
        auth = authenticator_for(session, cloud)
        yield GlanceClient(
            session,
            auth,
            chunk_bytes=chunk_bytes,
            request_timeout_s=cloud.read_timeout_s,
            throttle=throttle,
        )


async def run_worker(
    *,
    database_url: str,
    cloud: CloudSettings,
    settings: WorkerSettings,
    stop: asyncio.Event,
) -> RunSummary:
    """Run one worker process until `stop` is set or, with `once`, the queue is drained."""
    ops = Operations(settings)
    async with (
        open_store(database_url, max_size=min(settings.concurrency + 2, 20)) as store,
        following_bandwidth(database_url, worker_id=settings.worker_id) as throttle,
        open_glance(
            cloud,
            chunk_bytes=settings.chunk_bytes,
            connections=settings.concurrency + settings.stage_concurrency + 2,
            throttle=throttle,
        ) as glance,
    ):
        runner = ImageRunner(
            glance=glance,
            store=store,
            settings=ExecutorSettings(
                worker_id=settings.worker_id,
                hash_algorithm=settings.hash_algorithm,
                verify_md5=settings.verify_md5,
                policies=settings.policies,
            ),
            stage_slots=asyncio.Semaphore(settings.stage_concurrency),
            on_progress=ops.on_progress,
        )
        consumer = Consumer(
            store,
            runner.run,
            ConsumerSettings(
                worker_id=settings.worker_id,
                concurrency=settings.concurrency,
                lease_s=settings.lease_s,
                heartbeat_s=settings.heartbeat_s,
                idle_poll_s=settings.idle_poll_s,
                grace_s=settings.grace_s,
                once=settings.once,
            ),
        )
        async with ops.running(store, settings):
            return await consumer.run(stop)


EventObserver = Callable[[Mapping[str, Any]], None]
_LEVELS = {**logging.getLevelNamesMapping(), "EXCEPTION": logging.ERROR}


class Operations:
    """What operators watch a worker by: progress, metrics and webhooks, fed by its events."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.metrics = WorkerMetrics()
        self.progress: RunProgress | None = None
        self.notifier: WebhookNotifier | None = None
        self._settings = settings

    def on_progress(self, result_id: int, done_bytes: int) -> None:
        self.metrics.on_progress(result_id, done_bytes)
        if self.progress is not None:
            self.progress.on_progress(result_id, done_bytes)

    @asynccontextmanager
    async def running(self, store: Store, settings: WorkerSettings) -> AsyncIterator[None]:
        """Serve metrics, send webhooks and show progress while the block runs."""
        self.progress = RunProgress(store, mode=settings.progress)
        observers: list[EventObserver] = [self.metrics.observe, self.progress.observe]
        async with AsyncExitStack() as stack:
            if settings.metrics_port is not None:
                served = await stack.enter_async_context(
                    serving_metrics(
                        self.metrics,
                        store.outstanding,
                        host=settings.metrics_host,
                        port=settings.metrics_port,
                    )
                )
                if served is None:  # the worker runs on without its endpoints
                    log.warning(
                        "metrics.port_unavailable",
                        host=settings.metrics_host,
                        port=settings.metrics_port,
                        hint="choose another port with --metrics-port (0 turns the endpoints "
                        "off) or another address with --metrics-host",
                    )
            if settings.webhook is not None:
                self.notifier = WebhookNotifier(
                    settings.webhook, store.job_summaries, worker_id=settings.worker_id
                )
                await stack.enter_async_context(notifying(self.notifier))
                observers.append(self.notifier.observe)
            await stack.enter_async_context(self.progress.showing())
            stack.enter_context(observing_events(observers))
            yield


@contextmanager
def observing_events(observers: list[EventObserver]) -> Iterator[None]:
    """Hand every log event of this process, with its bound context, to `observers`.

    Observers see events below the configured log level too (metrics must not depend on
    --log-level); those are dropped right after them.
    """
    config = structlog.get_config()
    wrapper = config["wrapper_class"]
    min_level = wrapper.get_effective_level(None) if hasattr(wrapper, "get_effective_level") else 0

    def tap(_: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        seen = {**structlog.contextvars.get_contextvars(), **event}
        for observer in observers:
            try:
                observer(seen)
            except Exception as exc:  # a watcher's bug must not break the worker's logging
                print(f"event observer failed: {exc!r}", file=sys.stderr)
        if _LEVELS.get(method.upper(), logging.INFO) < min_level:
            raise structlog.DropEvent
        return event

    structlog.configure(
        processors=[tap, *config["processors"]],
        wrapper_class=structlog.make_filtering_bound_logger(min(min_level, logging.INFO)),
    )
    try:
        yield
    finally:
        structlog.configure(processors=config["processors"], wrapper_class=wrapper)


def environment() -> Mapping[str, str]:
    """The process environment, the one place the app reads it."""
    return dict(os.environ)
