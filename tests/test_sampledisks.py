"""Sample VMDK files: their bytes follow the on-disk layout, and qemu-img reads them back."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import struct
import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from worker.intake.sampledisks import (
    GD_AT_END,
    write_monolithic_sparse,
    write_sample_batch,
    write_stream_optimized,
)

SECTOR = 512
GRAIN = 64 * 1024
MIB = 1 << 20
HEADER_FIELDS = (
    "magic", "version", "flags", "capacity", "grain_size", "descriptor_offset", "descriptor_size",
    "gtes_per_gt", "rgd_offset", "gd_offset", "overhead", "unclean_shutdown", "newline",
    "compress_algorithm",
)  # fmt: skip


def header_of(raw: bytes) -> dict[str, Any]:
    """The SparseExtentHeader at the start of `raw`, parsed independently of the writer."""
    return dict(zip(HEADER_FIELDS, struct.unpack_from("<4sIIQQQQIQQQB4sH", raw), strict=True))


def descriptor_of(raw: bytes, header: dict[str, Any]) -> str:
    offset, size = int(header["descriptor_offset"]), int(header["descriptor_size"])
    return raw[offset * SECTOR : (offset + size) * SECTOR].rstrip(b"\0").decode("ascii")


def read_back(raw: bytes, limit_bytes: int | None = None) -> bytes:
    """The disk's content (up to limit_bytes), read through GD, GTs and grains independently."""
    header = header_of(raw)
    if header["gd_offset"] == GD_AT_END:
        header = header_of(raw[-2 * SECTOR :])  # the footer: a copy of the header, real gdOffset
    capacity, gd, compressed = (
        int(header[k]) for k in ("capacity", "gd_offset", "compress_algorithm")
    )
    grains = -(-capacity // 128)
    disk = bytearray(min(capacity * SECTOR, limit_bytes or capacity * SECTOR) + GRAIN)
    tables = struct.unpack_from(f"<{-(-grains // 512)}I", raw, gd * SECTOR)
    for table_index, table_sector in enumerate(tables):
        if not table_sector:
            continue
        for entry, grain_sector in enumerate(
            struct.unpack_from("<512I", raw, table_sector * SECTOR)
        ):
            index = table_index * 512 + entry
            if grain_sector and index < grains and index * GRAIN < len(disk):
                start = grain_sector * SECTOR
                if compressed:
                    lba, size = struct.unpack_from("<QI", raw, start)
                    assert lba == index * 128
                    grain = zlib.decompress(raw[start + 12 : start + 12 + size])
                else:
                    grain = raw[start : start + GRAIN]
                disk[index * GRAIN : index * GRAIN + GRAIN] = grain
    return bytes(disk[: min(capacity * SECTOR, limit_bytes or capacity * SECTOR)])


def holes(index: int) -> bytes:
    """Grains 0, 3 and 600 carry data (600 lies in the second grain table); the rest are holes."""
    return (
        bytes([index % 250 + 1]) * (GRAIN if index != 3 else 1000) if index in (0, 3, 600) else b""
    )


def expected_holes(size_bytes: int) -> bytes:
    disk = bytearray(size_bytes)
    for index in (0, 3, 600):
        grain = holes(index)
        disk[index * GRAIN : index * GRAIN + len(grain)] = grain
    return bytes(disk)


# The bytes ------------------------------------------------------------------------------------


def test_monolithic_sparse_header_and_descriptor(tmp_path: Path) -> None:
    path = tmp_path / "web01.vmdk"
    size = write_monolithic_sparse(path, virtual_size_bytes=64 * MIB, data=b"\x01" * 70000, seed=7)
    raw = path.read_bytes()
    header = header_of(raw)

    assert size == len(raw) == (128 + 2 * 128) * SECTOR  # metadata, then two 64 KiB grains
    assert header == {
        "magic": b"KDMV",
        "version": 1,
        "flags": 0x3,
        "capacity": 64 * MIB // SECTOR,
        "grain_size": 128,
        "descriptor_offset": 1,
        "descriptor_size": 20,
        "gtes_per_gt": 512,
        "rgd_offset": 21,
        "gd_offset": 30,  # qemu-img puts a 64 MiB disk's GD here too
        "overhead": 128,
        "unclean_shutdown": 0,
        "newline": b"\n \r\n",
        "compress_algorithm": 0,
    }
    lines = descriptor_of(raw, header).splitlines()
    assert lines[0] == "# Disk DescriptorFile"
    assert 'createType="monolithicSparse"' in lines
    assert 'RW 131072 SPARSE "web01.vmdk"' in lines
    assert "#DDB" in lines
    assert 'ddb.adapterType = "ide"' in lines
    assert 'ddb.geometry.cylinders = "131"' in lines
    assert raw[SECTOR] == ord("#")


def test_monolithic_sparse_keeps_zero_grains_unallocated(tmp_path: Path) -> None:
    path = tmp_path / "holes.vmdk"
    size = write_monolithic_sparse(path, virtual_size_bytes=64 * MIB, data=holes)
    raw = path.read_bytes()
    assert size == (128 + 3 * 128) * SECTOR
    assert read_back(raw) == expected_holes(64 * MIB)
    # The redundant directory and tables say the same as the primary ones.
    gd_table = raw[30 * SECTOR : 31 * SECTOR + 2 * 2048]
    rgd_table = raw[21 * SECTOR : 22 * SECTOR + 2 * 2048]
    assert struct.unpack_from("<2I", gd_table) == (31, 35)
    assert struct.unpack_from("<2I", rgd_table) == (22, 26)
    assert gd_table[SECTOR:] == rgd_table[SECTOR:]


@pytest.mark.parametrize("footer", [False, True])
def test_stream_optimized_header_markers_and_grains(tmp_path: Path, footer: bool) -> None:
    path = tmp_path / "db01.vmdk"
    write_stream_optimized(
        path, virtual_size_bytes=64 * MIB, seed=3, fill_bytes=100_000, footer=footer
    )
    raw = path.read_bytes()
    header = header_of(raw)

    assert (header["magic"], header["version"], header["flags"]) == (b"KDMV", 3, 0x30003)
    assert (header["capacity"], header["grain_size"], header["gtes_per_gt"]) == (131072, 128, 512)
    assert (header["descriptor_offset"], header["descriptor_size"]) == (1, 20)
    assert (header["overhead"], header["compress_algorithm"]) == (128, 1)
    assert header["newline"] == b"\n \r\n"
    assert 'createType="streamOptimized"' in descriptor_of(raw, header)
    assert 'RW 131072 SPARSE "db01.vmdk"' in descriptor_of(raw, header)
    # The first grain sits at overHead behind its marker: lba, compressed size, deflated data.
    lba, size = struct.unpack_from("<QI", raw, 128 * SECTOR)
    first = zlib.decompress(raw[128 * SECTOR + 12 : 128 * SECTOR + 12 + size])
    assert (lba, len(first)) == (0, GRAIN)
    assert first == random.Random(3).randbytes(100_000)[:GRAIN]
    # End of stream: type 0 marker in the last sector.
    assert struct.unpack_from("<QII", raw, len(raw) - SECTOR) == (0, 0, 0)
    if footer:
        assert header["gd_offset"] == GD_AT_END
        assert struct.unpack_from("<QII", raw, len(raw) - 3 * SECTOR) == (1, 0, 3)
        footer_header = header_of(raw[len(raw) - 2 * SECTOR :])
        assert {**footer_header, "gd_offset": GD_AT_END} == header
        gd = int(footer_header["gd_offset"])
    else:
        gd = int(header["gd_offset"])
    assert struct.unpack_from("<QII", raw, (gd - 1) * SECTOR) == (1, 0, 2)  # GD marker: 1 sector
    (table_sector,) = struct.unpack_from("<I", raw, gd * SECTOR)
    assert struct.unpack_from("<QII", raw, (table_sector - 1) * SECTOR) == (4, 0, 1)  # GT marker
    assert read_back(raw) == random.Random(3).randbytes(100_000).ljust(64 * MIB, b"\0")


def test_sample_batch_mixes_subformats_with_distinct_content(tmp_path: Path) -> None:
    paths = write_sample_batch(tmp_path / "disks", count=6, fill_bytes=150_000, seed=1)
    again = write_sample_batch(tmp_path / "again", count=6, fill_bytes=150_000, seed=1)

    headers = [header_of(p.read_bytes()) for p in paths]
    assert [(h["version"], h["gd_offset"] == GD_AT_END) for h in headers] == [
        (1, False), (3, False), (3, True), (1, False), (3, False), (3, True),
    ]  # fmt: skip
    digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
    assert len(digests) == 6
    contents = {read_back(p.read_bytes(), 150_001) for p in paths}
    assert len(contents) == 6
    assert all(c[150_000] == 0 and c.count(0) < 2000 for c in contents)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]


