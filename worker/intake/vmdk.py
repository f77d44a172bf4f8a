"""Inspect a VMDK before any byte moves, reading its headers only, and refuse what Glance would."""

from __future__ import annotations

import os
import re
import stat
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from worker.errors import UnsupportedDisk
from worker.intake.identity import identity_of

SECTOR_BYTES = 512
GIB = 1 << 30
GD_AT_END = 0xFFFFFFFFFFFFFFFF
# qemu and oslo both cap an embedded or standalone descriptor at 1 MiB - 1.
DESCRIPTOR_MAX_BYTES = (1 << 20) - 1
FOOTER_BYTES = 3 * SECTOR_BYTES  # footer marker, footer, end-of-stream marker
MARKER_EOS, MARKER_FOOTER = 0, 3
NO_PARENT_CID = "ffffffff"
CONVERT_COMMAND = "qemu-img convert -O vmdk -o subformat=streamOptimized"

# SparseExtentHeader up to compressAlgorithm (79 bytes), little-endian.
_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
_MARKER = struct.Struct("<QII")
_NEWLINE_TEST = b"\n \r\n"
_FLAG_NEWLINE_TEST = 0x1

# createType, lower-cased as oslo compares it -> the spelling VMware writes.
_MONOLITHIC = {"monolithicsparse": "monolithicSparse", "streamoptimized": "streamOptimized"}
_FLAT = {"monolithicflat": "monolithicFlat", "vmfs": "vmfs"}
_FLAT_EXTENT_TYPES = frozenset({"FLAT", "VMFS"})
_EXTENT_TYPES = frozenset(
    {"FLAT", "SPARSE", "ZERO", "VMFS", "VMFSSPARSE", "VMFSRDM", "VMFSRAW", "SESPARSE"}
)
_EXTENT_ACCESS = ("rw", "rdonly", "noaccess")
# 2**64 sectors has 20 digits; a longer number is hostile (and int() refuses 4,300 digits).
_MAX_SECTOR_DIGITS = 20
# ACCESS SIZE_IN_SECTORS TYPE ["file name" [OFFSET]]; ZERO extents name no file.
_EXTENT_LINE = re.compile(
    r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Za-z]+)(?:\s+"([^"]*)"(?:\s+(\d+))?)?$', re.IGNORECASE
)


@dataclass(frozen=True)
class Extent:
    """One extent line of a descriptor."""

    access: str
    size_sectors: int
    kind: str  # upper case: FLAT, SPARSE, VMFS ...
    file_name: str | None
    offset_sectors: int


@dataclass(frozen=True)
class Descriptor:
    """A parsed descriptor: createType as written, header fields by lower-case key, extents."""

    create_type: str
    fields: dict[str, str]
    extents: tuple[Extent, ...]


@dataclass(frozen=True)
class Inspection:
    """What a VMDK turned out to be and what to upload for it."""

    subformat: str  # createType as VMware spells it
    virtual_size_bytes: int
    disk_format: str  # "vmdk", or "raw" when a flat extent is uploaded as it is
    upload_source: str  # the file (or URL) to upload: the VMDK itself, or its flat extent
    upload_size_bytes: int
    bytes_read: int
    warnings: tuple[str, ...] = ()
    # The identity of a flat extent to upload, taken when it was checked (None: the file
    # itself, whose identity the caller took).
    upload_identity: Mapping[str, int | str] | None = field(default=None, compare=False, repr=False)


# Where the flat extent a descriptor names is, for the caller who reads the descriptor: its
# name and size as the descriptor gives them -> what to upload and its identity, or
# UnsupportedDisk. The descriptor's own place decides what "beside it" means.
ExtentLocator = Callable[[str, int], tuple[str, Mapping[str, int | str]]]


