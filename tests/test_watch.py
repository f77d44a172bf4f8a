"""Watching imports over real HTTP to the sandbox: one list call serves every importing image."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
import pytest

from tests.fixtures.cloud import password_settings
from worker.clients.glance import GlanceClient
from worker.clients.keystone import KeystoneAuth
from worker.errors import CloudUnavailable, NotFound
from worker.run.watch import ImportPace, ImportWatch
from worker.sandbox import Fault, Sandbox, SandboxConfig

LIST = r"/image/v2/images"
ONE_IMAGE = r"/image/v2/images/[^/]+"
HOUR_S = 3600.0


@pytest.fixture
def sandbox_config() -> SandboxConfig:
    # Imports stop at `processing` until released: an image's status changes when we say so.
    return SandboxConfig(import_latency_s=0.0, hold_imports=True)


@pytest.fixture
def glance(sandbox: Sandbox, session: aiohttp.ClientSession) -> GlanceClient:
    return GlanceClient(session, KeystoneAuth(session, password_settings(sandbox)))


async def importing_image(glance: GlanceClient, tmp_path: Path, name: str) -> str:
    path = tmp_path / f"{name}.raw"
    path.write_bytes(os.urandom(64 * 1024))
    image = await glance.create_image(
        {"name": name, "disk_format": "raw", "container_format": "bare"}
    )
    await glance.stage(image.id, path, size_bytes=path.stat().st_size)
    await glance.import_image(image.id, request_id=f"req-{name}")
    return image.id


async def status_in_sandbox(sandbox: Sandbox, image_id: str, wanted: str) -> None:
    """Hold until the sandbox shows the image `wanted` (read in-process, no request)."""
    async with asyncio.timeout(10):
        while True:
            if (sandbox.image(image_id) or {}).get("status") == wanted:
                return
            await asyncio.sleep(0.01)


async def test_an_image_that_turns_active_is_handed_over_by_the_next_look_at_any_image(
    sandbox: Sandbox, glance: GlanceClient, tmp_path: Path
) -> None:
    late = await importing_image(glance, tmp_path, "late")
    await status_in_sandbox(sandbox, late, "importing")
    queued = (
        await glance.create_image({"name": "q", "disk_format": "raw", "container_format": "bare"})
    ).id
    watch = ImportWatch(glance)
    try:
        # Due in an hour: only a look made for another image can hand it over sooner.
        waiting = asyncio.ensure_future(
            watch.look(late, delay_s=HOUR_S, seen_status="importing", size_bytes=1, accepted_at=0)
        )
        sandbox.release_imports()
        await status_in_sandbox(sandbox, late, "active")
        other = await watch.look(
            queued, delay_s=0.0, seen_status="queued", size_bytes=1, accepted_at=None
        )
        image = await asyncio.wait_for(waiting, timeout=10)
    finally:
        await watch.close()

    assert image.status == "active"
    assert other.status == "queued"
    before = sandbox.count("GET", ONE_IMAGE)
    assert sandbox.count("GET", LIST) == watch.list_calls >= 1
    assert sandbox.count("GET", ONE_IMAGE) == before == 0  # no image was looked at alone


async def test_a_failed_list_call_reaches_only_the_images_that_were_due(
    sandbox: Sandbox, glance: GlanceClient, tmp_path: Path
) -> None:
    patient = await importing_image(glance, tmp_path, "patient")
    due = await importing_image(glance, tmp_path, "due")
    sandbox.inject(Fault("GET", r"/v2/images", status=503))
    watch = ImportWatch(glance)
    try:
        waiting = asyncio.ensure_future(
            watch.look(
                patient, delay_s=HOUR_S, seen_status="importing", size_bytes=1, accepted_at=0
            )
        )
        with pytest.raises(CloudUnavailable):
            await watch.look(due, delay_s=0.0, seen_status="importing", size_bytes=1, accepted_at=0)
        assert not waiting.done()  # still waiting for its own time, or for a change
        sandbox.release_imports()
        await status_in_sandbox(sandbox, patient, "active")
        await status_in_sandbox(sandbox, due, "active")
        again = await watch.look(
            due, delay_s=0.0, seen_status="importing", size_bytes=1, accepted_at=0
        )
        image = await asyncio.wait_for(waiting, timeout=10)
    finally:
        await watch.close()
    assert (again.status, image.status) == ("active", "active")


async def test_an_image_missing_from_the_list_is_looked_at_alone(
    sandbox: Sandbox, glance: GlanceClient, tmp_path: Path
) -> None:
    hidden = (
        await glance.create_image(
            {"name": "h", "disk_format": "raw", "container_format": "bare", "os_hidden": True}
        )
    ).id
    watch = ImportWatch(glance)
    try:
        image = await watch.look(
            hidden, delay_s=0.0, seen_status="queued", size_bytes=1, accepted_at=None
        )
    finally:
        await watch.close()
    assert image.id == hidden
    assert sandbox.count("GET", ONE_IMAGE) == 1


async def test_the_pace_is_learned_from_imports_seen_busy_then_active(
    sandbox: Sandbox, glance: GlanceClient, tmp_path: Path
) -> None:
    image_id = await importing_image(glance, tmp_path, "paced")
    await status_in_sandbox(sandbox, image_id, "importing")
    watch = ImportWatch(glance)
    try:
        accepted_at = watch.now()
        busy = await watch.look(
            image_id, delay_s=0.0, seen_status="importing", size_bytes=100, accepted_at=accepted_at
        )
        assert watch.pace.expect_s(100) is None  # nothing finished yet
        sandbox.release_imports()
        await status_in_sandbox(sandbox, image_id, "active")
        done = await watch.look(
            image_id, delay_s=0.0, seen_status="importing", size_bytes=100, accepted_at=accepted_at
        )
    finally:
        await watch.close()
    assert (busy.status, done.status) == ("importing", "active")
    expected = watch.pace.expect_s(100)
    assert expected is not None
    assert 0 < expected <= watch.now() - accepted_at


def test_the_pace_scales_recent_imports_by_size() -> None:
    pace = ImportPace(window=2)
    pace.record(100, 10.0)
    pace.record(50, 5.0)
    assert pace.expect_s(30) == pytest.approx(3.0)
    pace.record(100, 40.0)  # the oldest falls out of the window
    assert pace.expect_s(150) == pytest.approx(45.0 * 150 / 150)


async def test_a_deleted_image_reaches_its_waiter_as_not_found(
    sandbox: Sandbox, glance: GlanceClient
) -> None:
    image = await glance.create_image(
        {"name": "d", "disk_format": "raw", "container_format": "bare"}
    )
    await glance.delete_image(image.id)
    watch = ImportWatch(glance)
    try:
        with pytest.raises(NotFound):
            await watch.look(
                image.id, delay_s=0.0, seen_status="importing", size_bytes=1, accepted_at=None
            )
    finally:
        await watch.close()
