"""Keystone authentication over real HTTP against the sandbox cloud: tokens, catalog, renewal."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

import aiohttp
import pytest
from structlog.testing import capture_logs

from tests.fixtures.cloud import password_settings
from worker.clients.glance import GlanceClient
from worker.clients.keystone import (
    KeystoneAuth,
    StaticTokenAuth,
    auth_body,
    authenticator_for,
    find_image_endpoint,
)
from worker.config import CloudSettings, Secret, load_cloud_settings
from worker.errors import AuthExpired, AuthFailed, ConnectionFailed, EndpointNotFound
from worker.sandbox import Fault, Sandbox, SandboxConfig


async def glance_answers(session: aiohttp.ClientSession, image_url: str, token: str) -> int:
    """The status Glance gives this token on GET /v2/images."""
    async with session.get(f"{image_url}/v2/images", headers={"X-Auth-Token": token}) as response:
        return response.status


async def test_token_from_header_and_image_endpoint_from_catalog(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    auth = KeystoneAuth(session, password_settings(sandbox))

    with capture_logs() as logs:
        token = await auth.token()
        endpoint = await auth.image_endpoint()

    assert endpoint == sandbox.image_url
    assert await glance_answers(session, endpoint, token) == 200
    assert sandbox.issued_tokens == 1
    issued = [entry for entry in logs if entry["event"] == "auth.token_issued"]
    assert len(issued) == 1
    assert issued[0]["method"] == "password"
    assert issued[0]["expires_at"]


def user_and_project_by_id(sb: Sandbox) -> dict[str, str]:
    return {"OS_USER_ID": sb.user_id, "OS_PASSWORD": sb.password, "OS_PROJECT_ID": sb.project_id}


def application_credential_by_id(sb: Sandbox) -> dict[str, str]:
    return {
        "OS_APPLICATION_CREDENTIAL_ID": sb.app_cred_id,
        "OS_APPLICATION_CREDENTIAL_SECRET": sb.app_cred_secret,
    }


def application_credential_by_name_and_user(sb: Sandbox) -> dict[str, str]:
    return {
        "OS_AUTH_TYPE": "v3applicationcredential",
        "OS_APPLICATION_CREDENTIAL_NAME": sb.app_cred_name,
        "OS_APPLICATION_CREDENTIAL_SECRET": sb.app_cred_secret,
        "OS_USERNAME": sb.username,
        "OS_USER_DOMAIN_NAME": sb.domain_name,
    }


@pytest.mark.parametrize(
    "os_variables",
    [user_and_project_by_id, application_credential_by_id, application_credential_by_name_and_user],
)
async def test_other_credentials_get_a_token_glance_accepts(
    sandbox: Sandbox,
    session: aiohttp.ClientSession,
    os_variables: Callable[[Sandbox], dict[str, str]],
) -> None:
    settings = load_cloud_settings({"OS_AUTH_URL": sandbox.auth_url, **os_variables(sandbox)})
    auth = KeystoneAuth(session, settings)

    assert await glance_answers(session, await auth.image_endpoint(), await auth.token()) == 200


async def test_wrong_password_is_auth_failed(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    auth = KeystoneAuth(session, password_settings(sandbox, OS_PASSWORD="wrong"))

    with pytest.raises(AuthFailed) as caught:
        await auth.token()

    assert caught.value.status == 401
    assert caught.value.request_id
    assert "authentication" in caught.value.message


async def test_wrong_application_credential_secret_is_auth_failed(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    os_variables = {
        **application_credential_by_id(sandbox),
        "OS_APPLICATION_CREDENTIAL_SECRET": "not-it",
    }
    settings = load_cloud_settings({"OS_AUTH_URL": sandbox.auth_url, **os_variables})

    with pytest.raises(AuthFailed):
        await KeystoneAuth(session, settings).token()


@pytest.mark.parametrize("sandbox_config", [SandboxConfig(token_ttl_s=2.0)], indirect=True)
async def test_token_renewed_before_expiry(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    auth = KeystoneAuth(session, password_settings(sandbox))
    glance = GlanceClient(session, auth)
    image = await glance.create_image({"name": "renewal", "disk_format": "raw"})

    with capture_logs() as logs:
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            assert (await glance.get_image(image.id)).id == image.id
            await asyncio.sleep(0.2)

    assert sandbox.issued_tokens >= 2
    assert sandbox.count("GET", r"/image/v2/images/.*") > 10
    # Renewed ahead of expiry: the cloud never had to refuse a token.
    assert not [record for record in sandbox.requests if record.status == 401]
    assert any(entry["event"] == "auth.token_renewed" for entry in logs)


async def test_renewal_on_401(sandbox: Sandbox, session: aiohttp.ClientSession) -> None:
    auth = KeystoneAuth(session, password_settings(sandbox))
    glance = GlanceClient(session, auth)
    image = await glance.create_image({"name": "on-401", "disk_format": "raw"})
    sandbox.inject(Fault("GET", rf"/v2/images/{image.id}", status=401))

    with capture_logs() as logs:
        fetched = await glance.get_image(image.id)

    assert fetched.id == image.id
    assert sandbox.issued_tokens == 2
    renewed = [entry for entry in logs if entry["event"] == "auth.token_renewed"]
    assert renewed[0]["reason"] == "rejected"


@pytest.mark.parametrize("sandbox_config", [SandboxConfig(token_ttl_s=1.0)], indirect=True)
async def test_expired_token_renewed_once_for_many_concurrent_calls(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    # A clock stuck in the past: the client believes its token fresh, the cloud knows better.
    auth = KeystoneAuth(session, password_settings(sandbox), clock=lambda: 0.0)
    glance = GlanceClient(session, auth)
    image = await glance.create_image({"name": "single-flight", "disk_format": "raw"})
    await asyncio.sleep(1.2)

    fetched = await asyncio.gather(*(glance.get_image(image.id) for _ in range(20)))

    assert {item.id for item in fetched} == {image.id}
    assert sandbox.issued_tokens == 2
    assert len([record for record in sandbox.requests if record.status == 401]) == 20


async def test_concurrent_renew_calls_share_one_new_token(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    auth = KeystoneAuth(session, password_settings(sandbox))
    stale = await auth.token()

    renewed = await asyncio.gather(*(auth.renew(stale) for _ in range(10)))

    assert len(set(renewed)) == 1
    assert renewed[0] != stale
    assert sandbox.issued_tokens == 2


async def test_second_401_is_auth_expired(sandbox: Sandbox, session: aiohttp.ClientSession) -> None:
    glance = GlanceClient(session, KeystoneAuth(session, password_settings(sandbox)))
    sandbox.inject(Fault("GET", r"/v2/info/import", status=401, times=2))

    with pytest.raises(AuthExpired) as caught:
        await glance.import_methods()

    assert caught.value.status == 401
    assert caught.value.operation == "import_methods"


async def test_static_token_works_and_cannot_be_renewed(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    token = await KeystoneAuth(session, password_settings(sandbox)).token()
    settings = load_cloud_settings({"OS_TOKEN": token, "OS_IMAGE_URL": sandbox.image_url})
    auth = authenticator_for(session, settings)

    assert isinstance(auth, StaticTokenAuth)
    assert await GlanceClient(session, auth).import_methods()
    with pytest.raises(AuthExpired):
        await GlanceClient(session, StaticTokenAuth("bogus", sandbox.image_url)).import_methods()


def test_token_method_asks_for_a_project_scoped_token() -> None:
    settings = load_cloud_settings(
        {
            "OS_AUTH_URL": "http://keystone/v3",
            "OS_TOKEN": "pre-issued",
            "OS_PROJECT_NAME": "vms",
            "OS_PROJECT_DOMAIN_ID": "default",
        }
    )

    assert auth_body(settings) == {
        "identity": {"methods": ["token"], "token": {"id": "pre-issued"}},
        "scope": {"project": {"name": "vms", "domain": {"id": "default"}}},
    }


async def test_endpoint_override_wins_without_a_token(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    settings = password_settings(sandbox, OS_IMAGE_URL="http://glance.example:9292/")
    auth = KeystoneAuth(session, settings)

    assert await auth.image_endpoint() == "http://glance.example:9292"
    assert sandbox.issued_tokens == 0


async def test_no_endpoint_for_region_names_what_exists(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    auth = KeystoneAuth(session, password_settings(sandbox, OS_REGION_NAME="Atlantis"))

    with pytest.raises(EndpointNotFound) as caught:
        await auth.image_endpoint()

    assert "interface=public region=Atlantis" in caught.value.message
    assert "available: public/" in caught.value.message


def test_catalog_lookup_by_interface_and_region_strips_the_version() -> None:
    catalog = [
        {"type": "identity", "endpoints": [{"interface": "public", "url": "http://k/v3"}]},
        {
            "type": "image",
            "endpoints": [
                {"interface": "public", "region_id": "One", "url": "http://g1/v2/"},
                {"interface": "internal", "region_id": "Two", "url": "http://g2-internal"},
                {"interface": "public", "region_id": "Two", "url": "http://g2"},
            ],
        },
    ]

    assert find_image_endpoint(catalog, "public", None) == "http://g1"
    assert find_image_endpoint(catalog, "public", "Two") == "http://g2"
    assert find_image_endpoint(catalog, "internal", "Two") == "http://g2-internal"
    with pytest.raises(EndpointNotFound, match="available: public/One, internal/Two, public/Two"):
        find_image_endpoint(catalog, "admin", None)


async def test_keystone_unreachable_is_connection_failed(session: aiohttp.ClientSession) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = CloudSettings(
        auth_url=f"http://127.0.0.1:{port}/v3",
        username="u",
        user_domain_name="Default",
        password=Secret("p"),
        project_name="p",
        project_domain_name="Default",
    )

    with pytest.raises(ConnectionFailed) as caught:
        await KeystoneAuth(session, settings).token()

    assert caught.value.operation == "authenticate"
    assert str(caught.value) == (
        f"authenticate: cannot connect to http://127.0.0.1:{port}/v3/auth/tokens: "
        "connection refused"
    )


async def test_secrets_never_reach_the_logs(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    auth = KeystoneAuth(session, password_settings(sandbox))
    glance = GlanceClient(session, auth)

    with capture_logs() as logs:
        first = await auth.token()
        sandbox.inject(Fault("GET", r"/v2/info/import", status=401))
        await glance.import_methods()
        second = await auth.token()
        with pytest.raises(AuthFailed):
            await KeystoneAuth(session, password_settings(sandbox, OS_PASSWORD="bad")).token()

    logged = repr(logs)
    assert [entry["event"] for entry in logs] == ["auth.token_issued", "auth.token_renewed"]
    for secret in (first, second, sandbox.password):
        assert secret not in logged
