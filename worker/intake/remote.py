"""Disks read over HTTP(S): a datastore file on ESXi or vCenter, a web server, a presigned URL.

At submit, `probe_remote` learns a URL's size and validators (`ETag`, `Last-Modified`) from a
one-byte `Range` request, and `inspect_remote` reads the VMDK's headers (and the footer of a
streamOptimized disk) the same way: a few KiB, whatever the disk's size. A server that gives
no size or refuses `Range` is refused then, since the worker could resume nothing from it.

At run time `RemoteSources` reads each disk once from its start, in the worker's bounded
chunks, and resumes a read that broke in mid-stream with `Range: bytes=N-` and `If-Range`, so
that the stage upload it feeds never sees the break. A file whose validator changed meanwhile
(the server answers 200 with the whole file instead of 206) is `source_changed`. At most
`per_host` disks are read from one host at once: ESXi limits concurrent transfers per host.

Credentials come from `source_auth` (worker.intake.source_auth). A request that carries them
never follows a redirect to another origin or from https to http.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import threading
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any
from urllib.parse import quote, unquote, urljoin, urlsplit, urlunsplit

import aiohttp
from yarl import URL

from worker.clients.http import SAFE_REDIRECTS, USER_AGENT, redirect_refusal, shown_url
from worker.core.model import SOURCE_CONCURRENCY
from worker.errors import RedirectRefused, SourceChanged, SourceError, UnsupportedDisk
from worker.intake.source_auth import NO_AUTH, SourceAuth, find_source_auth
from worker.intake.vmdk import Inspection, inspect_open_vmdk

URL_SCHEMES = ("http", "https")
# How often a disk's read may break and be resumed before the attempt fails.
MAX_REOPENS = 5
CONNECT_TIMEOUT_S = 30.0
READ_TIMEOUT_S = 120.0
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def is_url(source: str) -> bool:
    """Whether a manifest's `source` names a URL rather than a file."""
    return urlsplit(source).scheme.lower() in URL_SCHEMES


def file_name_of(url: str) -> str:
    """The last path segment of a URL, decoded (the image name a file's base name would give)."""
    return unquote(PurePosixPath(urlsplit(url).path).name)


@dataclass(frozen=True)
class RemoteFile:
    """A URL as probed at submit: its size and what tells that it is still the same file."""

    url: str
    size_bytes: int
    etag: str | None
    last_modified: str | None

    def identity(self) -> dict[str, int | str]:
        """Recorded with the disk, compared by every later read (If-Range)."""
        found: dict[str, int | str] = {"size_bytes": self.size_bytes}
        if self.etag:
            found["etag"] = self.etag
        if self.last_modified:
            found["last_modified"] = self.last_modified
        return found


def ssl_context(auth: SourceAuth) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=auth.cacert or None)
    if auth.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


# At submit: blocking reads with the standard library, one small Range request at a time ----


