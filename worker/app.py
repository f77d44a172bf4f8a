"""Composition root: builds the HTTP session, clients, store, runner and consumer."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import structlog

from worker.clients.glance import GlanceClient
from worker.clients.http import new_session
from worker.clients.keystone import authenticator_for
from worker.clients.throttle import Throttle
from worker.config import CloudSettings
from worker.consumer import Consumer, ConsumerSettings, RunSummary
from worker.controls import following_bandwidth
from worker.core.machine import Policies
from worker.executor import ExecutorSettings, ImageRunner
from worker.store.store import Store

log = structlog.get_logger(__name__)


def default_worker_id() -> str:
    """host:pid identifies a worker process in rows, events and logs."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class WorkerSettings:
    """Everything `vmdk-migrate run` needs besides the cloud and the database."""

    worker_id: str = field(default_factory=default_worker_id)
    concurrency: int = 8  # images in flight
    stage_concurrency: int = 4  # of those, how many may be sending bytes at once
    chunk_bytes: int = 1 << 20
    hash_algorithm: str = "sha512"
    lease_s: float = 60.0
    heartbeat_s: float = 15.0
    idle_poll_s: float = 2.0
    grace_s: float = 60.0
    once: bool = False
    policies: Policies = field(default_factory=Policies)


@asynccontextmanager
async def open_store(database_url: str, *, max_size: int = 10) -> AsyncIterator[Store]:
    """A connected store with the schema brought up to date (migrations run on start)."""
    store = await Store.connect(database_url, max_size=max_size)
    try:
        applied = await store.upgrade()
        if applied:
            log.info("db.upgraded", versions=applied)
        yield store
    finally:
        await store.close()


@asynccontextmanager
async def open_glance(
    cloud: CloudSettings,
    *,
    chunk_bytes: int = 1 << 20,
    connections: int = 16,
    throttle: Throttle | None = None,
) -> AsyncIterator[GlanceClient]:
    """A Glance client with its own HTTP session, closed on exit."""
    async with new_session(cloud, connections=connections) as session:
        auth = authenticator_for(session, cloud)
        yield GlanceClient(session, auth, chunk_bytes=chunk_bytes, throttle=throttle)


async def run_worker(
    *,
    database_url: str,
    cloud: CloudSettings,
    settings: WorkerSettings,
    stop: asyncio.Event,
) -> RunSummary:
    """Run one worker process until `stop` is set or, with `once`, the queue is drained."""
    async with (
        open_store(database_url, max_size=min(settings.concurrency + 2, 20)) as store,
        following_bandwidth(database_url, worker_id=settings.worker_id) as throttle,
        open_glance(
            cloud,
            chunk_bytes=settings.chunk_bytes,
            connections=settings.concurrency + settings.stage_concurrency + 2,
            throttle=throttle,
        ) as glance,
    ):
        runner = ImageRunner(
            glance=glance,
            store=store,
            settings=ExecutorSettings(
                worker_id=settings.worker_id,
                hash_algorithm=settings.hash_algorithm,
                policies=settings.policies,
            ),
            stage_slots=asyncio.Semaphore(settings.stage_concurrency),
        )
        consumer = Consumer(
            store,
            runner.run,
            ConsumerSettings(
                worker_id=settings.worker_id,
                concurrency=settings.concurrency,
                lease_s=settings.lease_s,
                heartbeat_s=settings.heartbeat_s,
                idle_poll_s=settings.idle_poll_s,
                grace_s=settings.grace_s,
                once=settings.once,
            ),
        )
        return await consumer.run(stop)


def environment() -> Mapping[str, str]:
    """The process environment, the one place the app reads it."""
    return dict(os.environ)
