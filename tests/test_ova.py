"""OVA archives read by their headers only, and OVF exports read as manifest sources."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from tests.fixtures.archives import tar_bytes
from worker.errors import UnsupportedDisk
from worker.intake.appliance import OVA, OVF, open_appliance, parse_mf, sniff
from worker.intake.ova import is_tar, read_members
from worker.intake.sampledisks import SampleDisk, SampleVm, write_ova, write_ovf_directory

FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}
LONG = "a-virtual-machine-with-a-name-that-goes-on-" + "and-on-" * 10 + "end"


def _tar(path: Path, files: dict[str, bytes], tar_format: int) -> None:
    path.write_bytes(tar_bytes(files, tar_format))


@pytest.mark.parametrize("kind", ["gnu", "pax"])
def test_members_are_found_at_their_byte_range_also_with_long_names(
    tmp_path: Path, kind: str
) -> None:
    files = {"vm.ovf": b"<Envelope/>", f"{LONG}-disk1.vmdk": b"x" * 1000, "b": b"\1" * 513}
    assert len(f"{LONG}-disk1.vmdk") > 100
    path = tmp_path / "vm.ova"
    _tar(path, files, FORMATS[kind])
    with path.open("rb") as file:
        members = read_members(file)
        assert [m.name for m in members] == list(files)
        for member in members:
            file.seek(member.offset)
            assert file.read(member.size_bytes) == files[member.name]


def test_a_ustar_archive_with_a_prefixed_name(tmp_path: Path) -> None:
    name = "d" * 60 + "/" + "e" * 60  # too long for the name field: USTAR splits off a prefix
    path = tmp_path / "x.ova"
    _tar(path, {name: b"data"}, tarfile.USTAR_FORMAT)
    with path.open("rb") as file:
        (member,) = read_members(file)
    assert (member.name, member.size_bytes) == (name, 4)


def test_a_truncated_archive_is_refused_naming_the_member(tmp_path: Path) -> None:
    path = tmp_path / "cut.ova"
    _tar(path, {"vm.ovf": b"<Envelope/>", "vm-disk1.vmdk": b"x" * 5000}, tarfile.USTAR_FORMAT)
    data = path.read_bytes()
    path.write_bytes(data[:3000])
    with path.open("rb") as file, pytest.raises(UnsupportedDisk, match=r"truncated.*vm-disk1"):
        read_members(file)
    path.write_bytes(data[:700])  # inside the second header
    with path.open("rb") as file, pytest.raises(UnsupportedDisk, match="truncated"):
        read_members(file)
    path.write_bytes(data[:1024])  # between two members
    with path.open("rb") as file, pytest.raises(UnsupportedDisk, match="end-of-archive"):
        read_members(file)


def test_sources_are_recognised_by_content_not_by_name(tmp_path: Path) -> None:
    ova = write_ova(tmp_path / "a" / "web.ova", [SampleVm("web")])
    renamed = ova.rename(tmp_path / "web.bin")
    ovf = write_ovf_directory(tmp_path / "dir", [SampleVm("web")], name="web")
    assert sniff(str(renamed)) == OVA
    assert sniff(str(ovf.rename(ovf.with_suffix(".xml")))) == OVF
    assert sniff(str(tmp_path / "dir" / "web-disk1.vmdk")) is None
    assert is_tar(renamed.read_bytes()[:512])


@pytest.mark.parametrize("kind", ["ustar", "gnu", "pax"])
def test_an_ova_gives_each_disk_its_member_and_digest(tmp_path: Path, kind: str) -> None:
    vm = SampleVm(LONG if kind != "ustar" else "web", seed=3)
    path = write_ova(tmp_path / "vm.ova", [vm], tar_format=FORMATS[kind])
    appliance = open_appliance(str(path), OVA)
    assert appliance.warnings == ()
    with tarfile.open(path) as archive:
        for disk, number in zip(appliance.disks, (1, 2), strict=True):
            expected = archive.extractfile(f"{vm.name}-disk{number}.vmdk")
            assert expected is not None
            with path.open("rb") as file:
                file.seek(disk.offset or 0)
                data = file.read(disk.size_bytes)
            assert data == expected.read()
            assert disk.digest is not None
            assert disk.digest.algorithm == "sha256"
    assert [d.capacity_bytes for d in appliance.disks] == [16 << 20, 24 << 20]


def test_an_ovf_directory_gives_the_loose_files(tmp_path: Path) -> None:
    ovf = write_ovf_directory(tmp_path, [SampleVm("a"), SampleVm("b", seed=1)], name="app")
    appliance = open_appliance(str(ovf), OVF)
    assert [(d.vm.name, Path(d.path).name, d.offset) for d in appliance.disks] == [
        ("a", "a-disk1.vmdk", None),
        ("a", "a-disk2.vmdk", None),
        ("b", "b-disk1.vmdk", None),
        ("b", "b-disk2.vmdk", None),
    ]


def test_no_mf_is_a_warning_and_a_cert_is_reported(tmp_path: Path) -> None:
    ovf = write_ovf_directory(tmp_path, [SampleVm("a")], name="a", manifest=False)
    (tmp_path / "a.cert").write_text("-----BEGIN CERTIFICATE-----\n")
    appliance = open_appliance(str(ovf), OVF)
    assert all(d.digest is None for d in appliance.disks)
    assert any("no manifest (.mf)" in w for w in appliance.warnings)
    assert any("not verified" in w for w in appliance.warnings)


def test_an_envelope_that_does_not_match_its_mf_is_refused(tmp_path: Path) -> None:
    ovf = write_ovf_directory(tmp_path, [SampleVm("a")], name="a")
    ovf.write_text(ovf.read_text().replace("2048MB", "4096MB"))
    with pytest.raises(UnsupportedDisk, match=r"does not match the manifest a\.mf"):
        open_appliance(str(ovf), OVF)


@pytest.mark.parametrize(
    ("href", "message"),
    [
        ("../outside.vmdk", "unsafe ovf:href"),
        ("/etc/passwd", "unsafe ovf:href"),
        ("http://example.com/a.vmdk", "unsafe ovf:href"),
        ("gone.vmdk", "which is missing"),
    ],
)
def test_bad_hrefs_are_refused(tmp_path: Path, href: str, message: str) -> None:
    ovf = write_ovf_directory(tmp_path, [SampleVm("a")], name="a", manifest=False)
    ovf.write_text(ovf.read_text().replace('"a-disk2.vmdk"', f'"{href}"'))
    with pytest.raises(UnsupportedDisk, match=message):
        open_appliance(str(ovf), OVF)


def test_gzip_disks_are_refused_naming_the_ovftool_option(tmp_path: Path) -> None:
    ovf = write_ovf_directory(tmp_path, [SampleVm("a")], name="a", manifest=False)
    text = ovf.read_text().replace('ovf:id="file1"', 'ovf:id="file1" ovf:compression="gzip"')
    ovf.write_text(text)
    with pytest.raises(UnsupportedDisk, match="--compress"):
        open_appliance(str(ovf), OVF)


def test_an_ova_whose_first_member_is_not_an_ovf_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.ova"
    _tar(path, {"disk.vmdk": b"KDMV" + bytes(600)}, tarfile.USTAR_FORMAT)
    with pytest.raises(UnsupportedDisk, match="an OVA with no OVF"):
        open_appliance(str(path), OVA)


def test_an_ova_missing_a_disk_the_ovf_names_is_refused(tmp_path: Path) -> None:
    source = write_ovf_directory(tmp_path / "parts", [SampleVm("a")], name="a", manifest=False)
    path = tmp_path / "a.ova"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
        archive.add(source, arcname="a.ovf")
        archive.add(source.parent / "a-disk1.vmdk", arcname="a-disk1.vmdk")
    with pytest.raises(UnsupportedDisk, match=r"'a-disk2\.vmdk'.*which the OVA does not hold"):
        open_appliance(str(path), OVA)


def test_mf_lines_in_each_algorithm() -> None:
    text = (
        b"SHA1(a.ovf)= " + b"a" * 40 + b"\n"
        b"SHA256(a-disk1.vmdk)= " + b"B" * 64 + b"\n"
        b"SHA512(a-disk2.vmdk)=" + b"c" * 128 + b"\n"
    )
    digests = parse_mf(text, "a.mf")
    assert {name: (d.algorithm, d.value[:2]) for name, d in digests.items()} == {
        "a.ovf": ("sha1", "aa"),
        "a-disk1.vmdk": ("sha256", "bb"),
        "a-disk2.vmdk": ("sha512", "cc"),
    }
    with pytest.raises(UnsupportedDisk, match="bad line 1"):
        parse_mf(b"MD5(a.ovf)= abc\n", "a.mf")


def test_sample_exports_have_every_controller_kind(tmp_path: Path) -> None:
    vm = SampleVm("v", disks=(SampleDisk(bus="ide"), SampleDisk(bus="sata"), SampleDisk()))
    appliance = open_appliance(str(write_ovf_directory(tmp_path, [vm], name="v")), OVF)
    assert [d.vm.disks[d.position].controller.bus for d in appliance.disks] == [
        "ide", "sata", "scsi",
    ]  # fmt: skip


def test_sample_exports_can_carry_qemu_img_disks(tmp_path: Path) -> None:
    ova = write_ova(tmp_path / "q.ova", [SampleVm("q")], qemu_img=True)
    appliance = open_appliance(str(ova), OVA)
    with tarfile.open(ova) as archive:
        member = archive.extractfile("q-disk1.vmdk")
        assert member is not None
        head = member.read(2048)
    assert head.startswith(b"KDMV")
    assert b'createType="streamOptimized"' in head
    assert [d.capacity_bytes for d in appliance.disks] == [16 << 20, 24 << 20]


def test_split_disks_are_refused_naming_the_ovftool_option(tmp_path: Path) -> None:
    ovf = write_ovf_directory(tmp_path, [SampleVm("a")], name="a", manifest=False)
    text = ovf.read_text().replace('ovf:id="file2"', 'ovf:id="file2" ovf:chunkSize="7516192768"')
    ovf.write_text(text)
    with pytest.raises(UnsupportedDisk, match="--chunkSize"):
        open_appliance(str(ovf), OVF)