class _RedirectRule(urllib.request.HTTPRedirectHandler):
    """Follows a redirect unless the request carries credentials and would leave its origin."""

    def __init__(self, auth: SourceAuth) -> None:
        self._auth = auth

    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        refusal = redirect_refusal(URL(req.full_url), newurl)
        if refusal is not None and self._auth.sends_credentials:
            target, why = refusal
            raise RedirectRefused(
                f"refused to follow a redirect {why}: {shown_url(URL(req.full_url))} answered "
                f"{code} to {shown_url(target)}, and the request carries credentials",
                from_url=req.full_url,
                to_url=str(target),
                why=why,
                status=code,
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _Ranges:
    """Ranged GETs of one URL (blocking), each checked against the validators of the first."""

    def __init__(self, url: str, auth: SourceAuth, *, timeout_s: float = CONNECT_TIMEOUT_S):
        self.url = url
        self._auth = auth
        self._timeout_s = timeout_s
        handlers: list[urllib.request.BaseHandler] = [_RedirectRule(auth)]
        if urlsplit(url).scheme.lower() == "https":
            handlers.append(urllib.request.HTTPSHandler(context=ssl_context(auth)))
        self._opener = urllib.request.build_opener(*handlers)
        self.file: RemoteFile | None = None

    def get(self, start: int, stop: int) -> bytes:
        """Bytes [start, stop) of the file; the first call also learns its size and validators."""
        headers = {**self._auth.headers(), "Range": f"bytes={start}-{stop - 1}"}
        headers["User-Agent"] = USER_AGENT
        if self.file is not None and (self.file.etag or self.file.last_modified):
            headers["If-Range"] = self.file.etag or self.file.last_modified or ""
        request = urllib.request.Request(self.url, headers=headers)
        where = shown_url(URL(self.url))
        try:
            with self._opener.open(request, timeout=self._timeout_s) as answer:
                status, got = answer.status, answer.headers
                data = answer.read(stop - start) if status == 206 else b""
        except urllib.error.HTTPError as exc:
            raise SourceError(_refused(where, exc.code)) from None
        except urllib.error.URLError as exc:
            raise SourceError(f"cannot reach {where}: {exc.reason}") from None
        except OSError as exc:
            raise SourceError(f"cannot read {where}: {exc}") from None
        if status != 206:
            if self.file is not None:
                raise SourceChanged(
                    f"source changed while it was inspected: {where} is another file now"
                )
            raise SourceError(
                f"{where} refuses Range requests (it answered {status} to one): the worker "
                "needs them to inspect a disk and to resume a broken read"
            )
        total = _range_total(got.get("Content-Range"))
        if total is None:
            raise SourceError(f"{where} gives no size for the file (Content-Range has none)")
        if self.file is None:
            self.file = RemoteFile(
                self.url, total, got.get("ETag") or None, got.get("Last-Modified") or None
            )
        elif total != self.file.size_bytes:
            raise SourceChanged(f"source changed while it was inspected: {where}")
        return data


def _refused(where: str, status: int) -> str:
    if status in (401, 403):
        return f"{where} refused the credentials ({status}): check its source_auth entry"
    if status == 404:
        return f"no such file: {where} (404)"
    if status == 416:
        return f"{where} holds an empty file"
    return f"{where} answered {status}"


def _range_total(content_range: str | None) -> int | None:
    found = _CONTENT_RANGE.fullmatch((content_range or "").strip())
    if found is None or found[3] == "*":
        return None
    return int(found[3])


class _RangedReader:
    """The file-like view the VMDK inspector reads: seek and read, by ranged GETs."""

    def __init__(self, ranges: _Ranges) -> None:
        self._ranges = ranges
        self._position = 0

    def seek(self, offset: int, whence: int = 0) -> int:
        self._position = offset
        return offset

    def read(self, size: int = -1) -> bytes:
        assert self._ranges.file is not None
        stop = self._ranges.file.size_bytes
        if size >= 0:
            stop = min(stop, self._position + size)
        if stop <= self._position:
            return b""
        data = self._ranges.get(self._position, stop)
        self._position += len(data)
        return data


class HostSlots:
    """At most `per_host` threads at once inside `slot(url)` for each host: the submit-time
    probes of many disks on one datastore stay within what its host serves at once."""

    def __init__(self, per_host: int = SOURCE_CONCURRENCY) -> None:
        self.per_host = max(1, per_host)
        self._lock = threading.Lock()
        self._slots: dict[str, threading.BoundedSemaphore] = {}
        self.waiting = 0  # threads waiting for a slot now, of any host

    @contextmanager
    def slot(self, url: str) -> Iterator[None]:
        host = urlsplit(url).netloc.lower()
        with self._lock:
            slots = self._slots.setdefault(host, threading.BoundedSemaphore(self.per_host))
            self.waiting += 1
        try:
            slots.acquire()
        finally:
            with self._lock:
                self.waiting -= 1
        try:
            yield
        finally:
            slots.release()


# Every submit-time probe of this process: one submit of many disks on one datastore, or
# several at once, read no more of a host's files at once than a run would.
SUBMIT_SLOTS = HostSlots()


def probe_remote(url: str, auth: SourceAuth = NO_AUTH) -> RemoteFile:
    """The size and validators of the file at `url`, from a one-byte Range request."""
    ranges = _Ranges(url, auth)
    ranges.get(0, 1)
    assert ranges.file is not None
    return ranges.file


def inspect_remote(
    url: str, auth: SourceAuth = NO_AUTH, *, flat_as_raw: bool = False
) -> tuple[Inspection, RemoteFile]:
    """Inspect the VMDK at `url` from its headers, as a local file is inspected; the flat
    extent a descriptor names is the URL beside it, probed as the descriptor was."""

    def beside(name: str, size_bytes: int) -> tuple[str, Mapping[str, int | str]]:
        # Beside the descriptor, with its query: a datastore URL names its datacenter there.
        extent_url = urlunsplit(
            urlsplit(url)._replace(path=urlsplit(urljoin(url, quote(name))).path)
        )
        try:
            extent = probe_remote(extent_url, auth)
        except SourceError as exc:
            raise UnsupportedDisk(
                f"the flat extent '{name}' cannot be used: {exc.message}"
            ) from exc
        if extent.size_bytes != size_bytes:
            raise UnsupportedDisk(
                f"the flat extent '{name}' has {extent.size_bytes} bytes, the descriptor says "
                f"{size_bytes}: {shown_url(URL(extent_url))}"
            )
        return extent_url, extent.identity()

    ranges = _Ranges(url, auth)
    ranges.get(0, 1)
    assert ranges.file is not None
    inspection = inspect_open_vmdk(
        _RangedReader(ranges),  # type: ignore[arg-type]
        Path(file_name_of(url) or "disk.vmdk"),
        size_bytes=ranges.file.size_bytes,
        flat_as_raw=flat_as_raw,
        locate_extent=beside,
    )
    return inspection, ranges.file


# At run time: streamed reads with resume, and slots per host --------------------------------


class RemoteSources:
    """The worker's reads of URL sources: one HTTP session, at most `per_host` reads per host."""

    def __init__(
        self,
        *,
        per_host: int = SOURCE_CONCURRENCY,
        max_reopens: int = MAX_REOPENS,
        env: Mapping[str, str] | None = None,
        read_timeout_s: float = READ_TIMEOUT_S,
    ) -> None:
        self.per_host = max(1, per_host)
        self.max_reopens = max_reopens
        self._env = env
        self._read_timeout_s = read_timeout_s
        self._slots: defaultdict[str, asyncio.Semaphore] = defaultdict(
            lambda: asyncio.Semaphore(self.per_host)
        )
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> RemoteSources:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=self._read_timeout_s
                ),
                headers={"User-Agent": USER_AGENT},
                connector=aiohttp.TCPConnector(limit=0),
            )
        return self._session

    @asynccontextmanager
    async def reading(
        self,
        url: str,
        *,
        size_bytes: int,
        identity: Mapping[str, int | str] | None,
        auth_name: str | None,
    ) -> AsyncIterator[RemoteHandle]:
        """Hold one of the host's slots while the block reads the file (once or again)."""
        auth = find_source_auth(auth_name, self._env) if auth_name else NO_AUTH
        async with self._slots[urlsplit(url).netloc.lower()]:
            handle = RemoteHandle(self, url, size_bytes, identity or {}, auth)
            try:
                yield handle
            finally:
                await handle.aclose()


