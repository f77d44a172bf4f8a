"""The sandbox cloud's lifecycle: one aiohttp server, Keystone at /identity, Glance at /image."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from worker.sandbox import glance, glance_data, glance_images, keystone
from worker.sandbox.config import Fault, SandboxConfig
from worker.sandbox.context import (
    BACKGROUND_KEY,
    ENDPOINTS_KEY,
    NO_ANSWER,
    REQUEST_ID,
    STATE_KEY,
    Background,
    Endpoints,
)
from worker.sandbox.errors import glance_error, keystone_error
from worker.sandbox.faults import (
    FaultBook,
    ServiceOutages,
    fault_middleware,
    outage_middleware,
    service_path,
)
from worker.sandbox.state import CloudState

log = structlog.get_logger(__name__)

MAX_REQUEST_ID_CHARS = 64
REQUEST_ID_HEADER = "x-openstack-request-id"


@dataclass(frozen=True)
class RequestRecord:
    """One request the sandbox saw; `status` is 0 when the connection closed without an answer."""

    method: str
    path: str
    status: int


def _request_id(request: web.Request) -> str:
    sent = request.headers.get(REQUEST_ID_HEADER)
    if sent is None:
        return f"req-{uuid.uuid4()}"
    return sent if sent.startswith("req-") else f"req-{sent}"


def frame_middleware(records: list[RequestRecord]) -> Any:
    """Outermost layer: request ids (431 when too long) and the record of every request."""

    @web.middleware
    async def frame(request: web.Request, handler: Any) -> web.StreamResponse:
        sent = request.headers.get(REQUEST_ID_HEADER, "")
        request[REQUEST_ID] = _request_id(request)
        response: web.StreamResponse
        if len(sent) > MAX_REQUEST_ID_CHARS:
            message = f"Request ID is longer than {MAX_REQUEST_ID_CHARS} characters"
            if request.path.startswith("/identity"):
                response = keystone_error(431, message)
            else:
                response = glance_error(request, 431, message)
            request[REQUEST_ID] = f"req-{uuid.uuid4()}"
        else:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                response = _http_exception(request, exc)
        if _carries_request_id(request, response):
            response.headers[REQUEST_ID_HEADER] = request[REQUEST_ID]
        status = 0 if request.get(NO_ANSWER) else response.status
        records.append(RequestRecord(request.method, request.path, status))
        return response

    return frame


def _carries_request_id(request: web.Request, response: web.StreamResponse) -> bool:
    """Real Glance rejects a bad token, and serves its version list, before it assigns an id."""
    if not request.path.startswith("/image"):
        return True
    return response.status != 401 and service_path(request.path) not in glance.UNAUTHENTICATED_PATHS


def _http_exception(request: web.Request, exc: web.HTTPException) -> web.Response:
    """aiohttp's own 404/405 for unknown paths, reworded in the service's error style."""
    if request.path.startswith("/identity"):
        return keystone_error(exc.status, exc.reason)
    return glance_error(request, exc.status, exc.reason)


class Sandbox:
    """A Keystone v3 + Glance v2 cloud served over real HTTP on one port."""

    username = "admin"
    project_name = "admin"
    domain_name = "Default"

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()
        self.requests: list[RequestRecord] = []
        self._faults = FaultBook()
        self.outages = ServiceOutages()
        self._endpoints = Endpoints()
        self._background = Background()
        self._state: CloudState | None = None

    @property
    def state(self) -> CloudState:
        if self._state is None:
            raise RuntimeError("the sandbox is not serving")
        return self._state

    @property
    def base_url(self) -> str:
        return self._endpoints.base_url

    @property
    def auth_url(self) -> str:
        return self._endpoints.auth_url

    @property
    def image_url(self) -> str:
        return self._endpoints.image_url

    @property
    def user_id(self) -> str:
        return self.state.user.id

    @property
    def project_id(self) -> str:
        return self.state.project.id

    @property
    def app_cred_id(self) -> str:
        return self.state.app_cred.id

    @property
    def app_cred_name(self) -> str:
        return self.state.app_cred.name

    @property
    def app_cred_secret(self) -> str:
        return self.state.app_cred.secret

    @property
    def issued_tokens(self) -> int:
        return self.state.issued_count

    @property
    def password(self) -> str:
        return self.state.user.password

    def rotate_password(self, new_password: str) -> None:
        """Change the admin user's password; like Keystone, revoke every token issued so far."""
        self.state.user = dataclasses.replace(self.state.user, password=new_password)
        self.state.tokens.clear()

    async def lose_imports(self) -> None:
        """What a restart of Glance's API process does to imports in flight: they stop where
        they are, the image `importing`, the task `processing`, the lock held, for good."""
        await self._stop_background()

    def release_imports(self) -> None:
        """Let imports held with `hold_imports` (and every later one) run to their end."""
        self.state.imports_released.set()

    def set_outage(self, service: str, mode: str = "down") -> None:
        """Take `service` (identity or image) down, or make it answer 503 to everything."""
        self.outages.set(service, mode)

    def clear_outage(self, service: str | None = None) -> None:
        """End the outage of `service` (None: of every service)."""
        self.outages.clear(service)

    def os_environment(self) -> dict[str, str]:
        """The OS_* variables a client exports to use this cloud, as for any OpenStack cloud."""
        return {
            "OS_AUTH_URL": self.auth_url,
            "OS_USERNAME": self.username,
            "OS_PASSWORD": self.password,
            "OS_PROJECT_NAME": self.project_name,
            "OS_USER_DOMAIN_NAME": self.domain_name,
            "OS_PROJECT_DOMAIN_NAME": self.domain_name,
        }

    def clouds_yaml_entry(self) -> dict[str, object]:
        """The same settings as an entry of clouds.yaml, as openstacksdk and the CLI read it."""
        return {
            "auth": {
                "auth_url": self.auth_url,
                "username": self.username,
                "password": self.password,
                "project_name": self.project_name,
                "user_domain_name": self.domain_name,
                "project_domain_name": self.domain_name,
            },
            "identity_api_version": 3,
            "interface": "public",
        }

    @property
    def peak_concurrent_stages(self) -> int:
        """The most stage bodies this cloud was receiving at one moment."""
        return self.state.peak_stages_in_flight

    def token_values(self) -> list[str]:
        """Every token issued so far (tests check none leaked into logs or tables)."""
        return list(self.state.tokens)

    def images(self) -> list[dict[str, Any]]:
        """Current images as GET /v2/images/{id} would show them."""
        return [image.to_json() for image in self.state.images.values()]

    def image(self, image_id: str) -> dict[str, Any] | None:
        found = self.state.images.get(image_id)
        return found.to_json() if found else None

    def tasks(self, image_id: str) -> list[dict[str, Any]]:
        return [task.to_json() for task in self.state.tasks_of(image_id)]

    def has_staged_data(self, image_id: str) -> bool:
        return self.state.staged_path(image_id).exists()

    def inject(self, fault: Fault) -> None:
        self._faults.add(fault)

    def withdraw(self, fault: Fault) -> None:
        """Take back a fault that has not fired (yet)."""
        self._faults.remove(fault)

    def count(self, method: str, path_regex: str) -> int:
        """How many requests matched `method` and `path_regex` (full path, e.g. /image/v2/...)."""
        return sum(
            1
            for record in self.requests
            if record.method == method.upper() and re.fullmatch(path_regex, record.path)
        )

    def _build_app(self) -> web.Application:
        app = web.Application(
            middlewares=[
                frame_middleware(self.requests),
                outage_middleware(self.outages),
                fault_middleware(self._faults),
                glance.auth_middleware(),
            ],
            client_max_size=1024**2,
        )
        app[STATE_KEY] = self.state
        app[ENDPOINTS_KEY] = self._endpoints
        app[BACKGROUND_KEY] = self._background
        for module in (keystone, glance, glance_images, glance_data):
            module.add_routes(app.router)
        return app

    @asynccontextmanager
    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[Sandbox]:
        """Serve until the block exits; then cancel imports and remove a temporary data dir."""
        temporary = self.config.data_dir is None
        data_dir = Path(self.config.data_dir or tempfile.mkdtemp(prefix="sandbox-cloud-"))
        self._state = CloudState(self.config, data_dir)
        runner = web.AppRunner(self._build_app(), access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
            bound_port = runner.addresses[0][1]
            self._endpoints.base_url = f"http://{host}:{bound_port}"
            log.info("sandbox.started", auth_url=self.auth_url, image_url=self.image_url)
            yield self
        finally:
            await self._stop_background()
            await runner.cleanup()
            if temporary:
                shutil.rmtree(data_dir, ignore_errors=True)

    async def _stop_background(self) -> None:
        tasks = list(self._background.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def serve_forever(host: str, port: int, config: SandboxConfig) -> None:
    """Run the sandbox until cancelled (the `vmdk-migrate sandbox` command)."""
    async with Sandbox(config).serve(host=host, port=port):
        await asyncio.Event().wait()
