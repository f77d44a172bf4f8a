"""What every sandbox handler may reach: the shared state, the public URLs and per-request keys."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from worker.sandbox.state import CloudState, Token

# Per-request keys set by the middlewares.
REQUEST_ID = "sandbox.request_id"
TOKEN = "sandbox.token"
RESET_AFTER_BYTES = "sandbox.reset_after_bytes"
NO_ANSWER = "sandbox.no_answer"


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
    token: Token = request[TOKEN]
    return token


def request_id_of(request: web.Request) -> str:
    request_id: str = request[REQUEST_ID]
    return request_id
