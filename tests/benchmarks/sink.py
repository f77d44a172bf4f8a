"""A discard sink that answers the Glance stage path: as fast as a Python server can take bytes.

Run as a process of its own (`python -m tests.benchmarks.sink`), it prints its port and then
serves: PUT .../stage bodies (Content-Length or chunked) are received into one reused buffer
and thrown away, GET /v2/images/{id} answers a queued image, /versions a v2 document, anything
else 404. No hashing, no files, no copies: what it costs is the ceiling it reports.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys

_BUFFER_BYTES = 1 << 20
_IMAGE_PATH = re.compile(rb"^/(?:image/)?v2/images/([0-9a-f-]+)$")
_SCHEMA_PATH = re.compile(rb"^/(?:image/)?v2/schemas/(.+)$")
_VERSIONS = json.dumps(
    {"versions": [{"id": "v2.16", "status": "CURRENT", "links": [{"rel": "self", "href": "/v2/"}]}]}
).encode()


def _schema(name: str) -> bytes:
    """Just enough of a schema for python-glanceclient, which fetches them before any command."""
    properties = {"id": {"type": "string"}, "name": {"type": ["null", "string"]}}
    return json.dumps(
        {"name": name.rsplit("/", 1)[-1], "properties": properties, "links": []}
    ).encode()


def _image(image_id: str) -> bytes:
    return json.dumps(
        {
            "id": image_id,
            "name": "bench",
            "status": "queued",
            "disk_format": "raw",
            "container_format": "bare",
            "visibility": "private",
            "tags": [],
            "size": None,
            "virtual_size": None,
        }
    ).encode()


def _answer(status: str, body: bytes = b"", content_type: str = "application/json") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n"
    if body:
        head += f"Content-Type: {content_type}\r\n"
    return head.encode() + b"x-openstack-request-id: req-sink\r\n\r\n" + body


class _Connection(asyncio.BufferedProtocol):
    """One keep-alive connection: headers, then a body counted down (or de-chunked) and dropped."""

    def __init__(self) -> None:
        self._buffer = bytearray(_BUFFER_BYTES)
        self._view = memoryview(self._buffer)
        self._pending = bytearray()  # header or chunk-size bytes not yet complete
        self._body_left = 0  # bytes of a Content-Length body (or current chunk) still to come
        self._chunked = False
        self._chunk_trailer = 0  # CRLF bytes after a chunk still to skip
        self._in_body = False
        self._method = b""
        self._path = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        data = self._view[:nbytes]
        while len(data):
            data = self._body(data) if self._in_body else self._headers(data)

    def _headers(self, data: memoryview) -> memoryview:
        self._pending += data
        end = self._pending.find(b"\r\n\r\n")
        if end < 0:
            return data[len(data) :]
        head = bytes(self._pending[:end])
        rest = bytes(self._pending[end + 4 :])
        self._pending.clear()
        lines = head.split(b"\r\n")
        self._method, self._path = lines[0].split(b" ")[:2]
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            fields[name.strip().lower()] = value.strip()
        self._chunked = fields.get(b"transfer-encoding", b"").lower() == b"chunked"
        self._body_left = 0 if self._chunked else int(fields.get(b"content-length", b"0"))
        self._chunk_trailer = 0
        self._in_body = True
        if not self._chunked and self._body_left == 0:
            self._finish()
        return memoryview(rest)

    def _body(self, data: memoryview) -> memoryview:
        if self._chunk_trailer:
            skip = min(self._chunk_trailer, len(data))
            self._chunk_trailer -= skip
            return data[skip:]
        if self._body_left:
            taken = min(self._body_left, len(data))
            self._body_left -= taken
            if not self._chunked and self._body_left == 0:
                self._finish()
            elif self._chunked and self._body_left == 0:
                self._chunk_trailer = 2
            return data[taken:]
        if not self._chunked:
            self._finish()
            return data
        return self._chunk_size(data)

    def _chunk_size(self, data: memoryview) -> memoryview:
        # The size line is a few bytes: look for its end in the head of the data only, so a
        # chunk's payload is never copied.
        head = bytes(self._pending) + bytes(data[:64])
        end = head.find(b"\r\n")
        if end < 0:
            self._pending += data
            return data[len(data) :]
        size = int(head[:end].split(b";")[0], 16)
        consumed = end + 2 - len(self._pending)
        self._pending.clear()
        if size == 0:
            self._finish()
            self._chunk_trailer = 0
            # The empty line after the last chunk (no trailers are sent by the clients here).
            rest = data[consumed:]
            return rest[2:] if bytes(rest[:2]) == b"\r\n" else rest
        self._body_left = size
        return data[consumed:]

    def _finish(self) -> None:
        self._in_body = False
        assert self._transport is not None
        self._transport.write(self._reply())

    def _reply(self) -> bytes:
        if self._method == b"PUT" and self._path.endswith(b"/stage"):
            return _answer("204 No Content")
        if self._method == b"GET":
            found = _IMAGE_PATH.match(self._path.split(b"?")[0])
            if found:
                return _answer("200 OK", _image(found.group(1).decode()))
            schema = _SCHEMA_PATH.match(self._path)
            if schema:
                return _answer("200 OK", _schema(schema.group(1).decode()))
            if self._path.rstrip(b"/") in (b"", b"/versions", b"/image", b"/image/versions"):
                return _answer("200 OK", _VERSIONS)
        print(f"sink: no route for {self._method!r} {self._path!r}", file=sys.stderr)
        return _answer("404 Not Found", b'{"message": "no such path"}')


async def _serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Connection, "127.0.0.1", port)
    bound = server.sockets[0].getsockname()[1]
    print(bound, flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
