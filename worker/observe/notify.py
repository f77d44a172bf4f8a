"""Webhook notifications of failed images and completed jobs, sent in the background."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from worker.background import alongside
from worker.clients.http import SAFE_REDIRECTS
from worker.config import Secret
from worker.core.events import Event, EventRecord
from worker.core.model import Phase
from worker.errors import RedirectRefused
from worker.observe.bus import publisher
from worker.observe.logs import redact_url
from worker.store.store import JobSummary

events = publisher(__name__)

# The only keys of an image.finished event a failure notice carries: no free-form data leaks.
_FAILURE_KEYS = (
    "job_id",
    "image",
    "image_id",
    "result_id",
    "error_code",
    "error",
    "attempts",
    "size_bytes",
    "duration_s",
    "glance_status",
)

_OUTAGE_EVENTS = frozenset({Event.OUTAGE_STARTED, Event.OUTAGE_ENDED})
# Not a notice: asks the sender to check whether the job is complete (then it sends one).
_CHECK_JOB = "check_job"
_OUTAGE_KEYS = ("service", "reason", "since", "duration_s", "message")

JobSummaries = Callable[[str], Awaitable[Sequence[JobSummary]]]
SIGNATURE_HEADER = "X-Vmdk-Migrate-Signature"


@dataclass(frozen=True)
class WebhookSettings:
    """Where to POST and how hard to try; the sender never holds up the pipeline."""

    url: str
    timeout_s: float = 10.0
    attempts: int = 5
    backoff_s: float = 1.0  # doubled after each failed attempt
    max_backoff_s: float = 30.0
    queue_size: int = 10_000  # notices beyond this are dropped (and logged), not awaited
    drain_s: float = 15.0  # at shutdown, time given to notices still queued
    secret: Secret | None = None  # signs each body: X-Vmdk-Migrate-Signature: sha256=<hex>


def signature(secret: Secret, body: bytes) -> str:
    """The signature header's value: HMAC-SHA256 of the exact body bytes, in hex."""
    digest = hmac.new(secret.reveal().encode(), body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def safe_target(url: str) -> str:
    """Scheme, host and port only: webhook paths and queries often carry a secret."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


class WebhookNotifier:
    """Turns log events into notices and POSTs them as JSON from one background task."""

    def __init__(
        self, settings: WebhookSettings, job_summaries: JobSummaries, *, worker_id: str
    ) -> None:
        self._settings = settings
        self._job_summaries = job_summaries
        self._worker_id = worker_id
        self._queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue(
            maxsize=settings.queue_size
        )
        self._completed: set[str] = set()
        self.sent = 0
        self.given_up = 0
        self.dropped = 0

    def observe(self, event: EventRecord) -> None:
        """Queue a failure notice and a completion check for each finished image, and one
        notice when an outage starts and one when it ends (never one per image)."""
        if event.event in _OUTAGE_EVENTS:
            notice = {key: _plain(event.get(key)) for key in _OUTAGE_KEYS if key in event.fields}
            self._put(event.event, {**notice, "worker_id": self._worker_id})
            return
        if event.event != Event.IMAGE_FINISHED or "job_id" not in event.fields:
            return
        if event.get("phase") == Phase.FAILED:
            notice = {key: _plain(event.get(key)) for key in _FAILURE_KEYS}
            self._put(Event.IMAGE_FAILED, {**notice, "worker_id": self._worker_id})
        self._put(_CHECK_JOB, {"job_id": str(event.get("job_id"))})

    def _put(self, kind: str, payload: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait((kind, payload))
        except asyncio.QueueFull:
            self._dropped(kind, payload, reason="queue_full")

    def _dropped(self, kind: str, payload: Mapping[str, Any], *, reason: str) -> None:
        """Every notice that will never be sent gets this one warning."""
        self.dropped += 1
        events.warning(
            Event.NOTIFY_DROPPED,
            kind=kind,
            job_id=payload.get("job_id"),
            result_id=payload.get("result_id"),
            reason=reason,
            target=safe_target(self._settings.url),
        )

    async def run(self, session: aiohttp.ClientSession) -> None:
        """Send queued notices one at a time, forever (cancel to stop)."""
        while True:
            kind, payload = await self._queue.get()
            try:
                if kind == _CHECK_JOB:
                    await self._check_job(session, payload["job_id"])
                else:
                    await self._send(session, kind, payload)
            except asyncio.CancelledError:
                self._dropped(kind, payload, reason="shutdown: in flight")
                raise
            except Exception:
                events.exception(Event.NOTIFY_ERROR, kind=kind)
                self._dropped(kind, payload, reason="error")
            finally:
                self._queue.task_done()

    async def drain(self) -> None:
        """Wait for the queued notices, at most `drain_s`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout=self._settings.drain_s)

    def drop_queued(self) -> None:
        """Log the notices still queued once the sender has stopped; they are not sent."""
        while not self._queue.empty():
            kind, payload = self._queue.get_nowait()
            self._dropped(kind, payload, reason="shutdown: still queued")
            self._queue.task_done()

    async def _check_job(self, session: aiohttp.ClientSession, job_id: str) -> None:
        if job_id in self._completed:
            return
        summaries = await self._job_summaries(job_id)
        if not summaries:
            return
        summary = summaries[0]
        unfinished = sum(n for phase, n in summary.counts.items() if not Phase(phase).terminal)
        if unfinished:
            return
        self._completed.add(job_id)
        payload = {
            "job_id": job_id,
            "job": summary.name,
            "disk_count": summary.disk_count,
            "done": summary.counts.get(Phase.DONE, 0),
            "failed": summary.counts.get(Phase.FAILED, 0),
            "total_bytes": summary.total_bytes,
            "worker_id": self._worker_id,
        }
        await self._send(session, Event.JOB_COMPLETED, payload)

    async def _send(
        self, session: aiohttp.ClientSession, kind: str, payload: dict[str, Any]
    ) -> None:
        settings = self._settings
        body = {"event": kind, **payload}
        # Receivers may see a notice twice (a lost answer, or two workers finishing a job at
        # once): this key names the notice so they can drop repeats.
        subject = payload.get("job_id") or f"{payload.get('service')}@{payload.get('since')}"
        key = f"{kind}:{subject}:{payload.get('result_id', '')}"
        data = json.dumps(body).encode()
        headers = {
            "Idempotency-Key": key,
            "User-Agent": "vmdk-migrate",
            "Content-Type": "application/json",
        }
        if settings.secret is not None:
            headers[SIGNATURE_HEADER] = signature(settings.secret, data)
        delay_s = settings.backoff_s
        for attempt in range(1, settings.attempts + 1):
            outcome = await self._post(session, data, headers)
            if outcome == "ok":
                self.sent += 1
                events.info(Event.NOTIFY_SENT, kind=kind, target=safe_target(settings.url))
                return
            final = attempt == settings.attempts or outcome.startswith("refused")
            events.warning(
                Event.NOTIFY_ATTEMPT_FAILED,
                kind=kind,
                target=safe_target(settings.url),
                attempt=attempt,
                reason=outcome,
                final=final,
            )
            if final:
                break
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, settings.max_backoff_s)
        self.given_up += 1
        self._dropped(kind, payload, reason=f"gave up: {outcome}")

    async def _post(
        self, session: aiohttp.ClientSession, data: bytes, headers: dict[str, str]
    ) -> str:
        """'ok', 'retry: ...' or 'refused: ...' (a 4xx other than 408/429 is not retried)."""
        timeout = aiohttp.ClientTimeout(total=self._settings.timeout_s)
        try:
            async with session.post(
                self._settings.url,
                data=data,
                headers=headers,
                timeout=timeout,
                middlewares=SAFE_REDIRECTS,
            ) as response:
                await response.read()
                status = response.status
        except RedirectRefused as exc:
            # Origins only: a webhook's path and query often carry its secret.
            return (
                f"refused: HTTP {exc.status} redirect {exc.why}, from {safe_target(exc.from_url)} "
                f"to {safe_target(exc.to_url)}"
            )
        except TimeoutError:
            return "retry: timeout"
        except aiohttp.ClientError as exc:
            return f"retry: {type(exc).__name__}"
        if status < 300:
            return "ok"
        if 400 <= status < 500 and status not in (408, 429):
            return f"refused: HTTP {status}"
        return f"retry: HTTP {status}"


def _plain(value: object) -> object:
    """JSON-safe values; text is cleared of credentials inside URLs."""
    if value is None or isinstance(value, bool | int | float):
        return value
    return redact_url(str(value))


@asynccontextmanager
async def notifying(notifier: WebhookNotifier) -> AsyncIterator[WebhookNotifier]:
    """Run the sender while the block runs; then give queued notices `drain_s` to go out."""
    async with aiohttp.ClientSession() as session:
        try:
            async with alongside(notifier.run(session), name="webhook"):
                yield notifier
                await notifier.drain()
        finally:
            notifier.drop_queued()
