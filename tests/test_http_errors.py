"""Error answers of real Glance and Keystone become our exception classes with a readable cause."""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from email.utils import formatdate
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

from worker.clients.http import (
    error_from_response,
    make_ssl_context,
    new_session,
    translate_transport_errors,
)
from worker.config import CloudSettings
from worker.errors import (
    AuthExpired,
    BadRequest,
    CloudUnavailable,
    ConfigError,
    Conflict,
    ConnectionFailed,
    Forbidden,
    ImageTooLarge,
    MigrationError,
    NotFound,
    QuotaExceeded,
    RateLimited,
    RequestTimeout,
    os_reason,
)

HTML = {"Content-Type": "text/html; charset=UTF-8"}
JSON = {"Content-Type": "application/json"}
TEXT = {"Content-Type": "text/plain; charset=UTF-8"}

# webob's HTML error page, as Glance sends it without `Accept: application/json`.
HTML_409 = b"""<html>
 <head>
  <title>409 Conflict</title>
 </head>
 <body>
  <h1>409 Conflict</h1>
  Image status transition from uploading to uploading is not allowed<br /><br />



 </body>
</html>"""

HTML_400 = b"""<html>
 <head>
  <title>400 Bad Request</title>
 </head>
 <body>
  <h1>400 Bad Request</h1>
  Unknown import method name &#x27;bogus-method&#x27;.<br /><br />



 </body>
</html>"""

GLANCE_JSON_409 = json.dumps(
    {
        "message": "Image needs to be staged before 'glance-direct' method can be used"
        "<br /><br />\n\n\n",
        "code": "409 Conflict",
        "title": "Conflict",
    }
).encode()

KEYSTONE_401 = json.dumps(
    {
        "error": {
            "code": 401,
            "title": "Unauthorized",
            "message": "The request you have made requires authentication.",
        }
    }
).encode()

PLAIN_404 = b"404 Not Found\n\nNo image found with ID 1b4f0f55-6b3d-4b7e-9d4c-3f0c0f1b9a51\n\n   "

QUOTA_413 = (
    b"413 Request Entity Too Large\n\nThe request returned a 413 Request Entity Too Large. "
    b"This generally means that rate limiting or a quota threshold was breached.\n\n"
    b"The response body:\nProject 71bd is over a limit for [Resource image_stage_total is over "
    b"limit of 100 due to current usage 90 and delta 20]"
)


def test_html_conflict_keeps_the_sentence_and_drops_the_markup() -> None:
    error = error_from_response(
        409, HTML_409, {**HTML, "X-Openstack-Request-Id": "req-abc"}, operation="stage"
    )

    assert isinstance(error, Conflict)
    assert error.message == "Image status transition from uploading to uploading is not allowed"
    assert error.status == 409
    assert error.request_id == "req-abc"
    assert error.operation == "stage"
    assert str(error) == (
        "stage HTTP 409: Image status transition from uploading to uploading is not allowed"
    )


def test_html_entities_are_unescaped() -> None:
    error = error_from_response(400, HTML_400, HTML, operation="import_image")

    assert isinstance(error, BadRequest)
    assert error.message == "Unknown import method name 'bogus-method'."


def test_glance_json_message_loses_its_html_debris() -> None:
    error = error_from_response(409, GLANCE_JSON_409, JSON, operation="import_image")

    assert isinstance(error, Conflict)
    assert error.message == ("Image needs to be staged before 'glance-direct' method can be used")


def test_keystone_json_error() -> None:
    error = error_from_response(
        401, KEYSTONE_401, {**JSON, "x-openstack-request-id": "req-k"}, operation="get_image"
    )

    assert isinstance(error, AuthExpired)
    assert error.message == "The request you have made requires authentication."
    assert error.request_id == "req-k"


def test_plain_text_drops_the_status_line() -> None:
    error = error_from_response(404, PLAIN_404, TEXT, operation="get_image")

    assert isinstance(error, NotFound)
    assert error.message == "No image found with ID 1b4f0f55-6b3d-4b7e-9d4c-3f0c0f1b9a51"


def test_413_size_cap_is_permanent() -> None:
    body = b"413 Request Entity Too Large\n\nThe incoming image is too large"

    error = error_from_response(413, body, TEXT, operation="stage")

    assert isinstance(error, ImageTooLarge)


def test_413_quota_is_back_pressure() -> None:
    error = error_from_response(413, QUOTA_413, TEXT, operation="stage")

    assert isinstance(error, QuotaExceeded)
    assert "image_stage_total" in error.message


def test_retry_after_seconds_on_429() -> None:
    error = error_from_response(429, b"slow down", {"Retry-After": "7"}, operation="get_image")

    assert isinstance(error, RateLimited)
    assert error.retry_after_s == 7.0


def test_retry_after_http_date_on_503() -> None:
    now_s = 1_750_000_000.0
    date = formatdate(now_s + 30, usegmt=True)

    error = error_from_response(
        503, b"", {"retry-after": date}, operation="stage", now_s=lambda: now_s
    )

    assert isinstance(error, CloudUnavailable)
    assert error.retry_after_s == pytest.approx(30.0)
    assert error.message == "Service Unavailable"


