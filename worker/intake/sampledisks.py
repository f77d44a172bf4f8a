"""Writes small but real VMDK files (monolithicSparse and streamOptimized) for demos and tests."""

from __future__ import annotations

import random
import struct
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

SECTOR_BYTES = 512
GRAIN_SECTORS = 128  # 64 KiB grains, as VMware and qemu write them
GRAIN_BYTES = GRAIN_SECTORS * SECTOR_BYTES
GTES_PER_GT = 512
GT_SECTORS = GTES_PER_GT * 4 // SECTOR_BYTES
DESCRIPTOR_OFFSET = 1
DESCRIPTOR_SECTORS = 20
GD_AT_END = 0xFFFFFFFFFFFFFFFF
FLAGS_SPARSE = 0x00000003  # newline test valid, redundant grain directory
FLAGS_STREAM = 0x00030003  # ... plus compressed grains and markers
MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER = 0, 1, 2, 3

# SparseExtentHeader up to compressAlgorithm (79 bytes); the rest of the sector is padding.
HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")

GrainData = bytes | Callable[[int], bytes] | None


def write_monolithic_sparse(
    path: Path, *, virtual_size_bytes: int, data: GrainData, seed: int = 0
) -> int:
    """Write a monolithicSparse VMDK holding `data` and return the file size in bytes.

    `data` is the disk's content from offset 0, or a function from grain index to that grain's
    bytes (at most 64 KiB); all-zero grains stay unallocated, which is what makes it sparse.
    """
    capacity = _capacity_sectors(virtual_size_bytes)
    grains = _grains(data, virtual_size_bytes)
    gt_count = _ceil(_ceil(capacity, GRAIN_SECTORS), GTES_PER_GT)
    gd_sectors = _ceil(gt_count * 4, SECTOR_BYTES)
    # qemu's layout: redundant GD and GTs, then GD and GTs, then grains from a grain boundary.
    rgd = DESCRIPTOR_OFFSET + DESCRIPTOR_SECTORS
    gd = rgd + gd_sectors + gt_count * GT_SECTORS
    overhead = _ceil(gd + gd_sectors + gt_count * GT_SECTORS, GRAIN_SECTORS) * GRAIN_SECTORS
    entries = [0] * (gt_count * GTES_PER_GT)
    for n, index in enumerate(grains):
        entries[index] = overhead + n * GRAIN_SECTORS
    metadata = bytearray(overhead * SECTOR_BYTES)
    header = _header(1, FLAGS_SPARSE, capacity, rgd=rgd, gd=gd, overhead=overhead)
    metadata[0:SECTOR_BYTES] = header
    descriptor = _descriptor("monolithicSparse", capacity, path.name, seed)
    _put(metadata, DESCRIPTOR_OFFSET, descriptor)
    for directory in (rgd, gd):
        first_gt = directory + gd_sectors
        _put(metadata, directory, _u32s(first_gt + i * GT_SECTORS for i in range(gt_count)))
        _put(metadata, first_gt, _u32s(entries))
    with path.open("wb") as out:
        out.write(metadata)
        for grain in grains.values():
            out.write(grain)
    return path.stat().st_size


def write_stream_optimized(
    path: Path, *, virtual_size_bytes: int, seed: int = 0, fill_bytes: int = 0, footer: bool = False
) -> int:
    """Write a streamOptimized VMDK whose first `fill_bytes` are pseudo-random; return its size.

    Grains are deflated behind grain markers, each grain table follows its grains behind a GT
    marker, then come the GD marker and GD. With `footer` the header says GD_AT_END and the file
    ends as VMware's do: footer marker, footer (the header with the real gdOffset), end of stream.
    """
    capacity = _capacity_sectors(virtual_size_bytes)
    grains = _grains(_pseudo_random(fill_bytes, seed), virtual_size_bytes)
    gt_count = _ceil(_ceil(capacity, GRAIN_SECTORS), GTES_PER_GT)
    overhead = GRAIN_SECTORS
    stream = bytearray(overhead * SECTOR_BYTES)
    _put(stream, DESCRIPTOR_OFFSET, _descriptor("streamOptimized", capacity, path.name, seed))
    directory = _append_grains_and_tables(stream, grains, gt_count)
    _append(stream, _marker(_ceil(gt_count * 4, SECTOR_BYTES), MARKER_GD))
    gd = len(stream) // SECTOR_BYTES
    _append(stream, _u32s(directory))
    real_header = _header(3, FLAGS_STREAM, capacity, rgd=0, gd=gd, overhead=overhead, compress=1)
    if footer:
        _append(stream, _marker(1, MARKER_FOOTER) + real_header)
        stream[0:SECTOR_BYTES] = _header(
            3, FLAGS_STREAM, capacity, rgd=0, gd=GD_AT_END, overhead=overhead, compress=1
        )
    else:
        stream[0:SECTOR_BYTES] = real_header
    _append(stream, _marker(0, MARKER_EOS))
    path.write_bytes(stream)
    return len(stream)