def test_bad_sizes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple of 512"):
        write_monolithic_sparse(tmp_path / "a.vmdk", virtual_size_bytes=1000, data=None)
    with pytest.raises(ValueError, match="exceed the virtual size"):
        write_monolithic_sparse(tmp_path / "a.vmdk", virtual_size_bytes=SECTOR, data=b"x" * 513)
    with pytest.raises(ValueError, match="exceed the virtual size"):
        write_stream_optimized(tmp_path / "a.vmdk", virtual_size_bytes=SECTOR, fill_bytes=513)


# qemu-img reads what we wrote -------------------------------------------------------------------

QEMU_IMG = shutil.which("qemu-img")
needs_qemu = pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img is not installed")

Writer = Callable[[Path], bytes]


def _sparse_holes(path: Path) -> bytes:
    size = 64 * MIB + SECTOR  # not a whole number of grains: the last grain is partial
    write_monolithic_sparse(path, virtual_size_bytes=size, data=holes)
    return expected_holes(size)


def _sparse_bytes(path: Path) -> bytes:
    content = random.Random(5).randbytes(300_001)
    write_monolithic_sparse(path, virtual_size_bytes=64 * MIB, data=content)
    return content.ljust(64 * MIB, b"\0")


def _stream(path: Path) -> bytes:
    write_stream_optimized(path, virtual_size_bytes=64 * MIB, seed=9, fill_bytes=33 * MIB + 3)
    return random.Random(9).randbytes(33 * MIB + 3).ljust(64 * MIB, b"\0")


