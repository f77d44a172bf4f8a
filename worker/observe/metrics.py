"""Prometheus metrics, /healthz and /readyz of one worker, fed from its event bus."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from worker.background import alongside
from worker.core.events import LEFT_THIS_WORKER, Event, EventRecord
from worker.core.model import Phase
from worker.observe.bus import publisher
from worker.run.outage import Outages, Service
from worker.store.problems import database_reason

events = publisher(__name__)

# Phases an image passes through while a worker holds it.
ACTIVE_PHASES = (Phase.CREATING, Phase.STAGING, Phase.IMPORTING, Phase.VERIFYING)
# Errors that mean the cloud refuses our credentials or has no image service for us.
_CLOUD_REFUSALS = frozenset({"auth_failed", "endpoint_not_found"})
# Events that follow a successful answer of the cloud.
_CLOUD_ANSWERED = frozenset(
    {
        Event.AUTH_TOKEN_ISSUED,
        Event.AUTH_TOKEN_RENEWED,
        Event.IMAGE_CREATED,
        Event.IMAGE_STAGED,
        Event.IMAGE_ADOPTING,
    }
)
_STAGE_BUCKETS_S = (0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200)
_IMPORT_BUCKETS_S = (0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600)
_TICK_S = 1.0
_STALLED_LOOP_S = 10.0  # /healthz fails when the event loop lagged this long
_PROBE_TIMEOUT_S = 2.0

DatabaseProbe = Callable[[], Awaitable[object]]
# What the worker waits for, e.g. "paused: image service unreachable for 2 min 5 s", or None.
PauseReason = Callable[[], str | None]


class WorkerMetrics:
    """Counters, gauges and histograms of one worker process, in a registry of its own."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = CollectorRegistry()
        self._clock = clock
        self.images_in_phase = Gauge(
            "vmdk_migrate_images_in_phase",
            "Images this worker holds, by phase.",
            ["phase"],
            registry=self.registry,
        )
        self.images_finished = Counter(
            "vmdk_migrate_images_finished",
            "Images this worker took to a terminal phase, by outcome (done or failed).",
            ["outcome"],
            registry=self.registry,
        )
        self.failures = Counter(
            "vmdk_migrate_image_failures",
            "Images that ended failed, by error code.",
            ["error_code"],
            registry=self.registry,
        )
        self.bytes_staged = Counter(
            "vmdk_migrate_staged_bytes",
            "Bytes sent to Glance staging areas (a re-sent stage counts again).",
            registry=self.registry,
        )
        self.stage_duration = Histogram(
            "vmdk_migrate_stage_duration_seconds",
            "Time of each completed upload to the staging area.",
            buckets=_STAGE_BUCKETS_S,
            registry=self.registry,
        )
        self.import_duration = Histogram(
            "vmdk_migrate_import_duration_seconds",
            "Time from an accepted import to the image being active or failed.",
            ["outcome"],
            buckets=_IMPORT_BUCKETS_S,
            registry=self.registry,
        )
        self.retries = Counter(
            "vmdk_migrate_retries",
            "Retries scheduled, by the error code that caused them.",
            ["error_code"],
            registry=self.registry,
        )
        self.stages_in_flight = Gauge(
            "vmdk_migrate_stages_in_flight",
            "Uploads to the staging area in progress.",
            registry=self.registry,
        )
        self.token_renewals = Counter(
            "vmdk_migrate_token_renewals",
            "Keystone token renewals, by reason (expiring or rejected).",
            ["reason"],
            registry=self.registry,
        )
        self.outage = Gauge(
            "vmdk_migrate_outage",
            "1 while this worker's breaker for the service is open (the worker is paused).",
            ["service"],
            registry=self.registry,
        )
        for phase in ACTIVE_PHASES:
            self.images_in_phase.labels(phase=phase.value).set(0)
        for outcome in (Phase.DONE, Phase.FAILED):
            self.images_finished.labels(outcome=outcome.value)
        self._phases: dict[int, str] = {}
        self._staging_since: dict[int, float] = {}
        self._importing_since: dict[int, float] = {}
        self._progress: dict[int, int] = {}
        self.claimed_once = False
        self.cloud_ok: bool | None = None

    def watch_outages(self, outages: Outages) -> None:
        """Read the breakers at each scrape: 1 per open one."""

        def reader(service: Service) -> Callable[[], float]:
            return lambda: float(outages.is_open(service))

        for service in Service:
            self.outage.labels(service=service.value).set_function(reader(service))

    def on_progress(self, result_id: int, done_bytes: int) -> None:
        """The image runner's upload progress hook: counts the bytes sent since the last call."""
        previous = self._progress.get(result_id, 0)
        if done_bytes < previous:
            previous = 0  # a new attempt starts from the first byte again
        self.bytes_staged.inc(done_bytes - previous)
        self._progress[result_id] = done_bytes

    def observe(self, event: EventRecord) -> None:
        """Update the series from one published event (a subscriber of the run's bus)."""
        name = event.event
        self._note_cloud(name, event)
        if name == Event.AUTH_TOKEN_RENEWED:
            self.token_renewals.labels(reason=str(event.get("reason", "unknown"))).inc()
        elif name == Event.WORKER_STOPPED:
            self._forget_all()
        elif name.startswith("image.") and event.result_id is not None:
            self.claimed_once = True
            self._on_image_event(name, event.result_id, event)

    def _note_cloud(self, name: Event, event: EventRecord) -> None:
        if name in _CLOUD_ANSWERED:
            self.cloud_ok = True
        elif event.get("error_code") in _CLOUD_REFUSALS:
            self.cloud_ok = False

    def _on_image_event(self, name: Event, result_id: int, event: EventRecord) -> None:
        if name == Event.IMAGE_PROGRESS_NOT_SAVED:
            return  # said during the upload: the stage goes on
        now = self._clock()
        self._end_stage(result_id, staged=name == Event.IMAGE_STAGED, now=now)
        if name == Event.IMAGE_STAGING:
            self._staging_since[result_id] = now
            self._progress[result_id] = 0
        elif name == Event.IMAGE_RETRY_SCHEDULED:
            self.retries.labels(error_code=str(event.get("error_code", "unknown"))).inc()
        elif name == Event.IMAGE_IMPORT_REQUESTED:
            self._importing_since[result_id] = now
        phase = event.get("phase")
        if name in LEFT_THIS_WORKER:
            self._finish(result_id, name, str(phase or Phase.FAILED), event, now)
        elif phase in ACTIVE_PHASES:
            self._phases[result_id] = str(phase)
        self._count_phases()

    def _end_stage(self, result_id: int, *, staged: bool, now: float) -> None:
        started = self._staging_since.pop(result_id, None)
        if started is not None and staged:
            self.stage_duration.observe(now - started)
        self.stages_in_flight.set(len(self._staging_since))

    def _finish(
        self, result_id: int, name: Event, phase: str, event: EventRecord, now: float
    ) -> None:
        self._phases.pop(result_id, None)
        self._progress.pop(result_id, None)
        import_started = self._importing_since.pop(result_id, None)
        if name != Event.IMAGE_FINISHED:
            return  # stopped here unfinished: another worker goes on with the image
        # Said once per image that ended here, a crashed one included (see Consumer).
        outcome = Phase.DONE.value if phase == Phase.DONE else Phase.FAILED.value
        self.images_finished.labels(outcome=outcome).inc()
        if outcome == Phase.FAILED.value:
            self.failures.labels(error_code=str(event.get("error_code") or "unknown")).inc()
        if import_started is not None:
            self.import_duration.labels(outcome=outcome).observe(now - import_started)

    def _forget_all(self) -> None:
        self._phases.clear()
        self._staging_since.clear()
        self._importing_since.clear()
        self._progress.clear()
        self.stages_in_flight.set(0)
        self._count_phases()

    def _count_phases(self) -> None:
        for phase in ACTIVE_PHASES:
            count = sum(1 for held in self._phases.values() if held == phase)
            self.images_in_phase.labels(phase=phase.value).set(count)

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


