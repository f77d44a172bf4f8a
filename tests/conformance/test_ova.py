"""An OVA of qemu-img streamOptimized disks migrated into the cloud under test: each disk is
uploaded from its byte range of the archive, and the OVF's properties are on the images."""

from __future__ import annotations

import asyncio
import hashlib
import json
import tarfile
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conformance.conftest import Target
from tests.conformance.helpers import cloud_of
from worker.core.machine import Policies
from worker.core.policy import PollPolicy, RetryPolicy
from worker.intake.manifest import load_manifest
from worker.intake.sampledisks import SampleDisk, SampleVm, write_ova
from worker.run.app import run_worker
from worker.run.settings import WorkerSettings
from worker.store.store import open_store

pytestmark = pytest.mark.conformance

MIB = 1 << 20
FAST = Policies(
    retry=RetryPolicy(base_delay_s=0.2, max_delay_s=1.0, quota_delay_s=0.5),
    poll=PollPolicy(first_delay_s=0.05, max_delay_s=0.25, tasks_every_s=0.3),
)
BATCH_TIMEOUT_S = 120.0


async def _image(target: Target, image_id: object) -> dict[str, Any]:
    async with (
        target.session() as http,
        http.get(target.glance(f"/v2/images/{image_id}")) as answer,
    ):
        assert answer.status == 200, await answer.text()
        body: dict[str, Any] = await answer.json(content_type=None)
        return body


async def _delete(target: Target, image_id: object) -> None:
    async with target.session() as http, http.delete(target.glance(f"/v2/images/{image_id}")):
        pass


async def test_an_ova_ends_done_verified_with_the_ovf_properties(
    target: Target, database_url: str, tmp_path: Path
) -> None:
    vm_name = f"conformance-ova-{uuid.uuid4().hex[:8]}"
    vm = SampleVm(
        vm_name,
        # SATA boots before SCSI: the files' order is the boot order.
        disks=(SampleDisk(64 * MIB, fill_bytes=2 * MIB, bus="sata"), SampleDisk(32 * MIB)),
        guest_id="rhel8_64Guest",
        memory_mib=1024,
    )
    ova = write_ova(tmp_path / "vm.ova", [vm], tar_format=tarfile.PAX_FORMAT, qemu_img=True)
    manifest = tmp_path / "job.json"
    # No virtio rewrite: the sandbox would change the bytes, upstream Glance never does.
    manifest.write_text(
        json.dumps(
            {
                "job": vm_name,
                "defaults": {"es_virtio_enabled": "no"},
                "disks": [{"source": str(ova)}],
            }
        )
    )
    loaded = load_manifest(manifest)
    async with open_store(database_url) as store:
        job_id = await store.submit_job(
            loaded.job, manifest=loaded.document, manifest_sha256=loaded.sha256
        )
    cloud = cloud_of(target)
    settings = WorkerSettings(
        once=True, idle_poll_s=0.1, heartbeat_s=1.0, policies=FAST, progress="off", concurrency=1
    )
    async with asyncio.timeout(BATCH_TIMEOUT_S):
        summary = await run_worker(
            database_url=database_url, cloud=cloud, settings=settings, stop=asyncio.Event()
        )
    async with open_store(database_url) as store:
        rows = {row.image_name: row for row in await store.result_rows(job_id)}
    try:
        assert summary.by_phase == {"done": 2}
        with tarfile.open(ova) as archive:
            for number, (bus, min_disk) in enumerate((("sata", 1), ("scsi", 1)), start=1):
                name = f"{vm_name}-disk{number}"
                member = archive.extractfile(f"{name}.vmdk")
                assert member is not None
                digest = hashlib.sha512(member.read()).hexdigest()
                row = rows[name]
                assert (row.phase, row.verification) == ("done", "verified")
                assert row.source_hash_value == row.glance_os_hash_value == digest
                image = await _image(target, row.glance_image_id)
                assert (image["name"], image["status"], image["disk_format"]) == (
                    name, "active", "vmdk",
                )  # fmt: skip
                assert image["virtual_size"] == vm.disks[number - 1].virtual_size_bytes
                assert (image["min_ram"], image["min_disk"]) == (1024, min_disk)
                assert image["hw_firmware_type"] == "uefi"
                assert (image["os_type"], image["os_distro"]) == ("linux", "rhel")
                assert image["vmware_ostype"] == "rhel8_64Guest"
                assert image["hw_disk_bus"] == bus
                assert (image["vm_name"], image["vm_disk_index"]) == (vm_name, str(number))
    finally:
        for row in rows.values():
            await _delete(target, row.glance_image_id)
