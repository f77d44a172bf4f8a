"""A manifest's OVA and OVF entries, each expanded into one disk entry per disk of its VMs.

An entry whose source is an OVA or an OVF (by content) becomes `NAME-disk1`, `NAME-disk2`,
... in boot order, where NAME is the entry's `name`, or else the VM's name; an export of
several VMs names each VM's disks after that VM (after `NAME-VM` when the entry has a name).
Each expanded entry keeps the entry's own settings, takes the values the OVF gives that
the manifest does not set (see worker.intake.properties), and reads its bytes from the
loose file or from the archive's byte range. Every other entry is left as it is.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from worker.errors import SourceError, UnsupportedDisk
from worker.intake.appliance import ApplianceDisk, open_appliance, sniff
from worker.intake.properties import apply, derive
from worker.vmdk import Inspection, inspect_open_vmdk

_VIRTIO = ("yes", "true", "1")


@dataclass(frozen=True)
class ExpandedDisk:
    """A disk entry made from one disk of an export."""

    entry: int  # the index of the manifest entry it comes from
    disk: ApplianceDisk
    from_ovf: tuple[str, ...]  # the values the OVF set (the manifest set the others)

    def appliance(self) -> dict[str, object]:
        """What the disk's results row keeps about its export (ImageSpec.appliance)."""
        return {
            "vm_name": self.disk.vm.name,
            "vm_disk_index": self.disk.position + 1,
            "file": self.disk.href,
            "from_ovf": list(self.from_ovf),
        }

    def expected_digest(self) -> dict[str, str] | None:
        """The .mf's digest of the disk's bytes (ImageSpec.expected_digest), if it has one."""
        digest = self.disk.digest
        if digest is None:
            return None
        return {"algorithm": digest.algorithm, "value": digest.value, "manifest": digest.manifest}


@dataclass
class Expansion:
    """The manifest's disk entries after expansion, and what it found on the way."""

    disks: list[object] = field(default_factory=list)
    expanded: dict[int, ExpandedDisk] = field(default_factory=dict)  # by new index
    origin: list[int] = field(default_factory=list)  # new index -> entry index
    problems: list[tuple[int, str, str]] = field(default_factory=list)  # (entry, field, message)
    warnings: list[tuple[int, str]] = field(default_factory=list)  # (entry, message)


def expand(disks: Sequence[object], defaults: Mapping[str, object], base_dir: Path) -> Expansion:
    """Expand every entry whose source is an OVA or an OVF; leave the others as they are."""
    result = Expansion()
    for index, entry in enumerate(disks):
        source = entry.get("source") if isinstance(entry, dict) else None
        path = os.path.realpath(os.path.join(base_dir, source)) if isinstance(source, str) else None
        kind = sniff(path) if path and source else None
        if not isinstance(entry, dict) or path is None or kind is None:
            result.disks.append(entry)
            result.origin.append(index)
            continue
        _expand_entry(result, index, entry, defaults, path, kind)
    return result


def _expand_entry(
    result: Expansion,
    index: int,
    entry: Mapping[str, object],
    defaults: Mapping[str, object],
    path: str,
    kind: str,
) -> None:
    refused = [key for key in ("flat_as_raw",) if entry.get(key) is True]
    disk_format = entry.get("disk_format", defaults.get("disk_format", "vmdk"))
    for key in refused:
        result.problems.append((index, key, f"does not apply to an {kind.upper()} source"))
    if disk_format != "vmdk":
        result.problems.append(
            (index, "disk_format", f"the disks of an {kind.upper()} are VMDKs: leave it vmdk")
        )
    try:
        appliance = open_appliance(path, kind)
    except (UnsupportedDisk, SourceError) as exc:
        where = "" if path in exc.message else f": {path}"
        result.problems.append((index, "source", f"{exc.message}{where}"))
        return
    result.warnings += [(index, warning) for warning in appliance.warnings]
    if refused or disk_format != "vmdk":
        return
    virtio = str(entry.get("es_virtio_enabled", defaults.get("es_virtio_enabled", "yes")))
    several = len(appliance.envelope.vms) > 1
    own_name = entry.get("name") if isinstance(entry.get("name"), str) else None
    for disk in appliance.disks:
        name = disk.vm.name if own_name is None else own_name
        if several and own_name is not None:
            name = f"{own_name}-{disk.vm.name}"
        values = derive(disk.vm, disk.position, virtio=virtio.lower() in _VIRTIO)
        expanded, taken = apply(entry, defaults, values)
        expanded["name"] = f"{name}-disk{disk.position + 1}"
        expanded["source"] = disk.path
        result.expanded[len(result.disks)] = ExpandedDisk(index, disk, taken)
        result.disks.append(expanded)
        result.origin.append(index)


def inspect_member(path: Path, offset: int, size_bytes: int) -> Inspection:
    """Inspect the VMDK that is `size_bytes` of the archive at `path` from `offset`, exactly
    as a loose file is inspected."""
    try:
        with open(path, "rb") as file:
            return inspect_open_vmdk(file, path, offset=offset, size_bytes=size_bytes)
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror or exc}") from exc


def capacity_problem(expanded: ExpandedDisk, inspection: Inspection) -> str | None:
    """Why the VMDK's virtual size disagrees with the OVF's capacity for it, or None."""
    capacity = expanded.disk.capacity_bytes
    if inspection.virtual_size_bytes == capacity:
        return None
    return (
        f"the VMDK {expanded.disk.href!r} has a virtual size of {inspection.virtual_size_bytes} "
        f"bytes, the OVF gives the disk a capacity of {capacity} bytes"
    )
