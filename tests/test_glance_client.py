"""The Glance client over real HTTP: the sandbox cloud, and a bare server for the raw stage."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.fixtures.cloud import password_settings
from worker.clients.glance import BackendStore, GlanceClient, Quota
from worker.clients.keystone import KeystoneAuth, StaticTokenAuth
from worker.config import CloudSettings
from worker.errors import (
    CloudUnavailable,
    Conflict,
    ConnectionFailed,
    ImageTooLarge,
    NotFound,
    QuotaExceeded,
    RateLimited,
    RequestTimeout,
    SourceError,
)
from worker.sandbox import Fault, Sandbox, SandboxConfig

MIB = 1 << 20
STAGE_PATH = r"/v2/images/[^/]+/stage"


def settings_for(sandbox: Sandbox) -> CloudSettings:
    return password_settings(sandbox)


@pytest.fixture
def auth(sandbox: Sandbox, session: aiohttp.ClientSession) -> KeystoneAuth:
    return KeystoneAuth(session, settings_for(sandbox))


@pytest.fixture
def glance(session: aiohttp.ClientSession, auth: KeystoneAuth) -> GlanceClient:
    return GlanceClient(session, auth, chunk_bytes=256 * 1024, request_timeout_s=5.0)


def write_file(directory: Path, size_bytes: int, name: str = "disk.bin") -> Path:
    path = directory / name
    path.write_bytes(os.urandom(size_bytes))
    return path


def digest(path: Path, algorithm: str) -> str:
    return hashlib.new(algorithm, path.read_bytes()).hexdigest()


async def new_image(glance: GlanceClient, name: str = "disk") -> str:
    image = await glance.create_image(
        {"name": name, "disk_format": "raw", "container_format": "bare"}
    )
    return image.id


async def sandbox_status(sandbox: Sandbox, image_id: str, wanted: str) -> str | None:
    """The image's status in the sandbox once it is `wanted`, or the last seen after 2 s."""
    seen = None
    for _ in range(40):
        found = sandbox.image(image_id)
        seen = found["status"] if found else None
        if seen == wanted:
            break
        await asyncio.sleep(0.05)
    return seen


async def test_round_trip_create_stage_import_tasks_update_delete(
    sandbox: Sandbox, glance: GlanceClient, tmp_path: Path
) -> None:
    source = write_file(tmp_path, 3 * MIB + 123)
    size_bytes = source.stat().st_size
    chosen_id = str(uuid.uuid4())
    seen_progress: list[int] = []

    created = await glance.create_image(
        {
            "id": chosen_id,
            "name": "round-trip",
            "disk_format": "raw",
            "container_format": "bare",
            "os_type": "linux",
        }
    )
    staged = await glance.stage(
        created.id,
        source,
        size_bytes=size_bytes,
        hash_algos=("md5", "sha512"),
        progress=seen_progress.append,
    )
    after_stage = await glance.get_image(created.id)
    echoed = await glance.import_image(created.id, request_id="req-" + str(uuid.uuid4()))
    assert await sandbox_status(sandbox, created.id, "active") == "active"
    active = await glance.get_image(created.id)
    tasks = await glance.image_tasks(created.id)

    assert created.id == chosen_id
    assert created.status == "queued"
    assert created.properties["os_type"] == "linux"
    assert created.request_id
    assert staged.size_bytes == size_bytes
    assert staged.digests == {"md5": digest(source, "md5"), "sha512": digest(source, "sha512")}
    assert seen_progress[-1] == size_bytes
    assert len(seen_progress) == 13  # ceil(size / 256 KiB)
    assert after_stage.status == "uploading"
    assert after_stage.size == size_bytes
    assert active.checksum == staged.digests["md5"]
    assert active.os_hash_algo == "sha512"
    assert active.os_hash_value == staged.digests["sha512"]
    assert [task.request_id for task in tasks] == [echoed]
    assert tasks[0].status == "success"

    updated = await glance.update_image(
        created.id,
        [
            {"op": "replace", "path": "/name", "value": "renamed"},
            {"op": "add", "path": "/hw_disk_bus", "value": "virtio"},
        ],
    )
    assert updated.name == "renamed"
    assert updated.properties["hw_disk_bus"] == "virtio"

    await glance.delete_image(created.id)
    with pytest.raises(NotFound):
        await glance.get_image(created.id)
    with pytest.raises(NotFound):
        await glance.delete_image(created.id)


