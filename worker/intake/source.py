"""A disk's bytes as the worker reads them: the file inspected at submit, and nothing else.

At submit the manifest records each source's identity (device, inode, size, mtime) and
inspects the VMDK through a Source opened with that identity. To upload or hash it, the
worker opens the path without following a symbolic link in its last
component, checks on the open file that it is still a regular file with that identity (and,
for a VMDK, re-inspects its header), reads no further than the recorded size, and checks when
it has read everything that nothing was written meanwhile. A disk swapped for a link to
another file, rewritten in place, or replaced by a device such as /dev/zero is a SourceError.

A disk inside an OVA is a byte range of the archive: its identity is the archive's, plus the
`offset` where the member's data starts; the source reads exactly the member's size from there.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import stat
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Protocol

from worker.errors import SourceError, UnsupportedDisk
from worker.intake.identity import identity_of
from worker.intake.vmdk import Inspection, inspect_open_vmdk

IDENTITY_KEYS = ("device", "inode", "size_bytes", "mtime_ns")
# In the identity of a disk inside an archive: where its bytes start (size_bytes is the archive's).
OFFSET_KEY = "offset"
# No link followed in the last component; a FIFO swapped in must not block the open.
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class Source:
    """One source file, open and checked; its calls block (async callers use a thread)."""

    def __init__(
        self,
        path: Path,
        file: BinaryIO,
        opened: os.stat_result,
        size_bytes: int,
        *,
        offset: int | None = None,
    ):
        self.path = path
        self._file = file
        self._offset = offset
        self._opened = opened
        self._size_bytes = size_bytes
        self._read_bytes = 0
        # A whole file may be read one byte past its size, to see it grew; a member may not:
        # the next byte is the archive's, and the archive's identity says it is unchanged.
        self._limit = size_bytes if offset is not None else size_bytes + 1

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        size_bytes: int,
        identity: Mapping[str, int | str] | None = None,
        reinspect: bool = False,
    ) -> Source:
        """Open `path` and check it is the file expected, or raise SourceError.

        With an `offset` in the identity, the source is `size_bytes` of the file from there.
        """
        offset = int(identity[OFFSET_KEY]) if identity and OFFSET_KEY in identity else None
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise SourceError(
                    f"source changed: {path} is now a symbolic link, which is not followed"
                ) from exc
            raise SourceError(f"cannot read {path}: {exc.strerror or exc}") from exc
        try:
            # Checked on the descriptor, before it becomes a file object: a directory in the
            # file's place opens, but fdopen would raise a bare IsADirectoryError.
            opened = os.fstat(fd)
            _check(path, opened, size_bytes, identity, offset)
        except BaseException:
            os.close(fd)
            raise
        source = cls(path, os.fdopen(fd, "rb"), opened, size_bytes, offset=offset)
        try:
            if reinspect:
                source.reinspect()
            source._file.seek(offset or 0)
        except BaseException:
            source.close()
            raise
        return source

    def inspect(self, *, flat_as_raw: bool = False) -> Inspection:
        """The VMDK inspection of these bytes (UnsupportedDisk says what is wrong with them)."""
        try:
            return inspect_open_vmdk(
                self._file,
                self.path,
                flat_as_raw=flat_as_raw,
                offset=self._offset or 0,
                size_bytes=self._size_bytes,
            )
        except OSError as exc:
            raise SourceError(f"cannot read {self.path}: {exc.strerror or exc}") from exc

    def reinspect(self) -> None:
        """SourceError unless the bytes are still the VMDK that was inspected at submit."""
        try:
            self.inspect()
        except UnsupportedDisk as exc:
            raise SourceError(
                f"source changed: {self.path} is no longer the VMDK that was inspected: "
                f"{exc.message}"
            ) from exc

    def read(self, size: int) -> bytes:
        """Up to `size` bytes, never more than the recorded size and one byte (a grown file)."""
        allowed = self._limit - self._read_bytes
        try:
            chunk = self._file.read(max(0, min(size, allowed)))
        except OSError as exc:
            raise SourceError(f"cannot read {self.path}: {exc}") from exc
        self._read_bytes += len(chunk)
        return chunk

    def check_unchanged(self) -> None:
        """SourceError if the file was written to (or its inode changed) since it was opened."""
        now = os.fstat(self._file.fileno())
        before = self._opened
        if (now.st_size, now.st_mtime_ns, now.st_ctime_ns) != (
            before.st_size,
            before.st_mtime_ns,
            before.st_ctime_ns,
        ):
            raise SourceError(
                f"source changed while it was read: {self.path} was written to meanwhile, "
                "so the bytes sent may mix old and new data"
            )

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Source:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _check(
    path: Path,
    status: os.stat_result,
    size_bytes: int,
    identity: Mapping[str, int | str] | None,
    offset: int | None = None,
) -> None:
    if not stat.S_ISREG(status.st_mode):
        raise SourceError(f"source changed: {path} is not a regular file any more")
    if identity is not None:
        found = identity_of(status)
        if (found["device"], found["inode"]) != (identity.get("device"), identity.get("inode")):
            raise SourceError(
                f"source changed since it was inspected: {path} is another file now "
                f"(device {found['device']} inode {found['inode']}, inspected: device "
                f"{identity.get('device')} inode {identity.get('inode')})"
            )
        changed = [key for key in ("size_bytes", "mtime_ns") if found[key] != identity.get(key)]
        if changed:
            raise SourceError(
                f"source changed since it was inspected: {path} was modified "
                f"({', '.join(f'{key} {identity.get(key)} -> {found[key]}' for key in changed)})"
            )
    if offset is not None:
        if offset + size_bytes > status.st_size:
            raise SourceError(
                f"source changed: {path} has {status.st_size} bytes, too few for the "
                f"{size_bytes} bytes of the disk at byte {offset}"
            )
    elif status.st_size != size_bytes:
        raise SourceError(
            f"source changed: {path} has {status.st_size} bytes, expected {size_bytes}"
        )


def inspect_source(
    path: Path,
    *,
    size_bytes: int,
    identity: Mapping[str, int | str] | None = None,
    flat_as_raw: bool = False,
) -> Inspection:
    """Inspect the VMDK at `path` (or, with an offset in `identity`, inside it) from its
    headers, through the same checked open as the upload; UnsupportedDisk says what is wrong.

    With `flat_as_raw`, a monolithicFlat or vmfs descriptor yields its flat extent to upload
    as disk_format raw. Reads the header, the descriptor and, for streamOptimized files with
    GD_AT_END, the footer at the end: a few KiB whatever the disk's size.
    """
    with Source.open(path, size_bytes=size_bytes, identity=identity) as source:
        return source.inspect(flat_as_raw=flat_as_raw)


class SourceStream(Protocol):
    """One read of a source from its start, in order; async callers await each chunk."""

    async def read(self, size: int) -> bytes:
        """Up to `size` bytes; b"" once the source ended."""
        ...

    async def finish(self) -> None:
        """After the recorded size was read: SourceError if the source grew or changed."""
        ...

    async def aclose(self) -> None: ...


class SourceHandle(Protocol):
    """A disk's source, ready to be read (once, or again after a failed attempt)."""

    size_bytes: int
    shown: str  # the source as messages name it

    async def check(self) -> None:
        """Before any request: SourceError unless the source is there and the one expected."""
        ...

    async def stream(self) -> SourceStream:
        """A new read from the first byte."""
        ...


