"""Migration scenarios run by the real worker (run_worker and the CLI) on both targets alike."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conformance.conftest import Target
from tests.conformance.helpers import (
    KILLED_DISK_DATA_BYTES,
    KILLED_DISK_VIRTUAL_BYTES,
    MIB,
    VIRTUAL_SIZE_BYTES,
    cloud_of,
    create_type,
    finished,
    first_token_expiry,
    image_answer,
    images_named,
    info_requests,
    log_events,
    os_environment,
    preflight_table,
    qemu_vmdk,
    queue_unchecked,
    refusal,
    rows_of,
    run_batch,
    run_python_module,
    settled_active,
    sha512_of,
    short_lived_tokens,
    start_worker,
    submit,
    submit_document,
    submit_small,
    unique,
    wait_for_row,
    write_manifest,
)
from worker.clients.glance import open_glance
from worker.sandbox.files import FileServer

pytestmark = pytest.mark.conformance


# ---- disks, jobs, targets -----------------------------------------------------------------


@pytest.fixture
async def made(target: Target) -> AsyncIterator[list[str]]:
    """Names of the images a scenario makes; whatever is left of them is deleted after."""
    names: list[str] = []
    yield names
    async with target.session() as http:
        for name in names:
            for image in await images_named(target, name):
                async with http.delete(target.glance(f"/v2/images/{image['id']}")):
                    pass


# ---- worker processes ---------------------------------------------------------------------


# ---- scenarios ----------------------------------------------------------------------------


async def test_a_batch_of_qemu_img_disks_ends_done_with_sizes_and_hashes_verified(
    target: Target, database_url: str, tmp_path: Path, made: list[str]
) -> None:
    subformats = ["monolithicSparse", "streamOptimized", "monolithicSparse", "streamOptimized"]
    disks = {}
    for number, subformat in enumerate(subformats):
        name = unique(f"batch-{number}")
        disks[name] = qemu_vmdk(
            tmp_path / f"{name}.vmdk",
            subformat,
            data_bytes=(number + 1) * MIB,
            virtual_bytes=VIRTUAL_SIZE_BYTES,
        )
        assert create_type(disks[name]) == subformat
    made.extend(disks)
    job_id = await submit(database_url, tmp_path, disks)

    # One image at a time, so that this also holds on the SQLite fallback, where two imports
    # at once can hang an import task for good; test_production.py runs batches at
    # --concurrency 8 when Glance is on MariaDB.
    summary = await run_batch(database_url, target, concurrency=1)

    assert summary.by_phase == {"done": len(disks)}
    rows = await rows_of(database_url, job_id)
    for name, path in disks.items():
        row, digest = rows[name], sha512_of(path)
        assert (row.phase, row.verification, row.error_code) == ("done", "verified", None)
        assert row.glance_size == row.source_size_bytes == path.stat().st_size
        assert row.source_hash_value == row.glance_os_hash_value == digest
        assert row.glance_os_hash_algo == "sha512"
        status, image = await image_answer(target, row.glance_image_id)
        assert status == 200
        assert (image["name"], image["status"]) == (name, "active")
        assert image["os_hash_value"] == digest
        assert image["virtual_size"] == VIRTUAL_SIZE_BYTES


async def test_web_download_reads_a_presigned_url_in_glance_and_is_verified_against_a_sha256(
    target: Target, database_url: str, tmp_path: Path, made: list[str]
) -> None:
    name = unique("web-download")
    made.append(name)
    signature = uuid.uuid4().hex
    async with FileServer(tmp_path / "web", signature=signature).serve() as web:
        web.root.mkdir()
        disk = qemu_vmdk(
            web.root / f"{name}.vmdk",
            "streamOptimized",
            data_bytes=2 * MIB,
            virtual_bytes=VIRTUAL_SIZE_BYTES,
        )
        sha256 = hashlib.sha256(disk.read_bytes()).hexdigest()
        manifest = {
            "job": unique("web-download"),
            "defaults": {"es_virtio_enabled": "no", "import_method": "web-download"},
            "disks": [
                {"source": web.presigned_url(disk.name), "source_digest": f"sha256:{sha256}"}
            ],
        }
        job_id = await submit_document(database_url, tmp_path, manifest)

        summary = await run_batch(database_url, target)

    assert summary.by_phase == {"done": 1}
    row = (await rows_of(database_url, job_id))[name]
    assert (row.phase, row.verification, row.error_code) == ("done", "verified", None)
    assert row.glance_size == disk.stat().st_size
    assert row.glance_os_hash_value == sha512_of(disk)
    assert row.bytes_staged == 0  # nothing passed through the worker to Glance
    assert row.source_path.endswith("X-Amz-Signature=***")  # Glance had it; the row does not
    assert all(served.status < 400 for served in web.served)
    # Glance's own download (no Range), and the worker's read to hash the source in sha512.
    reads = [served.range for served in web.gets(disk.name)]
    assert None in reads
    assert "bytes=0-" in reads


async def test_a_non_vmdk_file_forced_past_preflight_fails_with_import_failed(
    target: Target, database_url: str, tmp_path: Path, made: list[str]
) -> None:
    name = unique("not-vmdk")
    made.append(name)
    path = tmp_path / "random.vmdk"
    path.write_bytes(os.urandom(MIB))
    # Straight into the queue: the manifest checks would refuse this file before a byte moved.
    job_id = await queue_unchecked(database_url, name, path, MIB, job_stem="forced")

    summary = await run_batch(database_url, target)

    assert summary.by_phase == {"failed": 1}
    row = (await rows_of(database_url, job_id))[name]
    assert (row.phase, row.error_code, row.cleanup) == ("failed", "import_failed", "deleted")
    assert row.error_message
    assert (await image_answer(target, row.glance_image_id))[0] == 404
    assert await images_named(target, name) == []


async def test_glance_client_maps_each_refusal_to_its_error_class(
    target: Target, tmp_path: Path, made: list[str]
) -> None:
    name = unique("refusals")
    made.append(name)
    disk = qemu_vmdk(
        tmp_path / "disk.vmdk", "monolithicSparse", data_bytes=MIB, virtual_bytes=VIRTUAL_SIZE_BYTES
    )
    size_bytes = disk.stat().st_size
    outcomes = {}
    async with open_glance(cloud_of(target)) as glance:
        body = {"name": name, "disk_format": "vmdk", "container_format": "bare"}
        image_id = (await glance.create_image(body)).id
        request_id = f"req-{uuid.uuid4()}"
        outcomes["import never staged"] = await refusal(
            glance.import_image(image_id, request_id=request_id)
        )
        await glance.stage(image_id, disk, size_bytes=size_bytes)
        # Its own session: real Glance refuses this upload before reading the body and then
        # drops the connection, which aiohttp has already pooled; the next request sent on it
        # would fail as ConnectionFailed (retryable, so the worker copes) whatever its answer.
        async with open_glance(cloud_of(target)) as once:
            outcomes["stage after stage"] = await refusal(
                once.stage(image_id, disk, size_bytes=size_bytes)
            )
        await glance.import_image(image_id, request_id=f"req-{uuid.uuid4()}")
        await settled_active(glance, image_id)
        outcomes["import after active"] = await refusal(
            glance.import_image(image_id, request_id=f"req-{uuid.uuid4()}")
        )
        await glance.delete_image(image_id)
        outcomes["delete twice"] = await refusal(glance.delete_image(image_id))

    assert outcomes == {
        "import never staged": ("Conflict", 409),
        "stage after stage": ("Conflict", 409),
        "import after active": ("Conflict", 409),
        "delete twice": ("NotFound", 404),
    }


@pytest.fixture(scope="module")
def big_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A monolithicSparse VMDK with 256 MiB of random data, made once for both targets."""
    directory = tmp_path_factory.mktemp("big")
    return qemu_vmdk(
        directory / "big.vmdk",
        "monolithicSparse",
        data_bytes=KILLED_DISK_DATA_BYTES,
        virtual_bytes=KILLED_DISK_VIRTUAL_BYTES,
    )


