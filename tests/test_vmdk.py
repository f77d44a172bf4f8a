"""VMDK inspection: qemu-img files of every subformat, hand-built hostile ones, other formats."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import random
import re
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fixtures.archives import tar_bytes
from tests.fixtures.cli import WORKER_CLI
from worker.errors import SourceError, UnsupportedDisk
from worker.intake.sampledisks import write_monolithic_sparse, write_stream_optimized
from worker.intake.source import inspect_source
from worker.intake.vmdk import Inspection, min_disk_warning, parse_descriptor
from worker.sandbox import Sandbox

MIB = 1 << 20
GIB = 1 << 30
CONVERT = "convert it first with qemu-img convert -O vmdk -o subformat=streamOptimized"


@pytest.fixture(scope="session")
def qemu_img() -> str:
    found = shutil.which("qemu-img")
    if found is None:
        pytest.fail("qemu-img not found: install qemu-utils (make test installs it)")
    return found


def qemu_create(qemu_img: str, path: Path, fmt: str, size: str = "4M", *options: str) -> Path:
    command = [qemu_img, "create", "-q", "-f", fmt]
    for option in options:
        command += ["-o", option]
    subprocess.run([*command, str(path), size], check=True, capture_output=True)
    return path


def qemu_vmdk(qemu_img: str, directory: Path, subformat: str, *options: str) -> Path:
    path = directory / f"{subformat}.vmdk"
    return qemu_create(qemu_img, path, "vmdk", "4M", f"subformat={subformat}", *options)


def qemu_convert(qemu_img: str, directory: Path, subformat: str) -> Path:
    """A VMDK as `qemu-img convert` writes it from 4 MiB of data (create writes no data)."""
    source = directory / "source.raw"
    if not source.exists():
        source.write_bytes(random.Random(7).randbytes(4 * MIB))
    path = directory / f"{subformat}.vmdk"
    command = [qemu_img, "convert", "-q", "-f", "raw", "-O", "vmdk", "-o"]
    subprocess.run(
        [*command, f"subformat={subformat}", str(source), str(path)],
        check=True,
        capture_output=True,
    )
    return path


def qemu_info(qemu_img: str, path: Path) -> dict[str, object]:
    answer = subprocess.run(
        [qemu_img, "info", "--output=json", str(path)], check=True, capture_output=True
    )
    info: dict[str, object] = json.loads(answer.stdout)
    return info


def inspect_vmdk(path: Path, *, flat_as_raw: bool = False) -> Inspection:
    """The submit-time inspection of the whole file as it is now."""
    size_bytes = path.stat().st_size if path.exists() else 0
    return inspect_source(path, size_bytes=size_bytes, flat_as_raw=flat_as_raw)


def refusal(path: Path, *, flat_as_raw: bool = False) -> str:
    with pytest.raises(UnsupportedDisk) as caught:
        inspect_vmdk(path, flat_as_raw=flat_as_raw)
    assert caught.value.code == "unsupported_disk"
    return caught.value.message


def rewrite_descriptor(path: Path, change: Callable[[str], str]) -> None:
    """Edit the descriptor embedded at sector 1 of a sparse VMDK, keeping its sector count."""
    data = bytearray(path.read_bytes())
    sectors = struct.unpack_from("<Q", data, 0x24)[0]
    region = slice(512, 512 + sectors * 512)
    text = bytes(data[region]).split(b"\0", 1)[0].decode("ascii")
    new = change(text).encode("ascii")
    assert len(new) <= sectors * 512
    data[region] = new.ljust(sectors * 512, b"\0")
    path.write_bytes(bytes(data))


def patch(path: Path, offset: int, content: bytes) -> None:
    with path.open("r+b") as file:
        file.seek(offset)
        file.write(content)


def flat_descriptor(directory: Path, create_type: str, extent: str, name: str = "disk") -> Path:
    path = directory / f"{name}.vmdk"
    path.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
        f'createType="{create_type}"\n\n# Extent description\n{extent}\n\n'
        '# The Disk Data Base\n#DDB\n\nddb.adapterType = "lsilogic"\n'
    )
    return path


# Accepted -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subformat", "options"),
    [
        ("monolithicSparse", ()),
        ("monolithicSparse", ("zeroed_grain=on",)),  # header version 2
        ("monolithicSparse", ("adapter_type=lsilogic", "hwversion=10")),
        ("streamOptimized", ()),
    ],
)
def test_qemu_sparse_and_stream_files_are_accepted(
    qemu_img: str, tmp_path: Path, subformat: str, options: tuple[str, ...]
) -> None:
    path = qemu_vmdk(qemu_img, tmp_path, subformat, *options)

    inspection = inspect_vmdk(path)

    assert inspection == Inspection(
        subformat=subformat,
        virtual_size_bytes=4 * MIB,
        disk_format="vmdk",
        upload_source=str(path),
        upload_size_bytes=path.stat().st_size,
        bytes_read=inspection.bytes_read,
    )
    assert inspection.virtual_size_bytes == qemu_info(qemu_img, path)["virtual-size"]
    # Header and embedded descriptor only: 512 + 20 sectors, whatever the file holds.
    assert inspection.bytes_read == 512 + 20 * 512


@pytest.mark.parametrize("subformat", ["monolithicSparse", "streamOptimized"])
def test_qemu_convert_sparse_and_stream_outputs_are_accepted(
    qemu_img: str, tmp_path: Path, subformat: str
) -> None:
    path = qemu_convert(qemu_img, tmp_path, subformat)

    inspection = inspect_vmdk(path)

    assert (inspection.subformat, inspection.disk_format) == (subformat, "vmdk")
    assert inspection.virtual_size_bytes == 4 * MIB == qemu_info(qemu_img, path)["virtual-size"]
    assert inspection.upload_size_bytes == path.stat().st_size


def test_vmware_style_stream_with_footer_is_accepted_from_header_and_footer(
    qemu_img: str, tmp_path: Path
) -> None:
    path = tmp_path / "ova-disk.vmdk"
    write_stream_optimized(path, virtual_size_bytes=64 * MIB, fill_bytes=2 * MIB, footer=True)

    inspection = inspect_vmdk(path)

    assert (inspection.subformat, inspection.disk_format) == ("streamOptimized", "vmdk")
    assert inspection.virtual_size_bytes == 64 * MIB == qemu_info(qemu_img, path)["virtual-size"]
    assert inspection.bytes_read == 512 + 20 * 512 + 3 * 512
    assert inspection.bytes_read < path.stat().st_size // 100


def test_a_10_gib_stream_with_footer_is_inspected_from_under_2_mib(tmp_path: Path) -> None:
    small = tmp_path / "small.vmdk"
    write_stream_optimized(small, virtual_size_bytes=10 * GIB, footer=True)
    data = small.read_bytes()
    head, tail = data[: 128 * 512], data[-3 * 512 :]
    path = tmp_path / "big.vmdk"
    with path.open("wb") as file:
        file.write(head)
    os.truncate(path, 10 * GIB)  # sparse: no disk space used
    patch(path, 10 * GIB - len(tail), tail)

    inspection = inspect_vmdk(path)

    assert path.stat().st_size == 10 * GIB
    assert inspection.virtual_size_bytes == 10 * GIB
    assert inspection.upload_size_bytes == 10 * GIB
    assert inspection.bytes_read < 2 * MIB


# Descriptor files: flat, vmfs, split and delta disks -------------------------------------------


@pytest.mark.parametrize("subformat", ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"])
def test_split_disks_are_refused_with_the_convert_command(
    qemu_img: str, tmp_path: Path, subformat: str
) -> None:
    path = qemu_vmdk(qemu_img, tmp_path, subformat)

    message = refusal(path)

    assert message.startswith(f"unsupported VMDK subformat {subformat}: {CONVERT} {path} ")
    assert message.endswith(str(tmp_path / f"{subformat}-stream.vmdk"))
    assert refusal(path, flat_as_raw=True) == message


@pytest.mark.parametrize("subformat", ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"])
def test_split_disks_from_qemu_convert_are_refused_with_the_convert_command(
    qemu_img: str, tmp_path: Path, subformat: str
) -> None:
    # convert pads the descriptor file with NULs to a whole sector.
    path = qemu_convert(qemu_img, tmp_path, subformat)
    assert path.read_bytes().endswith(b"\0")

    message = refusal(path)

    assert message.startswith(f"unsupported VMDK subformat {subformat}: {CONVERT} {path} ")


def test_a_piece_of_a_split_sparse_disk_is_refused(qemu_img: str, tmp_path: Path) -> None:
    qemu_vmdk(qemu_img, tmp_path, "twoGbMaxExtentSparse")

    message = refusal(tmp_path / "twoGbMaxExtentSparse-s001.vmdk")

    assert "without an embedded descriptor" in message
    assert "use the descriptor file" in message


def test_monolithic_flat_is_refused_naming_its_flat_extent(qemu_img: str, tmp_path: Path) -> None:
    path = qemu_vmdk(qemu_img, tmp_path, "monolithicFlat")

    message = refusal(path)

    assert "VMDK subformat monolithicFlat is a descriptor" in message
    assert "flat extent 'monolithicFlat-flat.vmdk'" in message
    assert "set flat_as_raw: true" in message
    assert CONVERT.removeprefix("convert it first with ") in message


def test_monolithic_flat_with_flat_as_raw_uploads_its_extent_as_raw(
    qemu_img: str, tmp_path: Path
) -> None:
    path = qemu_vmdk(qemu_img, tmp_path, "monolithicFlat")
    extent = tmp_path / "monolithicFlat-flat.vmdk"

    inspection = inspect_vmdk(path, flat_as_raw=True)

    assert inspection == Inspection(
        subformat="monolithicFlat",
        virtual_size_bytes=4 * MIB,
        disk_format="raw",
        upload_source=str(extent),
        upload_size_bytes=extent.stat().st_size,
        bytes_read=path.stat().st_size,
    )


def test_monolithic_flat_from_qemu_convert_uploads_its_extent_as_raw(
    qemu_img: str, tmp_path: Path
) -> None:
    path = qemu_convert(qemu_img, tmp_path, "monolithicFlat")
    extent = tmp_path / "monolithicFlat-flat.vmdk"
    assert path.stat().st_size == 512
    assert path.read_bytes().endswith(b"\0" * 16)

    assert "flat extent 'monolithicFlat-flat.vmdk'" in refusal(path)
    inspection = inspect_vmdk(path, flat_as_raw=True)

    assert (inspection.subformat, inspection.disk_format) == ("monolithicFlat", "raw")
    assert (inspection.upload_source, inspection.upload_size_bytes) == (str(extent), 4 * MIB)
    assert extent.read_bytes() == (tmp_path / "source.raw").read_bytes()


def test_text_after_the_nul_padding_of_a_descriptor_is_refused(tmp_path: Path) -> None:
    (tmp_path / "disk-flat.vmdk").write_bytes(b"\0" * 8192)
    path = flat_descriptor(tmp_path, "monolithicFlat", 'RW 16 FLAT "disk-flat.vmdk" 0')
    text = path.read_bytes()
    path.write_bytes(text + b"\0" * 40 + b'RW 16 FLAT "other-flat.vmdk" 0\n')

    message = refusal(path, flat_as_raw=True)

    assert message == f"invalid VMDK descriptor: data follows the NUL padding at byte {len(text)}"


@pytest.mark.parametrize("field", ["size", "offset"])
def test_an_extent_number_of_thousands_of_digits_is_refused(tmp_path: Path, field: str) -> None:
    huge = "9" * 5000
    extent = (
        f'RW {huge} FLAT "disk-flat.vmdk" 0'
        if field == "size"
        else (f'RW 16 FLAT "disk-flat.vmdk" {huge}')
    )
    path = flat_descriptor(tmp_path, "monolithicFlat", extent)

    message = refusal(path, flat_as_raw=True)

    assert message.startswith("invalid VMDK descriptor: line 8 gives a sector count of 5000 digits")


def test_the_flat_extent_itself_is_not_a_vmdk(qemu_img: str, tmp_path: Path) -> None:
    qemu_vmdk(qemu_img, tmp_path, "monolithicFlat")

    message = refusal(tmp_path / "monolithicFlat-flat.vmdk")

    assert message.startswith("not a VMDK: the file is raw data")
    assert "flat_as_raw: true" in message


def test_vmfs_descriptor_both_ways(tmp_path: Path) -> None:
    (tmp_path / "esx-flat.vmdk").write_bytes(b"\1" * 8192)
    path = flat_descriptor(tmp_path, "vmfs", 'RW 16 VMFS "esx-flat.vmdk"', name="esx")

    assert "VMDK subformat vmfs is a descriptor" in refusal(path)
    inspection = inspect_vmdk(path, flat_as_raw=True)
    assert (inspection.subformat, inspection.disk_format) == ("vmfs", "raw")
    assert (inspection.upload_source, inspection.upload_size_bytes) == (
        str(tmp_path / "esx-flat.vmdk"),
        8192,
    )


@pytest.mark.parametrize(
    ("extent_bytes", "expected"),
    [
        (None, "the flat extent 'disk-flat.vmdk' cannot be used: No such file or directory"),
        (4096, "the flat extent 'disk-flat.vmdk' has 4096 bytes, the descriptor says 8192"),
    ],
)
def test_flat_as_raw_needs_the_whole_extent(
    tmp_path: Path, extent_bytes: int | None, expected: str
) -> None:
    if extent_bytes is not None:
        (tmp_path / "disk-flat.vmdk").write_bytes(b"\0" * extent_bytes)
    path = flat_descriptor(tmp_path, "monolithicFlat", 'RW 16 FLAT "disk-flat.vmdk" 0')

    assert refusal(path, flat_as_raw=True).startswith(expected)


def test_flat_extent_at_an_offset_cannot_be_raw(tmp_path: Path) -> None:
    (tmp_path / "disk-flat.vmdk").write_bytes(b"\0" * 16384)
    path = flat_descriptor(tmp_path, "monolithicFlat", 'RW 16 FLAT "disk-flat.vmdk" 16')

    assert "starts at sector 16, not 0" in refusal(path, flat_as_raw=True)


@pytest.mark.parametrize(
    ("create_type", "extent", "expected"),
    [
        ("vmfsSparse", 'RW 8192 VMFSSPARSE "vm-000001-delta.vmdk"', "subformat vmfsSparse"),
        ("seSparse", 'RW 8192 SESPARSE "vm-000001-sesparse.vmdk"', "subformat seSparse"),
        ("vmfsRaw", 'RW 8192 VMFSRAW "/vmfs/devices/disks/naa.1"', "CVE-2024-32498"),
        ("fullDevice", 'RW 8192 FLAT "sda" 0', "subformat fullDevice"),
    ],
)
def test_other_descriptor_types_are_refused(
    tmp_path: Path, create_type: str, extent: str, expected: str
) -> None:
    path = flat_descriptor(tmp_path, create_type, extent)

    message = refusal(path, flat_as_raw=True)

    assert expected in message
    assert CONVERT in message or "CVE" in message


def test_a_snapshot_delta_is_refused_naming_its_parent(tmp_path: Path) -> None:
    path = tmp_path / "vm-000001.vmdk"
    path.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=fb183c20\nparentCID=bd9ea81a\n"
        'createType="vmfsSparse"\nparentFileNameHint="vm.vmdk"\n'
        'RW 8192 VMFSSPARSE "vm-000001-delta.vmdk"\n'
    )

    message = refusal(path)

    assert "snapshot delta on top of 'vm.vmdk'" in message
    assert "consolidate the snapshot" in message
    assert "qemu-img convert -O vmdk -o subformat=streamOptimized" in message


def test_a_qemu_child_of_a_backing_file_is_refused(qemu_img: str, tmp_path: Path) -> None:
    base = qemu_vmdk(qemu_img, tmp_path, "monolithicSparse")
    child = tmp_path / "child.vmdk"
    subprocess.run(
        [qemu_img, "create", "-q", "-f", "vmdk", "-b", str(base), "-F", "vmdk", str(child)],
        check=True,
        capture_output=True,
    )

    message = refusal(child)

    assert f"monolithicSparse snapshot delta on top of '{base}'" in message


def test_a_vmfs_sparse_delta_extent_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vm-000001-delta.vmdk"
    path.write_bytes(b"COWD" + struct.pack("<I", 1) + b"\0" * 2040)

    assert refusal(path).startswith("unsupported VMDK subformat vmfsSparse")


def test_a_standalone_descriptor_of_a_sparse_disk_points_at_the_data(tmp_path: Path) -> None:
    path = flat_descriptor(tmp_path, "monolithicSparse", 'RW 8192 SPARSE "disk-s.vmdk"')

    assert "use the file it names (disk-s.vmdk) as the source" in refusal(path)


# Hostile descriptors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extent",
    ['RW 2048 FLAT "/etc/hosts" 0', 'RW 2048 FLAT "../x" 0', 'RW 2048 FLAT ".." 0'],
)
def test_a_sparse_file_whose_descriptor_names_another_file_is_refused(
    qemu_img: str, tmp_path: Path, extent: str
) -> None:
    path = qemu_vmdk(qemu_img, tmp_path, "monolithicSparse")
    rewrite_descriptor(path, lambda text: text.replace("# The Disk Data Base", f"{extent}\n#"))

    message = refusal(path)

    assert message.startswith(f"unsafe VMDK extent {extent!r}")
    assert "CVE-2024-32498" in message


@pytest.mark.parametrize("extent", ['RW 16 FLAT "../outside-flat.vmdk" 0', 'RW 16 FLAT "a\\b" 0'])
def test_a_flat_descriptor_reaching_out_of_its_directory_is_refused(
    tmp_path: Path, extent: str
) -> None:
    (tmp_path / "outside-flat.vmdk").write_bytes(b"\0" * 8192)
    inner = tmp_path / "inner"
    inner.mkdir()
    path = flat_descriptor(inner, "monolithicFlat", extent)

    assert "CVE-2024-32498" in refusal(path, flat_as_raw=True)


def test_a_second_extent_in_a_sparse_file_is_refused(qemu_img: str, tmp_path: Path) -> None:
    path = qemu_vmdk(qemu_img, tmp_path, "monolithicSparse")
    rewrite_descriptor(
        path, lambda text: text.replace("# The Disk Data Base", 'RW 16 FLAT "hosts" 0\n#')
    )

    assert "must name exactly one SPARSE extent (this file), it names 2" in refusal(path)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda t: t + "\nrm -rf /\n", "line 20 is neither a header field"),
        (lambda t: t.replace('createType="monolithicSparse"', ""), "no createType"),
        (lambda t: re.sub(r"RW \d+ SPARSE .*", "", t), "it names no extent"),
        (lambda t: t.replace("SPARSE", "SPARKLY"), "is a bad extent"),
        (lambda t: t.replace("monolithicSparse", "monolithicFlat"), "subformat monolithicFlat"),
    ],
)
def test_descriptor_grammar_is_strict(
    qemu_img: str, tmp_path: Path, change: Callable[[str], str], expected: str
) -> None:
    path = qemu_vmdk(qemu_img, tmp_path, "monolithicSparse")
    rewrite_descriptor(path, change)

    assert expected in refusal(path)


def test_parse_descriptor_reads_fields_and_extents() -> None:
    descriptor = parse_descriptor(
        '# Disk DescriptorFile\r\nversion=1\r\nCreateType="vmfs"\r\n'
        'RDONLY 100 VMFS "a-flat.vmdk" 0\r\nRW 50 ZERO\r\nddb.uuid = "60 00"\r\n'
    )

    assert descriptor.create_type == "vmfs"
    assert descriptor.fields["version"] == "1"
    assert [(e.access, e.size_sectors, e.kind, e.file_name) for e in descriptor.extents] == [
        ("RDONLY", 100, "VMFS", "a-flat.vmdk"),
        ("RW", 50, "ZERO", None),
    ]


# Damaged headers and footers ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "content", "expected"),
    [
        (4, struct.pack("<I", 4), "unsupported VMDK header version 4 (1 to 3 are known)"),
        (0x1C, struct.pack("<Q", 2), "puts the descriptor at sector 2"),
        (0x49, b"\n \n\n", "text-mode (ASCII) file transfer"),
        (0x0C, struct.pack("<Q", 0), "capacity of 0 sectors"),
        (0x38, struct.pack("<Q", 0xFFFFFFFFFFFFFFFF), "cannot defer its grain directory"),
    ],
)
def test_damaged_sparse_headers_are_refused(
    qemu_img: str, tmp_path: Path, offset: int, content: bytes, expected: str
) -> None:
    path = qemu_vmdk(qemu_img, tmp_path, "monolithicSparse")
    patch(path, offset, content)

    assert expected in refusal(path)


@pytest.mark.parametrize(
    ("keep_bytes", "expected"),
    [
        (100, "truncated VMDK header: the file has 100 bytes, a sparse header needs 512"),
        (2048, "truncated VMDK: the embedded descriptor runs past the end of file"),
        (11 * 1024, "truncated VMDK: the grain directory is at sector"),
    ],
)
def test_truncated_sparse_files_are_refused(
    qemu_img: str, tmp_path: Path, keep_bytes: int, expected: str
) -> None:
    path = qemu_vmdk(qemu_img, tmp_path, "monolithicSparse")
    os.truncate(path, keep_bytes)

    assert refusal(path).startswith(expected)


@pytest.fixture
def footer_disk(tmp_path: Path) -> Path:
    path = tmp_path / "ova-disk.vmdk"
    write_stream_optimized(path, virtual_size_bytes=8 * MIB, fill_bytes=256 << 10, footer=True)
    return path


@pytest.mark.parametrize(
    ("from_end", "content", "expected"),
    [
        (1536 - 12, struct.pack("<I", 1), "does not end with a footer marker"),
        (1024, b"XXXX", "the VMDK footer has no KDMV signature"),
        (1024 - 0x0C, struct.pack("<Q", 99), "the VMDK footer does not match its header"),
        (1024 - 0x38, struct.pack("<Q", 0xFFFFFFFFFFFFFFFF), "does not match its header"),
        (512 - 12, struct.pack("<I", 1), "does not end with an end-of-stream marker"),
    ],
)
def test_damaged_footers_are_refused(
    footer_disk: Path, from_end: int, content: bytes, expected: str
) -> None:
    patch(footer_disk, footer_disk.stat().st_size - from_end, content)

    assert expected in refusal(footer_disk)


def test_a_stream_cut_before_its_footer_is_refused(footer_disk: Path) -> None:
    os.truncate(footer_disk, footer_disk.stat().st_size - 1536)

    assert "does not end with a footer marker" in refusal(footer_disk)


def test_warnings_do_not_refuse(qemu_img: str, tmp_path: Path) -> None:
    path = qemu_vmdk(qemu_img, tmp_path, "monolithicSparse")
    patch(path, 0x48, b"\1")  # uncleanShutdown
    rewrite_descriptor(path, lambda text: text.replace("RW 8192 ", "RW 4096 "))

    inspection = inspect_vmdk(path)

    assert inspection.warnings == (
        "the descriptor's extent has 4096 sectors, the header 8192: the header's capacity is used",
        "the VMDK header marks an unclean shutdown: was the disk copied while in use?",
    )


# Not a VMDK at all ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "options", "found"),
    [
        ("qcow2", (), "a qcow2 image (set disk_format: qcow2"),
        ("vpc", (), "a VHD image (set disk_format: vhd"),
        ("vpc", ("subformat=fixed",), "a VHD image (set disk_format: vhd"),
        ("vhdx", (), "a VHDX image (set disk_format: vhdx"),
        ("vdi", (), "a VirtualBox VDI image (set disk_format: vdi"),
        ("qed", (), "a QED image"),
        (
            "raw",
            (),
            "not a disk image (data with no disk image signature); if it is a raw disk all "
            "the same, set disk_format: raw",
        ),
    ],
)
def test_other_qemu_formats_are_named(
    qemu_img: str, tmp_path: Path, fmt: str, options: tuple[str, ...], found: str
) -> None:
    path = qemu_create(qemu_img, tmp_path / "disk.vmdk", fmt, "4M", *options)

    message = refusal(path)

    assert message.startswith(f"not a VMDK: the file is {found}")


def random_bytes(size_bytes: int) -> bytes:
    data = bytearray(random.Random(7).randbytes(size_bytes))
    data[510:512] = b"\0\0"  # not a boot sector by chance
    return bytes(data)


def iso_bytes() -> bytes:
    data = bytearray(64 * 1024)
    data[0x8000:0x8006] = b"\1CD001"
    return bytes(data)


def mbr_bytes() -> bytes:
    data = bytearray(4096)
    data[510:512] = b"\x55\xaa"
    return bytes(data)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "not a VMDK: the file is empty"),
        (b"KD", "truncated VMDK header: the file has 2 bytes"),
        (
            random_bytes(1 << 20),
            "not a VMDK: the file is not a disk image (random data); if it is a raw disk all "
            "the same, set disk_format: raw",
        ),
        (iso_bytes(), "not a VMDK: the file is an ISO 9660/UDF image (set disk_format: iso"),
        (mbr_bytes(), "not a VMDK: the file is raw data with a partition table"),
        (b"LUKS\xba\xbe" + bytes(600), "not a VMDK: the file is a LUKS-encrypted volume"),
        (
            b"# Disk DescriptorFile\n" + bytes(2 << 20),
            "the file starts like a VMDK descriptor but has 2097174 bytes",
        ),
        (b'createType="x\xff"\n', "the VMDK descriptor is not UTF-8 text (byte 13)"),
    ],
)
def test_files_that_are_not_vmdks_are_named(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "disk.vmdk"
    path.write_bytes(content)

    assert refusal(path).startswith(expected)


OVF = b"""<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1">
  <References><File ovf:href="web01-disk1.vmdk" ovf:id="file1"/></References>
