"""Manifest entries whose source is an OVA or an OVF: a disk per VM disk, checked as loose ones."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest

from worker.errors import InvalidManifest
from worker.intake.manifest import LoadedManifest, load_manifest
from worker.intake.sampledisks import SampleDisk, SampleVm, pack_ova, write_ova, write_ovf_directory


def _load(tmp_path: Path, disks: list[dict[str, object]], **defaults: object) -> LoadedManifest:
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"job": "vms", "defaults": defaults, "disks": disks}))
    return load_manifest(path)


def _problems(tmp_path: Path, disks: list[dict[str, object]]) -> list[str]:
    with pytest.raises(InvalidManifest) as refused:
        _load(tmp_path, disks)
    return [str(problem) for problem in refused.value.problems]


def test_an_ova_becomes_one_disk_per_vm_disk_with_the_ovf_properties(tmp_path: Path) -> None:
    write_ova(tmp_path / "web.ova", [SampleVm("web01", guest_id="windows2019srv_64Guest")])
    loaded = _load(tmp_path, [{"source": "web.ova", "min_ram": 512}], es_virtio_enabled="yes")
    boot, data = loaded.job.disks
    assert (boot.name, data.name) == ("web01-disk1", "web01-disk2")
    assert boot.min_ram == 512  # the manifest's own value wins
    assert (boot.min_disk, data.min_disk) == (1, 1)
    assert boot.properties == {
        "es_virtio_enabled": "yes",
        "hw_firmware_type": "uefi",
        "os_type": "windows",
        "os_distro": "windows",
        "vmware_ostype": "windows2019srv_64Guest",
        "hw_disk_bus": "virtio",
        "hw_vif_model": "virtio",
        "vmware_adaptertype": "lsiLogic",
        "vm_name": "web01",
        "vm_disk_index": "1",
    }
    assert data.properties["hw_disk_bus"] == "scsi"
    assert boot.appliance is not None
    assert "min_ram" not in boot.appliance["from_ovf"]  # type: ignore[operator]
    assert "min_disk" in boot.appliance["from_ovf"]  # type: ignore[operator]
    # Each disk is its member's byte range of the one archive.
    assert boot.source == data.source == str(tmp_path / "web.ova")
    assert boot.source_identity is not None
    assert data.source_identity is not None
    with (tmp_path / "web.ova").open("rb") as file:
        file.seek(int(boot.source_identity["offset"]))
        assert file.read(4) == b"KDMV"
    assert boot.size_bytes < (tmp_path / "web.ova").stat().st_size
    assert boot.expected_digest is not None
    assert boot.expected_digest["algorithm"] == "sha256"
    assert loaded.warnings == ()


def test_a_multi_vm_ovf_names_each_vms_disks_after_it(tmp_path: Path) -> None:
    vms = [SampleVm("db", guest_id="rhel8_64Guest"), SampleVm("app", seed=1, firmware="bios")]
    write_ovf_directory(tmp_path / "vapp", vms, name="vapp")
    loaded = _load(tmp_path, [{"source": "vapp/vapp.ovf", "tags": ["vapp"]}])
    assert [(d.name, d.properties["vm_name"]) for d in loaded.job.disks] == [
        ("db-disk1", "db"), ("db-disk2", "db"), ("app-disk1", "app"), ("app-disk2", "app"),
    ]  # fmt: skip
    assert [d.properties["hw_firmware_type"] for d in loaded.job.disks] == ["uefi"] * 2 + [
        "bios"
    ] * 2
    assert loaded.job.disks[0].properties["os_distro"] == "rhel"
    assert loaded.job.disks[0].source == str(tmp_path / "vapp" / "db-disk1.vmdk")
    assert all(d.tags == ("vapp",) for d in loaded.job.disks)
    assert [d.disk_index for d in loaded.job.disks] == [0, 1, 2, 3]
    named = _load(tmp_path, [{"source": "vapp/vapp.ovf", "name": "shop"}])
    assert named.job.disks[2].name == "shop-app-disk1"


def test_names_stay_unique_and_problems_name_the_entry(tmp_path: Path) -> None:
    write_ova(tmp_path / "web.ova", [SampleVm("web01")])
    problems = _problems(
        tmp_path, [{"source": "web.ova"}, {"source": "web.ova"}, {"source": "missing.vmdk"}]
    )
    assert problems == [
        "disks[1].name: duplicate image name 'web01-disk1': disks[0] and disks[1] "
        "(disk web01-disk1)",
        "disks[1].name: duplicate image name 'web01-disk2': disks[0] and disks[1] "
        "(disk web01-disk2)",
        f"disks[2].source: no such file: {tmp_path / 'missing.vmdk'}",
    ]
    assert len(_load(tmp_path, [{"source": "web.ova"}, {"source": "web.ova", "name": "b"}])
               .job.disks) == 4  # fmt: skip


def _export(tmp_path: Path, **changes: bytes) -> Path:
    """An OVF export of one VM whose files are then changed (name -> new content)."""
    ovf = write_ovf_directory(tmp_path / "parts", [SampleVm("v")], name="v", manifest=False)
    for name, content in changes.items():
        (ovf.parent / name).write_bytes(content)
    return ovf


FLAT = b'# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType="monolithicFlat"\nRW 32768 FLAT "v-flat.vmdk" 0\n'  # noqa: E501


def test_bad_exports_are_refused_naming_the_entry(tmp_path: Path) -> None:
    cases: dict[str, Path] = {}
    no_ovf = tmp_path / "no-ovf.ova"
    with tarfile.open(no_ovf, "w", format=tarfile.USTAR_FORMAT) as archive:
        archive.add(_export(tmp_path / "a").parent / "v-disk1.vmdk", arcname="v-disk1.vmdk")
    cases["no-ovf"] = no_ovf
    flat = _export(tmp_path / "b", **{"v-disk2.vmdk": FLAT})
    cases["flat"] = pack_ova(flat, tmp_path / "flat.ova")
    whole = write_ova(tmp_path / "whole.ova", [SampleVm("v")])
    truncated = tmp_path / "truncated.ova"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2 + 4096])  # in disk2
    cases["truncated"] = truncated
    missing = _export(tmp_path / "c")
    (missing.parent / "v-disk2.vmdk").unlink()
    cases["missing"] = missing
    for name, href in (("dotdot", "../v-disk2.vmdk"), ("absolute", "/etc/hostname")):
        ovf = _export(tmp_path / name)
        ovf.write_text(ovf.read_text().replace('"v-disk2.vmdk"', f'"{href}"'))
        cases[name] = ovf
    resized = _export(tmp_path / "d")
    resized.write_text(resized.read_text().replace('ovf:capacity="16777216"', 'ovf:capacity="8"'))
    cases["capacity"] = resized
    entries: list[dict[str, object]] = [
        {"source": str(path), "name": name} for name, path in cases.items()
    ]
    problems = _problems(tmp_path, entries)
    expected = {
        "no-ovf": "an OVA with no OVF: the tar archive's first member 'v-disk1.vmdk'",
        "flat": "VMDK subformat monolithicFlat is a descriptor",
        "truncated": "truncated archive: member 'v-disk",
        "missing": "the OVF names file 'v-disk2.vmdk' for disk 'vmdisk2' of VM 'v', which is "
        "missing",
        "dotdot": "unsafe ovf:href '../v-disk2.vmdk'",
        "absolute": "unsafe ovf:href '/etc/hostname'",
        "capacity": "has a virtual size of 16777216 bytes, the OVF gives the disk a capacity "
        "of 8 bytes (disk capacity-disk1)",
    }
    assert len(problems) == len(expected), problems
    for index, (name, message) in enumerate(expected.items()):
        assert problems[index].startswith(f"disks[{index}].source: "), (name, problems[index])
        assert message in problems[index], (name, problems[index])
    assert "(disk flat-disk2)" in problems[1]


def test_an_export_without_mf_warns_and_a_cert_is_reported(tmp_path: Path) -> None:
    ovf = write_ovf_directory(tmp_path / "e", [SampleVm("v")], name="v", manifest=False)
    ovf.with_suffix(".cert").write_text("-----BEGIN CERTIFICATE-----\n")
    loaded = _load(tmp_path, [{"source": str(ovf)}])
    assert [str(w) for w in loaded.warnings] == [
        "disks[0].source: no manifest (.mf): the disks' digests cannot be checked",
        "disks[0].source: the export is signed (.cert): the signature is not verified; the "
        ".mf digests are",
    ]
    assert all(d.expected_digest is None for d in loaded.job.disks)


def test_ide_and_sata_disks_get_their_bus(tmp_path: Path) -> None:
    vm = SampleVm("v", disks=(SampleDisk(bus="ide"), SampleDisk(bus="sata")))
    write_ova(tmp_path / "v.ova", [vm])
    loaded = _load(tmp_path, [{"source": "v.ova"}], es_virtio_enabled="no")
    assert [
        (d.properties["hw_disk_bus"], d.properties.get("vmware_adaptertype"))
        for d in loaded.job.disks
    ] == [("ide", "ide"), ("sata", None)]


def test_the_source_root_confines_exports_and_their_disks(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = write_ova(tmp_path / "elsewhere" / "v.ova", [SampleVm("v")])
    ovf = write_ovf_directory(root / "v", [SampleVm("w")], name="w")
    disk = ovf.parent / "w-disk2.vmdk"
    moved = disk.rename(tmp_path / "elsewhere" / "w-disk2.vmdk")
    disk.symlink_to(moved)  # the OVF's file leads outside the root
    path = tmp_path / "job.json"
    path.write_text(
        json.dumps({"job": "j", "disks": [{"source": str(outside)}, {"source": str(ovf)}]})
    )
    with pytest.raises(InvalidManifest) as refused:
        load_manifest(path, source_root=root)
    problems = [str(p) for p in refused.value.problems]
    assert problems == [
        f"disks[0].source: outside the allowed source root {root}: {outside}",
        f"disks[1].source: outside the allowed source root {root}: {moved} (disk w-disk2)",
    ]


def test_an_image_name_too_long_for_glance_is_refused(tmp_path: Path) -> None:
    write_ova(tmp_path / "v.ova", [SampleVm("v")])
    (problem,) = _problems(tmp_path, [{"source": "v.ova", "name": "n" * 250}])
    assert problem.startswith("disks[0].name: the image name nnnn")
    assert "256 characters, more than Glance's 255" in problem


def test_settings_that_cannot_apply_to_an_export_are_refused(tmp_path: Path) -> None:
    write_ova(tmp_path / "v.ova", [SampleVm("v")])
    problems = _problems(
        tmp_path,
        [
            {"source": "v.ova", "flat_as_raw": True},
            {"source": "v.ova", "name": "w", "disk_format": "raw"},
        ],
    )
    assert problems == [
        "disks[0].flat_as_raw: does not apply to an OVA source",
        "disks[1].disk_format: the disks of an OVA are VMDKs: leave it vmdk",
    ]


def test_a_fifo_or_a_device_as_source_is_not_opened_as_an_export(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.ova"
    os.mkfifo(fifo)
    problems = _problems(tmp_path, [{"source": str(fifo)}, {"source": "/dev/zero"}])
    assert problems == [
        f"disks[0].source: not a regular file: {fifo}",
        "disks[1].source: not a regular file: /dev/zero",
    ]