def _stream_footer(path: Path) -> bytes:
    write_stream_optimized(
        path, virtual_size_bytes=64 * MIB, seed=9, fill_bytes=200_000, footer=True
    )
    return random.Random(9).randbytes(200_000).ljust(64 * MIB, b"\0")


def _empty_stream_footer(path: Path) -> bytes:
    write_stream_optimized(path, virtual_size_bytes=64 * MIB, footer=True)
    return bytes(64 * MIB)


@needs_qemu
@pytest.mark.parametrize(
    ("writer", "create_type"),
    [
        (_sparse_holes, "monolithicSparse"),
        (_sparse_bytes, "monolithicSparse"),
        (_stream, "streamOptimized"),
        (_stream_footer, "streamOptimized"),
        (_empty_stream_footer, "streamOptimized"),
    ],
)
def test_qemu_img_reads_back_what_was_written(
    tmp_path: Path, writer: Writer, create_type: str
) -> None:
    assert QEMU_IMG is not None
    path = tmp_path / "disk.vmdk"
    expected = writer(path)

    info = json.loads(_qemu("info", "--output=json", "-f", "vmdk", str(path)))
    _qemu("check", "-f", "vmdk", str(path))  # exits non-zero on any error it finds
    _qemu("convert", "-f", "vmdk", "-O", "raw", str(path), str(tmp_path / "disk.raw"))

    assert info["virtual-size"] == len(expected)
    assert info["format-specific"]["data"]["create-type"] == create_type
    assert (tmp_path / "disk.raw").read_bytes() == expected


def _qemu(*args: str) -> str:
    done = subprocess.run(
        [QEMU_IMG or "qemu-img", *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout
