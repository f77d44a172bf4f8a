"""The OVF envelope as ovftool writes it: VMs, their disks in boot order, and image properties."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.errors import UnsupportedDisk
from worker.intake.ovf import parse_envelope
from worker.intake.properties import apply, derive, guest_distro

NAMESPACES = (
    'xmlns="http://schemas.dmtf.org/ovf/envelope/1" '
    'xmlns:cim="http://schemas.dmtf.org/wbem/wscim/1/common" '
    'xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" '
    'xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/'
    'CIM_ResourceAllocationSettingData" '
    'xmlns:vmw="http://www.vmware.com/schema/ovf" '
    'xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/'
    'CIM_VirtualSystemSettingData" '
    'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"'
)

# The shape of `ovftool vi://.../web01 web01.ovf`: a SCSI boot disk on a second controller
# listed after the IDE one, a data disk on SATA, EFI firmware.
WEB01 = (Path(__file__).parent / "data" / "web01.ovf").read_text(encoding="utf-8")


def _system(name: str, disk: str, guest: str, *, resource: str = "5", subtype: str = "") -> str:
    sub = f"<rasd:ResourceSubType>{subtype}</rasd:ResourceSubType>" if subtype else ""
    return f"""
    <VirtualSystem ovf:id="{name}">
      <Info>A virtual machine</Info>
      <Name>{name}</Name>
      <OperatingSystemSection ovf:id="1" vmw:osType="{guest}"><Info>os</Info>
      </OperatingSystemSection>
      <VirtualHardwareSection>
        <Info>Virtual hardware requirements</Info>
        <Item><rasd:AllocationUnits>byte * 2^30</rasd:AllocationUnits>
          <rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType>
          <rasd:VirtualQuantity>8</rasd:VirtualQuantity></Item>
        <Item><rasd:Address>0</rasd:Address><rasd:InstanceID>3</rasd:InstanceID>{sub}
          <rasd:ResourceType>{resource}</rasd:ResourceType></Item>
        <Item><rasd:AddressOnParent>0</rasd:AddressOnParent>
          <rasd:HostResource>ovf:/disk/{disk}</rasd:HostResource>
          <rasd:InstanceID>4</rasd:InstanceID><rasd:Parent>3</rasd:Parent>
          <rasd:ResourceType>17</rasd:ResourceType></Item>
      </VirtualHardwareSection>
    </VirtualSystem>"""


# Two VMs in one export (a vApp): `ovftool vi://.../vApp/app app.ovf`.
VAPP = f"""<?xml version="1.0" encoding="UTF-8"?>
<Envelope {NAMESPACES}>
  <References>
    <File ovf:href="app-db-disk1.vmdk" ovf:id="file1" ovf:size="68096"/>
    <File ovf:href="app-win-disk1.vmdk" ovf:id="file2" ovf:size="68096"/>
  </References>
  <DiskSection><Info>disks</Info>
    <Disk ovf:capacity="10" ovf:capacityAllocationUnits="byte * 2^30" ovf:diskId="vmdisk1"
      ovf:fileRef="file1"/>
    <Disk ovf:capacity="20" ovf:capacityAllocationUnits="byte * 2^30" ovf:diskId="vmdisk2"
      ovf:fileRef="file2"/>
  </DiskSection>
  <VirtualSystemCollection ovf:id="app">
    <Info>A vApp</Info>
    <Name>app</Name>
    {_system("app-db", "vmdisk1", "rhel8_64Guest", resource="6", subtype="lsilogic")}
    {_system("app-win", "vmdisk2", "windows2019srv_64Guest")}
  </VirtualSystemCollection>
