"""What an OVF knows about a VM, as the Glance image properties of each of its disks.

| OVF                                   | image                                               |
|---------------------------------------|-----------------------------------------------------|
| `vmw:Config firmware="efi"`           | `hw_firmware_type=uefi` (else `bios`)               |
| `vmw:osType` (VMware guest id)        | `os_type` (`windows` or `linux`), `os_distro` (see  |
|                                       | GUEST_DISTROS), `vmware_ostype` (the guest id)      |
| memory                                | `min_ram` in MiB                                    |
| the disk's capacity                   | `min_disk` in GiB, rounded up                       |
| the disk's controller                 | `hw_disk_bus` and `vmware_adaptertype`              |
| the VirtualSystem                     | `vm_name`, `vm_disk_index` (1 for the boot disk)    |

When the cloud injects virtio drivers (`es_virtio_enabled: "yes"`), the boot disk gets
`hw_disk_bus=virtio` and `hw_vif_model=virtio`: the guest can then use virtio, and the
emulated VMware controller would only slow it down. A value the manifest sets explicitly
(on the disk or in `defaults`) always wins over the OVF's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from worker.intake.ovf import GIB, MIB, Controller, VirtualMachine

# VMware guest id (a prefix, lower-cased) -> os_distro, in libosinfo's short vocabulary
# that Glance's metadefs and Nova use.
GUEST_DISTROS: tuple[tuple[str, str], ...] = (
    ("ubuntu", "ubuntu"),
    ("rhel", "rhel"),
    ("centos", "centos"),
    ("rockylinux", "rocky"),
    ("almalinux", "almalinux"),
    ("oraclelinux", "ol"),
    ("sles", "sles"),
    ("opensuse", "opensuse"),
    ("debian", "debian"),
    ("fedora", "fedora"),
    ("freebsd", "freebsd"),
    ("win", "windows"),
)
# ResourceSubType of a SCSI controller (lower-cased) -> Glance's vmware_adaptertype.
SCSI_ADAPTERS = {
    "lsilogic": "lsiLogic",
    "buslogic": "busLogic",
    "lsilogicsas": "lsiLogicsas",
    "virtualscsi": "paraVirtual",
    "pvscsi": "paraVirtual",
}
# Named fields of a manifest disk (set beside `properties`); the rest are free properties.
_FIELDS = frozenset({"min_disk", "min_ram", "os_type", "os_distro"})
_HW_KEY = re.compile(r"^hw_[a-z0-9_]+$")


def guest_distro(guest_id: str) -> str | None:
    """The os_distro of a VMware guest id, or None when the table does not know it."""
    lowered = guest_id.lower()
    for prefix, distro in GUEST_DISTROS:
        if lowered.startswith(prefix):
            return distro
    return None


def adapter_type(controller: Controller) -> str | None:
    """Glance's vmware_adaptertype for a controller; None for SATA and NVMe, which it lacks."""
    if controller.bus == "ide":
        return "ide"
    if controller.bus == "scsi":
        return SCSI_ADAPTERS.get((controller.model or "lsilogic").lower(), "lsiLogic")
    return None


def derive(vm: VirtualMachine, position: int, *, virtio: bool) -> dict[str, object]:
    """The values the OVF gives the image of the VM's disk at `position` (0: the boot disk)."""
    disk = vm.disks[position]
    values: dict[str, object] = {
        "hw_firmware_type": "uefi" if vm.firmware == "efi" else "bios",
        "min_disk": -(-disk.capacity_bytes // GIB),
        "vm_name": vm.name,
        "vm_disk_index": str(position + 1),
    }
    if vm.guest_id:
        values["os_type"] = "windows" if vm.guest_id.lower().startswith("win") else "linux"
        distro = guest_distro(vm.guest_id)
        if distro is not None:
            values["os_distro"] = distro
        values["vmware_ostype"] = vm.guest_id
    if vm.memory_bytes:
        values["min_ram"] = -(-vm.memory_bytes // MIB)
    if disk.controller.bus != "nvme":
        values["hw_disk_bus"] = disk.controller.bus
    adapter = adapter_type(disk.controller)
    if adapter is not None:
        values["vmware_adaptertype"] = adapter
    if virtio and position == 0:
        values["hw_disk_bus"] = "virtio"
        values["hw_vif_model"] = "virtio"
    return values


def apply(
    entry: Mapping[str, object], defaults: Mapping[str, object], derived: Mapping[str, object]
) -> tuple[dict[str, object], tuple[str, ...]]:
    """The manifest entry with the OVF's values it does not set itself (nor its defaults);
    and the names of the values taken from the OVF, sorted."""
    result = dict(entry)
    own = entry.get("properties")
    default = defaults.get("properties")
    properties = dict(own) if isinstance(own, Mapping) else {}
    default_properties = default if isinstance(default, Mapping) else {}
    taken = []
    for key, value in derived.items():
        if key in _FIELDS or _HW_KEY.match(key):
            if key not in entry and key not in defaults:
                result[key] = value
                taken.append(key)
        elif key not in properties and key not in default_properties:
            properties[key] = value
            taken.append(key)
    result["properties"] = properties
    return result, tuple(sorted(taken))