def _append_grains_and_tables(
    stream: bytearray, grains: dict[int, bytes], gt_count: int
) -> list[int]:
    """Append each table's grains, then the table itself; return the grain directory."""
    by_table: dict[int, list[int]] = {}
    for index in grains:
        by_table.setdefault(index // GTES_PER_GT, []).append(index)
    directory = [0] * gt_count
    for table_index, indices in by_table.items():
        table = [0] * GTES_PER_GT
        for index in indices:
            table[index % GTES_PER_GT] = len(stream) // SECTOR_BYTES
            compressed = zlib.compress(grains[index], 1)  # fastest level: samples are mostly noise
            marker = struct.pack("<QI", index * GRAIN_SECTORS, len(compressed))
            _append(stream, marker + compressed)
        _append(stream, _marker(GT_SECTORS, MARKER_GT))
        directory[table_index] = len(stream) // SECTOR_BYTES
        _append(stream, _u32s(table))
    return directory


def write_sample_batch(
    directory: Path, *, count: int, fill_bytes: int, seed: int = 0
) -> list[Path]:
    """Write `count` disks cycling through the subformats, each with its own content and hash."""
    directory.mkdir(parents=True, exist_ok=True)
    virtual_size_bytes = max(64 << 20, _ceil(fill_bytes, 1 << 20) << 20)
    paths = []
    for number in range(count):
        disk_seed = seed * 1_000_003 + number
        kind = ("sparse", "stream", "stream-footer")[number % 3]
        path = directory / f"disk-{number:04d}-{kind}.vmdk"
        if kind == "sparse":
            content = _pseudo_random(fill_bytes, disk_seed)
            write_monolithic_sparse(
                path, virtual_size_bytes=virtual_size_bytes, data=content, seed=disk_seed
            )
        else:
            write_stream_optimized(
                path,
                virtual_size_bytes=virtual_size_bytes,
                seed=disk_seed,
                fill_bytes=fill_bytes,
                footer=kind == "stream-footer",
            )
        paths.append(path)
    return paths


def _header(
    version: int, flags: int, capacity: int, *, rgd: int, gd: int, overhead: int, compress: int = 0
) -> bytes:
    packed = HEADER.pack(
        b"KDMV", version, flags, capacity, GRAIN_SECTORS, DESCRIPTOR_OFFSET, DESCRIPTOR_SECTORS,
        GTES_PER_GT, rgd, gd, overhead, 0, b"\n \r\n", compress,
    )  # fmt: skip
    return packed.ljust(SECTOR_BYTES, b"\0")


def _descriptor(create_type: str, capacity: int, file_name: str, seed: int) -> bytes:
    if '"' in file_name or not file_name.isascii():
        raise ValueError(f"file name {file_name!r} cannot appear in a VMDK extent line")
    content_id = random.Random(seed).getrandbits(32)
    cylinders = min(_ceil(capacity, 16 * 63), 16383)
    text = (
        "# Disk DescriptorFile\nversion=1\n"
        f'CID={content_id:08x}\nparentCID=ffffffff\ncreateType="{create_type}"\n\n'
        f'# Extent description\nRW {capacity} SPARSE "{file_name}"\n\n'
        "# The Disk Data Base\n#DDB\n\n"
        'ddb.virtualHWVersion = "4"\n'
        f'ddb.geometry.cylinders = "{cylinders}"\n'
        'ddb.geometry.heads = "16"\nddb.geometry.sectors = "63"\nddb.adapterType = "ide"\n'
    )
    return text.encode("ascii")


def _grains(data: GrainData, virtual_size_bytes: int) -> dict[int, bytes]:
    """The non-zero grains by index, in order, each padded to a full grain."""
    if data is None:
        return {}
    read, grain_count = _grain_reader(data, virtual_size_bytes)
    grains = {}
    for index in range(grain_count):
        grain = read(index)
        if len(grain) > min(GRAIN_BYTES, virtual_size_bytes - index * GRAIN_BYTES):
            raise ValueError(f"grain {index} has {len(grain)} bytes: more than fit")
        if grain.count(0) != len(grain):
            grains[index] = grain.ljust(GRAIN_BYTES, b"\0")
    return grains


def _grain_reader(
    data: bytes | Callable[[int], bytes], virtual_size_bytes: int
) -> tuple[Callable[[int], bytes], int]:
    if callable(data):
        return data, _ceil(virtual_size_bytes, GRAIN_BYTES)
    if len(data) > virtual_size_bytes:
        raise ValueError(f"{len(data)} bytes of data exceed the virtual size")
    content = data

    def grain_of(index: int) -> bytes:
        return content[index * GRAIN_BYTES : (index + 1) * GRAIN_BYTES]

    return grain_of, _ceil(len(content), GRAIN_BYTES)


def _pseudo_random(size_bytes: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size_bytes)


def _capacity_sectors(virtual_size_bytes: int) -> int:
    if virtual_size_bytes <= 0 or virtual_size_bytes % SECTOR_BYTES:
        raise ValueError(f"virtual size {virtual_size_bytes} is not a positive multiple of 512")
    return virtual_size_bytes // SECTOR_BYTES


def _marker(value: int, marker_type: int) -> bytes:
    return struct.pack("<QII", value, 0, marker_type).ljust(SECTOR_BYTES, b"\0")


def _u32s(values: Iterable[int]) -> bytes:
    listed = list(values)
    return struct.pack(f"<{len(listed)}I", *listed)


def _put(buffer: bytearray, sector: int, content: bytes) -> None:
    buffer[sector * SECTOR_BYTES : sector * SECTOR_BYTES + len(content)] = content


def _append(buffer: bytearray, content: bytes) -> None:
    """Append `content`, padded to a whole sector: every structure starts on a sector."""
    buffer += content.ljust(_ceil(len(content), SECTOR_BYTES) * SECTOR_BYTES, b"\0")


def _ceil(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)
