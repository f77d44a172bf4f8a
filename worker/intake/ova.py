"""Read an OVA's member index (a tar archive) without extracting anything.

Only headers are read: each member's name, byte offset and size, so that a disk inside the
archive can be inspected and uploaded straight from its byte range. USTAR, GNU (long names
in `././@LongLink` members) and pax (`path` and `size` records) headers are understood.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import BinaryIO

from worker.errors import UnsupportedDisk

BLOCK = 512
_MAGIC_OFFSET = 257
_REGULAR = (b"0", b"\0", b"7")  # regular file; old tars write NUL; contiguous file
_GNU_LONG_NAME, _PAX_HEADER, _PAX_GLOBAL = b"L", b"x", b"g"
_GNU_LONG_LINK = b"K"
# Names and pax headers are small; a bigger one is not a real archive's.
_MAX_META_BYTES = 1 << 20


@dataclass(frozen=True)
class Member:
    """One regular file inside the archive: where its data starts and how long it is."""

    name: str
    offset: int
    size_bytes: int


def is_tar(head: bytes) -> bool:
    """The first block is a tar header: USTAR or GNU magic and a checksum that adds up."""
    if len(head) < BLOCK or head[_MAGIC_OFFSET : _MAGIC_OFFSET + 5] != b"ustar":
        return False
    return _checksum_ok(head[:BLOCK])


def read_members(file: BinaryIO, *, size_bytes: int | None = None) -> tuple[Member, ...]:
    """Every regular member of the tar archive open in `file`, in archive order.

    UnsupportedDisk when the archive is truncated (a header or a member's data runs past the
    end of the file) or a header is damaged.
    """
    if size_bytes is None:
        size_bytes = os.fstat(file.fileno()).st_size
    members: list[Member] = []
    position = 0
    long_name: str | None = None
    pax: dict[str, str] = {}
    while (header := _header_at(file, position, size_bytes)) is not None:
        kind = header[156:157]
        size = _number(header[124:136], position)
        size = _pax_size(pax["size"], position) if "size" in pax else size
        name = pax.get("path") or long_name or _header_name(header)
        data_at = position + BLOCK
        position = data_at + -(-size // BLOCK) * BLOCK  # data is padded to whole blocks
        if position > size_bytes:
            raise UnsupportedDisk(_truncated(data_at - BLOCK, size_bytes, f"member {name!r}"))
        if kind in (_GNU_LONG_NAME, _PAX_HEADER, _GNU_LONG_LINK, _PAX_GLOBAL):
            data = _meta(file, data_at, size)
            if kind == _GNU_LONG_NAME:
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            elif kind == _PAX_HEADER:
                pax = _pax_records(data, data_at - BLOCK)
            continue
        long_name, pax = None, {}
        if kind in _REGULAR:
            members.append(Member(name=name, offset=data_at, size_bytes=size))
    return tuple(members)


def _header_at(file: BinaryIO, position: int, size_bytes: int) -> bytes | None:
    """The header block at `position`, or None at the end of the archive (a zero block).

    An archive that just stops, even between two members, was cut short: tar ends every
    archive with zero blocks.
    """
    file.seek(position)
    header = file.read(BLOCK)
    if len(header) < BLOCK:
        if not header:
            raise UnsupportedDisk(
                f"truncated archive: it stops at byte {position} without the end-of-archive "
                "blocks tar writes; copy the OVA again"
            )
        raise UnsupportedDisk(_truncated(position, size_bytes, "a member's header"))
    if header == bytes(BLOCK):
        return None
    if not _checksum_ok(header):
        raise UnsupportedDisk(
            f"damaged tar archive: the header at byte {position} has a wrong checksum"
        )
    return header


def _meta(file: BinaryIO, data_at: int, size: int) -> bytes:
    if size > _MAX_META_BYTES:
        raise UnsupportedDisk(f"the tar header at byte {data_at - BLOCK} is too large")
    file.seek(data_at)
    return file.read(size)


def _truncated(position: int, size_bytes: int, what: str) -> str:
    return (
        f"truncated archive: {what} at byte {position} runs past the end of the file "
        f"({size_bytes} bytes); copy the OVA again"
    )


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = _number(header[148:156], 0)
    except UnsupportedDisk:
        return False
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:BLOCK])
    return stored == unsigned


def _number(field: bytes, position: int) -> int:
    """A header number: octal text, or GNU's base-256 for big sizes (high bit set)."""
    if field and field[0] & 0x80:
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise UnsupportedDisk(
            f"damaged tar archive: a number in the header at byte {position} is not octal"
        ) from None


def _header_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:263] == b"ustar\0":  # POSIX USTAR: a prefix may hold the directories
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "replace")


def _pax_records(data: bytes, position: int) -> dict[str, str]:
    """`LENGTH KEY=VALUE\\n` records of a pax extended header."""
    records: dict[str, str] = {}
    at = 0
    while at < len(data):
        space = data.find(b" ", at)
        if space < 0 or not data[at:space].isdigit():
            break
        length = int(data[at:space])
        record = data[space + 1 : at + length]
        if length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            raise UnsupportedDisk(f"damaged pax header at byte {position}")
        key, _, value = record[:-1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        at += length
    return records


def _pax_size(text: str, position: int) -> int:
    if not text.isdigit():
        raise UnsupportedDisk(f"damaged pax header at byte {position}: size {text[:30]!r}")
    return int(text)
