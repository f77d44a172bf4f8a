"""An OVA or an OVF directory as a manifest source: its VMs' disks and where their bytes are.

A source is recognised by its content, not its name: a tar archive is an OVA (its first
member must be the OVF envelope), and XML whose root is an `Envelope` is an OVF whose files
sit beside it, as its `ovf:href`s name them. Each disk is then either a loose file or a byte
range of the archive. The manifest file (`.mf`) gives each file's digest: the envelope's is
checked here, each disk's while it is uploaded.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath

from worker.errors import SourceError, UnsupportedDisk
from worker.intake.ova import Member, is_tar, read_members
from worker.intake.ovf import (
    MAX_ENVELOPE_BYTES,
    Envelope,
    FileRef,
    VirtualMachine,
    VmDisk,
    looks_like_envelope,
    parse_envelope,
)

OVA, OVF = "ova", "ovf"
_SNIFF_BYTES = 4096
# `SHA256(name)= hex`, as ovftool and vSphere write each line of a .mf.
_MF_LINE = re.compile(r"^(SHA1|SHA256|SHA512)\s*\((.+)\)\s*=\s*([0-9a-fA-F]+)\s*$")
_MF_ALGORITHMS = {"SHA1": "sha1", "SHA256": "sha256", "SHA512": "sha512"}
_DIGEST_LENGTHS = {"sha1": 40, "sha256": 64, "sha512": 128}
_MAX_MF_BYTES = 1 << 20
COMPRESSED_HINT = (
    "ovftool compresses disks only when asked with --compress: export again without that "
    "option (or decompress the disk and drop ovf:compression from the OVF)"
)


@dataclass(frozen=True)
class Digest:
    """A digest the .mf gives for one file: hashlib's algorithm name and the hex value."""

    algorithm: str
    value: str
    manifest: str  # the .mf's name, for messages


@dataclass(frozen=True)
class ApplianceDisk:
    """One disk of a VM of the appliance, and the bytes that hold it."""

    vm: VirtualMachine
    position: int  # 0 for the boot disk
    path: str  # the archive, or the loose VMDK (resolved)
    offset: int | None  # where the member's data starts in the archive; None: a loose file
    size_bytes: int
    digest: Digest | None

    @property
    def capacity_bytes(self) -> int:
        return self.vm.disks[self.position].capacity_bytes

    @property
    def href(self) -> str:
        return self.vm.disks[self.position].file.href


@dataclass(frozen=True)
class Appliance:
    """An OVA or OVF source: its envelope and every disk of its VMs, VM by VM."""

    kind: str  # "ova" or "ovf"
    path: str
    envelope: Envelope
    disks: tuple[ApplianceDisk, ...]
    warnings: tuple[str, ...] = ()


