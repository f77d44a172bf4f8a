"""Glance v2: one method per API call, typed results, the stage body streamed and hashed."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload

from worker.clients.http import (
    REQUEST_ID_HEADER,
    SAFE_REDIRECTS,
    error_from_response,
    header,
    new_session,
    translate_transport_errors,
)
from worker.clients.keystone import Authenticator, authenticator_for
from worker.clients.throttle import Throttle
from worker.config import CloudSettings
from worker.core.model import DEFAULT_HASH_ALGO, GLANCE_DIRECT
from worker.errors import (
    CloudUnavailable,
    MigrationError,
    NotFound,
    RequestTimeout,
)
from worker.intake.source import LocalHandle, SourceHandle, read_whole

JSON_PATCH = "application/openstack-images-v2.1-json-patch"
# File data one process holds in flight across all its uploads: with many uploads at once each
# reads smaller chunks, so memory stays flat as concurrency grows (one upload: full chunks).
BUFFER_BUDGET_BYTES = 4 << 20
MIN_CHUNK_BYTES = 256 << 10


@dataclass(frozen=True)
class Image:
    """An image as Glance shows it; every key we do not name is in `properties`."""

    id: str
    name: str | None
    status: str
    size: int | None
    virtual_size: int | None
    checksum: str | None
    os_hash_algo: str | None
    os_hash_value: str | None
    disk_format: str | None
    container_format: str | None
    properties: Mapping[str, object] = field(default_factory=dict)
    request_id: str | None = None

    @classmethod
    def from_json(cls, document: Mapping[str, Any], request_id: str | None) -> Image:
        known: dict[str, Any] = {name: document.get(name) for name in _IMAGE_FIELDS}
        others = {key: value for key, value in document.items() if key not in _IMAGE_FIELDS}
        known.update(id=str(known["id"]), status=str(known["status"]))
        return cls(**known, properties=others, request_id=request_id)


# The keys of an image's document that Image names; the others are its properties.
_IMAGE_FIELDS = tuple(f.name for f in fields(Image) if f.name not in ("properties", "request_id"))


@dataclass(frozen=True)
class Task:
    """One import task of an image (GET /v2/images/{id}/tasks)."""

    id: str
    status: str
    request_id: str | None
    message: str | None
    created_at: str | None
    updated_at: str | None = None

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> Task:
        # The code emits `request_id`, the API reference shows `request-id`: read both.
        request_id = document.get("request_id") or document.get("request-id")
        return cls(
            id=str(document.get("id")),
            status=str(document.get("status")),
            request_id=request_id,
            message=document.get("message"),
            created_at=document.get("created_at"),
            updated_at=document.get("updated_at"),
        )


@dataclass(frozen=True)
class BackendStore:
    """A Glance backend store (not the worker's PostgreSQL `Store`); `default` is where an
    import lands when none is named."""

    id: str
    default: bool


@dataclass(frozen=True)
class StageResult:
    """What was streamed: the byte count and our digests of exactly those bytes."""

    size_bytes: int
    digests: Mapping[str, str]
    request_id: str | None


@dataclass(frozen=True)
class Quota:
    """One unified-limit quota; sizes are in MiB as Glance reports them."""

    usage: int
    limit: int


@dataclass(frozen=True)
class _Answer:
    status: int
    body: bytes
    headers: Mapping[str, str]

    @property
    def request_id(self) -> str | None:
        return header(self.headers, REQUEST_ID_HEADER)

    def document(self, operation: str) -> dict[str, Any]:
        try:
            document = json.loads(self.body)
        except ValueError:
            document = None
        if not isinstance(document, dict):
            raise CloudUnavailable(
                "the answer is not a JSON object",
                status=self.status,
                request_id=self.request_id,
                operation=operation,
            )
        return document


class GlanceClient:
    """The image API calls the migration makes, each renewing the token once on a 401."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        auth: Authenticator,
        *,
        chunk_bytes: int = 1 << 20,
        request_timeout_s: float = 60.0,
        throttle: Throttle | None = None,
        on_small_call: Callable[[float, int], None] | None = None,
    ) -> None:
        self._session = session
        # Told the time and status of every answer but an upload's (the stage gate reads it).
        self._on_small_call = on_small_call
        self._auth = auth
        self._chunk_bytes = chunk_bytes
        # One throttle for every stage of the process: the bandwidth cap is on the sum.
        self._throttle = throttle or Throttle()
        self._request_timeout_s = request_timeout_s
        # No total: an upload of hundreds of GB takes as long as it takes, but must not stall.
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=request_timeout_s, sock_read=request_timeout_s
        )

    async def create_image(self, body: Mapping[str, object]) -> Image:
        answer = await self._call(
            "POST", "/v2/images", operation="create_image", expected=(201,), json_body=body
        )
        return Image.from_json(answer.document("create_image"), answer.request_id)

    async def stage(
        self,
        image_id: str,
        source: Path | SourceHandle,
        *,
        size_bytes: int,
        hash_algos: Sequence[str] = (DEFAULT_HASH_ALGO,),
        progress: Callable[[int], None] | None = None,
        identity: Mapping[str, int | str] | None = None,
        reinspect: bool = False,
    ) -> StageResult:
        """Stream the source as the image's data; on a 401 the whole stream restarts once.

        A path is a local file: with `identity` (see worker.intake.source) only that very file
        is sent, and `reinspect` checks its VMDK header again first.
        """
        if isinstance(source, Path):
            source = LocalHandle(
                source, size_bytes=size_bytes, identity=identity, reinspect=reinspect
            )
        async with translate_transport_errors("stage"):  # names the operation of our errors
            await source.check()
        bodies: list[_FileBody] = []

        def new_body() -> _FileBody:
            body = _FileBody(
                source,
                chunk_bytes=self._chunk_bytes,
                hash_algos=hash_algos,
                progress=progress,
                write_timeout_s=self._request_timeout_s,
                throttle=self._throttle,
            )
            bodies.append(body)
            return body

        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(size_bytes),
            "x-openstack-image-size": str(size_bytes),
        }
        try:
            with self._throttle.sending():
                answer = await self._call(
                    "PUT",
                    f"/v2/images/{image_id}/stage",
                    operation="stage",
                    expected=(204,),
                    headers=headers,
                    body_factory=new_body,
                )
        except MigrationError as exc:
            if bodies and bodies[-1].failure is not None:
                raise bodies[-1].failure from exc
            raise
        digests = await bodies[-1].digests()
        if progress is not None and bodies[-1].sent_bytes < size_bytes:
            # The answer can cancel the body writer before it reports the last chunk.
            progress(size_bytes)
        return StageResult(size_bytes, digests, answer.request_id)

    async def import_image(
        self,
        image_id: str,
        *,
        request_id: str,
        method: str = GLANCE_DIRECT,
        uri: str | None = None,
        stores: Sequence[str] = (),
        all_stores: bool = False,
        all_stores_must_succeed: bool = True,
    ) -> str:
        """Ask for the import under our request id; the id Glance echoes names its task.

        web-download takes the `uri` Glance downloads the image from. `stores` (or
        `all_stores`) asks a multi-store cloud to copy the image to those stores; without
        either the body names none, as a single-store cloud wants (it refuses
        `all_stores_must_succeed` with 400).
        """
        method_body: dict[str, object] = {"name": method}
        if uri is not None:
            method_body["uri"] = uri
        body: dict[str, object] = {"method": method_body}
        if stores or all_stores:
            # Glance refuses all_stores beside a `stores` key (400), even an empty one.
            body.update({"all_stores": True} if all_stores else {"stores": list(stores)})
            body["all_stores_must_succeed"] = all_stores_must_succeed
        answer = await self._call(
            "POST",
            f"/v2/images/{image_id}/import",
            operation="import_image",
            expected=(202,),
            json_body=body,
            headers={"X-Openstack-Request-ID": request_id},
        )
        return answer.request_id or request_id

    async def get_image(self, image_id: str) -> Image:
        answer = await self._call("GET", f"/v2/images/{image_id}", operation="get_image")
        return Image.from_json(answer.document("get_image"), answer.request_id)

    async def list_images(self, **filters: str) -> AsyncIterator[Image]:
        """Every image matching the filters, following `next` page after page."""
        path: str | None = "/v2/images"
        params: Mapping[str, str] | None = filters
        while path:
            answer = await self._call("GET", path, operation="list_images", params=params)
            document = answer.document("list_images")
            for item in document.get("images") or ():
                yield Image.from_json(item, answer.request_id)
            next_path = document.get("next")
            path, params = (next_path if isinstance(next_path, str) else None), None

    async def update_image(self, image_id: str, patch: Sequence[Mapping[str, object]]) -> Image:
        answer = await self._call(
            "PATCH",
            f"/v2/images/{image_id}",
            operation="update_image",
            data=json.dumps(list(patch)).encode(),
            headers={"Content-Type": JSON_PATCH},
        )
        return Image.from_json(answer.document("update_image"), answer.request_id)

    async def delete_image(self, image_id: str) -> None:
        await self._call(
            "DELETE", f"/v2/images/{image_id}", operation="delete_image", expected=(204,)
        )

    async def probe(self) -> None:
        """The cheapest authenticated call: does the image service answer us at all?"""
        await self._call("GET", "/v2/images", operation="probe", params={"limit": "1"})

    @property
    def auth(self) -> Authenticator:
        return self._auth

    async def image_tasks(self, image_id: str) -> list[Task]:
        """The image's import tasks, oldest first (Glance returns them unordered)."""
        answer = await self._call("GET", f"/v2/images/{image_id}/tasks", operation="image_tasks")
        tasks = [Task.from_json(item) for item in answer.document("image_tasks").get("tasks") or ()]
        return sorted(tasks, key=lambda task: task.created_at or "")

    async def import_methods(self) -> list[str]:
        answer = await self._call("GET", "/v2/info/import", operation="import_methods")
        methods = answer.document("import_methods").get("import-methods") or {}
        return [str(name) for name in methods.get("value") or ()]

    async def stores(self) -> list[BackendStore]:
        """The stores; an empty list means a single-store cloud."""
        for path in ("/v2/info/stores", "/v2/stores/available"):
            try:
                answer = await self._call("GET", path, operation="stores")
            except NotFound:
                continue
            return [
                BackendStore(id=str(item.get("id")), default=_truthy(item.get("default")))
                for item in answer.document("stores").get("stores") or ()
            ]
        return []

    async def usage(self) -> dict[str, Quota]:
        """Unified-limit quotas by name; empty when quotas are off (or too old a Glance)."""
        try:
            answer = await self._call("GET", "/v2/info/usage", operation="usage")
        except NotFound:
            return {}
        usage = answer.document("usage").get("usage") or {}
        return {
            name: Quota(usage=int(entry.get("usage") or 0), limit=int(entry.get("limit") or 0))
            for name, entry in usage.items()
            if isinstance(entry, dict)
        }

    async def _call(
        self,
        method: str,
        path: str,
        *,
        operation: str,
        expected: tuple[int, ...] = (200,),
        json_body: object = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        body_factory: Callable[[], Payload] | None = None,
    ) -> _Answer:
        """One request; a 401 renews the token and repeats it once, a second 401 is AuthExpired."""
        for attempt in (1, 2):
            token = await self._auth.token()
            url = f"{await self._auth.image_endpoint()}{path}"
            all_headers = {"Accept": "application/json", "X-Auth-Token": token, **(headers or {})}
            body = body_factory() if body_factory is not None else data
            sent_at = time.monotonic()
            async with (
                translate_transport_errors(operation, url),
                self._session.request(
                    method,
                    url,
                    headers=all_headers,
                    params=params,
                    json=json_body,
                    data=body,
                    timeout=self._timeout,
                    middlewares=SAFE_REDIRECTS,
                ) as response,
            ):
                answer = _Answer(response.status, await response.read(), dict(response.headers))
            if self._on_small_call is not None and body_factory is None:
                self._on_small_call(time.monotonic() - sent_at, answer.status)
            if answer.status == 401 and attempt == 1:
                await self._auth.renew(token)
                continue
            if answer.status not in expected:
                raise error_from_response(
                    answer.status, answer.body, answer.headers, operation=operation
                )
            return answer
        raise AssertionError("unreachable: the second attempt returns or raises")


