"""Read an OVF envelope (what vSphere's "Export OVF Template" and ovftool write) into its VMs.

Only what a migration needs is read: the files of `References`, the disks of `DiskSection`,
and for each `VirtualSystem` (one, or several in a `VirtualSystemCollection`) its name,
guest OS, memory, firmware and the disks attached to its controllers. Elements and
attributes are matched by local name, so OVF 1.x and 2.x and the namespace prefixes
different exporters choose all read the same. DTDs and entities are refused.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring

from worker.errors import UnsupportedDisk

GIB = 1 << 30
MIB = 1 << 20
# An envelope is a few KiB; anything much bigger is not one.
MAX_ENVELOPE_BYTES = 16 << 20
# CIM ResourceType of the VirtualHardwareSection items read here.
MEMORY, IDE, SCSI, DISK, OTHER_STORAGE = "4", "5", "6", "17", "20"
# Controller kinds in the order a VMware BIOS boots from them when a VM has several: an IDE
# disk before a SATA one, before a SCSI one (then NVMe).
BUS_ORDER = ("ide", "sata", "scsi", "nvme")
_UNITS = re.compile(r"^\s*byte\s*(?:\*\s*(\d+)\s*\^\s*(\d+))?\s*$", re.IGNORECASE)
_NAMED_UNITS = {"kilobytes": 1 << 10, "megabytes": MIB, "gigabytes": GIB, "kb": 1 << 10,
                "mb": MIB, "gb": GIB}  # fmt: skip


@dataclass(frozen=True)
class FileRef:
    """One `References/File`: a file of the export, named relative to the envelope."""

    file_id: str
    href: str
    size_bytes: int | None
    compression: str | None  # "gzip" when the exporter compressed the file itself
    chunk_size: int | None = None  # set when the exporter split the file into pieces


@dataclass(frozen=True)
class Controller:
    """A disk controller of a VM: its kind (ide, sata, scsi, nvme) and model."""

    instance_id: str
    bus: str
    model: str | None  # ResourceSubType as written: lsilogic, VirtualSCSI, vmware.sata.ahci ...
    number: int  # rasd:Address, the controller's bus number among those of its kind


@dataclass(frozen=True)
class VmDisk:
    """One disk of a VM, where it is attached and the file that holds it."""

    disk_id: str
    file: FileRef
    capacity_bytes: int
    controller: Controller
    address: int  # rasd:AddressOnParent, the unit on the controller


@dataclass(frozen=True)
class VirtualMachine:
    """One `VirtualSystem`: its disks boot disk first (controller-then-address order)."""

    system_id: str
    name: str
    guest_id: str | None  # vmw:osType, VMware's guest id (ubuntu64Guest, windows2019srv_64Guest)
    memory_bytes: int | None
    firmware: str  # "efi" or "bios"
    disks: tuple[VmDisk, ...]


@dataclass(frozen=True)
class Envelope:
    """What an OVF envelope says: its files and its VMs, in document order."""

    files: tuple[FileRef, ...]
    vms: tuple[VirtualMachine, ...]


def parse_envelope(data: bytes) -> Envelope:
    """Parse an OVF envelope; UnsupportedDisk says what is wrong with it."""
    root = _root(data)
    files = {ref.file_id: ref for ref in _files(root)}
    disks = _disk_section(root, files)
    systems = [el for el in root.iter() if _local(el.tag) == "VirtualSystem"]
    if not systems:
        raise UnsupportedDisk("the OVF envelope describes no VirtualSystem")
    vms = tuple(_virtual_machine(system, disks) for system in systems)
    return Envelope(files=tuple(files.values()), vms=vms)


def is_envelope(data: bytes) -> bool:
    """True when `data` is XML whose root element is an OVF `Envelope`."""
    try:
        return _local(_root(data).tag) == "Envelope"
    except UnsupportedDisk:
        return False


def looks_like_envelope(head: bytes) -> bool:
    """A cheap first look at a file's start: XML that opens an `Envelope` element."""
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    return text.startswith(b"<") and re.search(rb"<(?:[\w.-]+:)?Envelope[\s/>]", head) is not None


