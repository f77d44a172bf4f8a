"""Glance v2 image data: stage (PUT), import (POST), download and the image's import tasks."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiofiles
import structlog
from aiohttp import web

from worker.sandbox.context import BACKGROUND_KEY, request_id_of, state_of, token_of
from worker.sandbox.errors import glance_error, quota_message
from worker.sandbox.faults import body_chunks, drop_connection, read_json
from worker.sandbox.glance_images import find_image, not_found
from worker.sandbox.importer import LOCK, ImportFlow, default_store, name_in, writable_stores
from worker.sandbox.state import MIB, CloudState, Image, Task, utcnow

log = structlog.get_logger(__name__)

STAGE_CHUNK_BYTES = 1024 * 1024
GLANCE_DIRECT = "glance-direct"
WEB_DOWNLOAD = "web-download"


class StageRefused(Exception):
    """The stage cannot go on; `status`/`message` is the answer, the image goes back to queued."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _declared_size(request: web.Request) -> int | None:
    """x-openstack-image-size, else Content-Length; None when chunked (size unknown)."""
    header = request.headers.get("x-openstack-image-size")
    if header is not None:
        return int(header)
    return request.content_length


async def _receive(request: web.Request, path: Path, rate_bytes_per_s: float | None) -> int:
    """Stream the body into `path`, never holding more than one chunk in memory."""
    written = 0
    started = time.monotonic()
    async with aiofiles.open(path, "wb") as target:
        async for chunk in body_chunks(request, STAGE_CHUNK_BYTES):
            await target.write(chunk)
            written += len(chunk)
            if rate_bytes_per_s:  # a slow link: hold the upload to the configured rate
                ahead_s = written / rate_bytes_per_s - (time.monotonic() - started)
                if ahead_s > 0:
                    await asyncio.sleep(ahead_s)
    return written


def _unstage(state: CloudState, image: Image, path: Path) -> None:
    path.unlink(missing_ok=True)
    if state.images.get(image.id) is image and image.status == "uploading":
        image.set_status("queued")


def _stage_quota_problem(state: CloudState, request: web.Request, resource: str, delta: int) -> str:
    over = state.over_quota(resource, delta)
    if over is None:
        return ""
    limit, usage = over
    return quota_message(token_of(request).project_id or "", resource, limit, usage, delta)


