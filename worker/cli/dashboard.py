"""The read-only web dashboard: job progress and per-image rows from the dashboard views.

Each job's bar, rate and ETA are by bytes moved (dashboard.job_bytes): the page's process
samples them every second, and the rate is their moving average (worker/observe/rates.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any
from uuid import UUID

import structlog
from aiohttp import web

from worker.core.events import Event
from worker.core.model import Phase
from worker.errors import ConfigError
from worker.observe.rates import SAMPLE_EVERY_S, JobRates
from worker.store.store import open_store
from worker.store.views import Views

log = structlog.get_logger(__name__)

VIEWS_KEY = web.AppKey("views", Views)
RATES_KEY = web.AppKey("rates", JobRates)
MAX_JOBS = 200
DEFAULT_IMAGE_LIMIT = 500
MAX_IMAGE_LIMIT = 5000

ALLOWED_HOSTS_KEY = web.AppKey("allowed_hosts", frozenset)
# Host names a browser on this machine uses; any other Host header is refused.
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
_LIMIT = re.compile(r"[0-9]{1,9}")  # ASCII digits only: str.isdigit() also takes '²'

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def allowed_hosts(bind_host: str, extra: Collection[str] = ()) -> frozenset[str]:
    """Loopback names, the bind address when it names one interface, and `extra`."""
    names = set(LOOPBACK_HOSTS) | {_bare(name) for name in extra if name.strip()}
    if bind_host not in ("", "0.0.0.0", "::"):
        names.add(_bare(bind_host))
    return frozenset(names)


def _bare(host: str) -> str:
    """A host name as compared: lower case, without a port, IPv6 without brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return host.rsplit(":", 1)[0]
    return host


@web.middleware
async def _check_host(request: web.Request, handler: Handler) -> web.StreamResponse:
    # A page on another site can make a browser send requests here under its own name (DNS
    # rebinding); the Host header gives it away.
    host = request.headers.get("Host", "")
    if _bare(host) not in request.app[ALLOWED_HOSTS_KEY]:
        log.warning(Event.DASHBOARD_HOST_REFUSED, host=host[:100])
        message = (
            f"this dashboard does not answer to host {host[:100]!r}: "
            "start it with --allowed-host NAME to add a name"
        )
        return web.Response(status=421, text=json.dumps({"error": message}), **_JSON_TYPE)
    return await handler(request)


def build_app(
    views: Views, rates: JobRates, *, hosts: frozenset[str] = LOOPBACK_HOSTS
) -> web.Application:
    """The page and its JSON endpoints, reading through `views` and the job rates `rates`
    sample, for requests naming `hosts`."""
    app = web.Application(middlewares=[_check_host])
    app[VIEWS_KEY] = views
    app[RATES_KEY] = rates
    app[ALLOWED_HOSTS_KEY] = hosts
    app.router.add_get("/", _page)
    app.router.add_get("/api/jobs", _jobs)
    app.router.add_get("/api/jobs/{job_id}/images", _images)
    return app


@dataclass(frozen=True)
class ServedDashboard:
    """A dashboard being served: its base URL, and the job rates it samples."""

    url: str
    rates: JobRates
    views: Views

    async def sample(self) -> None:
        """Sample every job's bytes moved now (the sampler does it every second)."""
        await self.rates.sample(self.views)


