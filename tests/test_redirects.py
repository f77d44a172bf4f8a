"""Redirects never carry a token, a password or a notice to another origin, nor from https to http.

Each test runs two real loopback servers on two ports, which are two origins: the one the
worker is configured with, which redirects, and the other one, which must see nothing.
"""

from __future__ import annotations

import json
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from tests.fixtures.events import record
from worker.clients.glance import GlanceClient
from worker.clients.http import new_session
from worker.clients.keystone import KeystoneAuth, StaticTokenAuth
from worker.config import CloudSettings, Secret
from worker.core.events import Event
from worker.errors import RedirectRefused
from worker.observe.notify import WebhookNotifier, WebhookSettings, notifying

TOKEN = "tok-3f1d-secret"
PASSWORD = "pw-never-elsewhere"
IMAGE = {"id": "c0ffee00-0000-4000-8000-000000000001", "name": "x", "status": "queued"}


@dataclass
class Origin:
    """One loopback server: its base URL and every request it received."""

    url: str = ""
    seen: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def serving(
    handler: Handler, *, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[Origin]:
    origin = Origin()

    async def recorded(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        origin.seen.append((request.method, request.path, dict(request.headers), body))
        return await handler(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recorded)
    runner = web.AppRunner(app, shutdown_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    scheme = "https" if ssl_context else "http"
    origin.url = f"{scheme}://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield origin
    finally:
        await runner.cleanup()


def redirect_to(target: Origin, status: int = 307) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, headers={"Location": f"{target.url}{request.path_qs}"})

    return handle


async def accept_anything(request: web.Request) -> web.StreamResponse:
    """What a hostile host answers: a created image, an issued token, an accepted notice."""
    if request.path == "/v3/auth/tokens":
        return web.json_response(
            {"token": {"expires_at": "2099-01-01T00:00:00Z", "catalog": []}},
            status=201,
            headers={"X-Subject-Token": "stolen"},
        )
    return web.json_response(IMAGE, status=201)


@pytest.fixture
async def other() -> AsyncIterator[Origin]:
    async with serving(accept_anything) as origin:
        yield origin


def assert_refused(caught: pytest.ExceptionInfo[RedirectRefused], start: str, to: str) -> None:
    error = caught.value
    assert error.code == "redirect_refused"
    assert error.status == 307
    assert f"{start} answered 307 to {to}" in error.message
    assert "carries credentials" in error.message


async def test_a_redirect_of_the_image_endpoint_to_another_origin_keeps_the_token(
    other: Origin, session: aiohttp.ClientSession
) -> None:
    async with serving(redirect_to(other)) as endpoint:
        glance = GlanceClient(session, StaticTokenAuth(TOKEN, endpoint.url))

        with pytest.raises(RedirectRefused) as caught:
            await glance.create_image({"name": "x", "disk_format": "vmdk"})

    assert_refused(caught, f"{endpoint.url}/v2/images", f"{other.url}/v2/images")
    assert caught.value.operation == "create_image"
    assert [(method, path) for method, path, _, _ in endpoint.seen] == [("POST", "/v2/images")]
    assert other.seen == []


async def test_a_redirect_within_the_origin_is_still_followed(
    session: aiohttp.ClientSession,
) -> None:
    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path == "/old/v2/images/abc":
            return web.Response(status=308, headers={"Location": "/v2/images/abc"})
        return web.json_response({**IMAGE, "id": "abc"})

    async with serving(handle) as endpoint:
        glance = GlanceClient(session, StaticTokenAuth(TOKEN, f"{endpoint.url}/old"))
        image = await glance.get_image("abc")

    assert image.id == "abc"
    assert [path for _, path, _, _ in endpoint.seen] == ["/old/v2/images/abc", "/v2/images/abc"]
    assert all(headers["X-Auth-Token"] == TOKEN for _, _, headers, _ in endpoint.seen)


async def test_a_redirect_of_keystone_to_another_origin_keeps_the_password(
    other: Origin, session: aiohttp.ClientSession
) -> None:
    async with serving(redirect_to(other)) as keystone:
        settings = CloudSettings(
            auth_url=f"{keystone.url}/v3",
            username="admin",
            password=Secret(PASSWORD),
            project_name="admin",
        )
        with pytest.raises(RedirectRefused) as caught:
            await KeystoneAuth(session, settings).token()

    tokens = "/v3/auth/tokens"
    assert_refused(caught, f"{keystone.url}{tokens}", f"{other.url}{tokens}")
    assert caught.value.operation == "authenticate"
    (_, _, _, body), *_ = keystone.seen
    assert PASSWORD in body.decode()  # it was asked for the password, and only it got it
    assert other.seen == []


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-nodes", "-newkey", "ec", "-pkeyopt",
         "ec_paramgen_curve:prime256v1", "-subj", "/CN=127.0.0.1", "-addext",
         "subjectAltName=IP:127.0.0.1", "-days", "2", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_an_https_endpoint_redirecting_to_http_keeps_the_token(
    other: Origin, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    settings = CloudSettings(cacert=str(cert), connect_timeout_s=5.0, read_timeout_s=5.0)

    async with (
        serving(redirect_to(other), ssl_context=server_tls) as endpoint,
        new_session(settings) as session,
    ):
        glance = GlanceClient(session, StaticTokenAuth(TOKEN, endpoint.url))
        with pytest.raises(RedirectRefused) as caught:
            await glance.get_image("abc")

    assert endpoint.url.startswith("https://")
    assert "refused to follow a redirect from https to http" in caught.value.message
    assert_refused(caught, f"{endpoint.url}/v2/images/abc", f"{other.url}/v2/images/abc")
    assert len(endpoint.seen) == 1
    assert other.seen == []


async def test_a_webhook_redirected_to_another_origin_is_not_followed(other: Origin) -> None:
    async def no_jobs(job_id: str) -> list[object]:
        return []

    async with serving(redirect_to(other)) as receiver:
        settings = WebhookSettings(url=f"{receiver.url}/hooks/sEcReT?k=v", backoff_s=0.01)
        notifier = WebhookNotifier(settings, no_jobs, worker_id="w1")  # type: ignore[arg-type]
        with capture_logs() as logs:
            async with notifying(notifier):
                notifier.observe(
                    record(Event.IMAGE_FINISHED, job_id="j1", phase="failed", image="a")
                )

    assert [path for _, path, _, _ in receiver.seen] == ["/hooks/sEcReT"]
    assert other.seen == []
    assert (notifier.sent, notifier.given_up) == (0, 1)
    (failed,) = [entry for entry in logs if entry["event"] == "notify.attempt_failed"]
    assert failed["log_level"] == "warning"
    assert failed["final"] is True
    assert failed["reason"] == (
        f"refused: HTTP 307 redirect to another origin, from {receiver.url} to {other.url}"
    )
    assert "sEcReT" not in json.dumps(logs)