def _truthy(value: object) -> bool:
    return value is True or str(value).lower() == "true"


def _update(hashers: Sequence[Any], chunk: bytes) -> None:
    for hasher in hashers:
        hasher.update(chunk)


def chunk_size_for(chunk_bytes: int, *, uploads: int) -> int:
    """The configured chunk, or one upload's share of the buffer budget if that is less."""
    share = BUFFER_BUDGET_BYTES // max(1, uploads)
    return min(chunk_bytes, max(MIN_CHUNK_BYTES, share))


class _FileBody(Payload):
    """A source streamed chunk by chunk with a declared size, hashed as it goes; single-use."""

    def __init__(
        self,
        source: SourceHandle,
        *,
        chunk_bytes: int,
        hash_algos: Sequence[str],
        progress: Callable[[int], None] | None,
        write_timeout_s: float,
        throttle: Throttle,
    ) -> None:
        super().__init__(source, content_type="application/octet-stream")
        # A known size makes aiohttp send Content-Length instead of chunked encoding.
        self._size = source.size_bytes
        self._source = source
        self._chunk_bytes = chunk_bytes
        self._hashers = {name: hashlib.new(name) for name in hash_algos}
        self._progress = progress
        self._write_timeout_s = write_timeout_s
        self._throttle = throttle
        self._last_hash: asyncio.Future[None] | None = None
        self.sent_bytes = 0
        self.failure: MigrationError | None = None

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("a streamed file body cannot be decoded")

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        self._consumed = True
        try:
            await self._stream(writer)
        except MigrationError as exc:
            # aiohttp wraps whatever a body raises; keep ours so stage() can raise it as is.
            exc.operation = exc.operation or "stage"
            self.failure = exc
            raise

    async def digests(self) -> dict[str, str]:
        """The hex digests, once the last chunk's hashing (maybe still in a thread) is done."""
        if self._last_hash is not None:
            await self._last_hash
        return {name: hasher.hexdigest() for name, hasher in self._hashers.items()}

    async def _stream(self, writer: AbstractStreamWriter) -> None:
        async def send(chunk: bytes) -> None:
            await self._send(writer, chunk)

        await read_whole(self._source, self._chunk_size, send)

    def _chunk_size(self) -> int:
        return chunk_size_for(self._chunk_bytes, uploads=self._throttle.streams)

    async def _send(self, writer: AbstractStreamWriter, chunk: bytes) -> None:
        # Hash chunk n in a thread while it is being sent: hashlib releases the GIL.
        hashing = asyncio.ensure_future(
            asyncio.to_thread(_update, tuple(self._hashers.values()), chunk)
        )
        self._last_hash = hashing
        try:
            await self._write(writer, chunk)
        except TimeoutError as exc:
            raise RequestTimeout(
                f"the cloud stopped reading the upload for {self._write_timeout_s:g} s",
                operation="stage",
            ) from exc
        # Shielded: when the answer arrives aiohttp cancels this writer, and the hash must finish.
        await asyncio.shield(hashing)
        self.sent_bytes += len(chunk)
        if self._progress is not None:
            self._progress(self.sent_bytes)

    async def _write(self, writer: AbstractStreamWriter, chunk: bytes) -> None:
        """Send the chunk, in slices the bandwidth cap lets through when there is one."""
        slice_bytes = self._throttle.slice_bytes(len(chunk))
        view = memoryview(chunk)
        for start in range(0, len(chunk), slice_bytes):
            piece = view[start : start + slice_bytes]
            await self._throttle.acquire(len(piece))
            # The timeout is per slice: waiting for the cap is not the cloud being slow.
            async with asyncio.timeout(self._write_timeout_s):
                await writer.write(piece)


@asynccontextmanager
async def open_glance(
    cloud: CloudSettings,
    *,
    chunk_bytes: int = 1 << 20,
    connections: int = 16,
    throttle: Throttle | None = None,
    reload_cloud: Callable[[], CloudSettings] | None = None,
    on_small_call: Callable[[float, int], None] | None = None,
) -> AsyncIterator[GlanceClient]:
    """A Glance client with its own HTTP session, closed on exit.

    `reload_cloud` reads the credentials again; it is used when they were rejected.
    """
    async with new_session(cloud, connections=connections) as session:
        auth = authenticator_for(session, cloud, reload=reload_cloud)
        yield GlanceClient(
            session,
            auth,
            chunk_bytes=chunk_bytes,
            request_timeout_s=cloud.read_timeout_s,
            throttle=throttle,
            on_small_call=on_small_call,
        )
