"""A disk inside an OVA as the worker reads it: exactly its byte range of the archive checked
at submit, and nothing else."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import pytest

from worker.errors import SourceError
from worker.intake.identity import identity_of
from worker.intake.ova import read_members
from worker.intake.sampledisks import SampleVm, write_ova
from worker.intake.source import OFFSET_KEY, Source, hash_source


def _disk(ova: Path, name: str) -> tuple[dict[str, int | str], int, bytes]:
    """The identity, size and bytes of the member `name`, as submit records them."""
    with ova.open("rb") as file:
        member = next(m for m in read_members(file) if m.name == name)
    with tarfile.open(ova) as archive:
        data = archive.extractfile(name)
        assert data is not None
        content = data.read()
    return {**identity_of(ova.stat()), OFFSET_KEY: member.offset}, member.size_bytes, content


async def test_a_member_is_read_and_hashed_from_its_byte_range_only(tmp_path: Path) -> None:
    ova = write_ova(tmp_path / "v.ova", [SampleVm("v")])
    identity, size, content = _disk(ova, "v-disk1.vmdk")

    with Source.open(ova, size_bytes=size, identity=identity, reinspect=True) as source:
        read = source.read(size + 4096)  # never past the member, into the next one
        assert read == content
        assert source.read(1) == b""
        source.check_unchanged()

    digests = await hash_source(ova, ["sha256", "sha512"], size_bytes=size, identity=identity)
    assert digests == {
        "sha256": hashlib.sha256(content).hexdigest(),
        "sha512": hashlib.sha512(content).hexdigest(),
    }


def test_a_rewritten_archive_or_a_member_that_is_no_vmdk_is_refused(tmp_path: Path) -> None:
    ova = write_ova(tmp_path / "v.ova", [SampleVm("v")])
    identity, size, _ = _disk(ova, "v-disk2.vmdk")

    wrong = {**identity, OFFSET_KEY: int(identity[OFFSET_KEY]) - 512}  # the member's tar header
    with pytest.raises(SourceError, match="no longer the VMDK that was inspected"):
        Source.open(ova, size_bytes=size, identity=wrong, reinspect=True)
    with pytest.raises(SourceError, match="too few"):
        Source.open(ova, size_bytes=ova.stat().st_size, identity=identity)

    with ova.open("r+b") as file:
        file.seek(int(identity[OFFSET_KEY]) + size // 2)
        file.write(b"changed")
    with pytest.raises(SourceError, match="modified"):
        Source.open(ova, size_bytes=size, identity=identity)
