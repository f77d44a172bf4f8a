"""OVA and OVF sources end to end: each VM disk streamed from its file or byte range, verified
against Glance and the export's .mf, with the OVF's properties on the image."""

from __future__ import annotations

import csv
import hashlib
import io
import tarfile
from pathlib import Path

from tests.fixtures.batch import migrate, rows_of, submit_manifest
from tests.fixtures.cli import run_cli
from worker.intake.sampledisks import SampleDisk, SampleVm, pack_ova, write_ova, write_ovf_directory
from worker.sandbox import Sandbox


def _member_bytes(ova: Path, name: str) -> bytes:
    with tarfile.open(ova) as archive:
        member = archive.extractfile(name)
        assert member is not None
        return member.read()


async def test_an_ova_with_two_disks_ends_done_verified_with_the_ovf_properties(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    ova = write_ova(tmp_path / "web01.ova", [SampleVm("web01", memory_mib=3000)])
    job_id = await submit_manifest(
        database_url,
        tmp_path,
        {
            "job": "ova",
            "defaults": {"es_virtio_enabled": "no"},
            "disks": [{"source": str(ova), "properties": {"owner_team": "web"}}],
        },
    )

    summary = await migrate(database_url, sandbox)

    assert summary.by_phase == {"done": 2}
    rows = await rows_of(database_url, job_id)
    images = {image["name"]: image for image in sandbox.images()}
    for number in (1, 2):
        name = f"web01-disk{number}"
        data = _member_bytes(ova, f"{name}.vmdk")
        row = rows[name]
        assert row.verification == "verified"
        assert row.source_path == str(ova)
        assert row.glance_size == row.source_size_bytes == len(data)
        assert row.source_hash_value == row.glance_os_hash_value
        assert row.source_hash_value == hashlib.sha512(data).hexdigest()
        image = images[name]
        assert image["status"] == "active"
        assert image["disk_format"] == "vmdk"
        assert (image["min_ram"], image["min_disk"]) == (3000, 1)
        assert image["hw_firmware_type"] == "uefi"
        assert (image["os_type"], image["os_distro"]) == ("linux", "ubuntu")
        assert image["vmware_ostype"] == "ubuntu64Guest"
        assert (image["hw_disk_bus"], image["vmware_adaptertype"]) == ("scsi", "lsiLogic")
        assert (image["vm_name"], image["vm_disk_index"]) == ("web01", str(number))
        assert image["owner_team"] == "web"
        assert "hw_vif_model" not in image
        assert "vm_name" in row.spec["appliance"]["from_ovf"]
        assert row.spec["appliance"]["vm_name"] == "web01"
    assert len(images) == 2


async def test_an_ovf_directory_with_two_disks_gives_the_boot_disk_virtio(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    vm = SampleVm(
        "win01",
        guest_id="windows2019srv_64Guest",
        firmware="bios",
        disks=(SampleDisk(bus="sata"), SampleDisk(bus="ide", virtual_size_bytes=2 << 30)),
    )
    ovf = write_ovf_directory(tmp_path / "export", [vm], name="win01")
    job_id = await submit_manifest(
        database_url,
        tmp_path,
        {"job": "ovf", "disks": [{"source": str(ovf), "name": "app", "hw_vif_model": "e1000"}]},
    )

    summary = await migrate(database_url, sandbox)

    assert summary.by_phase == {"done": 2}
    rows = await rows_of(database_url, job_id)
    images = {image["name"]: image for image in sandbox.images()}
    # IDE boots before SATA: the IDE disk is the first.
    boot, data = images["app-disk1"], images["app-disk2"]
    assert rows["app-disk1"].source_path == str(tmp_path / "export" / "win01-disk2.vmdk")
    assert (
        rows["app-disk1"].source_size_bytes == (tmp_path / "export/win01-disk2.vmdk").stat().st_size
    )
    assert (boot["hw_disk_bus"], boot["hw_vif_model"]) == ("virtio", "e1000")  # the manifest's
    assert (boot["vmware_adaptertype"], boot["min_disk"]) == ("ide", 2)
    assert (data["hw_disk_bus"], data.get("vmware_adaptertype")) == ("sata", None)
    assert (boot["os_type"], boot["os_distro"], boot["hw_firmware_type"]) == (
        "windows", "windows", "bios",
    )  # fmt: skip
    assert rows["app-disk1"].verification in ("verified", "transformed")
    assert "hw_vif_model" not in rows["app-disk1"].spec["appliance"]["from_ovf"]


def db01_with_disk2_tampered(tmp_path: Path) -> Path:
    """The OVF export of VM db01 with one byte of disk2 flipped inside the grains: the headers
    still read as before, but the bytes no longer match the manifest's digest."""
    ovf = write_ovf_directory(tmp_path / "parts", [SampleVm("db01")], name="db01")
    disk = ovf.parent / "db01-disk2.vmdk"
    data = bytearray(disk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    disk.write_bytes(bytes(data))
    return ovf


async def test_a_tampered_disk_fails_with_source_digest_mismatch_and_leaves_no_image(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    ovf = db01_with_disk2_tampered(tmp_path)
    ova = pack_ova(ovf, tmp_path / "db01.ova")
    job_id = await submit_manifest(
        database_url,
        tmp_path,
        {
            "job": "tampered",
            "defaults": {"es_virtio_enabled": "no"},
            "disks": [{"source": str(ova)}],
        },
    )

    summary = await migrate(database_url, sandbox)

    assert summary.by_phase == {"done": 1, "failed": 1}
    rows = await rows_of(database_url, job_id)
    failed = rows["db01-disk2"]
    assert failed.phase == "failed"
    assert failed.error_code == "source_digest_mismatch"
    expected = hashlib.sha256(_member_bytes(ova, "db01-disk2.vmdk")).hexdigest()
    assert expected in (failed.error_message or "")  # the digest of the bytes read
    assert failed.spec["expected_digest"]["value"] in (failed.error_message or "")
    assert failed.spec["expected_digest"]["value"] != expected
    assert failed.cleanup == "deleted"
    assert rows["db01-disk1"].phase == "done"
    assert [image["name"] for image in sandbox.images()] == ["db01-disk1"]


async def test_a_multi_vm_ovf_names_each_vms_images_after_it(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    vms = [
        SampleVm("app-db", disks=(SampleDisk(),), guest_id="rhel8_64Guest"),
        SampleVm("app-web", disks=(SampleDisk(),), seed=1),
    ]
    ovf = write_ovf_directory(tmp_path / "vapp", vms, name="app")
    job_id = await submit_manifest(
        database_url,
        tmp_path,
        {"job": "vapp", "defaults": {"es_virtio_enabled": "no"}, "disks": [{"source": str(ovf)}]},
    )

    summary = await migrate(database_url, sandbox)

    assert summary.by_phase == {"done": 2}
    rows = await rows_of(database_url, job_id)
    assert {name: row.verification for name, row in rows.items()} == {
        "app-db-disk1": "verified",
        "app-web-disk1": "verified",
    }
    images = {image["name"]: image for image in sandbox.images()}
    assert images["app-db-disk1"]["vm_name"] == "app-db"
    assert images["app-db-disk1"]["os_distro"] == "rhel"
    assert images["app-web-disk1"]["vm_name"] == "app-web"


async def test_status_groups_a_vms_disks_and_report_names_the_vm(
    database_url: str, sandbox: Sandbox, env: dict[str, str], tmp_path: Path
) -> None:
    ovf = db01_with_disk2_tampered(tmp_path)
    web = write_ova(tmp_path / "web01.ova", [SampleVm("web01", seed=4)])
    loose = write_ovf_directory(
        tmp_path / "loose", [SampleVm("x", disks=(SampleDisk(),))], name="x"
    )
    job_id = await submit_manifest(
        database_url,
        tmp_path,
        {
            "job": "vms",
            "defaults": {"es_virtio_enabled": "no"},
            "disks": [
                {"source": str(ovf)},
                {"source": str(web)},
                {"source": str(loose.parent / "x-disk1.vmdk"), "name": "plain"},
            ],
        },
    )
    await migrate(database_url, sandbox)

    table = await run_cli("status", job_id, env=env)
    assert table.code == 0, table.err
    assert "  vm db01: failed, 2 disk(s)  done=1  failed=1" in table.out.splitlines()
    assert "  vm web01: done, 2 disk(s)  done=2" in table.out.splitlines()
    as_json = await run_cli("status", job_id, "-f", "json", env=env)
    (job,) = as_json.json()
    assert [(vm["vm_name"], vm["state"], vm["done"], vm["failed"]) for vm in job["vms"]] == [
        ("db01", "failed", 1, 1),
        ("web01", "done", 2, 0),
    ]
    report = await run_cli("report", job_id, "-f", "csv", env=env)
    rows = list(csv.DictReader(io.StringIO(report.out)))
    assert [(row["image_name"], row["vm_name"]) for row in rows] == [
        ("db01-disk1", "db01"),
        ("db01-disk2", "db01"),
        ("web01-disk1", "web01"),
        ("web01-disk2", "web01"),
        ("plain", ""),
    ]
