"""The HTTP boundary: sessions, TLS, and where answers and transport failures become our errors."""

from __future__ import annotations

import email.utils
import html
import http
import json
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
from yarl import URL

from worker import __version__
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
    RedirectRefused,
    RequestTimeout,
    RetryableError,
    os_reason,
)

REQUEST_ID_HEADER = "x-openstack-request-id"
USER_AGENT = f"vmdk-migrate/{__version__}"

_MESSAGE_LIMIT_CHARS = 500
_STATUS_CLASSES: dict[int, type[MigrationError]] = {
    401: AuthExpired,
    403: Forbidden,
    404: NotFound,
    408: RequestTimeout,
    409: Conflict,
    429: RateLimited,
    # Not Implemented will not change on a retry.
    501: BadRequest,
}
# Glance's size-cap answer ("The incoming image is too large") as opposed to a quota or a full
# staging area, which are worth waiting for.
_SIZE_CAP = re.compile(r"image is too large|image_size_cap|size cap", re.IGNORECASE)
# Glance's per-image limits (image_tag_quota, image_property_quota ...): the request itself is
# too big, and waiting will not shrink it.
_PER_IMAGE_LIMIT = re.compile(r"number of allowed image \w+", re.IGNORECASE)
_TAG = re.compile(r"<[^>]+>")
_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
_HEAD = re.compile(r"<head>.*?</head>|<h1>.*?</h1>|<title>.*?</title>", re.IGNORECASE | re.DOTALL)
_SPACE = re.compile(r"\s+")
_STATUS_LINE = re.compile(r"^\d{3}\s+\S")
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


def error_from_response(
    status: int,
    body: bytes,
    headers: Mapping[str, str],
    *,
    operation: str,
    now_s: Callable[[], float] = time.time,
) -> MigrationError:
    """The error for a non-success answer: its class is the retry decision, its text the cause."""
    message = response_text(body, headers) or _reason(status)
    request_id = header(headers, REQUEST_ID_HEADER)
    cls = _error_class(status, message)
    error = cls(message, status=status, request_id=request_id, operation=operation)
    if isinstance(error, RetryableError):
        error.retry_after_s = parse_retry_after(header(headers, "retry-after"), now_s())
    return error


def _error_class(status: int, message: str) -> type[MigrationError]:
    if status == 413:
        if _PER_IMAGE_LIMIT.search(message):
            return BadRequest
        return ImageTooLarge if _SIZE_CAP.search(message) else QuotaExceeded
    if status in _STATUS_CLASSES:
        return _STATUS_CLASSES[status]
    if status >= 500:
        return CloudUnavailable
    return BadRequest


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"


def header(headers: Mapping[str, str], name: str) -> str | None:
    """A header's value whatever the case of its name (plain dicts are case-sensitive)."""
    value = headers.get(name)
    if value is not None:
        return value
    wanted = name.lower()
    return next((v for k, v in headers.items() if k.lower() == wanted), None)


