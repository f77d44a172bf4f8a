"""The sandbox cloud's lifecycle: one aiohttp server with Keystone under /identity, Glance under /image."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from worker.sandbox.config import Fault, SandboxConfig


@dataclass(frozen=True)
class RequestRecord:
    """One request the sandbox answered (or dropped), for counting calls in tests."""

    method: str
    path: str
    status: int


class Sandbox:
    """A Keystone v3 + Glance v2 cloud served over real HTTP on one port."""

    username = "admin"
    password = "secret"  # noqa: S105 - the sandbox's fixed, public demo credential
    project_name = "admin"
    domain_name = "Default"

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()
        self.requests: list[RequestRecord] = []
        self.issued_tokens = 0
        self.user_id = ""
        self.project_id = ""
        self.app_cred_id = ""
        self.app_cred_secret = ""
        self.base_url = ""
        self._faults: list[Fault] = []

    @property
    def auth_url(self) -> str:
        return f"{self.base_url}/identity/v3"

    @property
    def image_url(self) -> str:
        return f"{self.base_url}/image"

    def images(self) -> list[dict[str, Any]]:
        return []

    def inject(self, fault: Fault) -> None:
        self._faults.append(fault)

    @asynccontextmanager
    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[Sandbox]:
        runner = web.AppRunner(web.Application())
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0]
        self.base_url = f"http://{host}:{bound[1]}"
        try:
            yield self
        finally:
            await runner.cleanup()


async def serve_forever(host: str, port: int, config: SandboxConfig) -> None:
    """Run the sandbox until cancelled (the `vmdk-migrate sandbox` command)."""
    async with Sandbox(config).serve(host=host, port=port):
        await asyncio.Event().wait()