class LocalHandle:
    """A file on the worker's host (or a member of an archive there), read through `Source`."""

    def __init__(
        self,
        path: Path,
        *,
        size_bytes: int,
        identity: Mapping[str, int | str] | None = None,
        reinspect: bool = False,
    ) -> None:
        self.path = path
        self.size_bytes = size_bytes
        self.shown = str(path)
        self._identity = identity
        self._reinspect = reinspect

    async def check(self) -> None:
        """SourceError unless the file is there and the one expected (its VMDK header
        inspected again when asked)."""
        source = await asyncio.to_thread(
            Source.open,
            self.path,
            size_bytes=self.size_bytes,
            identity=self._identity,
            reinspect=self._reinspect,
        )
        source.close()

    async def stream(self) -> _LocalStream:
        # Opened and checked again for each read: the file may have been swapped meanwhile.
        source = await asyncio.to_thread(
            Source.open, self.path, size_bytes=self.size_bytes, identity=self._identity
        )
        return _LocalStream(source, self.size_bytes)


class _LocalStream:
    """One thread call per chunk, so that a cancelled read stops at the next chunk."""

    def __init__(self, source: Source, size_bytes: int) -> None:
        self._source = source
        self._size_bytes = size_bytes

    async def read(self, size: int) -> bytes:
        return await asyncio.to_thread(self._source.read, size)

    async def finish(self) -> None:
        path = self._source.path
        if await asyncio.to_thread(self._source.read, 1):
            raise SourceError(
                f"source changed while reading: {path} was declared as {self._size_bytes} "
                "bytes but it grew past the declared size"
            )
        await asyncio.to_thread(self._source.check_unchanged)

    async def aclose(self) -> None:
        self._source.close()


async def read_whole(
    handle: SourceHandle, chunk_bytes: Callable[[], int], each: Callable[[bytes], Awaitable[None]]
) -> None:
    """Read exactly the source's recorded size, in chunks of `chunk_bytes()` (asked again
    for each), handing each chunk to `each` in order; SourceError when it ends early, goes on
    past that size, or changed meanwhile."""
    stream = await handle.stream()
    try:
        remaining = handle.size_bytes
        while remaining > 0:
            chunk = await stream.read(min(chunk_bytes(), remaining))
            if not chunk:
                raise SourceError(
                    f"source changed while reading: {handle.shown} was declared as "
                    f"{handle.size_bytes} bytes but it ended after "
                    f"{handle.size_bytes - remaining} bytes"
                )
            remaining -= len(chunk)
            if remaining == 0:
                # Checked before the last chunk is handed on, so that a grown or rewritten
                # file is never sent whole.
                await stream.finish()
            await each(chunk)
    finally:
        await stream.aclose()


async def hash_source(
    source: Path | SourceHandle,
    hash_algos: Sequence[str],
    *,
    size_bytes: int,
    identity: Mapping[str, int | str] | None = None,
    chunk_bytes: int = 4 << 20,
) -> dict[str, str]:
    """The digests of exactly `size_bytes` of the source, off the event loop; SourceError when
    it is not the file expected, ends early, goes on past that size, or changes meanwhile."""
    handle = (
        LocalHandle(source, size_bytes=size_bytes, identity=identity)
        if isinstance(source, Path)
        else source
    )
    hashers = [hashlib.new(name) for name in hash_algos]

    def update(chunk: bytes) -> None:
        for hasher in hashers:
            hasher.update(chunk)

    async def each(chunk: bytes) -> None:
        await asyncio.to_thread(update, chunk)

    await read_whole(handle, lambda: chunk_bytes, each)
    return {name: hasher.hexdigest() for name, hasher in zip(hash_algos, hashers, strict=True)}