def parse_retry_after(value: str | None, now_s: float) -> float | None:
    """Retry-After as seconds from now: either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now_s)


def response_text(body: bytes, headers: Mapping[str, str]) -> str:
    """The meaningful sentence of an error body: Keystone JSON, Glance JSON, HTML or plain text."""
    text = body.decode("utf-8", errors="replace").strip()
    if not text:
        return ""
    content_type = (header(headers, "content-type") or "").lower()
    if text.startswith("{"):
        from_json = _json_message(text)
        if from_json is not None:
            return _limit(from_json)
    if "html" in content_type or text.lstrip().lower().startswith(("<html", "<!doctype")):
        return _limit(_html_text(text))
    return _limit(_plain_text(text))


def _json_message(text: str) -> str | None:
    try:
        document = json.loads(text)
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    # Keystone wraps the error in {"error": {...}}, Nova-style services in {"itemNotFound": {...}};
    # Glance answers {"message", "code", "title"} at the top level.
    if len(document) == 1:
        (inner,) = document.values()
        if isinstance(inner, dict):
            document = inner
    for key in ("message", "detail", "title"):
        value = document.get(key)
        if isinstance(value, str) and value.strip():
            return _html_text(value)
    return None


def _html_text(text: str) -> str:
    text = _HEAD.sub(" ", text)
    parts = (_clean(_TAG.sub(" ", part)) for part in _BREAK.split(text))
    return " ".join(part for part in parts if part)


def _plain_text(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # webob's plain-text errors repeat the status line ("409 Conflict") before the message.
    if len(lines) > 1 and _STATUS_LINE.match(lines[0]):
        lines = lines[1:]
    return _clean(" ".join(lines))


def _clean(text: str) -> str:
    return _SPACE.sub(" ", html.unescape(text)).strip()


def _limit(text: str) -> str:
    if len(text) <= _MESSAGE_LIMIT_CHARS:
        return text
    return text[: _MESSAGE_LIMIT_CHARS - 1] + "…"


def redirect_refusal(origin_url: URL, location: str) -> tuple[URL, str] | None:
    """Where a redirect goes and why it must not be followed, or None when it may be.

    Every request we make carries a credential (a token, a password, a signed notice), and
    aiohttp only drops `Authorization` and cookies when it leaves the origin: `X-Auth-Token`
    and a re-POSTed body would go along.
    """
    try:
        target = origin_url.join(URL(location))
        target_origin = target.origin()
    except ValueError:
        return None  # aiohttp refuses such a Location itself
    if origin_url.scheme == "https" and target.scheme == "http":
        return target, "from https to http"
    if target_origin != origin_url.origin():
        return target, "to another origin"
    return None


async def refuse_unsafe_redirects(
    request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
) -> aiohttp.ClientResponse:
    """Client middleware: a redirect that would leave the origin (or TLS) is RedirectRefused."""
    response = await handler(request)
    location = response.headers.get("Location")
    if response.status not in _REDIRECT_STATUSES or location is None:
        return response
    refusal = redirect_refusal(request.url, location)
    if refusal is None:
        return response
    target, why = refusal
    response.release()
    raise RedirectRefused(
        f"refused to follow a redirect {why}: {shown_url(request.url)} answered "
        f"{response.status} to {shown_url(target)}, and the request carries credentials",
        from_url=str(request.url),
        to_url=str(target),
        why=why,
        status=response.status,
        request_id=header(response.headers, REQUEST_ID_HEADER),
    )


# Per request rather than per session: every session a caller hands in gets the rule.
SAFE_REDIRECTS = (refuse_unsafe_redirects,)


def shown_url(url: URL) -> str:
    """A URL without its user information or query, which may carry secrets."""
    return str(url.with_user(None).with_query(None).with_fragment(None))


@asynccontextmanager
async def translate_transport_errors(
    operation: str, url: str | URL | None = None
) -> AsyncIterator[None]:
    """Turn aiohttp and timeout exceptions raised inside the block into our errors, once.

    Their message names the request's `url` (as `shown_url` shows it) and what went wrong in
    an operator's words, e.g. 'cannot connect to http://keystone:5000/v3/auth/tokens:
    connection refused': no exception class names.
    """
    where = shown_url(URL(url)) if url is not None else "the cloud"
    try:
        yield
    except MigrationError as exc:
        if exc.operation is None:
            exc.operation = operation
        raise
    except TimeoutError as exc:
        # Checked first: aiohttp's ServerTimeoutError is also a connection error.
        raise RequestTimeout(_timeout_text(exc, where), operation=operation) from exc
    except aiohttp.ClientConnectorCertificateError as exc:
        raise ConfigError(
            f"TLS certificate of {exc.host} not trusted: set cacert (or insecure)",
            operation=operation,
        ) from exc
    except aiohttp.InvalidURL as exc:
        raise ConfigError(f"invalid URL {exc.url}", operation=operation) from exc
    except aiohttp.ClientError as exc:
        raise ConnectionFailed(_describe(exc, where), operation=operation) from exc


def _timeout_text(exc: TimeoutError, where: str) -> str:
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return f"cannot connect to {where}: no answer in time"
    return f"no answer in time from {where}"


def _describe(exc: aiohttp.ClientError, where: str) -> str:
    """A transport failure in words; aiohttp's own texts name classes and `ssl:default`."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {where}: {os_reason(exc.os_error)}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return f"{where}: the server closed the connection"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return f"{where}: the answer broke off ({_first_clause(str(exc))})"
    if isinstance(exc, OSError):  # reset or broken pipe in mid-request
        return f"{where}: the connection broke ({os_reason(exc)})"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"{where}: unusable answer ({exc.message or f'HTTP {exc.status}'})"
    return f"{where}: the request failed ({_first_clause(str(exc)) or 'no reason given'})"


def _first_clause(text: str) -> str:
    """aiohttp's text without the repr of the exception it wraps ('...: <TransferEncoding...')."""
    return text.split(": <", 1)[0].strip().lower()


def make_ssl_context(settings: CloudSettings) -> ssl.SSLContext:
    """Verified TLS by default; `cacert` adds a trust root, `insecure` turns checking off."""
    if settings.cacert and not Path(settings.cacert).is_file():
        raise ConfigError(f"cacert {settings.cacert} does not exist")
    try:
        context = ssl.create_default_context(cafile=settings.cacert or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cacert {settings.cacert} is unusable: {exc}") from exc
    if settings.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def request_timeout(settings: CloudSettings) -> aiohttp.ClientTimeout:
    """Per-request limits without a total: a multi-GB upload may take hours but never stalls."""
    return aiohttp.ClientTimeout(
        total=None, sock_connect=settings.connect_timeout_s, sock_read=settings.read_timeout_s
    )


def new_session(settings: CloudSettings, *, connections: int = 16) -> aiohttp.ClientSession:
    """One shared session of keep-alive connections; size `connections` for uploads plus polls."""
    connector = aiohttp.TCPConnector(
        ssl=make_ssl_context(settings), limit=max(1, connections), keepalive_timeout=60.0
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=request_timeout(settings),
        headers={"User-Agent": USER_AGENT},
        raise_for_status=False,
    )