def test_unparseable_retry_after_is_ignored() -> None:
    error = error_from_response(429, b"", {"Retry-After": "soon"}, operation="x")

    assert isinstance(error, RateLimited)
    assert error.retry_after_s is None


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (300, BadRequest),
        (400, BadRequest),
        (401, AuthExpired),
        (403, Forbidden),
        (404, NotFound),
        (405, BadRequest),
        (406, BadRequest),
        (407, BadRequest),
        (408, RequestTimeout),
        (409, Conflict),
        (415, BadRequest),
        (429, RateLimited),
        (431, BadRequest),
        (500, CloudUnavailable),
        (501, BadRequest),
        (502, CloudUnavailable),
        (503, CloudUnavailable),
        (504, CloudUnavailable),
        (599, CloudUnavailable),
    ],
)
def test_status_mapping(status: int, expected: type[MigrationError]) -> None:
    error = error_from_response(status, b"", {}, operation="op")

    assert type(error) is expected


def test_long_bodies_are_truncated() -> None:
    error = error_from_response(500, b"x" * 5000, TEXT, operation="op")

    assert len(error.message) <= 500


E = TypeVar("E", bound=MigrationError)
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def transport_error(
    expected: type[E], operation: str, method: str, url: str, settings: CloudSettings, **kw: Any
) -> E:
    """The error `translate_transport_errors` makes of one request that fails on the way."""
    session = new_session(settings)
    try:
        with pytest.raises(expected) as caught:
            async with translate_transport_errors(operation, url):
                await session.request(method, url, **kw)
    finally:
        await session.close()
    return caught.value


@asynccontextmanager
async def images_url_served_by(handler: Handler) -> AsyncIterator[str]:
    """A loopback server that treats every connection with `handler`: its /v2/images URL."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v2/images"
    finally:
        server.close()


async def test_refused_connection_becomes_connection_failed() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://migrator:hunter2@127.0.0.1:{port}/v2/images?token=t0ken"
    settings = CloudSettings(connect_timeout_s=2.0, read_timeout_s=2.0)
    error = await transport_error(ConnectionFailed, "get_image", "GET", url, settings)

    assert error.operation == "get_image"
    assert isinstance(error.__cause__, aiohttp.ClientConnectionError)
    # The URL without its user information or query, and the OS's reason in words.
    assert (
        error.message == f"cannot connect to http://127.0.0.1:{port}/v2/images: connection refused"
    )


async def test_silent_server_becomes_request_timeout() -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up and closes
        writer.close()

    settings = CloudSettings(connect_timeout_s=1.0, read_timeout_s=0.2)
    async with images_url_served_by(never_answer) as url:
        error = await transport_error(RequestTimeout, "get_image", "GET", url, settings)

    assert isinstance(error.__cause__, TimeoutError)
    assert error.message == f"no answer in time from {url}"


async def test_a_server_that_hangs_up_is_named_with_the_url() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the whole request head, then no answer
        writer.close()

    settings = CloudSettings(connect_timeout_s=2.0, read_timeout_s=2.0)
    async with images_url_served_by(hang_up) as url:
        # POST: aiohttp repeats an idempotent request itself on a dropped connection.
        error = await transport_error(
            ConnectionFailed, "create_image", "POST", url, settings, json={}
        )

    assert error.message == f"{url}: the server closed the connection"


async def test_payload_errors_become_connection_failed() -> None:
    inner = aiohttp.http_exceptions.TransferEncodingError("Not enough data")
    url = "https://glance.example:9292/v2/images/1/file"
    with pytest.raises(ConnectionFailed) as caught:
        async with translate_transport_errors("stage", url):
            raise aiohttp.ClientPayloadError(f"Response payload is not completed: {inner!r}")

    assert caught.value.message == (
        f"{url}: the answer broke off (response payload is not completed)"
    )


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed"), "connection refused"),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
         "host name not resolved (Name or service not known)"),
        (ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"),
         "TLS error (handshake failed)"),
        (OSError("no errno at all"), "no errno at all"),
    ],
)  # fmt: skip
def test_os_errors_read_as_words(error: OSError, said: str) -> None:
    assert os_reason(error) == said


def test_ssl_context_verifies_by_default() -> None:
    context = make_ssl_context(CloudSettings())

    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname


def test_ssl_context_insecure_turns_checks_off() -> None:
    context = make_ssl_context(CloudSettings(insecure=True))

    assert context.verify_mode == ssl.CERT_NONE
    assert not context.check_hostname


def test_missing_cacert_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        make_ssl_context(CloudSettings(cacert=str(tmp_path / "ca.pem")))


def test_garbage_cacert_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")

    with pytest.raises(ConfigError, match="unusable"):
        make_ssl_context(CloudSettings(cacert=str(bad)))