def sniff(path: str) -> str | None:
    """The kind of export at `path`: "ova" for a tar archive, "ovf" for an XML envelope,
    None for anything else.

    Only a regular file is read (a FIFO would block, a device never end): for anything else,
    the ordinary source checks say why it cannot be used.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        head = os.pread(fd, _SNIFF_BYTES, 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    if is_tar(head):
        return OVA
    if looks_like_envelope(head):
        return OVF
    return None


def open_appliance(path: str, kind: str) -> Appliance:
    """Read the OVA or OVF at `path`; UnsupportedDisk or SourceError say what is wrong."""
    try:
        if kind == OVA:
            return _ova(path)
        return _ovf(path)
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _ova(path: str) -> Appliance:
    with open(path, "rb") as file:
        members = read_members(file)
        if not members:
            raise UnsupportedDisk("an OVA with no OVF: the tar archive holds no file")
        first = members[0]
        file.seek(first.offset)
        data = file.read(min(first.size_bytes, MAX_ENVELOPE_BYTES + 1))
        if not looks_like_envelope(data[:_SNIFF_BYTES]):
            raise UnsupportedDisk(
                f"an OVA with no OVF: the tar archive's first member {first.name!r} is not an "
                "OVF envelope (an OVA starts with its .ovf)"
            )
        envelope = parse_envelope(data)
        by_name = {_plain(member.name): member for member in members}
        manifest = _find(members, ".mf")
        mf_text = None
        if manifest is not None:
            file.seek(manifest.offset)
            mf_text = file.read(min(manifest.size_bytes, _MAX_MF_BYTES))
    warnings: list[str] = []
    digests = _digests(mf_text, manifest.name if manifest else None, first.name, data, warnings)
    if _find(members, ".cert") is not None:
        warnings.append(_CERT_WARNING)

    def member_of(vm: VirtualMachine, disk: VmDisk) -> tuple[str, int | None, int]:
        member = by_name.get(_plain(_checked_href(disk.file)))
        if member is None:
            raise UnsupportedDisk(
                f"the OVF names file {disk.file.href!r} for disk {disk.disk_id!r} of VM "
                f"{vm.name!r}, which the OVA does not hold"
            )
        return path, member.offset, member.size_bytes

    disks = _disks(envelope, member_of, digests, warnings)
    return Appliance(OVA, path, envelope, disks, tuple(warnings))


def _ovf(path: str) -> Appliance:
    with open(path, "rb") as file:
        data = file.read(MAX_ENVELOPE_BYTES + 1)
    envelope = parse_envelope(data)
    directory = os.path.dirname(path)
    name = os.path.basename(path)
    mf_name = f"{os.path.splitext(name)[0]}.mf"
    mf_text = None
    mf_path = os.path.join(directory, mf_name)
    if os.path.isfile(mf_path):
        with open(mf_path, "rb") as file:
            mf_text = file.read(_MAX_MF_BYTES)
    warnings: list[str] = []
    digests = _digests(mf_text, mf_name if mf_text is not None else None, name, data, warnings)
    if os.path.isfile(os.path.join(directory, f"{os.path.splitext(name)[0]}.cert")):
        warnings.append(_CERT_WARNING)

    def file_of(vm: VirtualMachine, disk: VmDisk) -> tuple[str, int | None, int]:
        disk_path = os.path.realpath(os.path.join(directory, _checked_href(disk.file)))
        return disk_path, None, _disk_status(disk_path, disk.file, vm, disk.disk_id).st_size

    disks = _disks(envelope, file_of, digests, warnings)
    return Appliance(OVF, path, envelope, disks, tuple(warnings))


def _disks(
    envelope: Envelope,
    locate: Callable[[VirtualMachine, VmDisk], tuple[str, int | None, int]],
    digests: Mapping[str, Digest],
    warnings: list[str],
) -> tuple[ApplianceDisk, ...]:
    """Every VM's disks in order, each where `locate` finds its bytes: (path, offset, size).

    A size that disagrees with the OVF's is added to `warnings`.
    """
    disks = []
    for vm in envelope.vms:
        for position, disk in enumerate(vm.disks):
            disk_path, offset, size_bytes = locate(vm, disk)
            warnings += _size_warnings(disk.file, size_bytes)
            disks.append(
                ApplianceDisk(
                    vm=vm,
                    position=position,
                    path=disk_path,
                    offset=offset,
                    size_bytes=size_bytes,
                    digest=digests.get(_plain(disk.file.href)),
                )
            )
    return tuple(disks)


_CERT_WARNING = "the export is signed (.cert): the signature is not verified; the .mf digests are"


def _disk_status(path: str, ref: FileRef, vm: VirtualMachine, disk_id: str) -> os.stat_result:
    try:
        status = os.stat(path)
    except FileNotFoundError:
        raise UnsupportedDisk(
            f"the OVF names file {ref.href!r} for disk {disk_id!r} of VM {vm.name!r}, which "
            f"is missing: {path}"
        ) from None
    if not stat.S_ISREG(status.st_mode):
        raise UnsupportedDisk(f"the OVF's file {ref.href!r} is not a regular file: {path}")
    return status


def _checked_href(ref: FileRef) -> str:
    """The href as a plain relative name, refusing what would leave the export's directory."""
    href = ref.href
    if ref.compression and ref.compression.lower() != "identity":
        raise UnsupportedDisk(
            f"the OVF marks {href!r} ovf:compression={ref.compression!r}: compressed disks are "
            f"refused; {COMPRESSED_HINT}"
        )
    if ref.chunk_size is not None:
        raise UnsupportedDisk(
            f"the OVF splits {href!r} into pieces of {ref.chunk_size} bytes (ovf:chunkSize), "
            "which are refused: export again without ovftool's --chunkSize option"
        )
    parts = PurePosixPath(href).parts
    if (
        re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", href)
        or href.startswith(("/", "\\"))
        or "\\" in href
        or ".." in parts
    ):
        raise UnsupportedDisk(
            f"unsafe ovf:href {href!r}: files of an export must be named relative to the OVF, "
            "without '..', an absolute path or a URL"
        )
    return href


def _plain(name: str) -> str:
    return name[2:] if name.startswith("./") else name


def _find(members: tuple[Member, ...], suffix: str) -> Member | None:
    return next((m for m in members if m.name.lower().endswith(suffix)), None)


def _digests(
    text: bytes | None, mf_name: str | None, ovf_name: str, envelope: bytes, warnings: list[str]
) -> dict[str, Digest]:
    """The .mf's digests by file name; checks the envelope's own digest."""
    if text is None or mf_name is None:
        warnings.append("no manifest (.mf): the disks' digests cannot be checked")
        return {}
    digests = parse_mf(text, mf_name)
    own = digests.get(_plain(ovf_name))
    if own is None:
        warnings.append(f"the manifest {mf_name} gives no digest of {ovf_name}")
    else:
        found = hashlib.new(own.algorithm, envelope).hexdigest()
        if found != own.value:
            raise UnsupportedDisk(
                f"the OVF envelope {ovf_name} does not match the manifest {mf_name}: "
                f"{own.algorithm} {found}, the manifest says {own.value}"
            )
    return digests


def parse_mf(text: bytes, mf_name: str) -> dict[str, Digest]:
    """`SHA256(file)= hex` lines (SHA1 and SHA512 too) by file name."""
    digests: dict[str, Digest] = {}
    for number, raw in enumerate(text.decode("utf-8", "replace").splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        match = _MF_LINE.match(line)
        algorithm = _MF_ALGORITHMS.get(match.group(1)) if match else None
        if match is None or algorithm is None or len(match.group(3)) != _DIGEST_LENGTHS[algorithm]:
            raise UnsupportedDisk(
                f"the manifest {mf_name} has a bad line {number}: {line[:80]!r} "
                "(expected SHA256(file)= hex)"
            )
        digests[_plain(match.group(2).strip())] = Digest(algorithm, match.group(3).lower(), mf_name)
    return digests


def _size_warnings(ref: FileRef, size_bytes: int) -> list[str]:
    if ref.size_bytes is not None and ref.size_bytes != size_bytes:
        return [f"the OVF gives {ref.href!r} ovf:size {ref.size_bytes}, the file has {size_bytes}"]
    return []