@asynccontextmanager
async def serving_dashboard(
    database_url: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    extra_hosts: Collection[str] = (),
    clock: Callable[[], float] = time.monotonic,
    sample_every_s: float | None = SAMPLE_EVERY_S,
) -> AsyncIterator[ServedDashboard]:
    """Serve the dashboard while the block runs (port 0 picks a free port).

    It answers requests whose Host header is a loopback name, the bind address, or one of
    `extra_hosts`. Each job's bytes moved are sampled at the start and then every
    `sample_every_s` on `clock` (with None, only when the caller calls `sample()`).
    """
    async with open_store(database_url, max_size=1):
        pass  # brings the schema, and so the views, up to date before serving
    # The dashboard only reads; the server refuses any write it might attempt.
    views = await Views.connect(database_url, application_name="vmdk-migrate-dashboard")
    rates = JobRates(clock=clock)
    app = build_app(views, rates, hosts=allowed_hosts(host, extra_hosts))
    runner = web.AppRunner(app, access_log=None)
    sampler = None
    try:
        await rates.sample(views)
        if sample_every_s is not None:
            sampler = asyncio.create_task(rates.run(views, sample_every_s), name="dashboard-rates")
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
            raise ConfigError(
                f"cannot serve the dashboard on {host} port {port}: {reason}; "
                "choose another port with --port (or another address with --host)"
            ) from exc
        url = f"http://{host}:{runner.addresses[0][1]}/"
        log.info(Event.DASHBOARD_STARTED, url=url)
        yield ServedDashboard(url, rates, views)
    finally:
        if sampler is not None:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        await runner.cleanup()
        await views.close()


async def _page(request: web.Request) -> web.Response:
    text = resources.files("worker.cli").joinpath("dashboard.html").read_text(encoding="utf-8")
    return web.Response(text=text, content_type="text/html", headers=_NO_CACHE)


async def _jobs(request: web.Request) -> web.Response:
    views = request.app[VIEWS_KEY]
    rates = request.app[RATES_KEY]
    jobs = await views.jobs(limit=MAX_JOBS)
    failures = await views.job_failures([job["job_id"] for job in jobs])
    vms = await views.job_vms([job["job_id"] for job in jobs])
    for job in jobs:
        job["vms"] = [vm.record() for vm in vms.get(job["job_id"], [])]
        job["rate_bytes_per_s"] = rates.rate_bytes_per_s(job["job_id"])
        job["eta_s"] = rates.eta_s(job["job_id"], job["bytes_to_move"])
        job["failures"] = [
            {key: record[key] for key in ("error_code", "images", "last_message")}
            for record in failures
            if record["job_id"] == job["job_id"]
        ]
    return _json({"jobs": jobs})


async def _images(request: web.Request) -> web.Response:
    job_id = _parse_uuid(request.match_info["job_id"])
    phase = _parse_phase(request.query.get("phase"))
    limit = _parse_limit(request.query.get("limit"))
    views = request.app[VIEWS_KEY]
    if not await views.job_exists(job_id):
        raise web.HTTPNotFound(text=json.dumps({"error": f"no job {job_id}"}), **_JSON_TYPE)
    images = await views.images(job_id, phase=phase, limit=limit)
    total = await views.image_count(job_id, phase=phase)
    return _json({"job_id": job_id, "phase": phase, "total": total, "images": images})


def _parse_uuid(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise _bad_request(f"not a job id: {text!r}") from None


def _parse_phase(text: str | None) -> str | None:
    if not text:
        return None
    try:
        return Phase(text).value
    except ValueError:
        raise _bad_request(f"unknown phase {text!r}") from None


def _parse_limit(text: str | None) -> int:
    if text is None:
        return DEFAULT_IMAGE_LIMIT
    if not _LIMIT.fullmatch(text) or not 1 <= int(text) <= MAX_IMAGE_LIMIT:
        raise _bad_request(f"limit must be an integer from 1 to {MAX_IMAGE_LIMIT}")
    return int(text)


_JSON_TYPE: Mapping[str, Any] = {"content_type": "application/json"}
_NO_CACHE = {"Cache-Control": "no-store"}


def _bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": message}), **_JSON_TYPE)


def _json(body: Mapping[str, object]) -> web.Response:
    return web.Response(
        text=json.dumps(body, default=_json_default), headers=_NO_CACHE, **_JSON_TYPE
    )


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    raise TypeError(f"cannot send {type(value).__name__} as JSON")