def _root(data: bytes) -> ET.Element:
    if len(data) > MAX_ENVELOPE_BYTES:
        raise UnsupportedDisk(
            f"the OVF envelope has {len(data)} bytes, more than an envelope may "
            f"({MAX_ENVELOPE_BYTES})"
        )
    try:
        root: ET.Element = fromstring(data, forbid_dtd=True)
    except DefusedXmlException as exc:
        raise UnsupportedDisk(
            f"the OVF envelope declares a DTD or entities, which are refused ({exc})"
        ) from exc
    except ET.ParseError as exc:
        raise UnsupportedDisk(f"the OVF envelope is not well-formed XML: {exc}") from exc
    if _local(root.tag) != "Envelope":
        raise UnsupportedDisk(
            f"not an OVF envelope: the XML's root element is {_local(root.tag)!r}, not 'Envelope'"
        )
    return root


def _local(name: str) -> str:
    return name.rsplit("}", 1)[-1]


def _attr(element: ET.Element, name: str) -> str | None:
    """The attribute of that local name, whatever its namespace (ovf:, vmw: or none)."""
    for key, value in element.attrib.items():
        if _local(key) == name:
            return value
    return None


def _children(element: ET.Element, name: str) -> list[ET.Element]:
    return [child for child in element if _local(child.tag) == name]


def _text(element: ET.Element, name: str) -> str | None:
    for child in element:
        if _local(child.tag) == name:
            return (child.text or "").strip()
    return None


def _files(root: ET.Element) -> list[FileRef]:
    refs = []
    for references in _children(root, "References"):
        for element in _children(references, "File"):
            file_id, href = _attr(element, "id"), _attr(element, "href")
            if not file_id or not href:
                raise UnsupportedDisk("an OVF References/File lacks its ovf:id or ovf:href")
            size = _attr(element, "size")
            chunk = _attr(element, "chunkSize")
            refs.append(
                FileRef(
                    file_id=file_id,
                    href=href,
                    size_bytes=_integer(size, "ovf:size", href) if size else None,
                    compression=(_attr(element, "compression") or None),
                    chunk_size=_integer(chunk, "ovf:chunkSize", href) if chunk else None,
                )
            )
    return refs


def _disk_section(root: ET.Element, files: dict[str, FileRef]) -> dict[str, tuple[FileRef, int]]:
    """Disk id -> (its file, its capacity in bytes)."""
    disks: dict[str, tuple[FileRef, int]] = {}
    for section in root.iter():
        if _local(section.tag) != "DiskSection":
            continue
        for element in _children(section, "Disk"):
            disk_id, file_ref = _attr(element, "diskId"), _attr(element, "fileRef")
            if not disk_id:
                raise UnsupportedDisk("an OVF DiskSection/Disk lacks its ovf:diskId")
            if not file_ref:
                raise UnsupportedDisk(
                    f"OVF disk {disk_id!r} has no ovf:fileRef: an empty disk has no data to migrate"
                )
            if file_ref not in files:
                raise UnsupportedDisk(
                    f"OVF disk {disk_id!r} names file {file_ref!r}, which References does not list"
                )
            capacity = _attr(element, "capacity")
            if capacity is None:
                raise UnsupportedDisk(f"OVF disk {disk_id!r} has no ovf:capacity")
            units = _attr(element, "capacityAllocationUnits") or "byte"
            disks[disk_id] = (
                files[file_ref],
                _integer(capacity, "ovf:capacity", disk_id) * _unit_bytes(units, disk_id),
            )
    return disks


def _unit_bytes(units: str, where: str) -> int:
    """The bytes of one unit such as `byte * 2^30` (OVF's programmatic units)."""
    named = _NAMED_UNITS.get(units.strip().lower())
    if named is not None:
        return named
    match = _UNITS.match(units)
    if match is None:
        raise UnsupportedDisk(f"{where}: unknown allocation units {units!r}")
    base, exponent = match.groups()
    if base is None:
        return 1
    if int(exponent) > 80:
        raise UnsupportedDisk(f"{where}: allocation units {units!r} are out of range")
    unit: int = int(base) ** int(exponent)
    return unit


def _integer(text: str, what: str, where: str) -> int:
    if not re.fullmatch(r"\s*\d{1,20}\s*", text):
        raise UnsupportedDisk(f"{where}: {what} must be a whole number, got {text[:40]!r}")
    return int(text)