</Envelope>
"""


def test_a_vm_of_ovftool_shape_is_read_with_its_disks_in_boot_order() -> None:
    envelope = parse_envelope(WEB01.encode())
    assert [f.href for f in envelope.files] == ["web01-disk1.vmdk", "web01-disk2.vmdk"]
    (vm,) = envelope.vms
    assert (vm.name, vm.guest_id, vm.firmware) == ("web01", "ubuntu64Guest", "efi")
    assert vm.memory_bytes == 4096 << 20
    # Controllers by kind in the order a VMware BIOS boots them (IDE, SATA, SCSI), not as listed.
    assert [(d.disk_id, d.controller.bus, d.address) for d in vm.disks] == [
        ("vmdisk2", "sata", 1),
        ("vmdisk1", "scsi", 0),
    ]
    assert vm.disks[1].capacity_bytes == 40 << 30
    assert vm.disks[0].capacity_bytes == 1610612736
    assert vm.disks[1].controller.model == "VirtualSCSI"
    assert vm.disks[0].file.size_bytes == 68096


def test_disks_on_one_controller_follow_their_address() -> None:
    text = WEB01.replace("<rasd:Parent>4</rasd:Parent>", "<rasd:Parent>3</rasd:Parent>")
    (vm,) = parse_envelope(text.encode()).vms
    assert [(d.disk_id, d.address) for d in vm.disks] == [("vmdisk1", 0), ("vmdisk2", 1)]


def test_a_virtual_system_collection_gives_each_vm_its_own_disks() -> None:
    envelope = parse_envelope(VAPP.encode())
    assert [(vm.name, [d.file.href for d in vm.disks]) for vm in envelope.vms] == [
        ("app-db", ["app-db-disk1.vmdk"]),
        ("app-win", ["app-win-disk1.vmdk"]),
    ]
    assert [vm.firmware for vm in envelope.vms] == ["bios", "bios"]
    assert envelope.vms[0].memory_bytes == 8 << 30


def test_properties_come_from_the_vm_and_its_disk() -> None:
    (vm,) = parse_envelope(WEB01.encode()).vms
    assert derive(vm, 1, virtio=False) == {
        "hw_firmware_type": "uefi",
        "min_disk": 40,
        "min_ram": 4096,
        "os_type": "linux",
        "os_distro": "ubuntu",
        "vmware_ostype": "ubuntu64Guest",
        "hw_disk_bus": "scsi",
        "vmware_adaptertype": "paraVirtual",
        "vm_name": "web01",
        "vm_disk_index": "2",
    }
    boot = derive(vm, 0, virtio=False)
    assert (boot["hw_disk_bus"], boot["min_disk"]) == ("sata", 2)  # 1.5 GiB rounds up
    assert "vmware_adaptertype" not in boot  # Glance's vmware_adaptertype has no SATA


def test_with_virtio_injection_the_boot_disk_asks_for_virtio() -> None:
    vapp = parse_envelope(VAPP.encode())
    windows = vapp.vms[1]
    values = derive(windows, 0, virtio=True)
    assert values["hw_disk_bus"] == values["hw_vif_model"] == "virtio"
    assert values["vmware_adaptertype"] == "ide"
    assert (values["os_type"], values["os_distro"]) == ("windows", "windows")
    (vm,) = parse_envelope(WEB01.encode()).vms
    assert derive(vm, 1, virtio=True)["hw_disk_bus"] == "scsi"  # only the boot disk
    assert "hw_vif_model" not in derive(vm, 1, virtio=True)


@pytest.mark.parametrize(
    ("guest", "distro"),
    [
        ("ubuntu64Guest", "ubuntu"),
        ("rhel8_64Guest", "rhel"),
        ("centos7_64Guest", "centos"),
        ("sles15_64Guest", "sles"),
        ("debian11_64Guest", "debian"),
        ("windows2019srv_64Guest", "windows"),
        ("windows9Server64Guest", "windows"),
        ("otherLinux64Guest", None),
    ],
)
def test_the_guest_id_table(guest: str, distro: str | None) -> None:
    assert guest_distro(guest) == distro


def test_explicit_manifest_values_win_and_the_ovf_values_are_named() -> None:
    (vm,) = parse_envelope(WEB01.encode()).vms
    entry = {"source": "web01.ova", "min_ram": 512, "properties": {"vm_name": "mine"}}
    defaults = {"os_distro": "ubuntu22.04", "properties": {"vmware_ostype": "x"}}
    merged, taken = apply(entry, defaults, derive(vm, 1, virtio=False))
    assert merged["min_ram"] == 512
    assert "os_distro" not in merged
    assert merged["properties"] == {
        "vm_name": "mine",
        "vmware_adaptertype": "paraVirtual",
        "vm_disk_index": "2",
    }
    assert taken == (
        "hw_disk_bus", "hw_firmware_type", "min_disk", "os_type", "vm_disk_index",
        "vmware_adaptertype",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<a/>", "root element is 'a'"),
        ("<Envelope", "not well-formed"),
        (
            '<?xml version="1.0"?><!DOCTYPE e [<!ENTITY x "y">]><Envelope>&x;</Envelope>',
            "DTD",
        ),
        (f"<Envelope {NAMESPACES}><References/></Envelope>", "no VirtualSystem"),
        (WEB01.replace('ovf:fileRef="file2"', 'ovf:fileRef="file9"'), "'file9'"),
        (WEB01.replace("ovf:/disk/vmdisk2", "ovf:/disk/vmdisk7"), "'vmdisk7'"),
        (WEB01.replace('ovf:capacity="40"', 'ovf:capacity="forty"'), "whole number"),
        (WEB01.replace("byte * 2^30", "furlongs"), "unknown allocation units"),
    ],
)
def test_bad_envelopes_are_refused_saying_why(text: str, message: str) -> None:
    with pytest.raises(UnsupportedDisk, match=message):
        parse_envelope(text.encode())
