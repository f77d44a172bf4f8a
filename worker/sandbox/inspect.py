"""The import-time format check: a staged file must really be the disk_format it claims."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

SECTOR_BYTES = 512
VMDK_HEADER = struct.Struct(
    "<4sIIQQQQ"
)  # magic, version, flags, capacity, grain, descOff, descSize
QCOW_MAGIC = b"QFI\xfb"
ALLOWED_VMDK_TYPES = ("monolithicsparse", "streamoptimized")
MAX_DESCRIPTOR_BYTES = 1024 * 1024 - 1
EXTENT_ACCESS = ("rw", "rdonly", "noaccess")


@dataclass(frozen=True)
class Verdict:
    """Whether Glance would accept the data, the virtual size it would record, and why not."""

    accepted: bool
    virtual_size: int | None = None
    reason: str = ""


def inspect_file(path: Path, disk_format: str | None) -> Verdict:
    """Check `path` against the claimed `disk_format` (blocking: call it in a thread)."""
    if disk_format == "vmdk":
        return _inspect_vmdk(path)
    if disk_format == "qcow2":
        return _inspect_qcow2(path)
    if disk_format == "raw":
        # Glance accepts any content claimed as raw; the virtual size is the byte count.
        return Verdict(True, path.stat().st_size)
    return Verdict(True, None)


def _inspect_vmdk(path: Path) -> Verdict:
    with path.open("rb") as stream:
        header = stream.read(SECTOR_BYTES)
        if len(header) < VMDK_HEADER.size or header[:4] != b"KDMV":
            return Verdict(False, reason="Image disk_format vmdk does not match stream data")
        _, version, _, capacity, _, desc_offset, desc_size = VMDK_HEADER.unpack_from(header)
        if not 1 <= version <= 3:
            return Verdict(False, reason=f"Unsupported VMDK version {version}")
        if desc_offset != 1 or desc_size == 0:
            return Verdict(False, reason="No descriptor found")
        stream.seek(desc_offset * SECTOR_BYTES)
        raw = stream.read(min(desc_size * SECTOR_BYTES, MAX_DESCRIPTOR_BYTES))
    problem = _descriptor_problem(raw.split(b"\x00", 1)[0].decode("ascii", "replace"))
    if problem:
        return Verdict(False, reason=problem)
    return Verdict(True, capacity * SECTOR_BYTES)


def _descriptor_problem(text: str) -> str:
    """Why the embedded descriptor is unsafe or unsupported, or "" when it is fine."""
    create_type = ""
    extents = 0
    for line in text.lower().splitlines():
        line = line.strip()
        if line.startswith("createtype"):
            create_type = line.partition("=")[2].strip().strip('"')
        elif line.startswith(EXTENT_ACCESS):
            extents += 1
            if "/" in line:
                return "Invalid extent filenames found"
    if create_type not in ALLOWED_VMDK_TYPES:
        return f"Unsupported subformat {create_type or 'formatnotfound'}"
    if extents == 0:
        return "No extents found"
    return ""


def _inspect_qcow2(path: Path) -> Verdict:
    with path.open("rb") as stream:
        header = stream.read(32)
    if len(header) < 32 or header[:4] != QCOW_MAGIC:
        return Verdict(False, reason="Image disk_format qcow2 does not match stream data")
    return Verdict(True, struct.unpack_from(">Q", header, 24)[0])