</Envelope>
"""
RAW_ADVICE = "set disk_format: raw"


@pytest.mark.parametrize(
    ("content", "expected", "raw_advised"),
    [
        (b"hello, this is a text file\n" * 40, "not a disk image (text)", False),
        (b"just text, and 512 bytes of it" + b"." * 482, "not a disk image (text)", False),
        (OVF, "not a disk image (an OVF descriptor", False),
        (tar_bytes({"web01.ovf": OVF, "web01-disk1.vmdk": bytes(1024)}), "an OVA", False),
        (tar_bytes({"notes.txt": b"x"}), "not a disk image (a tar archive)", False),
        (gzip.compress(bytes(4096)), "not a disk image (a gzip-compressed file)", False),
        (random_bytes(100_000), "not a disk image (random data; 100000 bytes", False),
        (random_bytes(64 << 10), "not a disk image (random data)", True),
        (bytes(1 << 20), "not a disk image (data with no disk image signature)", True),
    ],
)
def test_a_file_with_no_disk_image_signature_is_told_what_it_is(
    tmp_path: Path, content: bytes, expected: str, raw_advised: bool
) -> None:
    path = tmp_path / "disk.vmdk"
    path.write_bytes(content)

    message = refusal(path)

    assert message.startswith("not a VMDK: the file is ")
    assert expected in message
    assert (RAW_ADVICE in message) == raw_advised
    if b"ustar" in content:
        assert f"tar xf {path}" in message


def test_a_missing_file_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="cannot read"):
        inspect_vmdk(tmp_path / "nope.vmdk")


@pytest.mark.parametrize(
    ("virtual_size_bytes", "min_disk_gib", "warned"),
    [(GIB, 1, False), (GIB + 1, 1, True), (10 * GIB, 0, False), (10 * GIB, 9, True)],
)
def test_min_disk_warning(virtual_size_bytes: int, min_disk_gib: int, warned: bool) -> None:
    warning = min_disk_warning(virtual_size_bytes, min_disk_gib)

    assert (warning is not None) == warned
    if warning:
        assert f"set it to at least {-(-virtual_size_bytes // GIB)}" in warning


def test_sparse_writer_output_is_accepted_at_every_size(tmp_path: Path) -> None:
    for number, size in enumerate((MIB, 64 * MIB, 3 * GIB)):
        path = tmp_path / f"d{number}.vmdk"
        write_monolithic_sparse(path, virtual_size_bytes=size, data=b"\1" * 4096)
        assert inspect_vmdk(path).virtual_size_bytes == size


# Refused disks never reach the cloud --------------------------------------------------------


def bad_and_good_disks(qemu_img: str, directory: Path) -> dict[str, Path]:
    """Two good disks around one of each kind `validate` must refuse, by expected message."""
    write_monolithic_sparse(directory / "good-0.vmdk", virtual_size_bytes=MIB, data=b"\1" * 512)
    split = qemu_vmdk(qemu_img, directory, "twoGbMaxExtentSparse")
    flat = qemu_vmdk(qemu_img, directory, "monolithicFlat")
    hostile = qemu_vmdk(qemu_img, directory, "monolithicSparse")
    rewrite_descriptor(
        hostile, lambda t: t.replace("# The Disk Data Base", 'RW 2048 FLAT "/etc/hosts" 0\n#')
    )
    qcow2 = qemu_create(qemu_img, directory / "qcow2.vmdk", "qcow2")
    noise = directory / "noise.vmdk"
    noise.write_bytes(random_bytes(64 << 10))
    write_stream_optimized(directory / "good-1.vmdk", virtual_size_bytes=MIB, footer=True)
    return {
        "": directory / "good-0.vmdk",
        "unsupported VMDK subformat twoGbMaxExtentSparse: " + CONVERT: split,
        "flat extent 'monolithicFlat-flat.vmdk'": flat,
        "CVE-2024-32498": hostile,
        "not a VMDK: the file is a qcow2 image": qcow2,
        "not a VMDK: the file is not a disk image (random data)": noise,
        " ": directory / "good-1.vmdk",
    }


async def vmdk_migrate(*args: str, env: dict[str, str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *WORKER_CLI, *args,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode() + err.decode()


async def test_a_manifest_with_refused_disks_is_refused_whole_and_sends_nothing(
    qemu_img: str, database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    disks = bad_and_good_disks(qemu_img, tmp_path)
    manifest = tmp_path / "job.json"
    entries = [{"source": str(path), "name": f"image-{n}"} for n, path in enumerate(disks.values())]
    manifest.write_text(json.dumps({"job": "refused", "disks": entries}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
    env.update(
        OS_AUTH_URL=sandbox.auth_url, OS_USERNAME=sandbox.username, OS_PASSWORD=sandbox.password,
        OS_PROJECT_NAME=sandbox.project_name, OS_USER_DOMAIN_NAME=sandbox.domain_name,
        OS_PROJECT_DOMAIN_NAME=sandbox.domain_name, DATABASE_URL=database_url,
    )  # fmt: skip

    validated, validate_output = await vmdk_migrate("validate", str(manifest), env=env)
    submitted, submit_output = await vmdk_migrate("submit", str(manifest), env=env)
    ran, _ = await vmdk_migrate("run", "--once", env=env)

    assert (validated, submitted, ran) == (2, 2, 0)
    assert "invalid: 5 problem(s)" in validate_output
    for index, expected in enumerate(disks):
        line = next((x for x in validate_output.splitlines() if f"disks[{index}]." in x), "")
        assert expected.strip() in line if expected.strip() else not line
    assert "invalid: 5 problem(s)" in submit_output
    assert sandbox.count("PUT", r".*/stage") == 0
    assert sandbox.count("POST", r".*/v2/images$") == 0
