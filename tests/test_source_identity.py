"""The worker uploads and hashes the very file that was inspected at submit, and nothing else.

A disk swapped after submit for a same-size link to a file outside --source-root, or for
another file, a disk rewritten in place during the upload, and a resumed row whose source is
now /dev/zero all end `failed` with `source_error`, without their bytes reaching Glance.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from tests.fixtures.batch import make_disks, migrate, rows_of, sha512_of
from worker.clients.glance import GlanceClient
from worker.clients.keystone import StaticTokenAuth
from worker.errors import SourceError
from worker.intake.identity import identity_of
from worker.intake.manifest import load_manifest
from worker.intake.source import Source, hash_source
from worker.sandbox import Sandbox
from worker.store.store import open_store

MIB = 1 << 20


async def submit_rooted(database_url: str, root: Path, names: list[str]) -> str:
    """Submit disks under `root` with --source-root, as `vmdk-migrate submit` does."""
    paths = make_disks(root, names)
    manifest = root / "job.json"
    disks = [{"source": p.name, "name": n} for n, p in zip(names, paths, strict=True)]
    defaults = {"es_virtio_enabled": "no"}
    manifest.write_text(json.dumps({"job": "rooted", "defaults": defaults, "disks": disks}))
    loaded = load_manifest(manifest, source_root=root)
    async with open_store(database_url) as store:
        job_id = await store.submit_job(
            loaded.job, manifest=loaded.document, manifest_sha256=loaded.sha256
        )
    return str(job_id)


def same_size_outsider(outside: Path, like: Path) -> Path:
    """A file outside the root with as many bytes as `like`, and a secret in them."""
    outside.mkdir(exist_ok=True)
    secret = outside / f"shadow-of-{like.name}"
    size = like.stat().st_size
    secret.write_bytes((b"root:secret-hash:19000:0:99999:7:::\n" * (size // 36 + 1))[:size])
    return secret


async def test_disks_swapped_after_submit_are_not_uploaded(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    job_id = await submit_rooted(database_url, root, ["fine", "linked", "replaced", "touched"])
    secret = same_size_outsider(tmp_path / "outside", root / "linked.vmdk")
    # A same-size symlink to a file outside the root, where the inspected disk was.
    (root / "linked.vmdk").unlink()
    (root / "linked.vmdk").symlink_to(secret)
    # Another regular file moved over the disk: same name and size, another inode.
    shutil.copyfile(same_size_outsider(tmp_path / "outside", root / "replaced.vmdk"), root / "new")
    os.replace(root / "new", root / "replaced.vmdk")
    # The same file, written to after it was inspected.
    touched = root / "touched.vmdk"
    recorded = touched.stat()
    with touched.open("r+b") as file:
        file.write(b"\0" * 512)
    os.utime(touched, ns=(recorded.st_atime_ns, recorded.st_mtime_ns + 1_000_000_000))

    summary = await migrate(database_url, sandbox, concurrency=4)

    rows = await rows_of(database_url, job_id)
    assert summary.by_phase == {"done": 1, "failed": 3}
    assert (rows["fine"].phase, rows["fine"].verification) == ("done", "verified")
    assert rows["fine"].source_hash_value == sha512_of(root / "fine.vmdk")
    expected = {
        "linked": "is now a symbolic link, which is not followed",
        "replaced": "is another file now",
        "touched": "was modified (mtime_ns",
    }
    for name, message in expected.items():
        assert rows[name].phase == "failed"
        assert rows[name].error_code == "source_error"
        assert message in (rows[name].error_message or ""), rows[name].error_message
        assert rows[name].cleanup == "deleted"
        stage_path = f"/image/v2/images/{rows[name].glance_image_id}/stage"
        assert sandbox.count("PUT", stage_path) == 0  # not a byte of it was sent
    assert [image["name"] for image in sandbox.images()] == ["fine"]


async def test_a_resumed_row_whose_source_is_now_dev_zero_fails_at_once(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    job_id = await submit_rooted(database_url, root, ["disk"])
    assert (await migrate(database_url, sandbox)).by_phase == {"done": 1}
    # As if the worker had died after the import, before it hashed the source; meanwhile the
    # disk became a link to an endless device.
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            """UPDATE results SET phase = 'importing', source_hash_algo = NULL,
                   source_hash_value = NULL, verification = NULL, finished_at = NULL,
                   lease_expires_at = NULL, next_attempt_at = now()"""
        )
    finally:
        await conn.close()
    (root / "disk.vmdk").unlink()
    (root / "disk.vmdk").symlink_to("/dev/zero")

    summary = await asyncio.wait_for(migrate(database_url, sandbox), timeout=60)

    row = (await rows_of(database_url, job_id))["disk"]
    assert summary.by_phase == {"failed": 1}
    assert row.error_code == "source_error"
    assert "is now a symbolic link" in (row.error_message or "")


@pytest.mark.parametrize("kind", ["device", "link to a device"])
async def test_hashing_a_device_or_a_grown_file_is_refused_and_bounded(
    tmp_path: Path, kind: str
) -> None:
    path = Path("/dev/zero")
    if kind == "link to a device":
        path = tmp_path / "disk.vmdk"
        path.symlink_to("/dev/zero")

    with pytest.raises(SourceError, match=r"not a regular file|symbolic link"):
        await asyncio.wait_for(hash_source(path, ["sha512"], size_bytes=MIB), timeout=30)


async def test_hashing_reads_the_recorded_size_and_no_more(tmp_path: Path) -> None:
    path = tmp_path / "disk.vmdk"
    path.write_bytes(b"x" * (2 * MIB))
    identity = identity_of(path.stat())

    digests = await hash_source(path, ["sha512"], size_bytes=2 * MIB, identity=identity)
    assert digests == {"sha512": sha512_of(path)}

    with path.open("ab") as grown:
        grown.write(b"more")
    with pytest.raises(SourceError, match="modified"):
        await hash_source(path, ["sha512"], size_bytes=2 * MIB, identity=identity)
    with pytest.raises(SourceError, match="has 2097156 bytes, expected 2097152"):
        await hash_source(path, ["sha512"], size_bytes=2 * MIB)


def test_a_source_that_no_longer_looks_like_the_inspected_vmdk_is_refused(
    tmp_path: Path,
) -> None:
    (path,) = make_disks(tmp_path, ["disk"])
    with path.open("r+b") as file:
        file.write(b"QFI\xfb")  # a qcow2 signature where the VMDK header was

    with pytest.raises(SourceError, match="no longer the VMDK that was inspected"):
        Source.open(path, size_bytes=path.stat().st_size, reinspect=True)


@asynccontextmanager
async def pausing_glance(
    halfway: asyncio.Event, resume: asyncio.Event
) -> AsyncIterator[tuple[str, list[int]]]:
    """A stage endpoint that stops reading after 1 MiB until `resume` is set."""
    received: list[int] = []

    async def stage(request: web.Request) -> web.Response:
        seen = 0
        async for chunk in request.content.iter_chunked(256 << 10):
            seen += len(chunk)
            if not halfway.is_set() and seen >= MIB:
                halfway.set()
                await resume.wait()
        received.append(seen)
        return web.Response(status=204)

    app = web.Application(client_max_size=1 << 30)
    app.router.add_put("/v2/images/{image_id}/stage", stage)
    runner = web.AppRunner(app, shutdown_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", received
    finally:
        await runner.cleanup()


async def test_an_in_place_rewrite_of_the_same_size_during_the_upload_fails_the_stage(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    # Larger than what loopback socket buffers hold, so the upload is mid-file when it pauses.
    path = tmp_path / "disk.raw"
    with path.open("wb") as file:
        file.truncate(64 * MIB)
    identity = identity_of(path.stat())
    halfway, resume = asyncio.Event(), asyncio.Event()

    async with pausing_glance(halfway, resume) as (url, received):
        glance = GlanceClient(session, StaticTokenAuth("token", url), chunk_bytes=256 << 10)
        upload = asyncio.create_task(
            glance.stage("abc", path, size_bytes=64 * MIB, identity=identity)
        )
        await halfway.wait()
        with path.open("r+b") as file:  # same size, other bytes
            file.write(b"rewritten" * 1000)
        # File times tick coarsely (a few ms on ext4): make the rewrite's time a later one.
        status = path.stat()
        os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns + 1_000_000_000))
        resume.set()

        with pytest.raises(SourceError, match="written to meanwhile") as caught:
            await upload

    assert caught.value.operation == "stage"
    assert all(seen < 64 * MIB for seen in received)  # the cloud never got the whole file