class _LoopWatch:
    """Measures how late a periodic tick runs: a blocked event loop shows as a growing lag."""

    def __init__(self) -> None:
        self.last_tick = time.monotonic()
        self.lag_s = 0.0

    async def run(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(_TICK_S)
            self.last_tick = time.monotonic()
            self.lag_s = max(0.0, self.last_tick - before - _TICK_S)

    def stalled_s(self) -> float:
        return max(self.lag_s, time.monotonic() - self.last_tick - _TICK_S)


def build_app(
    metrics: WorkerMetrics,
    probe_database: DatabaseProbe,
    paused: PauseReason = lambda: None,
) -> web.Application:
    """/metrics, /healthz and /readyz over the given metrics, database probe and breakers."""
    watch = _LoopWatch()
    app = web.Application()

    async def serve_metrics(_: web.Request) -> web.Response:
        response = web.Response(body=metrics.exposition())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def healthz(_: web.Request) -> web.Response:
        stalled_s = watch.stalled_s()
        ok = stalled_s < _STALLED_LOOP_S
        body = {"status": "ok" if ok else "stalled", "loop_lag_s": round(stalled_s, 3)}
        return web.json_response(body, status=200 if ok else 503)

    async def readyz(_: web.Request) -> web.Response:
        checks = {"database": await _database_ok(probe_database), "cloud": _cloud_state(metrics)}
        pause = paused()
        ready = (
            pause is None
            and checks["database"] == "ok"
            and checks["cloud"] in ("ok", "not_checked_yet")
        )
        body: dict[str, object] = {"status": "ready" if ready else "not_ready", **checks}
        if pause is not None:
            body["reason"] = pause
        return web.json_response(body, status=200 if ready else 503)

    async def watch_loop(_: web.Application) -> AsyncIterator[None]:
        async with alongside(watch.run(), name="loop-watch"):
            yield

    app.router.add_get("/metrics", serve_metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.cleanup_ctx.append(watch_loop)
    return app


async def _database_ok(probe: DatabaseProbe) -> str:
    try:
        await asyncio.wait_for(probe(), timeout=_PROBE_TIMEOUT_S)
    except Exception as exc:
        return f"unreachable: {database_reason(exc)}"
    return "ok"


def _cloud_state(metrics: WorkerMetrics) -> str:
    """Checked only once the worker claimed an image: an idle worker needs no cloud yet."""
    if not metrics.claimed_once:
        return "not_checked_yet"
    if metrics.cloud_ok is None:
        return "not_authenticated_yet"
    return "ok" if metrics.cloud_ok else "refused"


@asynccontextmanager
async def serving_metrics(
    metrics: WorkerMetrics,
    probe_database: DatabaseProbe,
    *,
    host: str,
    port: int,
    paused: PauseReason = lambda: None,
) -> AsyncIterator[str | None]:
    """Serve the endpoints on host:port (0: a free port); yields the base URL.

    A port already taken (another worker on this host) is logged and yields None: the
    worker runs on without the endpoints rather than not at all.
    """
    runner = web.AppRunner(build_app(metrics, probe_database, paused), access_log=None)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            events.warning(Event.METRICS_UNAVAILABLE, host=host, port=port, error=str(exc))
            yield None
            return
        url = f"http://{host}:{runner.addresses[0][1]}"
        events.info(Event.METRICS_SERVING, url=url)
        yield url
    finally:
        await runner.cleanup()
