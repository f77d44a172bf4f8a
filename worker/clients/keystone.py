"""Keystone v3 tokens: issued, renewed before expiry or on a 401 (single-flight); the catalog."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import aiohttp

from worker.clients.http import (
    REQUEST_ID_HEADER,
    SAFE_REDIRECTS,
    error_from_response,
    header,
    request_timeout,
    response_text,
    translate_transport_errors,
)
from worker.config import (
    AUTH_APPLICATION_CREDENTIAL,
    AUTH_TOKEN,
    CloudSettings,
    Secret,
)
from worker.core.events import Event
from worker.errors import AuthExpired, AuthFailed, ConfigError, EndpointNotFound
from worker.observe.bus import publisher

events = publisher(__name__)

# A short-lived token is renewed when this share of its life is left, if that is sooner
# than the configured margin (a 2 s token with a 300 s margin would never be usable).
_MIN_LIFE_LEFT_FRACTION = 0.25
_VERSION_SUFFIX = re.compile(r"/v2(\.\d+)?$")


class Authenticator(Protocol):
    """What the Glance client needs from authentication."""

    async def token(self) -> str:
        """A token valid for a while yet."""
        ...

    async def renew(self, stale_token: str) -> str:
        """A token other than `stale_token`, which the cloud refused."""
        ...

    async def image_endpoint(self) -> str:
        """The Glance base URL, without the /v2 suffix."""
        ...


@dataclass(frozen=True)
class _Issued:
    value: Secret
    expires_at: datetime | None
    renew_at_s: float | None
    catalog: Sequence[Mapping[str, Any]] = field(default=())


class KeystoneAuth:
    """Password, application-credential or token authentication against Keystone v3."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: CloudSettings,
        *,
        renew_margin_s: float = 300.0,
        clock: Callable[[], float] = time.time,
        reload: Callable[[], CloudSettings] | None = None,
    ) -> None:
        if not settings.auth_url:
            raise AuthFailed("no auth_url to authenticate against")
        self._session = session
        self._settings = settings
        # Reads the credentials again from where they came from (clouds.yaml, secure.yaml,
        # environment file), so a rotated secret is picked up without a restart.
        self._reload = reload
        self._renew_margin_s = renew_margin_s
        self._clock = clock
        self._current: _Issued | None = None
        self._lock = asyncio.Lock()
        self._tokens_url = _tokens_url(settings.auth_url)

    async def token(self) -> str:
        current = self._current
        if current is None or self._due(current):
            async with self._lock:
                current = self._current
                if current is None or self._due(current):
                    current = await self._issue(reason="expiring")
        return current.value.reveal()

    async def renew(self, stale_token: str) -> str:
        async with self._lock:
            current = self._current
            # Someone renewed while this caller waited: share their token.
            if current is not None and current.value.reveal() != stale_token:
                return current.value.reveal()
            return (await self._issue(reason="rejected")).value.reveal()

    async def image_endpoint(self) -> str:
        if self._settings.image_endpoint:
            return self._settings.image_endpoint
        await self.token()
        assert self._current is not None
        return find_image_endpoint(
            self._current.catalog, self._settings.interface, self._settings.region_name
        )

    @property
    def source(self) -> str:
        """Where the credentials in use came from: `clouds.yaml:NAME` or `environment`."""
        return self._settings.source

    async def reauthenticate(self) -> None:
        """Ask for a new token, with the credentials read again when a loader was given.

        The probe of the identity breaker: it answers whether Keystone is back, and whether
        credentials that were rejected have been fixed where they are kept.
        """
        if self._reload is not None:
            try:
                fresh = self._reload()
            except ConfigError as exc:
                raise AuthFailed(
                    f"credentials from {self._settings.source} are unusable: {exc}",
                    operation="authenticate",
                ) from exc
            if fresh != self._settings:
                events.info(Event.AUTH_CREDENTIALS_RELOADED, source=fresh.source)
                self._settings = fresh
                self._tokens_url = _tokens_url(fresh.auth_url or "")
        async with self._lock:
            await self._issue(reason="probe")

    def _due(self, issued: _Issued) -> bool:
        return issued.renew_at_s is not None and self._clock() >= issued.renew_at_s

    async def _issue(self, *, reason: str) -> _Issued:
        first = self._current is None
        issued = await self._request_token()
        self._current = issued
        expires_at = issued.expires_at.isoformat() if issued.expires_at else None
        method = self._settings.auth_type
        if first:
            events.info(Event.AUTH_TOKEN_ISSUED, method=method, expires_at=expires_at)
        else:
            events.info(
                Event.AUTH_TOKEN_RENEWED, method=method, expires_at=expires_at, reason=reason
            )
        return issued

    async def _request_token(self) -> _Issued:
        body = {"auth": auth_body(self._settings)}
        async with (
            translate_transport_errors("authenticate", self._tokens_url),
            self._session.post(
                self._tokens_url,
                json=body,
                headers={"Accept": "application/json"},
                timeout=request_timeout(self._settings),
                middlewares=SAFE_REDIRECTS,
            ) as response,
        ):
            raw = await response.read()
            if response.status == 401:
                raise AuthFailed(
                    response_text(raw, response.headers) or "Keystone refused the credentials",
                    status=401,
                    request_id=header(response.headers, REQUEST_ID_HEADER),
                    operation="authenticate",
                )
            if response.status not in (200, 201):
                raise error_from_response(
                    response.status, raw, response.headers, operation="authenticate"
                )
            value = response.headers.get("X-Subject-Token")
            document = _json_object(raw, response.status)
        if not value:
            raise AuthFailed("Keystone answered without an X-Subject-Token header")
        return self._issued(Secret(value), document.get("token") or {})

    def _issued(self, value: Secret, token: Mapping[str, Any]) -> _Issued:
        expires_at = _parse_time(token.get("expires_at"))
        renew_at_s = None
        if expires_at is not None:
            now_s = self._clock()
            life_s = max(0.0, expires_at.timestamp() - now_s)
            margin_s = min(self._renew_margin_s, life_s * _MIN_LIFE_LEFT_FRACTION)
            renew_at_s = expires_at.timestamp() - margin_s
        return _Issued(value, expires_at, renew_at_s, tuple(token.get("catalog") or ()))


