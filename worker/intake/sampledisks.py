"""Writes small but real VMDK files (monolithicSparse and streamOptimized) for demos and tests,
and VMware exports of them: OVF directories and OVA archives."""

from __future__ import annotations

import hashlib
import random
import struct
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

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


# OVF exports: an envelope in the shape ovftool writes, streamOptimized disks, a .mf -------

OVF_NAMESPACES = (
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
# Controller InstanceIDs of every sample VM: one of each kind, as vSphere VMs commonly have.
_CONTROLLERS = {"scsi": 3, "ide": 4, "sata": 5}


@dataclass(frozen=True)
class SampleDisk:
    """One disk of a sample VM: its size, how much of it holds data, and its controller."""

    virtual_size_bytes: int = 16 << 20
    fill_bytes: int = 64 << 10
    bus: str = "scsi"  # scsi, ide or sata
    unit: int | None = None  # AddressOnParent; by default the disk's number on its controller


@dataclass(frozen=True)
class SampleVm:
    """A VM to export: what its OVF says about it, and its disks (files VM-disk1, VM-disk2 ...
    in this order; the images follow the boot order, see worker.intake.ovf.BUS_ORDER)."""

    name: str
    disks: tuple[SampleDisk, ...] = (SampleDisk(), SampleDisk(virtual_size_bytes=24 << 20))
    guest_id: str = "ubuntu64Guest"
    firmware: str = "efi"
    memory_mib: int = 2048
    seed: int = 0


def write_ovf_directory(
    directory: Path,
    vms: Sequence[SampleVm],
    *,
    name: str,
    manifest: bool = True,
    qemu_img: bool = False,
) -> Path:
    """Write an OVF export (NAME.ovf, NAME.mf, one VM-diskN.vmdk per disk); return the .ovf.

    Several VMs make a VirtualSystemCollection, as a vApp's export does. The disks are
    streamOptimized with VMware's footer, or, with `qemu_img`, made by `qemu-img convert`.
    """
    directory.mkdir(parents=True, exist_ok=True)
    files: list[tuple[str, int]] = []
    for vm in vms:
        for number, disk in enumerate(vm.disks, start=1):
            file_name = f"{vm.name}-disk{number}.vmdk"
            seed = vm.seed * 1000 + number
            if qemu_img:
                size = _qemu_stream_optimized(directory / file_name, disk, seed)
            else:
                size = write_stream_optimized(
                    directory / file_name,
                    virtual_size_bytes=disk.virtual_size_bytes,
                    seed=seed,
                    fill_bytes=disk.fill_bytes,
                    footer=True,
                )
            files.append((file_name, size))
    ovf_path = directory / f"{name}.ovf"
    ovf_path.write_text(ovf_envelope(vms, files, collection=name), encoding="utf-8")
    if manifest:
        names = [ovf_path.name, *(file_name for file_name, _ in files)]
        lines = [f"SHA256({n})= {_sha256_of(directory / n)}" for n in names]
        (directory / f"{name}.mf").write_text("\n".join(lines) + "\n", encoding="ascii")
    return ovf_path


def _qemu_stream_optimized(path: Path, disk: SampleDisk, seed: int) -> int:
    """A streamOptimized VMDK made by qemu-img from a raw disk whose first bytes are random."""
    raw = path.with_suffix(".raw")
    try:
        with raw.open("wb") as out:
            out.truncate(disk.virtual_size_bytes)
            out.write(_pseudo_random(disk.fill_bytes, seed))
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized",
             str(raw), str(path)],
            check=True,
            capture_output=True,
        )  # fmt: skip
    finally:
        raw.unlink(missing_ok=True)
    return path.stat().st_size


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_ova(
    path: Path,
    vms: Sequence[SampleVm],
    *,
    tar_format: int = tarfile.USTAR_FORMAT,
    manifest: bool = True,
    qemu_img: bool = False,
) -> Path:
    """Write an OVA of `vms`: the files of an OVF export in a tar archive (see pack_ova)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name[: -len(".ova")] if path.name.endswith(".ova") else path.name
    with tempfile.TemporaryDirectory(dir=path.parent) as parts:
        ovf_path = write_ovf_directory(
            Path(parts), vms, name=name, manifest=manifest, qemu_img=qemu_img
        )
        pack_ova(ovf_path, path, tar_format=tar_format)
    return path


def pack_ova(ovf_path: Path, path: Path, *, tar_format: int = tarfile.USTAR_FORMAT) -> Path:
    """Pack the OVF export of `ovf_path` into the OVA `path`: the .ovf first, the .mf second,
    then the disks, as ovftool orders them."""
    mf_path = ovf_path.with_suffix(".mf")
    disks = sorted(p for p in ovf_path.parent.iterdir() if p.suffix == ".vmdk")
    with tarfile.open(path, "w", format=tar_format) as archive:
        for member in [ovf_path, *([mf_path] if mf_path.exists() else []), *disks]:
            info = archive.gettarinfo(member, arcname=member.name)
            info.uid = info.gid = 64
            info.uname = info.gname = "someone"
            with member.open("rb") as data:
                archive.addfile(info, data)
    return path


def ovf_envelope(
    vms: Sequence[SampleVm], files: Sequence[tuple[str, int]], *, collection: str
) -> str:
    """The OVF text ovftool would write for `vms`, whose disk files are `files` (name, size)."""
    references = "".join(
        f'    <File ovf:href={quoteattr(file_name)} ovf:id="file{n}" ovf:size="{size}"/>\n'
        for n, (file_name, size) in enumerate(files, start=1)
    )
    disk_lines, systems, number = [], [], 0
    for vm in vms:
        items = []
        for index, disk in enumerate(vm.disks):
            number += 1
            disk_lines.append(
                f'    <Disk ovf:capacity="{disk.virtual_size_bytes}" ovf:diskId="vmdisk{number}" '
                f'ovf:fileRef="file{number}" ovf:format="http://www.vmware.com/interfaces/'
                'specifications/vmdk.html#streamOptimized"/>\n'
            )
            same_bus = [d for d in vm.disks[:index] if d.bus == disk.bus]
            unit = disk.unit if disk.unit is not None else len(same_bus)
            items.append(
                "      <Item>\n"
                f"        <rasd:AddressOnParent>{unit}</rasd:AddressOnParent>\n"
                f"        <rasd:ElementName>Hard disk {index + 1}</rasd:ElementName>\n"
                f"        <rasd:HostResource>ovf:/disk/vmdisk{number}</rasd:HostResource>\n"
                f"        <rasd:InstanceID>{10 + index}</rasd:InstanceID>\n"
                f"        <rasd:Parent>{_CONTROLLERS[disk.bus]}</rasd:Parent>\n"
                "        <rasd:ResourceType>17</rasd:ResourceType>\n"
                "      </Item>\n"
            )
        systems.append(_virtual_system(vm, "".join(items)))
    body = "".join(systems)
    if len(vms) > 1:
        body = (
            f"  <VirtualSystemCollection ovf:id={quoteattr(collection)}>\n"
            "    <Info>A collection of virtual machines</Info>\n"
            f"    <Name>{escape(collection)}</Name>\n{body}  </VirtualSystemCollection>\n"
        )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        "<!--Generated by VMware ovftool 4.4.3 (build-18663434)-->\n"
        f'<Envelope vmw:buildId="build-18663434" {OVF_NAMESPACES}>\n'
        f"  <References>\n{references}  </References>\n"
        "  <DiskSection>\n    <Info>Virtual disk information</Info>\n"
        f"{''.join(disk_lines)}  </DiskSection>\n"
        "  <NetworkSection>\n    <Info>The list of logical networks</Info>\n"
        '    <Network ovf:name="VM Network">\n'
        "      <Description>The VM Network network</Description>\n    </Network>\n"
        f"  </NetworkSection>\n{body}</Envelope>\n"
    )


def _virtual_system(vm: SampleVm, disk_items: str) -> str:
    firmware = (
        '      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>\n'
        if vm.firmware == "efi"
        else ""
    )
    return (
        f"  <VirtualSystem ovf:id={quoteattr(vm.name)}>\n"
        "    <Info>A virtual machine</Info>\n"
        f"    <Name>{escape(vm.name)}</Name>\n"
        f'    <OperatingSystemSection ovf:id="94" vmw:osType={quoteattr(vm.guest_id)}>\n'
        "      <Info>The kind of installed guest operating system</Info>\n"
        "    </OperatingSystemSection>\n"
        "    <VirtualHardwareSection>\n"
        "      <Info>Virtual hardware requirements</Info>\n"
        "      <System>\n"
        "        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>\n"
        "        <vssd:InstanceID>0</vssd:InstanceID>\n"
        f"        <vssd:VirtualSystemIdentifier>{escape(vm.name)}</vssd:VirtualSystemIdentifier>\n"
        "        <vssd:VirtualSystemType>vmx-15</vssd:VirtualSystemType>\n"
        "      </System>\n"
        "      <Item>\n"
        "        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>\n"
        "        <rasd:ElementName>2 virtual CPU(s)</rasd:ElementName>\n"
        "        <rasd:InstanceID>1</rasd:InstanceID>\n"
        "        <rasd:ResourceType>3</rasd:ResourceType>\n"
        "        <rasd:VirtualQuantity>2</rasd:VirtualQuantity>\n"
        "      </Item>\n"
        "      <Item>\n"
        "        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>\n"
        f"        <rasd:ElementName>{vm.memory_mib}MB of memory</rasd:ElementName>\n"
        "        <rasd:InstanceID>2</rasd:InstanceID>\n"
        "        <rasd:ResourceType>4</rasd:ResourceType>\n"
        f"        <rasd:VirtualQuantity>{vm.memory_mib}</rasd:VirtualQuantity>\n"
        "      </Item>\n"
        "      <Item>\n"
        "        <rasd:Address>0</rasd:Address>\n"
        "        <rasd:ElementName>SCSI controller 0</rasd:ElementName>\n"
        "        <rasd:InstanceID>3</rasd:InstanceID>\n"
        "        <rasd:ResourceSubType>lsilogic</rasd:ResourceSubType>\n"
        "        <rasd:ResourceType>6</rasd:ResourceType>\n"
        "      </Item>\n"
        "      <Item>\n"
        "        <rasd:Address>0</rasd:Address>\n"
        "        <rasd:ElementName>IDE 0</rasd:ElementName>\n"
        "        <rasd:InstanceID>4</rasd:InstanceID>\n"
        "        <rasd:ResourceType>5</rasd:ResourceType>\n"
        "      </Item>\n"
        "      <Item>\n"
        "        <rasd:Address>0</rasd:Address>\n"
        "        <rasd:ElementName>SATA controller 0</rasd:ElementName>\n"
        "        <rasd:InstanceID>5</rasd:InstanceID>\n"
        "        <rasd:ResourceSubType>vmware.sata.ahci</rasd:ResourceSubType>\n"
        "        <rasd:ResourceType>20</rasd:ResourceType>\n"
        "      </Item>\n"
        '      <Item ovf:required="false">\n'
        "        <rasd:AddressOnParent>0</rasd:AddressOnParent>\n"
        "        <rasd:AutomaticAllocation>false</rasd:AutomaticAllocation>\n"
        "        <rasd:ElementName>CD-ROM 1</rasd:ElementName>\n"
        "        <rasd:InstanceID>6</rasd:InstanceID>\n"
        "        <rasd:Parent>5</rasd:Parent>\n"
        "        <rasd:ResourceSubType>vmware.cdrom.remotepassthrough</rasd:ResourceSubType>\n"
        "        <rasd:ResourceType>15</rasd:ResourceType>\n"
        "      </Item>\n"
        f"{disk_items}{firmware}"
        "    </VirtualHardwareSection>\n"
        "  </VirtualSystem>\n"
    )