async def test_list_follows_next_across_pages(sandbox: Sandbox, glance: GlanceClient) -> None:
    created = {await new_image(glance, f"paged-{n}") for n in range(5)}
    await new_image(glance, "other")

    listed = [image.id async for image in glance.list_images(limit="2", sort_key="name")]
    named = [image.id async for image in glance.list_images(name="paged-3")]

    assert created <= set(listed)
    assert len(listed) == 6
    assert sandbox.count("GET", r"/image/v2/images") >= 4
    assert len(named) == 1
    assert named[0] in created


async def test_info_endpoints(glance: GlanceClient) -> None:
    assert await glance.import_methods() == ["glance-direct", "web-download", "copy-image"]
    assert await glance.stores() == [BackendStore(id="fs", default=True)]
    assert await glance.usage() == {}


async def test_stores_fall_back_to_the_vendor_path(sandbox: Sandbox, glance: GlanceClient) -> None:
    sandbox.inject(Fault("GET", r"/v2/info/stores", status=404))

    assert await glance.stores() == [BackendStore(id="fs", default=True)]
    assert sandbox.count("GET", r"/image/v2/stores/available") == 1


async def test_no_store_list_means_single_store(sandbox: Sandbox, glance: GlanceClient) -> None:
    sandbox.inject(Fault("GET", r"/v2/info/stores", status=404))
    sandbox.inject(Fault("GET", r"/v2/stores/available", status=404))

    assert await glance.stores() == []


@pytest.mark.parametrize(
    "sandbox_config", [SandboxConfig(quota={"image_stage_total": 1})], indirect=True
)
async def test_stage_over_quota_is_back_pressure(
    sandbox: Sandbox, glance: GlanceClient, tmp_path: Path
) -> None:
    source = write_file(tmp_path, 3 * MIB)
    image_id = await new_image(glance)

    with pytest.raises(QuotaExceeded) as caught:
        await glance.stage(image_id, source, size_bytes=3 * MIB)
    usage = await glance.usage()

    assert "image_stage_total" in caught.value.message
    assert caught.value.status == 413
    assert caught.value.request_id
    assert usage["image_stage_total"] == Quota(usage=0, limit=1)
    assert sandbox.image(image_id)["status"] == "queued"  # type: ignore[index]


async def test_size_cap_is_image_too_large(
    sandbox: Sandbox, glance: GlanceClient, tmp_path: Path
) -> None:
    source = write_file(tmp_path, MIB)
    image_id = await new_image(glance)
    body = (
        "<html><head><title>413 Request Entity Too Large</title></head><body>"
        "<h1>413 Request Entity Too Large</h1>The incoming image is too large<br /><br />"
        "</body></html>"
    )
    sandbox.inject(Fault("PUT", STAGE_PATH, status=413, body=body))

    with pytest.raises(ImageTooLarge) as caught:
        await glance.stage(image_id, source, size_bytes=MIB)

    assert caught.value.message == "The incoming image is too large"


async def test_import_before_stage_is_conflict(sandbox: Sandbox, glance: GlanceClient) -> None:
    image_id = await new_image(glance)

    with pytest.raises(Conflict) as caught:
        await glance.import_image(image_id, request_id="req-" + str(uuid.uuid4()))

    assert caught.value.message == (
        "Image needs to be staged before 'glance-direct' method can be used"
    )
    assert caught.value.operation == "import_image"
    assert caught.value.request_id


async def test_second_stage_is_conflict(glance: GlanceClient, tmp_path: Path) -> None:
    source = write_file(tmp_path, MIB)
    image_id = await new_image(glance)
    await glance.stage(image_id, source, size_bytes=MIB)

    with pytest.raises(Conflict, match="from uploading to uploading is not allowed"):
        await glance.stage(image_id, source, size_bytes=MIB)


async def test_unknown_image_is_not_found(glance: GlanceClient) -> None:
    missing = str(uuid.uuid4())

    with pytest.raises(NotFound) as caught:
        await glance.get_image(missing)

    assert missing in caught.value.message
    assert caught.value.status == 404