async def test_a_worker_killed_mid_stage_finishes_the_image_after_a_restart(
    target: Target, database_url: str, big_disk: Path, tmp_path: Path, made: list[str]
) -> None:
    name = unique("killed")
    made.append(name)
    job_id = await submit(database_url, tmp_path, {name: big_disk})
    env = os_environment(target, database_url)
    log_path = tmp_path / "worker.log"

    # A short lease, so that the restarted worker may take the image over within seconds.
    first = await start_worker(env, log_path, "--once", "--lease", "2")
    try:
        mid_stage = await wait_for_row(
            database_url, name, "phase = 'staging' AND bytes_staged > 0", timeout_s=60.0
        )
    finally:
        first.send_signal(signal.SIGKILL)
        await first.wait()
    assert first.returncode == -signal.SIGKILL
    killed = await wait_for_row(database_url, name, "true", timeout_s=1.0)
    assert killed["phase"] == "staging", f"the stage ended before the kill: {dict(killed)}"
    assert 0 < mid_stage["bytes_staged"] < killed["source_size_bytes"]

    await wait_for_row(database_url, name, "lease_expires_at < now()", timeout_s=10.0)
    second = await start_worker(env, log_path, "--once")
    assert await finished(second) == 0, log_path.read_text()[-3000:]

    row = (await rows_of(database_url, job_id))[name]
    assert (row.phase, row.verification, row.attempts) == ("done", "verified", 2)
    assert row.glance_os_hash_value == sha512_of(big_disk)
    images = await images_named(target, name)
    assert [(image["id"], image["status"]) for image in images] == [
        (str(row.glance_image_id), "active")
    ]