class StaticTokenAuth:
    """A pre-issued token and a known endpoint: nothing to renew with."""

    def __init__(self, token: Secret | str, image_endpoint: str) -> None:
        self._token = token if isinstance(token, Secret) else Secret(token)
        self._endpoint = image_endpoint.rstrip("/")

    async def token(self) -> str:
        return self._token.reveal()

    async def renew(self, stale_token: str) -> str:
        raise AuthExpired(
            "the pre-issued token was refused and there are no credentials to renew it",
            operation="authenticate",
        )

    async def image_endpoint(self) -> str:
        return self._endpoint


def authenticator_for(
    session: aiohttp.ClientSession,
    settings: CloudSettings,
    *,
    reload: Callable[[], CloudSettings] | None = None,
) -> Authenticator:
    """The authenticator the settings call for."""
    if settings.uses_static_token and settings.token and settings.image_endpoint:
        return StaticTokenAuth(settings.token, settings.image_endpoint)
    return KeystoneAuth(session, settings, reload=reload)


def auth_body(settings: CloudSettings) -> dict[str, Any]:
    """The `auth` object of POST /v3/auth/tokens for the configured method."""
    if settings.auth_type == AUTH_APPLICATION_CREDENTIAL:
        # Application credentials carry their own project scope; Keystone refuses another one.
        return {"identity": _application_credential_identity(settings)}
    if settings.auth_type == AUTH_TOKEN:
        identity: dict[str, Any] = {
            "methods": ["token"],
            "token": {"id": _reveal(settings.token)},
        }
    else:
        user = _user_ref(settings)
        user["password"] = _reveal(settings.password)
        identity = {"methods": ["password"], "password": {"user": user}}
    return {"identity": identity, "scope": {"project": _project_ref(settings)}}


def _application_credential_identity(settings: CloudSettings) -> dict[str, Any]:
    credential: dict[str, Any] = {"secret": _reveal(settings.application_credential_secret)}
    if settings.application_credential_id:
        credential["id"] = settings.application_credential_id
    else:
        credential["name"] = settings.application_credential_name
        credential["user"] = _user_ref(settings)
    return {"methods": ["application_credential"], "application_credential": credential}


def _user_ref(settings: CloudSettings) -> dict[str, Any]:
    return _ref(
        settings.user_id, settings.username, settings.user_domain_id, settings.user_domain_name
    )


def _project_ref(settings: CloudSettings) -> dict[str, Any]:
    return _ref(
        settings.project_id,
        settings.project_name,
        settings.project_domain_id,
        settings.project_domain_name,
    )


def _ref(
    id_: str | None, name: str | None, domain_id: str | None, domain_name: str | None
) -> dict[str, Any]:
    """A user or project as Keystone wants it: by id, or by name within its domain."""
    if id_:
        return {"id": id_}
    return {"name": name, "domain": _domain(domain_id, domain_name)}


def _domain(domain_id: str | None, domain_name: str | None) -> dict[str, str]:
    return {"id": domain_id} if domain_id else {"name": domain_name or ""}


def _reveal(secret: Secret | None) -> str:
    return secret.reveal() if secret is not None else ""


def find_image_endpoint(
    catalog: Sequence[Mapping[str, Any]], interface: str, region_name: str | None
) -> str:
    """The image service's URL for the interface and region; EndpointNotFound lists what exists."""
    available: list[str] = []
    for service in catalog:
        if service.get("type") != "image":
            continue
        for endpoint in service.get("endpoints") or ():
            where = (endpoint.get("interface"), endpoint.get("region_id") or endpoint.get("region"))
            available.append(f"{where[0]}/{where[1]}")
            in_region = region_name is None or region_name in (
                endpoint.get("region"),
                endpoint.get("region_id"),
            )
            if where[0] == interface and in_region and endpoint.get("url"):
                return _VERSION_SUFFIX.sub("", str(endpoint["url"]).rstrip("/"))
    exists = ", ".join(available) if available else "no image service at all"
    raise EndpointNotFound(
        f"no image endpoint for interface={interface} region={region_name or 'any'} "
        f"in the catalog (available: {exists})"
    )


def _tokens_url(auth_url: str) -> str:
    base = auth_url.rstrip("/")
    if not re.search(r"/v3$", base):
        base += "/v3"
    return f"{base}/auth/tokens"


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    # Keystone writes UTC; a missing zone must not be read as local time.
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _json_object(raw: bytes, status: int) -> dict[str, Any]:
    try:
        document = json.loads(raw)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise AuthFailed(
            "Keystone's token answer is not a JSON object", status=status, operation="authenticate"
        )
    return document