async def test_rate_limited_carries_retry_after(sandbox: Sandbox, glance: GlanceClient) -> None:
    sandbox.inject(Fault("GET", r"/v2/info/import", status=429, retry_after_s=12))

    with pytest.raises(RateLimited) as caught:
        await glance.import_methods()

    assert caught.value.retry_after_s == 12.0


async def test_server_error_is_cloud_unavailable(sandbox: Sandbox, glance: GlanceClient) -> None:
    sandbox.inject(Fault("POST", r"/v2/images", status=503, retry_after_s=3))

    with pytest.raises(CloudUnavailable) as caught:
        await new_image(glance)

    assert caught.value.retry_after_s == 3.0
    assert caught.value.operation == "create_image"


async def test_dropped_answer_is_connection_failed(sandbox: Sandbox, glance: GlanceClient) -> None:
    # POST, because aiohttp itself repeats an idempotent request once on a dropped keep-alive.
    sandbox.inject(Fault("POST", r"/v2/images", drop_response=True))

    with pytest.raises(ConnectionFailed) as caught:
        await new_image(glance)

    assert caught.value.operation == "create_image"
    assert (
        caught.value.message == f"{sandbox.image_url}/v2/images: the server closed the connection"
    )


async def test_slow_answer_is_request_timeout(
    sandbox: Sandbox, session: aiohttp.ClientSession, auth: KeystoneAuth
) -> None:
    glance = GlanceClient(session, auth, request_timeout_s=0.3)
    await glance.import_methods()
    sandbox.inject(Fault("GET", r"/v2/info/import", stall_s=1.0))

    with pytest.raises(RequestTimeout) as caught:
        await glance.import_methods()

    assert caught.value.message == f"no answer in time from {sandbox.image_url}/v2/info/import"


async def test_connection_reset_mid_stage_is_connection_failed(
    sandbox: Sandbox, glance: GlanceClient, tmp_path: Path
) -> None:
    source = write_file(tmp_path, 8 * MIB)
    image_id = await new_image(glance)
    sandbox.inject(Fault("PUT", STAGE_PATH, reset_after_bytes=2 * MIB))

    with pytest.raises(ConnectionFailed) as caught:
        await glance.stage(image_id, source, size_bytes=8 * MIB)

    assert caught.value.message.startswith(f"{sandbox.image_url}/v2/images/{image_id}/stage: ")
    assert not re.search(r"\b[A-Z]\w+(Error|Exception)\b", caught.value.message)

    assert await sandbox_status(sandbox, image_id, "queued") == "queued"
    assert not sandbox.has_staged_data(image_id)


async def test_stage_restarts_the_stream_after_a_401(
    sandbox: Sandbox, glance: GlanceClient, tmp_path: Path
) -> None:
    source = write_file(tmp_path, 2 * MIB + 5)
    image_id = await new_image(glance)
    sandbox.inject(Fault("PUT", STAGE_PATH, status=401))

    staged = await glance.stage(image_id, source, size_bytes=2 * MIB + 5)

    assert staged.digests == {"sha512": digest(source, "sha512")}
    assert sandbox.issued_tokens == 2
    assert sandbox.count("PUT", r"/image" + STAGE_PATH) == 2
    assert sandbox.image(image_id)["size"] == 2 * MIB + 5  # type: ignore[index]


async def test_file_shrinking_during_stage_is_source_error(
    sandbox: Sandbox, glance: GlanceClient, tmp_path: Path
) -> None:
    source = write_file(tmp_path, 4 * MIB)
    image_id = await new_image(glance)

    def shrink_after_first_chunk(sent_bytes: int) -> None:
        if sent_bytes <= 256 * 1024:
            os.truncate(source, MIB)

    with pytest.raises(SourceError, match="source changed while reading"):
        await glance.stage(image_id, source, size_bytes=4 * MIB, progress=shrink_after_first_chunk)

    assert await sandbox_status(sandbox, image_id, "queued") == "queued"


async def test_file_growing_during_stage_is_source_error(
    sandbox: Sandbox, glance: GlanceClient, tmp_path: Path
) -> None:
    source = write_file(tmp_path, 2 * MIB)
    image_id = await new_image(glance)

    def grow_after_first_chunk(sent_bytes: int) -> None:
        if sent_bytes <= 256 * 1024:
            with source.open("ab") as appended:
                appended.write(b"late bytes")

    with pytest.raises(SourceError, match="grew past the declared size"):
        await glance.stage(image_id, source, size_bytes=2 * MIB, progress=grow_after_first_chunk)

    assert await sandbox_status(sandbox, image_id, "queued") == "queued"