def _virtual_machine(system: ET.Element, disks: dict[str, tuple[FileRef, int]]) -> VirtualMachine:
    system_id = _attr(system, "id") or ""
    name = _text(system, "Name") or system_id
    if not name:
        raise UnsupportedDisk("an OVF VirtualSystem has neither a Name nor an ovf:id")
    guest_id = None
    for section in _children(system, "OperatingSystemSection"):
        guest_id = _attr(section, "osType") or guest_id
    hardware = _Hardware(name)
    for section in _children(system, "VirtualHardwareSection"):
        for item in section:
            hardware.read(item)
    vm_disks = sorted(hardware.disks(disks), key=_boot_order)
    if not vm_disks:
        raise UnsupportedDisk(f"VM {name!r} has no disk with data in the OVF")
    return VirtualMachine(
        system_id=system_id,
        name=name,
        guest_id=guest_id,
        memory_bytes=hardware.memory_bytes,
        firmware=hardware.firmware,
        disks=tuple(vm_disks),
    )


class _Hardware:
    """The items of a VM's VirtualHardwareSection that matter here, read one by one."""

    def __init__(self, vm_name: str) -> None:
        self.vm_name = vm_name
        self.memory_bytes: int | None = None
        self.firmware = "bios"
        self.controllers: dict[str, Controller] = {}
        self.attached: list[tuple[str, str, int]] = []  # (disk id, controller id, address)

    def read(self, item: ET.Element) -> None:
        kind = _local(item.tag)
        if kind == "Config" and _attr(item, "key") == "firmware":
            self.firmware = "efi" if (_attr(item, "value") or "").lower() == "efi" else "bios"
        if kind not in ("Item", "StorageItem"):
            return
        resource = _text(item, "ResourceType")
        instance = _text(item, "InstanceID") or ""
        if resource == MEMORY:
            quantity = _integer(_text(item, "VirtualQuantity") or "", "memory", self.vm_name)
            units = _text(item, "AllocationUnits") or "byte * 2^20"
            self.memory_bytes = quantity * _unit_bytes(units, f"{self.vm_name} memory")
        elif resource in (IDE, SCSI, OTHER_STORAGE):
            controller = _controller(item, resource, instance)
            if controller is not None:
                self.controllers[instance] = controller
        elif resource == DISK:
            self.attached.append(_attachment(item, self.vm_name))

    def disks(self, known: dict[str, tuple[FileRef, int]]) -> list[VmDisk]:
        found = []
        for disk_id, parent, address in self.attached:
            if disk_id not in known:
                raise UnsupportedDisk(
                    f"VM {self.vm_name!r} attaches disk {disk_id!r}, which the DiskSection "
                    "does not list"
                )
            if parent not in self.controllers:
                raise UnsupportedDisk(
                    f"VM {self.vm_name!r} attaches disk {disk_id!r} to controller {parent!r}, "
                    "which its VirtualHardwareSection does not list"
                )
            file_ref, capacity = known[disk_id]
            found.append(VmDisk(disk_id, file_ref, capacity, self.controllers[parent], address))
        return found


def _controller(item: ET.Element, resource: str, instance: str) -> Controller | None:
    model = _text(item, "ResourceSubType") or None
    if resource == IDE:
        bus = "ide"
    elif resource == SCSI:
        bus = "scsi"
    elif model and "sata" in model.lower():
        bus = "sata"
    elif model and "nvme" in model.lower():
        bus = "nvme"
    else:
        return None  # another kind of storage device: no disk of ours sits on it
    address = _text(item, "Address") or "0"
    number = int(address) if address.isdigit() else 0
    return Controller(instance_id=instance, bus=bus, model=model, number=number)


def _attachment(item: ET.Element, vm_name: str) -> tuple[str, str, int]:
    host = _text(item, "HostResource") or ""
    match = re.fullmatch(r"(?:ovf:)?/disk/(.+)", host)
    if match is None:
        raise UnsupportedDisk(
            f"VM {vm_name!r} has a disk whose rasd:HostResource {host[:60]!r} names no ovf:/disk/ID"
        )
    address = _text(item, "AddressOnParent") or "0"
    return match.group(1), _text(item, "Parent") or "", int(address) if address.isdigit() else 0


def _boot_order(disk: VmDisk) -> tuple[int, int, int]:
    controller = disk.controller
    return BUS_ORDER.index(controller.bus), controller.number, disk.address
