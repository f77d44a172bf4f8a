"""Fault injection: rules matched on method and path, and the body reader that honours resets."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from worker.sandbox.config import Fault
from worker.sandbox.context import NO_ANSWER, RESET_AFTER_BYTES
from worker.sandbox.errors import glance_error, keystone_error, title_for

PREFIXES = ("/identity", "/image")
MAX_JSON_BYTES = 1024 * 1024


def service_path(path: str) -> str:
    """The path below the service prefix (`/image/v2/images` -> `/v2/images`)."""
    for prefix in PREFIXES:
        if path == prefix or path.startswith(prefix + "/"):
            return path[len(prefix) :] or "/"
    return path


class FaultBook:
    """The active fault rules; the first rule matching a request fires and counts down."""

    def __init__(self) -> None:
        self._rules: list[Fault] = []

    def add(self, fault: Fault) -> None:
        re.compile(fault.path_regex)  # reject a bad pattern now, not on the first request
        if fault.times > 0:
            self._rules.append(fault)

    def remove(self, fault: Fault) -> None:
        if fault in self._rules:
            self._rules.remove(fault)

    def take(self, method: str, path: str) -> Fault | None:
        for fault in self._rules:
            if fault.method.upper() == method.upper() and re.fullmatch(fault.path_regex, path):
                fault.times -= 1
                if fault.times <= 0:
                    self._rules.remove(fault)
                return fault
        return None


def drop_connection(request: web.Request) -> None:
    """Close the connection at once, so the client sees a reset and no answer."""
    request[NO_ANSWER] = True
    if request.transport is not None:
        request.transport.abort()


def status_response(request: web.Request, fault: Fault, status: int) -> web.Response:
    headers = {}
    if fault.retry_after_s is not None:
        headers["Retry-After"] = f"{fault.retry_after_s:g}"
    if fault.body is not None:
        return web.Response(
            status=status, text=fault.body, content_type="text/html", headers=headers
        )
    if request.path.startswith("/identity"):
        return keystone_error(status, title_for(status), headers=headers)
    return glance_error(request, status, title_for(status), headers=headers)


def fault_middleware(book: FaultBook) -> Any:
    """The middleware applying `book` to every request before authentication."""

    @web.middleware
    async def apply_faults(request: web.Request, handler: Any) -> web.StreamResponse:
        fault = book.take(request.method, service_path(request.path))
        if fault is None:
            response: web.StreamResponse = await handler(request)
            return response
        if fault.hold is not None:
            fault.held_path = service_path(request.path)
            fault.held_query = request.query_string
            fault.reached.set()
            await fault.hold.wait()
        if fault.stall_s:
            await asyncio.sleep(fault.stall_s)
        if fault.status is not None:
            return status_response(request, fault, fault.status)
        if fault.reset_after_bytes is not None:
            request[RESET_AFTER_BYTES] = fault.reset_after_bytes
            if not request.body_exists:
                drop_connection(request)
                return web.Response(status=499)
        try:
            response = await handler(request)
        except ConnectionResetError:
            if RESET_AFTER_BYTES not in request:
                raise
            return web.Response(status=499)  # never sent: the connection is already gone
        if fault.drop_response or RESET_AFTER_BYTES in request:
            # A reset rule whose byte count was never reached still resets before the answer.
            drop_connection(request)
        return response

    return apply_faults


class ServiceOutages:
    """Whole services down: `down` drops every connection, `503` answers every request so.

    While the identity service is down, the image service cannot validate tokens either and
    answers 503, as Glance's keystonemiddleware does without a token cache.
    """

    MODES = ("down", "503")

    def __init__(self) -> None:
        self.modes: dict[str, str] = {}

    def set(self, service: str, mode: str) -> None:
        if service not in ("identity", "image") or mode not in self.MODES:
            raise ValueError(f"unknown outage {service}/{mode}")
        self.modes[service] = mode

    def clear(self, service: str | None = None) -> None:
        if service is None:
            self.modes.clear()
        else:
            self.modes.pop(service, None)

    def mode_for(self, path: str) -> str | None:
        service = "identity" if path.startswith("/identity") else "image"
        mode = self.modes.get(service)
        if mode is None and service == "image" and "identity" in self.modes:
            return "503"
        return mode


def outage_middleware(outages: ServiceOutages) -> Any:
    """The middleware playing `outages`, before any fault rule or authentication."""

    @web.middleware
    async def apply_outages(request: web.Request, handler: Any) -> web.StreamResponse:
        mode = outages.mode_for(request.path)
        if mode is None:
            response: web.StreamResponse = await handler(request)
            return response
        if mode == "down":
            drop_connection(request)
            return web.Response(status=499)  # never sent: the connection is already gone
        fault = Fault(method=request.method, path_regex=".*", status=503)
        return status_response(request, fault, 503)

    return apply_outages


async def body_chunks(request: web.Request, chunk_bytes: int = 1024 * 1024) -> AsyncIterator[bytes]:
    """The request body in chunks; an armed reset fault aborts the connection at its byte count."""
    limit: int | None = request.get(RESET_AFTER_BYTES)
    seen = 0
    async for chunk in request.content.iter_chunked(chunk_bytes):
        if limit is not None and seen + len(chunk) >= limit:
            if limit > seen:
                yield chunk[: limit - seen]
            break
        seen += len(chunk)
        yield chunk
    if limit is not None:
        drop_connection(request)
        raise ConnectionResetError("connection reset by an injected fault")


async def read_json(request: web.Request) -> Any:
    """The JSON body (raises ValueError when it is not JSON or too big)."""
    parts: list[bytes] = []
    size = 0
    async for chunk in body_chunks(request, 64 * 1024):
        size += len(chunk)
        if size > MAX_JSON_BYTES:
            raise ValueError("request body too large")
        parts.append(chunk)
    return json.loads(b"".join(parts) or b"null")