async def test_missing_or_resized_source_fails_before_any_request(
    sandbox: Sandbox, glance: GlanceClient, tmp_path: Path
) -> None:
    image_id = await new_image(glance)
    source = write_file(tmp_path, MIB)

    with pytest.raises(SourceError, match="cannot read"):
        await glance.stage(image_id, tmp_path / "absent.vmdk", size_bytes=MIB)
    with pytest.raises(SourceError, match="source changed"):
        await glance.stage(image_id, source, size_bytes=MIB + 1)

    assert sandbox.count("PUT", r"/image" + STAGE_PATH) == 0


async def test_stage_memory_stays_bounded(glance: GlanceClient, tmp_path: Path) -> None:
    size_bytes = 48 * MIB
    source = write_file(tmp_path, size_bytes)
    image_id = await new_image(glance)

    tracemalloc.start()
    try:
        staged = await glance.stage(image_id, source, size_bytes=size_bytes)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert staged.digests["sha512"] == digest(source, "sha512")
    # Client and in-process server together hold a few chunks, never the file.
    assert peak_bytes < size_bytes // 6


class RecordingGlance:
    """A bare stage endpoint that remembers the request line, headers and body it received."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.body_bytes = 0
        self.stall_s = 0.0

    async def stage(self, request: web.Request) -> web.Response:
        self.headers = dict(request.headers)
        await asyncio.sleep(self.stall_s)
        async for chunk in request.content.iter_any():
            self.body_bytes += len(chunk)
        return web.Response(status=204, headers={"x-openstack-request-id": "req-recorded"})


@pytest.fixture
async def recording() -> AsyncIterator[tuple[RecordingGlance, str]]:
    recorder = RecordingGlance()
    app = web.Application()
    app.router.add_put("/v2/images/{image_id}/stage", recorder.stage)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield recorder, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_stage_sends_content_length_not_chunked(
    recording: tuple[RecordingGlance, Any], session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    recorder, url = recording
    source = write_file(tmp_path, 3 * MIB + 1)
    glance = GlanceClient(session, StaticTokenAuth("tok", url), chunk_bytes=64 * 1024)

    staged = await glance.stage("abc", source, size_bytes=3 * MIB + 1)

    assert recorder.headers["Content-Length"] == str(3 * MIB + 1)
    assert recorder.headers["x-openstack-image-size"] == str(3 * MIB + 1)
    assert recorder.headers["Content-Type"] == "application/octet-stream"
    assert recorder.headers["X-Auth-Token"] == "tok"
    assert recorder.headers["Accept"] == "application/json"
    assert "Transfer-Encoding" not in recorder.headers
    assert recorder.body_bytes == 3 * MIB + 1
    assert staged.request_id == "req-recorded"


async def test_stage_to_a_cloud_that_stops_reading_times_out(
    recording: tuple[RecordingGlance, Any], session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    recorder, url = recording
    recorder.stall_s = 1.0
    source = write_file(tmp_path, 32 * MIB)
    glance = GlanceClient(session, StaticTokenAuth("tok", url), request_timeout_s=0.3)

    with pytest.raises(RequestTimeout, match="stopped reading"):
        await glance.stage("abc", source, size_bytes=32 * MIB)


def test_many_uploads_share_a_fixed_buffer_budget() -> None:
    from worker.clients.glance import BUFFER_BUDGET_BYTES, MIN_CHUNK_BYTES, chunk_size_for

    assert chunk_size_for(1 << 20, uploads=1) == 1 << 20  # one upload: full chunks
    assert chunk_size_for(1 << 20, uploads=4) == 1 << 20
    assert chunk_size_for(1 << 20, uploads=16) * 16 <= BUFFER_BUDGET_BYTES
    assert chunk_size_for(1 << 20, uploads=1000) == MIN_CHUNK_BYTES  # never absurdly small
    assert chunk_size_for(64 << 10, uploads=1) == 64 << 10  # a smaller setting is kept
