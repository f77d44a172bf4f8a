"""What every sandbox handler may reach: the shared state, the public URLs and per-request keys."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from worker.sandbox.state import CloudState, Token

# Per-request keys set by the middlewares.
REQUEST_ID = web.RequestKey("request_id", str)
TOKEN = web.RequestKey("token", Token)
RESET_AFTER_BYTES = web.RequestKey("reset_after_bytes", int)
NO_ANSWER = web.RequestKey("no_answer", bool)


@dataclass
class Endpoints:
    """Public URLs, known once the listening socket is bound."""

    base_url: str = ""

    @property
    def auth_url(self) -> str:
        return f"{self.base_url}/identity/v3"

    @property
    def image_url(self) -> str:
        return f"{self.base_url}/image"


@dataclass
class Background:
    """Import flows still running; cancelled when the sandbox stops."""

    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


STATE_KEY = web.AppKey("state", CloudState)
ENDPOINTS_KEY = web.AppKey("endpoints", Endpoints)
BACKGROUND_KEY = web.AppKey("background", Background)


def state_of(request: web.Request) -> CloudState:
    return request.app[STATE_KEY]


def endpoints_of(request: web.Request) -> Endpoints:
    return request.app[ENDPOINTS_KEY]


def token_of(request: web.Request) -> Token:
    """The caller's validated token (the auth middleware guarantees one on Glance routes)."""
    return request[TOKEN]


def request_id_of(request: web.Request) -> str:
    return request[REQUEST_ID]
