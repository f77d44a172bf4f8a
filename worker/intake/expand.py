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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from worker.errors import SourceError, UnsupportedDisk
from worker.intake.appliance import ApplianceDisk, open_appliance, sniff
from worker.intake.properties import apply, derive
from worker.intake.remote import is_url
from worker.intake.vmdk import Inspection

_VIRTIO = ("yes", "true", "1")
_SNIFF_THREADS = 16
_MAX_NAME = 255  # Glance's limit on image names, which the schema checks for other entries


@dataclass(frozen=True)
class ExpandedDisk:
    """A disk entry made from one disk of an export."""

    entry: int  # the index of the manifest entry it comes from
    disk: ApplianceDisk
    from_ovf: tuple[str, ...]  # the values the OVF set (the manifest set the others)

    def appliance(self) -> dict[str, object]:
        """What the disk's results row keeps about its export (DiskSpec.appliance)."""
        return {
            "entry": self.entry,
            "vm_name": self.disk.vm.name,
            "vm_disk_index": self.disk.position + 1,
            "file": self.disk.href,
            "from_ovf": list(self.from_ovf),
        }

    def expected_digest(self) -> dict[str, str] | None:
        """The .mf's digest of the disk's bytes (DiskSpec.expected_digest), if it has one."""
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


def expand(
    disks: Sequence[object],
    defaults: Mapping[str, object],
    base_dir: Path,
    *,
    source_root: str | None = None,
) -> Expansion:
    """Expand every entry whose source is an OVA or an OVF; leave the others as they are.

    A source outside `source_root` is not looked at: the ordinary checks refuse it.
    """
    paths = [_path_of(entry, base_dir, source_root) for entry in disks]
    # One small read per source; on a network mount each is a round trip: overlap them.
    to_sniff = [path for path in paths if path is not None]
    if len(to_sniff) > 1:
        with ThreadPoolExecutor(min(_SNIFF_THREADS, len(to_sniff))) as pool:
            kinds = dict(zip(to_sniff, pool.map(sniff, to_sniff), strict=True))
    else:
        kinds = {path: sniff(path) for path in to_sniff}
    result = Expansion()
    for index, (entry, path) in enumerate(zip(disks, paths, strict=True)):
        kind = kinds.get(path) if path is not None else None
        if not isinstance(entry, dict) or path is None or kind is None:
            result.disks.append(entry)
            result.origin.append(index)
            continue
        _expand_entry(result, index, entry, defaults, path, kind)
    return result


def _path_of(entry: object, base_dir: Path, source_root: str | None) -> str | None:
    source = entry.get("source") if isinstance(entry, dict) else None
    if not isinstance(source, str) or not source or is_url(source):
        return None  # an appliance is read from the worker's host only
    path = os.path.realpath(os.path.join(base_dir, source))
    if source_root is not None and os.path.commonpath([source_root, path]) != source_root:
        return None
    return path


def _expand_entry(
    result: Expansion,
    index: int,
    entry: Mapping[str, object],
    defaults: Mapping[str, object],
    path: str,
    kind: str,
) -> None:
    usable = True
    if entry.get("flat_as_raw") is True:
        result.problems.append(
            (index, "flat_as_raw", f"does not apply to an {kind.upper()} source")
        )
        usable = False
    if entry.get("disk_format", defaults.get("disk_format", "vmdk")) != "vmdk":
        result.problems.append(
            (index, "disk_format", f"the disks of an {kind.upper()} are VMDKs: leave it vmdk")
        )
        usable = False
    try:
        appliance = open_appliance(path, kind)
    except (UnsupportedDisk, SourceError) as exc:
        where = "" if path in exc.message else f": {path}"
        what = "" if kind.upper() in exc.message else f"{kind.upper()}: "
        result.problems.append((index, "source", f"{what}{exc.message}{where}"))
        return
    result.warnings += [(index, warning) for warning in appliance.warnings]
    if not usable:
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
        image_name = f"{name}-disk{disk.position + 1}"
        if len(image_name) > _MAX_NAME:
            where = "the entry's name" if own_name is not None else "the VM's name: set a name"
            message = (
                f"the image name {image_name[:40]}... has {len(image_name)} characters, more "
                f"than Glance's {_MAX_NAME}; it is made from {where}"
            )
            result.problems.append((index, "name" if own_name else "source", message))
            return
        expanded["name"] = image_name
        expanded["source"] = disk.path
        result.expanded[len(result.disks)] = ExpandedDisk(index, disk, taken)
        result.disks.append(expanded)
        result.origin.append(index)


def capacity_problem(expanded: ExpandedDisk, inspection: Inspection) -> str | None:
    """Why the VMDK's virtual size disagrees with the OVF's capacity for it, or None."""
    capacity = expanded.disk.capacity_bytes
    if inspection.virtual_size_bytes == capacity:
        return None
    return (
        f"the VMDK {expanded.disk.href!r} has a virtual size of {inspection.virtual_size_bytes} "
        f"bytes, the OVF gives the disk a capacity of {capacity} bytes"
    )