async def test_a_token_that_expires_mid_batch_is_renewed(
    target: Target, database_url: str, tmp_path: Path, made: list[str]
) -> None:
    names = [unique(f"token-{number}") for number in range(5)]
    made.extend(names)
    log_path = tmp_path / "worker.log"
    async with short_lived_tokens(target) as (cloud, lifetime_s):
        worker = await start_worker(os_environment(cloud, database_url), log_path)
        try:
            job_ids = [await submit_small(database_url, tmp_path, names[0])]
            expiry = first_token_expiry(log_path)
            # Small disks paced over the first token's life; the last comes after it expired,
            # so only a renewed token can migrate it.
            for name, before_expiry_s in zip(
                names[1:],
                [0.75 * lifetime_s, 0.5 * lifetime_s, 0.25 * lifetime_s, -1.0],
                strict=True,
            ):
                due_s = expiry.timestamp() - before_expiry_s
                await asyncio.sleep(max(0.0, due_s - time.time()))
                job_ids.append(await submit_small(database_url, tmp_path, name))
        finally:
            worker.send_signal(signal.SIGTERM)
            assert await finished(worker, timeout_s=30.0) == 0, log_path.read_text()[-3000:]

    rows = [row for job_id in job_ids for row in (await rows_of(database_url, job_id)).values()]
    assert [(row.phase, row.verification) for row in rows] == [("done", "verified")] * 5
    events = [e["event"] for e in log_events(log_path)]
    assert events.count("auth.token_issued") == 1
    assert events.count("auth.token_renewed") >= 1, events
    assert rows[-1].finished_at is not None
    assert rows[-1].finished_at > expiry


async def test_validate_online_reads_the_cloud_and_exits_0(target: Target, tmp_path: Path) -> None:
    name = unique("validate")
    disk = qemu_vmdk(
        tmp_path / "disk.vmdk", "streamOptimized", data_bytes=MIB, virtual_bytes=VIRTUAL_SIZE_BYTES
    )
    manifest = write_manifest(tmp_path, name, {name: disk})
    requests_before = info_requests(target)

    code, text, err = await run_python_module(
        "worker", "validate", "--online", str(manifest), env=os_environment(target), timeout_s=60
    )

    assert code == 0, text + err
    findings = preflight_table(text)
    assert all(status != "BLOCKING" for status, _ in findings.values()), text
    assert findings["import method"] == (
        "ok",
        "glance-direct is enabled (glance-direct, web-download, copy-image)",
    )
    assert findings["stores"] == ("ok", "1 store(s): fs (default)")
    assert findings["quota"] == ("ok", "no unified limits reported: Glance enforces no quota")
    assert text.rstrip().endswith("the cloud can take this job")
    if requests_before is not None:
        after = info_requests(target)
        assert after is not None
        assert {path: after[path] - requests_before[path] for path in after} == {
            "/v2/info/import": 1,
            "/v2/info/stores": 1,
            "/v2/info/usage": 1,
        }
