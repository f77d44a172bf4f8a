"""A datastore's files over HTTP, as ESXi, vCenter or a web server serves them to the worker.

`FileServer` serves the files of one directory at `/folder/NAME` (the ESXi datastore URL,
whose `dcPath` and `dsName` query it ignores) and at `/NAME`, with what the worker relies on:
`Content-Length`, single `Range` requests answered 206 with `Content-Range`, a strong `ETag`
and `Last-Modified`, and `If-Range`. It can ask for basic or bearer authentication, and it
misbehaves on demand: it drops a response after some bytes, refuses `Range`, or answers
without a size. It counts what it served, and how many responses were streaming at once.
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path

import aiofiles
from aiohttp import web

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")
_CHUNK_BYTES = 256 << 10


@dataclass(frozen=True)
class Served:
    """One request the file server answered: what was asked for and what it sent."""

    method: str
    name: str
    range: str | None
    status: int
    authorization: str | None  # the header as sent, so tests can see what reached the server


@dataclass
class FileServer:
    """Serves `root` on loopback; `username`/`password` or `token` make it ask for credentials."""

    root: Path
    username: str | None = None
    password: str | None = None
    token: str | None = None
    # A presigned URL's: every request must carry it as `X-Amz-Signature` in its query.
    signature: str | None = None
    ranges: bool = True  # False: ignore Range and answer 200 with the whole file
    sizes: bool = True  # False: chunked answers, and `bytes a-b/*` ranges (no size)
    # name -> URL: answer 302 to there instead of serving the file (another host, say).
    redirects: dict[str, str] = field(default_factory=dict)
    served: list[Served] = field(default_factory=list)
    peak_streaming: int = 0
    in_flight: int = 0  # requests being answered now
    _drops: list[int] = field(default_factory=list)
    _held: asyncio.Event | None = None
    _streaming: int = 0
    base_url: str = ""

    def hold(self) -> None:
        """Requests wait, once received, until `release()`."""
        self._held = asyncio.Event()

    def release(self) -> None:
        if self._held is not None:
            self._held.set()

    def drop_after(self, nbytes: int, *, times: int = 1) -> None:
        """The next `times` GETs of file data close their connection after `nbytes` bytes."""
        self._drops += [nbytes] * times

    def url(self, name: str) -> str:
        """The datastore URL of `name`, as ESXi spells it."""
        return f"{self.base_url}/folder/{name}?dcPath=ha-datacenter&dsName=datastore1"

    def gets(self, name: str) -> list[Served]:
        """The GETs of `name` that were answered with its data (200 or 206)."""
        return [s for s in self.served if s.method == "GET" and s.name == name and s.status < 300]

    @asynccontextmanager
    async def serve(
        self, host: str = "127.0.0.1", *, tls: ssl.SSLContext | None = None
    ) -> AsyncIterator[FileServer]:
        """Serve until the block exits (over TLS with `tls`); `base_url` says where."""
        app = web.Application()
        app.router.add_route("*", "/folder/{name:.+}", self._handle)
        app.router.add_route("*", "/{name:.+}", self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, 0, ssl_context=tls)
            await site.start()
            scheme = "https" if tls is not None else "http"
            self.base_url = f"{scheme}://{host}:{runner.addresses[0][1]}"
            yield self
        finally:
            await runner.cleanup()

    def presigned_url(self, name: str) -> str:
        """A presigned URL of `name`, as object storage issues them: the signature in the query."""
        return (
            f"{self.base_url}/folder/{name}?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            f"&X-Amz-Expires=3600&X-Amz-Signature={self.signature}"
        )

    def _authorized(self, request: web.Request) -> bool:
        if self.signature is not None:
            return request.query.get("X-Amz-Signature") == self.signature
        sent = request.headers.get("Authorization", "")
        if self.token is not None:
            return sent == f"Bearer {self.token}"
        if self.username is not None:
            pair = f"{self.username}:{self.password or ''}".encode()
            return sent == "Basic " + base64.b64encode(pair).decode()
        return True

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        asked = request.headers.get("Range")
        self.in_flight += 1
        try:
            if self._held is not None:
                await self._held.wait()
            response = await self._answer(request, name, asked)
        finally:
            self.in_flight -= 1
        self.served.append(
            Served(
                request.method, name, asked, response.status, request.headers.get("Authorization")
            )
        )
        return response

    async def _answer(
        self, request: web.Request, name: str, asked: str | None
    ) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405)
        if not self._authorized(request):
            if self.signature is not None:
                return web.Response(status=403, text="SignatureDoesNotMatch")
            scheme = "Bearer" if self.token is not None else 'Basic realm="datastore"'
            return web.Response(status=401, headers={"WWW-Authenticate": scheme})
        if name in self.redirects:
            return web.Response(status=302, headers={"Location": self.redirects[name]})
        path = self.root / name
        if ".." in Path(name).parts or not path.is_file():
            return web.Response(status=404)
        status = path.stat()
        size = status.st_size
        headers = {
            "ETag": f'"{status.st_ino:x}-{size:x}-{status.st_mtime_ns:x}"',
            "Last-Modified": formatdate(status.st_mtime, usegmt=True),
            "Accept-Ranges": "bytes" if self.ranges else "none",
        }
        start, end = 0, size - 1
        partial = False
        if asked is not None and self.ranges and _if_range_holds(request, headers):
            found = _RANGE.fullmatch(asked.strip())
            if found is None or int(found[1]) >= size:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            start = int(found[1])
            end = min(size - 1, int(found[2])) if found[2] else size - 1
            partial = True
            headers["Content-Range"] = f"bytes {start}-{end}/{size if self.sizes else '*'}"
        response = web.StreamResponse(status=206 if partial else 200, headers=headers)
        if self.sizes:
            response.content_length = end - start + 1
        else:
            response.enable_chunked_encoding()
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        drop_at = self._drops.pop(0) if self._drops else None
        self._streaming += 1
        self.peak_streaming = max(self.peak_streaming, self._streaming)
        try:
            await _send(request, response, path, start, end + 1, drop_at)
        finally:
            self._streaming -= 1
        return response


def _if_range_holds(request: web.Request, headers: dict[str, str]) -> bool:
    """Whether a Range applies: no If-Range, or one naming the file's current validator."""
    validator = request.headers.get("If-Range")
    return validator is None or validator in (headers["ETag"], headers["Last-Modified"])


async def _send(
    request: web.Request,
    response: web.StreamResponse,
    path: Path,
    start: int,
    stop: int,
    drop_at: int | None,
) -> None:
    sent = 0
    async with aiofiles.open(path, "rb") as file:
        await file.seek(start)
        position = start
        while position < stop:
            length = min(_CHUNK_BYTES, stop - position)
            if drop_at is not None:
                length = min(length, drop_at - sent)
            data = await file.read(length)
            if not data:
                break
            await response.write(data)
            sent += len(data)
            position += len(data)
            if drop_at is not None and sent >= drop_at:
                if request.transport is not None:
                    request.transport.abort()  # the connection dies in mid-stream
                return