class RemoteHandle:
    """One URL source, read from its start by each `stream()`."""

    def __init__(
        self,
        sources: RemoteSources,
        url: str,
        size_bytes: int,
        identity: Mapping[str, int | str],
        auth: SourceAuth,
    ) -> None:
        self._sources = sources
        self.url = url
        self.size_bytes = size_bytes
        self._identity = identity
        self.auth = auth
        self.reopens = 0  # breaks resumed, over every stream of this handle
        self.shown = shown_url(URL(url))
        self._opened: RemoteStream | None = None

    async def check(self) -> None:
        """Open the read (kept for the first `stream()`): SourceError or SourceChanged unless
        the server serves the file inspected."""
        self._opened = await self.stream()

    async def stream(self) -> RemoteStream:
        if self._opened is not None:
            stream, self._opened = self._opened, None
            return stream
        stream = RemoteStream(self)
        await stream.open_at(0)
        return stream

    async def aclose(self) -> None:
        if self._opened is not None:
            await self._opened.aclose()
            self._opened = None

    def validator(self) -> str | None:
        value = self._identity.get("etag") or self._identity.get("last_modified")
        return str(value) if value else None


class RemoteStream:
    """Bytes of a URL from the start, resumed with Range where the connection breaks."""

    def __init__(self, handle: RemoteHandle) -> None:
        self._handle = handle
        self._position = 0
        self._response: aiohttp.ClientResponse | None = None

    async def open_at(self, position: int) -> None:
        handle = self._handle
        headers = {**handle.auth.headers(), "Range": f"bytes={position}-"}
        validator = handle.validator()
        if validator is not None:
            headers["If-Range"] = validator
        try:
            response = await handle._sources.session().get(
                handle.url,
                headers=headers,
                ssl=ssl_context(handle.auth) if handle.url.lower().startswith("https") else True,
                middlewares=SAFE_REDIRECTS if handle.auth.sends_credentials else (),
            )
        except RedirectRefused:
            raise
        except (aiohttp.ClientError, TimeoutError) as exc:
            await self._broke(f"cannot reach {handle.shown}: {exc}")
            return await self.open_at(position)
        if response.status >= 500:
            response.release()
            await self._broke(f"{handle.shown} answered {response.status}")
            return await self.open_at(position)
        if response.status != 206:
            response.release()
            if response.status == 200:
                raise SourceChanged(
                    f"source changed since it was inspected: {handle.shown} answered the whole "
                    "file to a ranged request for the file inspected (its ETag or "
                    "Last-Modified changed)"
                )
            if response.status == 416:
                raise SourceChanged(
                    f"source changed since it was inspected: {handle.shown} has fewer than "
                    f"{position + 1} bytes now"
                )
            raise SourceError(_refused(handle.shown, response.status))
        found = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
        if found is None or int(found[1]) != position or found[3] != str(handle.size_bytes):
            response.release()
            raise SourceChanged(
                f"source changed since it was inspected: {handle.shown} answered bytes "
                f"{response.headers.get('Content-Range')!r} for bytes={position}- of "
                f"{handle.size_bytes}"
            )
        self._response = response
        self._position = position

    async def _broke(self, why: str) -> None:
        handle = self._handle
        handle.reopens += 1
        if handle.reopens > handle._sources.max_reopens:
            raise SourceError(
                f"the read of {handle.shown} broke {handle.reopens} times, the last at byte "
                f"{self._position}: {why}"
            )
        await asyncio.sleep(min(2.0, 0.1 * handle.reopens))

    async def read(self, size: int) -> bytes:
        """Up to `size` bytes (fewer only at the end of the file)."""
        wanted = min(size, self._handle.size_bytes - self._position)
        parts: list[bytes] = []
        while wanted > 0:
            assert self._response is not None
            try:
                chunk = await self._response.content.read(wanted)
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError):
                chunk, why = b"", "the connection broke"
            else:
                why = "the connection ended early"
            if not chunk:
                self._response.release()
                self._response = None
                await self._broke(why)
                await self.open_at(self._position)
                continue
            parts.append(chunk)
            self._position += len(chunk)
            wanted -= len(chunk)
        return b"".join(parts)

    async def finish(self) -> None:
        """The whole file was read; the Content-Range of each answer bounded it."""

    async def aclose(self) -> None:
        if self._response is not None:
            self._response.release()
            self._response = None
