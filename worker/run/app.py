"""Composition root: builds the HTTP session, clients, store, runner and consumer."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from worker.clients.glance import GlanceClient, open_glance
from worker.clients.keystone import KeystoneAuth
from worker.config import CloudSettings
from worker.core.events import Event
from worker.errors import (
    AuthExpired,
    AuthFailed,
    ConfigError,
    ConnectionFailed,
    EndpointNotFound,
    MigrationError,
)
from worker.intake.remote import RemoteSources
from worker.observe.bus import EventBus, current_bus, publisher
from worker.observe.metrics import WorkerMetrics, serving_metrics
from worker.observe.notify import WebhookNotifier, notifying
from worker.observe.progress import RunProgress, wants_bars
from worker.run.bandwidth import following_bandwidth
from worker.run.consumer import Consumer, RunSummary
from worker.run.gate import StageGate
from worker.run.outage import (
    Outages,
    OutageTooLong,
    Probe,
    Service,
    error_text,
    is_systemic_kind,
    service_of,
)
from worker.run.recovery import PauseBoard, discard_if_orphaned, settling_owed_cleanups
from worker.run.runner import ImageRunner
from worker.run.settings import WorkerSettings
from worker.run.watch import ImportWatch
from worker.store.store import CONNECTION_ERRORS, Store, open_store

events = publisher(__name__)


async def run_worker(
    *,
    database_url: str,
    cloud: CloudSettings,
    settings: WorkerSettings,
    stop: asyncio.Event,
    reload_cloud: Callable[[], CloudSettings] | None = None,
) -> RunSummary:
    """Run one worker process until `stop` is set or, with `once`, the queue is drained.

    Raises ConfigError when the credentials are refused at start (nothing is claimed), and
    OutageTooLong when an outage outlasted `settings.outage.max_outage_s`.

    Everything the run says is published on one event bus, built here: the log (through the
    bus this runs inside) and metrics follow it from the start, progress and webhooks while
    images are worked on.
    """
    ops = Operations(settings)
    bus = EventBus([current_bus().publish, ops.metrics.observe])
    with bus.active():
        summary = await _run(bus, ops, database_url, cloud, settings, stop, reload_cloud)
    if summary.gave_up is not None:
        raise OutageTooLong(summary.gave_up)
    return summary


async def _run(
    bus: EventBus,
    ops: Operations,
    database_url: str,
    cloud: CloudSettings,
    settings: WorkerSettings,
    stop: asyncio.Event,
    reload_cloud: Callable[[], CloudSettings] | None,
) -> RunSummary:
    gate = StageGate(settings.stage_concurrency, adaptive=settings.adaptive_stages)
    async with (
        open_store(database_url, max_size=min(settings.concurrency + 2, 20)) as store,
        following_bandwidth(database_url, worker_id=settings.worker_id) as throttle,
        RemoteSources(per_host=settings.source_concurrency) as remote_sources,
        open_glance(
            cloud,
            chunk_bytes=settings.chunk_bytes,
            connections=settings.concurrency + settings.stage_concurrency + 2,
            throttle=throttle,
            reload_cloud=reload_cloud,
            on_small_call=gate.answered,
        ) as glance,
    ):
        pauses = PauseBoard(store, worker_id=settings.worker_id)
        outages = Outages(
            {**probes_for(glance), Service.DATABASE: database_probe(store)},
            policy=settings.outage,
            on_change=pauses.on_change,
        )
        store.on_connection = outages.report_database
        try:
            await authenticate_first(glance, outages)
            return await _consume(
                bus, store, glance, gate, remote_sources, outages, ops, settings, stop
            )
        finally:
            store.on_connection = None
            await outages.aclose()
            await pauses.aclose()


async def _consume(
    bus: EventBus,
    store: Store,
    glance: GlanceClient,
    gate: StageGate,
    remote_sources: RemoteSources,
    outages: Outages,
    ops: Operations,
    settings: WorkerSettings,
    stop: asyncio.Event,
) -> RunSummary:
    watch = ImportWatch(glance)
    runner = ImageRunner(
        glance=glance,
        store=store,
        settings=settings,
        stage_slots=gate,
        on_progress=ops.on_progress,
        outages=outages,
        watch=watch,
        remote_sources=remote_sources,
        # Per-step lines are detail while bars show each image's progress.
        step_log_level=logging.DEBUG if wants_bars(settings.progress, sys.stderr) else logging.INFO,
    )
    consumer = Consumer(
        store,
        runner.run,
        settings,
        outages=outages,
        on_lost=lambda result_id: discard_if_orphaned(
            store, glance, result_id, runner.take_image_of(result_id)
        ),
    )
    async with (
        ops.running(bus, store, settings, outages),
        settling_owed_cleanups(store, glance, outages, worker_id=settings.worker_id),
    ):
        try:
            return await consumer.run(stop)
        finally:
            await watch.close()


def probes_for(glance: GlanceClient) -> dict[Service, Probe]:
    """How each breaker asks whether its service is back."""
    probes: dict[Service, Probe] = {Service.IMAGE: glance.probe}
    if isinstance(glance.auth, KeystoneAuth):
        probes[Service.IDENTITY] = glance.auth.reauthenticate
    return probes


def database_probe(store: Store) -> Probe:
    """The database breaker's probe: the store's calls outwait the server themselves, but an
    idle worker also needs to hear that it is back."""

    async def probe() -> None:
        try:
            await store.ping()
        except CONNECTION_ERRORS as exc:
            raise ConnectionFailed(error_text(exc), operation="database") from exc

    return probe


async def authenticate_first(glance: GlanceClient, outages: Outages) -> None:
    """Authenticate before anything is claimed.

    Refused credentials or a catalog without Glance are configuration errors (exit 3, no row
    touched); an unreachable Keystone is an outage, waited out like one.
    """
    source = glance.auth.source if isinstance(glance.auth, KeystoneAuth) else "OS_TOKEN"
    try:
        await glance.auth.token()
        await glance.auth.image_endpoint()
    except (AuthFailed, AuthExpired) as exc:
        raise ConfigError(f"Keystone refused the credentials from {source}: {exc}") from exc
    except EndpointNotFound as exc:
        raise ConfigError(f"{exc} (credentials from {source})") from exc
    except MigrationError as exc:
        if not is_systemic_kind(exc):
            raise
        outages.open(service_of(exc), exc)


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
    async def running(
        self, bus: EventBus, store: Store, settings: WorkerSettings, outages: Outages
    ) -> AsyncIterator[None]:
        """Serve metrics, send webhooks and show progress, following `bus`, while the block
        runs (metrics follow it from the start of the run)."""
        self.metrics.watch_outages(outages)
        self.progress = RunProgress(store, mode=settings.progress)
        async with AsyncExitStack() as stack:
            stack.enter_context(bus.subscribed(self.progress.observe))
            if settings.metrics_port is not None:
                served = await stack.enter_async_context(
                    serving_metrics(
                        self.metrics,
                        store.outstanding,
                        paused=outages.describe,
                        host=settings.metrics_host,
                        port=settings.metrics_port,
                    )
                )
                if served is None:  # the worker runs on without its endpoints
                    events.warning(
                        Event.METRICS_PORT_UNAVAILABLE,
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
                stack.enter_context(bus.subscribed(self.notifier.observe))
            await stack.enter_async_context(self.progress.showing())
            yield