def inspect_open_vmdk(
    file: BinaryIO,
    path: Path,
    *,
    flat_as_raw: bool = False,
    offset: int = 0,
    size_bytes: int | None = None,
    locate_extent: ExtentLocator | None = None,
) -> Inspection:
    """The same inspection of a file already open (its position is not kept).

    With `offset` and `size_bytes`, the VMDK is those bytes of the file (a member of an OVA),
    inspected exactly as a file of its own.
    """
    if size_bytes is None:
        size_bytes = os.fstat(file.fileno()).st_size - offset
    reader = _Reader(file, size_bytes, base=offset)
    locate = locate_extent or _beside(path)
    return _inspect(path, reader, flat_as_raw=flat_as_raw, locate=locate)


def min_disk_warning(virtual_size_bytes: int, min_disk_gib: int) -> str | None:
    """Why a set min_disk (GiB) is too small for the disk's virtual size, or None."""
    needed_gib = -(-virtual_size_bytes // GIB)
    if 0 < min_disk_gib < needed_gib:
        return (
            f"min_disk {min_disk_gib} GiB is below the disk's virtual size of "
            f"{virtual_size_bytes} bytes: set it to at least {needed_gib}"
        )
    return None


def convert_hint(path: Path) -> str:
    """The qemu-img command that turns any VMDK qemu can open into one Glance accepts."""
    target = path.with_name(f"{path.stem}-stream.vmdk")
    return f"{CONVERT_COMMAND} {path} {target}"


class _Reader:
    """Positioned reads of one open file (or of `size_bytes` of it from `base`), counting every
    byte read."""

    def __init__(self, file: BinaryIO, size_bytes: int, *, base: int = 0) -> None:
        self._file = file
        self._base = base
        self.size_bytes = size_bytes
        self.bytes_read = 0

    def read_at(self, offset: int, length: int) -> bytes:
        offset = max(0, min(offset, self.size_bytes))
        length = max(0, min(length, self.size_bytes - offset))
        self._file.seek(self._base + offset)
        data = self._file.read(length)
        self.bytes_read += len(data)
        return data


def _inspect(
    path: Path, reader: _Reader, *, flat_as_raw: bool, locate: ExtentLocator
) -> Inspection:
    head = reader.read_at(0, SECTOR_BYTES)
    if head.startswith(b"KDMV"):
        return _inspect_sparse(path, reader, head)
    if head.startswith(b"COWD"):
        raise UnsupportedDisk(
            "unsupported VMDK subformat vmfsSparse: this is a snapshot's -delta extent (COWD); "
            f"consolidate the snapshot, or convert the disk's descriptor first with "
            f"{CONVERT_COMMAND} DESCRIPTOR.vmdk {path.stem}-stream.vmdk"
        )
    if _looks_like_descriptor(head):
        return _inspect_descriptor(path, reader, head, flat_as_raw=flat_as_raw, locate=locate)
    raise UnsupportedDisk(_not_a_vmdk(path, reader, head))


# Hosted sparse extents: monolithicSparse and streamOptimized --------------------------------


def _inspect_sparse(path: Path, reader: _Reader, head: bytes) -> Inspection:
    if len(head) < SECTOR_BYTES:
        raise UnsupportedDisk(
            f"truncated VMDK header: the file has {len(head)} bytes, a sparse header needs "
            f"{SECTOR_BYTES}"
        )
    fields = _HEADER.unpack_from(head)
    version, flags, capacity = fields[1], fields[2], fields[3]
    descriptor_sector, descriptor_sectors, gd_sector = fields[5], fields[6], fields[9]
    _check_header(version, flags, capacity, newline_test=fields[12])
    _check_descriptor_place(descriptor_sector, descriptor_sectors)
    raw = reader.read_at(SECTOR_BYTES, min(descriptor_sectors * SECTOR_BYTES, DESCRIPTOR_MAX_BYTES))
    if len(raw) < min(descriptor_sectors * SECTOR_BYTES, DESCRIPTOR_MAX_BYTES):
        raise UnsupportedDisk("truncated VMDK: the embedded descriptor runs past the end of file")
    text = _ascii(raw.split(b"\0", 1)[0])
    if not text.strip():
        raise UnsupportedDisk(_SPLIT_PIECE)
    descriptor = parse_descriptor(text)
    subformat = _MONOLITHIC.get(descriptor.create_type.lower())
    if subformat is None:
        raise UnsupportedDisk(_unsupported(descriptor, path))
    _check_single_sparse_extent(descriptor, subformat)
    _check_not_delta(descriptor, path)
    if gd_sector == GD_AT_END:
        gd_sector = _footer_gd_sector(reader, head, subformat)
    footer_bytes = FOOTER_BYTES if fields[9] == GD_AT_END else 0
    end_sector = (reader.size_bytes - footer_bytes) // SECTOR_BYTES
    if gd_sector >= end_sector:
        raise UnsupportedDisk(
            f"truncated VMDK: the grain directory is at sector {gd_sector}, past the end of the "
            f"file ({reader.size_bytes} bytes)"
        )
    return Inspection(
        subformat=subformat,
        virtual_size_bytes=capacity * SECTOR_BYTES,
        disk_format="vmdk",
        upload_source=str(path),
        upload_size_bytes=reader.size_bytes,
        bytes_read=reader.bytes_read,
        warnings=_sparse_warnings(descriptor, capacity, unclean=fields[11]),
    )


_SPLIT_PIECE = (
    "sparse VMDK extent without an embedded descriptor: this is one piece of a split disk "
    "(such as a twoGbMaxExtentSparse -s001.vmdk); use the descriptor file that names it as the "
    "source"
)


def _check_header(version: int, flags: int, capacity: int, *, newline_test: bytes) -> None:
    if version not in (1, 2, 3):
        raise UnsupportedDisk(f"unsupported VMDK header version {version} (1 to 3 are known)")
    if flags & _FLAG_NEWLINE_TEST and newline_test != _NEWLINE_TEST:
        raise UnsupportedDisk(
            "damaged VMDK header: its newline test bytes were changed, as a text-mode (ASCII) "
            "file transfer does; copy the file again in binary mode"
        )
    if capacity == 0:
        raise UnsupportedDisk("the VMDK header gives the disk a capacity of 0 sectors")


def _check_descriptor_place(descriptor_sector: int, descriptor_sectors: int) -> None:
    if descriptor_sector == 0 or descriptor_sectors == 0:
        raise UnsupportedDisk(_SPLIT_PIECE)
    if descriptor_sector != 1:
        raise UnsupportedDisk(
            f"the VMDK header puts the descriptor at sector {descriptor_sector}; "
            "a monolithic VMDK keeps it at sector 1"
        )


def _check_single_sparse_extent(descriptor: Descriptor, subformat: str) -> None:
    # The data is in this very file: any other extent would make qemu open another file.
    kinds = [extent.kind for extent in descriptor.extents]
    if kinds != ["SPARSE"]:
        raise UnsupportedDisk(
            f"the {subformat} descriptor must name exactly one SPARSE extent (this file), "
            f"it names {len(kinds)}: {', '.join(kinds)}"
        )


def _footer_gd_sector(reader: _Reader, head: bytes, subformat: str) -> int:
    """Check VMware's three closing sectors; return the real grain directory sector."""
    if subformat != "streamOptimized":
        raise UnsupportedDisk(f"a {subformat} header cannot defer its grain directory to a footer")
    tail = reader.read_at(reader.size_bytes - FOOTER_BYTES, FOOTER_BYTES)
    if reader.size_bytes < SECTOR_BYTES + FOOTER_BYTES or len(tail) < FOOTER_BYTES:
        raise UnsupportedDisk("truncated VMDK: too short for the footer its header announces")
    marker, footer, eos = (tail[i : i + SECTOR_BYTES] for i in range(0, FOOTER_BYTES, 512))
    _value, size, kind = _MARKER.unpack_from(marker)
    if size != 0 or kind != MARKER_FOOTER:
        raise UnsupportedDisk(
            "the header says GD_AT_END but the file does not end with a footer marker "
            "(truncated or damaged stream)"
        )
    if footer[:4] != b"KDMV":
        raise UnsupportedDisk("the VMDK footer has no KDMV signature")
    # The footer repeats the header; only the grain directory's place may differ.
    header_fields, footer_fields = _HEADER.unpack_from(head), _HEADER.unpack_from(footer)
    same = (0, 1, 3, 4, 5, 6)  # magic, version, capacity, grain, descriptor place and size
    if any(footer_fields[i] != header_fields[i] for i in same) or footer_fields[9] == GD_AT_END:
        raise UnsupportedDisk("the VMDK footer does not match its header")
    if _MARKER.unpack_from(eos) != (0, 0, MARKER_EOS):
        raise UnsupportedDisk("the VMDK stream does not end with an end-of-stream marker")
    gd_sector: int = footer_fields[9]
    return gd_sector


def _sparse_warnings(descriptor: Descriptor, capacity: int, *, unclean: int) -> tuple[str, ...]:
    warnings = []
    described = sum(extent.size_sectors for extent in descriptor.extents)
    if described != capacity:
        warnings.append(
            f"the descriptor's extent has {described} sectors, the header {capacity}: "
            "the header's capacity is used"
        )
    if unclean:
        warnings.append(
            "the VMDK header marks an unclean shutdown: was the disk copied while in use?"
        )
    return tuple(warnings)


# Text descriptors: monolithicFlat, vmfs, split and delta disks -------------------------------


def _looks_like_descriptor(head: bytes) -> bool:
    text = head.lower()
    return text.startswith(b"# disk descriptorfile") or b"createtype" in text


def _inspect_descriptor(
    path: Path, reader: _Reader, head: bytes, *, flat_as_raw: bool, locate: ExtentLocator
) -> Inspection:
    if reader.size_bytes > DESCRIPTOR_MAX_BYTES:
        raise UnsupportedDisk(
            f"the file starts like a VMDK descriptor but has {reader.size_bytes} bytes, "
            f"more than a descriptor may ({DESCRIPTOR_MAX_BYTES})"
        )
    # Most descriptors fit in the first sector, already read.
    raw = head if len(head) == reader.size_bytes else reader.read_at(0, reader.size_bytes)
    # qemu-img convert pads the descriptor file with NULs to a whole sector; qemu reads the
    # text up to the first NUL. Anything but padding after it would be hidden from a reader.
    raw, _, padding = raw.partition(b"\0")
    if padding.strip(b"\0"):
        raise UnsupportedDisk(
            f"invalid VMDK descriptor: data follows the NUL padding at byte {len(raw)}"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnsupportedDisk(f"the VMDK descriptor is not UTF-8 text (byte {exc.start})") from exc
    descriptor = parse_descriptor(text)
    kind = descriptor.create_type.lower()
    _check_not_delta(descriptor, path)
    if kind in _FLAT:
        return _flat_extent(
            path, reader, descriptor, _FLAT[kind], flat_as_raw=flat_as_raw, locate=locate
        )
    if kind in _MONOLITHIC:
        names = [extent.file_name for extent in descriptor.extents if extent.file_name]
        raise UnsupportedDisk(
            f"a standalone descriptor of a {_MONOLITHIC[kind]} disk: use the file it names "
            f"({', '.join(names) or 'none'}) as the source"
        )
    raise UnsupportedDisk(_unsupported(descriptor, path))


def _flat_extent(
    path: Path,
    reader: _Reader,
    descriptor: Descriptor,
    subformat: str,
    *,
    flat_as_raw: bool,
    locate: ExtentLocator,
) -> Inspection:
    extents = descriptor.extents
    extent = extents[0]
    if len(extents) != 1 or extent.kind not in _FLAT_EXTENT_TYPES or not extent.file_name:
        raise UnsupportedDisk(_unsupported(descriptor, path))
    name = extent.file_name
    size_bytes = extent.size_sectors * SECTOR_BYTES
    if not flat_as_raw:
        raise UnsupportedDisk(
            f"VMDK subformat {subformat} is a descriptor; the disk's data is in the flat extent "
            f"'{name}': set flat_as_raw: true to upload '{name}' as disk_format raw, or convert "
            f"it first with {convert_hint(path)}"
        )
    if extent.offset_sectors:
        raise UnsupportedDisk(
            f"the flat extent '{name}' starts at sector {extent.offset_sectors}, not 0: "
            f"it cannot be uploaded as raw; convert it first with {convert_hint(path)}"
        )
    upload_source, identity = locate(name, size_bytes)
    return Inspection(
        subformat=subformat,
        virtual_size_bytes=size_bytes,
        disk_format="raw",
        upload_source=upload_source,
        upload_size_bytes=size_bytes,
        bytes_read=reader.bytes_read,
        upload_identity=identity,
    )


def _beside(path: Path) -> ExtentLocator:
    """A flat extent in the descriptor's directory on this host."""

    def locate(name: str, size_bytes: int) -> tuple[str, Mapping[str, int | str]]:
        extent_path = Path(os.path.realpath(path.parent / name))
        return str(extent_path), identity_of(_check_flat_file(extent_path, name, size_bytes))

    return locate


def _check_flat_file(extent_path: Path, name: str, size_bytes: int) -> os.stat_result:
    try:
        status = os.stat(extent_path)
    except OSError as exc:
        raise UnsupportedDisk(
            f"the flat extent '{name}' cannot be used: {exc.strerror or exc}: {extent_path}"
        ) from exc
    if not stat.S_ISREG(status.st_mode):
        raise UnsupportedDisk(f"the flat extent '{name}' is not a regular file: {extent_path}")
    if status.st_size != size_bytes:
        raise UnsupportedDisk(
            f"the flat extent '{name}' has {status.st_size} bytes, the descriptor says "
            f"{size_bytes}: {extent_path}"
        )
    return status


def _check_not_delta(descriptor: Descriptor, path: Path) -> None:
    parent = descriptor.fields.get("parentfilenamehint")
    parent_cid = descriptor.fields.get("parentcid", NO_PARENT_CID).lower()
    if parent or parent_cid != NO_PARENT_CID:
        on_top_of = f" on top of '{parent}'" if parent else ""
        raise UnsupportedDisk(
            f"unsupported VMDK: a {descriptor.create_type} snapshot delta{on_top_of}; "
            "consolidate the snapshot, or convert it first (qemu-img reads the whole chain) "
            f"with {convert_hint(path)}"
        )


def _unsupported(descriptor: Descriptor, path: Path) -> str:
    return (
        f"unsupported VMDK subformat {descriptor.create_type}: convert it first with "
        f"{convert_hint(path)}"
    )


# The descriptor grammar ---------------------------------------------------------------------


def parse_descriptor(text: str) -> Descriptor:
    """Parse descriptor text as strictly as oslo's safety check; raise UnsupportedDisk if bad.

    Only blank and comment lines, `ddb*` lines, `key=value` header lines and extent lines are
    allowed; extent file names must be plain names in the descriptor's own directory.
    """
    fields: dict[str, str] = {}
    extents: list[Extent] = []
    for number, line in enumerate((raw.strip() for raw in text.split("\n")), start=1):
        lowered = line.lower()
        if not line or line.startswith("#") or lowered.startswith("ddb"):
            continue
        if lowered.split(" ", 1)[0] in _EXTENT_ACCESS:
            extents.append(_extent(line, number))
        elif "=" in line and " " not in line.split("=", 1)[0]:
            key, value = line.split("=", 1)
            fields[key.lower()] = value.strip().strip('"')
        else:
            raise UnsupportedDisk(
                f"invalid VMDK descriptor: line {number} is neither a header field, an extent "
                f"nor a ddb entry: {line[:60]!r}"
            )
    create_type = fields.get("createtype")
    if not create_type:
        raise UnsupportedDisk("invalid VMDK descriptor: no createType")
    if not extents:
        raise UnsupportedDisk("invalid VMDK descriptor: it names no extent")
    return Descriptor(create_type=create_type, fields=fields, extents=tuple(extents))


def _extent(line: str, number: int) -> Extent:
    # oslo refuses any slash in an extent line, quoted or not; so do we, before parsing.
    if "/" in line or "\\" in line:
        raise UnsupportedDisk(_unsafe_name(line))
    match = _EXTENT_LINE.match(line)
    if match is None or match.group(3).upper() not in _EXTENT_TYPES:
        raise UnsupportedDisk(f"invalid VMDK descriptor: line {number} is a bad extent: {line!r}")
    access, sectors, kind, name, offset = match.groups()
    if name is not None and (name in ("", ".", "..") or "\0" in name):
        raise UnsupportedDisk(_unsafe_name(line))
    for value in (sectors, offset or ""):
        if len(value) > _MAX_SECTOR_DIGITS:
            raise UnsupportedDisk(
                f"invalid VMDK descriptor: line {number} gives a sector count of {len(value)} "
                f"digits, more than any disk has: {line[:60]!r}"
            )
    return Extent(
        access=access.upper(),
        size_sectors=int(sectors),
        kind=kind.upper(),
        file_name=name,
        offset_sectors=int(offset or 0),
    )


def _unsafe_name(line: str) -> str:
    return (
        f"unsafe VMDK extent {line[:80]!r}: extent file names must be plain names beside the "
        "descriptor, without path separators or '..' (a path in an extent is how "
        "CVE-2024-32498 read files off the server)"
    )


def _ascii(raw: bytes) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise UnsupportedDisk(
            f"invalid VMDK descriptor: not ASCII text (byte {exc.start}), which Glance refuses"
        ) from exc


# Everything else ----------------------------------------------------------------------------

_VDI_SIGNATURE = struct.pack("<I", 0xBEDA107F)
# Signature at offset 0 -> (what the file is, the disk_format that would upload it as it is).
_SIGNATURES: tuple[tuple[bytes, str, str | None], ...] = (
    (b"QFI\xfb", "a qcow2 image", "qcow2"),
    (b"QED\0", "a QED image", None),
    (b"vhdxfile", "a VHDX image", "vhdx"),
    (b"conectix", "a VHD image", "vhd"),
    (b"LUKS\xba\xbe", "a LUKS-encrypted volume", None),
)
_ISO_OFFSET = 0x8001
_ISO_SIGNATURES = (b"CD001", b"NSR02", b"NSR03")
# How VMware and qemu name the data files of monolithicFlat, vmfs and twoGbMaxExtentFlat disks.
_FLAT_EXTENT_NAME = re.compile(r"-(flat|f\d{3})\.vmdk$", re.IGNORECASE)


def _not_a_vmdk(path: Path, reader: _Reader, head: bytes) -> str:
    if not head:
        return "not a VMDK: the file is empty"
    if b"KDMV".startswith(head[:4]) and len(head) < 4:
        return f"truncated VMDK header: the file has {len(head)} bytes"
    found, disk_format = _identify(reader, head)
    if disk_format in ("raw", None) and _FLAT_EXTENT_NAME.search(path.name):
        return (
            f"not a VMDK: the file is {found or 'raw data'}, the flat extent of a "
            "descriptor-based VMDK; "
            "use the descriptor .vmdk as the source with flat_as_raw: true, or set "
            "disk_format: raw"
        )
    if found is None:
        return f"not a VMDK: the file is {_not_a_disk_image(path, reader)}"
    advice = f" (set disk_format: {disk_format} to upload it as it is)" if disk_format else ""
    return f"not a VMDK: the file is {found}{advice}"


def _identify(reader: _Reader, head: bytes) -> tuple[str | None, str | None]:
    """What a file with a known disk image signature is, and the disk_format that takes it."""
    for signature, found, disk_format in _SIGNATURES:
        if head.startswith(signature):
            return found, disk_format
    if head[0x40:0x44] == _VDI_SIGNATURE:
        return "a VirtualBox VDI image", "vdi"
    # A fixed-size VHD has its only copy of the footer in the last sector.
    if reader.read_at(reader.size_bytes - SECTOR_BYTES, 8) == b"conectix":
        return "a VHD image", "vhd"
    if reader.read_at(_ISO_OFFSET, 5) in _ISO_SIGNATURES:
        return "an ISO 9660/UDF image", "iso"
    if len(head) == SECTOR_BYTES and head[510:512] == b"\x55\xaa":
        return "raw data with a partition table (a raw disk image)", "raw"
    return None, None


# What a file without any disk image signature holds: archives, then text, then bytes.
_ARCHIVES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\x1f\x8b", "a gzip-compressed file"),
    (0, b"\xfd7zXZ\x00", "an xz-compressed file"),
    (0, b"BZh", "a bzip2-compressed file"),
    (0, b"\x28\xb5\x2f\xfd", "a zstd-compressed file"),
    (0, b"PK\x03\x04", "a zip archive"),
)
_TAR_MAGIC_OFFSET = 257
_SNIFF_BYTES = 4096
_OVF_NAMESPACE = b"schemas.dmtf.org/ovf/envelope"
_EXTRACT_HINT = "extract the .vmdk files it holds (tar xf {path}) and list those as sources"


def _not_a_disk_image(path: Path, reader: _Reader) -> str:
    """'not a disk image (what it is)', with the way out; raw only where it could be a disk."""
    sniff = reader.read_at(0, _SNIFF_BYTES)
    for offset, magic, what in _ARCHIVES:
        if sniff[offset:].startswith(magic):
            return f"not a disk image ({what}); unpack it and list the disk inside as the source"
    if sniff[_TAR_MAGIC_OFFSET : _TAR_MAGIC_OFFSET + 5] == b"ustar":
        first_member = sniff[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if first_member.lower().endswith(".ovf"):
            return (
                f"not a disk image (an OVA: a tar archive of an OVF appliance, {first_member} "
                f"first); {_EXTRACT_HINT.format(path=path)}"
            )
        return f"not a disk image (a tar archive); {_EXTRACT_HINT.format(path=path)}"
    if _is_text(sniff):
        if _OVF_NAMESPACE in sniff or b"<Envelope" in sniff or b"<ovf:Envelope" in sniff:
            return (
                "not a disk image (an OVF descriptor: XML that describes an appliance); "
                "list the .vmdk files it names as sources"
            )
        return "not a disk image (text)"
    what = "random data" if _looks_random(sniff) else "data with no disk image signature"
    if reader.size_bytes % SECTOR_BYTES:
        return (
            f"not a disk image ({what}; {reader.size_bytes} bytes, not a whole number "
            f"of {SECTOR_BYTES}-byte sectors)"
        )
    return (
        f"not a disk image ({what}); if it is a raw disk all the same, set disk_format: raw "
        "to upload it as it is"
    )


def _is_text(sample: bytes) -> bool:
    """UTF-8 with no control characters but tab, newline, carriage return and form feed."""
    try:
        text = sample.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(sample) - 3:  # a character cut at the end of the sample is fine
            return False
        text = sample[: exc.start].decode("utf-8")
    return all(ch.isprintable() or ch in "\t\n\r\f" for ch in text)


def _looks_random(sample: bytes) -> bool:
    """Nearly every byte value occurs, as in encrypted, compressed or random data."""
    return len(sample) >= SECTOR_BYTES and len(set(sample)) > 200
