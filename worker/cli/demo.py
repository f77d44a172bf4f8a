"""`make demo`: a generated batch migrated into the sandbox cloud, on the embedded database.

Everything is real but local: sample VMDKs written to disk, the sandbox cloud served over
HTTP on loopback, an embedded PostgreSQL, and the same worker code a production run uses.
One disk is named so that the sandbox fails its virtio injection, as the vendor's cloud
reports it, to show what a failure looks like in the results. One VM comes as an OVA, as
vSphere exports it: its two disks are uploaded straight from the archive, with the
properties its OVF gives.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import click

from worker.cli.report import print_job_status
from worker.config import environment, load_cloud_settings
from worker.intake.manifest import load_manifest
from worker.intake.sampledisks import SampleDisk, SampleVm, write_ova, write_sample_batch
from worker.run.app import run_worker
from worker.run.settings import WorkerSettings
from worker.sandbox import Sandbox, SandboxConfig
from worker.store.embedded import resolve_database_url
from worker.store.store import open_store

FAILING_SUFFIX = "-virtio-broken"
FILL_BYTES = 4 << 20  # real data per sample disk, so every disk has its own hash
DEMO_LINK_BYTES_PER_S = 1 << 20
# The VM exported as an OVA: a boot disk and a data disk.
DEMO_VM = SampleVm(
    "demo-vm",
    disks=(SampleDisk(64 << 20, fill_bytes=FILL_BYTES), SampleDisk(64 << 20, fill_bytes=1 << 20)),
    seed=7,
)
OVA_DISKS = len(DEMO_VM.disks)


def write_demo_manifest(workdir: Path, *, disks: int) -> Path:
    """Generate the sample disks and a manifest naming them; returns the manifest's path."""
    disk_dir = workdir / "disks"
    disk_dir.mkdir(parents=True, exist_ok=True)
    paths = write_sample_batch(disk_dir, count=disks, fill_bytes=FILL_BYTES, seed=7)
    entries = []
    for number, path in enumerate(paths):
        name = f"demo-{number:02d}"
        if number == len(paths) - 1:
            name += FAILING_SUFFIX
        entries.append({"source": str(path.relative_to(workdir)), "name": name})
    ova = write_ova(workdir / "exports" / "demo-vm.ova", [DEMO_VM])
    entries.append({"source": str(ova.relative_to(workdir))})  # demo-vm-disk1, demo-vm-disk2
    manifest = {
        "job": "demo",
        "defaults": {
            "disk_format": "vmdk",
            "container_format": "bare",
            "es_virtio_enabled": "yes",
            "os_type": "linux",
            "hw_disk_bus": "virtio",
            "tags": ["vmdk-migrate-demo"],
        },
        "disks": entries,
    }
    path = workdir / "demo.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


async def run_demo(*, disks: int, workdir: Path) -> int:
    """Submit and migrate the demo batch; 0 when the outcome is the expected one."""
    manifest_path = await asyncio.to_thread(write_demo_manifest, workdir, disks=disks)
    loaded = await asyncio.to_thread(load_manifest, manifest_path)
    database_url = await asyncio.to_thread(resolve_database_url, environment())
    config = SandboxConfig(
        virtio_fail_names=(f"*{FAILING_SUFFIX}",),
        import_latency_s=0.5,
        # The demo shows verified hashes; the sandbox can also rewrite data like the vendor's
        # driver injection does (then rows are marked `transformed`), see the README.
        rewrite_virtio=False,
        # A modest link, so that on a terminal the progress bars are seen moving.
        stage_rate_bytes_per_s=DEMO_LINK_BYTES_PER_S,
    )
    async with Sandbox(config).serve(host="127.0.0.1", port=0) as cloud_server:
        cloud = load_cloud_settings(cloud_server.os_environment())
        async with open_store(database_url) as store:
            job_id = await store.submit_job(
                loaded.job, manifest=loaded.document, manifest_sha256=loaded.sha256
            )
        click.echo(
            f"submitted job {job_id} ({disks} disks and an OVA of {OVA_DISKS}) to the sandbox cloud"
        )
        settings = WorkerSettings(concurrency=4, stage_concurrency=2, once=True, idle_poll_s=0.2)
        await run_worker(
            database_url=database_url, cloud=cloud, settings=settings, stop=asyncio.Event()
        )
        async with open_store(database_url) as store:
            summary = (await store.job_summaries(str(job_id)))[0]
            rows = await store.result_rows(job_id)
    print_job_status(summary, rows)
    failed = [row for row in rows if row.phase == "failed"]
    done = [row for row in rows if row.phase == "done"]
    expected = len(done) == disks - 1 + OVA_DISKS and [r.error_code for r in failed] == [
        "virtio_failed"
    ]
    click.echo("demo: as expected" if expected else "demo: UNEXPECTED outcome")
    return 0 if expected else 1