async def stage(request: web.Request) -> web.Response:
    if request.content_type != "application/octet-stream":
        return glance_error(request, 415, f"Invalid content type {request.content_type}")
    state = state_of(request)
    image = find_image(request)
    if GLANCE_DIRECT not in state.config.import_methods or image is None:
        return not_found(request, request.match_info["image_id"])
    try:
        declared = _declared_size(request)
    except ValueError:
        return glance_error(request, 400, "Invalid x-openstack-image-size header")
    problem = _stage_quota_problem(state, request, "image_stage_total", (declared or 0) // MIB)
    if problem:
        return glance_error(request, 413, problem)
    if image.status != "queued":
        message = f"Image status transition from {image.status} to uploading is not allowed"
        return glance_error(request, 409, message)
    image.set_status("uploading")
    state.stages_in_flight += 1
    state.peak_stages_in_flight = max(state.peak_stages_in_flight, state.stages_in_flight)
    try:
        image.size = await _stage_bytes(request, state, image, declared)
    except StageRefused as exc:
        return glance_error(request, exc.status, exc.message)
    except Exception as exc:
        # The client went away mid-body (or an injected reset fired): nobody reads an answer.
        log.info("sandbox.stage_aborted", image_id=image.id, error=type(exc).__name__)
        drop_connection(request)
        return web.Response(status=499)
    finally:
        state.stages_in_flight -= 1
    if name_in(image, state.config.truncate_stage_names) and image.size:
        image.size = max(0, image.size - 512)
        os.truncate(state.staged_path(image.id), image.size)
    image.touch()
    return web.Response(status=204)


async def _stage_bytes(
    request: web.Request, state: CloudState, image: Image, declared: int | None
) -> int:
    """Receive the body as Glance's stage does; on any failure the image goes back to queued."""
    path = state.staged_path(image.id)
    try:
        problem = _stage_quota_problem(state, request, "image_count_uploading", 0)
        if problem:
            raise StageRefused(413, problem)
        if path.exists():
            raise StageRefused(409, f"The image {image.id} has data on staging")
        written = await _receive(request, path, state.config.stage_rate_bytes_per_s)
        if declared is not None and written != declared:
            word = "exceeds" if written > declared else "mismatch"
            raise StageRefused(
                400, f"Size {word}: declared {declared} bytes, received {written} bytes"
            )
    except StageRefused as exc:
        if exc.status == 409:
            # A stale staged file belongs to the earlier attempt: keep it, as Glance does.
            image.set_status("queued")
        else:
            _unstage(state, image, path)
        raise
    except BaseException:
        _unstage(state, image, path)
        raise
    if state.images.get(image.id) is not image:
        path.unlink(missing_ok=True)  # deleted while we were receiving
    return written


def _method_name(body: Any) -> str | None:
    method = body.get("method") if isinstance(body, dict) else None
    name = method.get("name") if isinstance(method, dict) else None
    return name if isinstance(name, str) else None


def _method_uri(body: Any) -> str | None:
    method = body.get("method") if isinstance(body, dict) else None
    uri = method.get("uri") if isinstance(method, dict) else None
    return uri if isinstance(uri, str) and uri else None


def _uri_problem(state: CloudState, uri: str | None) -> str:
    """Glance's 400 text for a web-download URI it refuses, or "" (its import filtering:
    http(s) only, and the hosts the cloud's operator disallowed)."""
    if uri is None:
        return "URI is required for web-download import method. Please use the 'uri' field."
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or (
        parts.hostname in state.config.web_download_disallowed_hosts
    ):
        return f"URI for web-download does not pass filtering: {uri}"
    return ""


def _import_conflict(image: Image, method: str) -> str:
    """Glance's 409 text for an import it refuses, or "" when the import may start."""
    if image.status == "active" and method != "copy-image":
        return "Image with status active cannot be target for import"
    if method == GLANCE_DIRECT and image.status != "uploading":
        return "Image needs to be staged before 'glance-direct' method can be used"
    if method == WEB_DOWNLOAD and image.status != "queued":
        return f"Image with status {image.status} cannot be target for import"
    if not image.container_format or not image.disk_format:
        return "'container_format' and 'disk_format' must be set before import"
    if method not in (GLANCE_DIRECT, WEB_DOWNLOAD):
        return f"Import method '{method}' is not available in this sandbox cloud"
    if LOCK in image.properties:
        return "Image has active task"
    return ""


class StoresRefused(Exception):
    """The import's choice of stores is refused with `status` (400 or 409) and `message`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _flag(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise StoresRefused(400, f"'{key}' must be boolean value only")
    return value


def _import_stores(state: CloudState, body: dict[str, Any]) -> tuple[str, ...]:
    """The stores the import copies to, resolved as Glance does (`get_stores_from_request`);
    a single-store cloud (no stores configured) ignores the choice."""
    if not state.config.stores:
        return ()
    known = {str(store["id"]) for store in state.config.stores}
    if body.get("all_stores", False):
        if "stores" in body:
            raise StoresRefused(
                400,
                "All_stores parameter can't be used with x-image-meta-store header or stores "
                "parameter",
            )
        return writable_stores(state)
    chosen = body.get("stores")
    if chosen is None:
        return (default_store(state),)
    if not isinstance(chosen, list):
        raise StoresRefused(400, "Invalid type value: stores must be a list")
    for store in chosen:
        if store not in known:
            raise StoresRefused(409, f"Store for identifier {store} not found")
    return tuple(str(store) for store in chosen)


async def import_image(request: web.Request) -> web.Response:
    state = state_of(request)
    try:
        body = await read_json(request)
    except ValueError:
        return glance_error(request, 400, "Malformed JSON in request body.")
    method, uri = _method_name(body), _method_uri(body)
    if method is None:
        return glance_error(request, 400, "Import request requires a 'method' field.")
    if method not in state.config.import_methods:
        return glance_error(request, 400, f"Unknown import method name '{method}'.")
    if method == WEB_DOWNLOAD and _uri_problem(state, uri):
        return glance_error(request, 400, _uri_problem(state, uri))
    try:
        _flag(body, "all_stores", False)
        must_succeed = _flag(body, "all_stores_must_succeed", True)
    except StoresRefused as exc:
        return glance_error(request, exc.status, exc.message)
    problem = _stage_quota_problem(state, request, "image_size_total", 0)
    if problem:
        return glance_error(request, 413, problem)
    image = find_image(request)
    if image is None:
        return not_found(request, request.match_info["image_id"])
    conflict = _import_conflict(image, method)
    if conflict:
        return glance_error(request, 409, conflict)
    try:
        stores = _import_stores(state, body)
    except StoresRefused as exc:
        return glance_error(request, exc.status, exc.message)
    if not must_succeed and not state.config.stores:
        message = "All_stores_must_succeed can only be set with enabled_backends"
        return glance_error(request, 400, message)
    task = _new_task(state, request, image, body, stores)
    image.properties[LOCK] = task.id
    image.touch()
    flow = ImportFlow(state, image.id, task, stores=stores, all_stores_must_succeed=must_succeed)
    request.app[BACKGROUND_KEY].spawn(flow.run())
    return web.Response(status=202, content_type="text/html")


def _new_task(
    state: CloudState,
    request: web.Request,
    image: Image,
    import_req: dict[str, Any],
    stores: tuple[str, ...],
) -> Task:
    now = utcnow()
    token = token_of(request)
    task = Task(
        id=str(uuid.uuid4()),
        image_id=image.id,
        owner=token.project_id or "",
        user_id=token.user_id,
        # The task keeps the id exactly as the client sent it; only the header gets `req-`.
        request_id=request.headers.get("x-openstack-request-id") or request_id_of(request),
        import_req=import_req,  # the request's body, as Glance keeps it
        backend=list(stores),
        created_at=now,
        updated_at=now,
    )
    state.tasks[task.id] = task
    return task


async def image_tasks(request: web.Request) -> web.Response:
    image = find_image(request)
    if image is None:
        return not_found(request, request.match_info["image_id"])
    tasks = state_of(request).tasks_of(image.id)
    return web.json_response({"tasks": [task.to_json() for task in tasks]})


async def download(request: web.Request) -> web.StreamResponse:
    image = find_image(request)
    if image is None:
        return not_found(request, request.match_info["image_id"])
    path = state_of(request).stored_path(image.id)
    if image.status != "active" or not path.exists():
        return web.Response(status=204)
    headers = {"Content-Type": "application/octet-stream"}
    if image.checksum:
        headers["Content-MD5"] = image.checksum
    return web.FileResponse(path, headers=headers)


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_put("/image/v2/images/{image_id}/stage", stage)
    router.add_post("/image/v2/images/{image_id}/import", import_image)
    router.add_get("/image/v2/images/{image_id}/tasks", image_tasks)
    router.add_get("/image/v2/images/{image_id}/file", download)
