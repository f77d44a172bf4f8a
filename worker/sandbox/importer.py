"""The asynchronous glance-direct import flow, ending as real Glance (or the vendor) ends it,
with Glance's image_conversion plugin when configured."""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path

import aiofiles
import aiohttp
import structlog

from worker.sandbox.inspect import inspect_file
from worker.sandbox.state import MIB, CloudState, Image, Task, utcnow

log = structlog.get_logger(__name__)

INTERNAL_ERROR = "Task failed due to Internal Error"
LOCK = "os_glance_import_task"
TO_STORES = "os_glance_importing_to_stores"
FAILED_STORES = "os_glance_failed_import"
VENDOR_REASON = "os_glance_es_failed_reason"
COPY_CHUNK_BYTES = 1024 * 1024
# What "driver injection" adds to the stored disk: deterministic, so repeated runs hash alike.
INJECTED_BLOCK = b"sandbox virtio drivers injected".ljust(512, b"\x00")


@dataclass(frozen=True)
class Stored:
    size_bytes: int
    md5: str
    sha512: str


def default_store(state: CloudState) -> str:
    stores = state.config.stores
    chosen = next((store for store in stores if store.get("default")), stores[0])
    return str(chosen["id"])


def writable_stores(state: CloudState) -> tuple[str, ...]:
    """The stores an import with all_stores copies to: Glance leaves out read-only ones."""
    return tuple(
        str(store["id"])
        for store in state.config.stores
        if str(store.get("read-only", "")).lower() != "true"
    )


def _listed(image: Image, key: str) -> list[str]:
    return [name for name in image.properties.get(key, "").split(",") if name]


def _add_store(image: Image, key: str, store: str | None) -> None:
    names = _listed(image, key)
    if store is not None and store not in names:
        image.properties[key] = ",".join([*names, store])


def _remove_store(image: Image, key: str, store: str | None) -> None:
    image.properties[key] = ",".join(name for name in _listed(image, key) if name != store)


def wants_virtio(image: Image) -> bool:
    return image.properties.get("es_virtio_enabled", "").lower() in ("yes", "true", "1")


def name_in(image: Image, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(image.name or "", pattern) for pattern in patterns)


def copy_to_store(staged: Path, stored: Path, inject: bool, corrupt: bool = False) -> Stored:
    """Copy staged bytes to the store, hashing on the way (blocking: call it in a thread)."""
    md5 = hashlib.md5(usedforsecurity=False)
    sha512 = hashlib.sha512()
    size = 0
    with staged.open("rb") as source, stored.open("wb") as target:
        while chunk := source.read(COPY_CHUNK_BYTES):
            if corrupt and size == 0:  # one flipped bit: same size, different hashes
                chunk = bytes([chunk[0] ^ 0x01]) + chunk[1:]
            target.write(chunk)
            md5.update(chunk)
            sha512.update(chunk)
            size += len(chunk)
        if inject:
            target.write(INJECTED_BLOCK)
            md5.update(INJECTED_BLOCK)
            sha512.update(INJECTED_BLOCK)
            size += len(INJECTED_BLOCK)
    return Stored(size, md5.hexdigest(), sha512.hexdigest())


class ConversionError(Exception):
    """qemu-img could not convert the staged file (or could not be run at all)."""


def convert_file(source: Path, target: Path, source_format: str | None, output_format: str) -> int:
    """`qemu-img convert` as Glance's image_conversion plugin runs it on the host (an error on
    stderr counts as a failure, as there), then the source removed as the plugin removes it;
    the converted size (blocking: call it in a thread)."""
    if source_format is None:
        raise ConversionError("the image has no disk_format to convert from")
    command = ["qemu-img", "convert", "-f", source_format, "-O", output_format]
    try:
        done = subprocess.run(
            [*command, str(source), str(target)], capture_output=True, text=True, check=False
        )
    except OSError as exc:
        raise ConversionError(f"cannot run qemu-img: {exc}") from exc
    if done.returncode != 0 or done.stderr:
        target.unlink(missing_ok=True)
        raise ConversionError(done.stderr.strip() or f"qemu-img exited {done.returncode}")
    source.unlink(missing_ok=True)
    return target.stat().st_size


class ImportFlow:
    """One import task's life, from `pending` to `success` or `failure`.

    The data is copied to `stores` one after the other (none: a single-store cloud). With
    `all_stores_must_succeed` the image turns active after the last store, and a store that
    fails fails the import; without it, each store that takes the image makes it active and
    the ones that fail are listed in os_glance_failed_import.
    """

    def __init__(
        self,
        state: CloudState,
        image_id: str,
        task: Task,
        *,
        stores: tuple[str, ...] = (),
        all_stores_must_succeed: bool = True,
    ) -> None:
        self.state = state
        self.image_id = image_id
        self.task = task
        self.stores = stores
        self.all_stores_must_succeed = all_stores_must_succeed

    def _image(self) -> Image | None:
        """The image, if it still exists and this task still holds its import lock."""
        image = self.state.images.get(self.image_id)
        if image is None or image.properties.get(LOCK) != self.task.id:
            return None
        return image

    async def run(self) -> None:
        latency_s = self.state.config.import_latency_s
        # Like Glance's task pool, the flow starts a moment after the 202: the image is
        # still `uploading` (and locked) in that window.
        await asyncio.sleep(latency_s / 2)
        image = self._image()
        if image is None:
            self._fail_task(INTERNAL_ERROR)
            return
        self._start(image)
        quota_message = self._quota_problem(image)
        if quota_message:
            self._end_queued(image, quota_message, delete_staged=False)
            return
        uri = self.task.import_req["method"].get("uri")
        if uri is not None and not await self._download(uri):
            return
        await self.state.imports_released.wait()
        await asyncio.sleep(latency_s)
        image = self._image()
        if image is None:
            self._fail_task(INTERNAL_ERROR)
            return
        await self._finish(image)

    def _start(self, image: Image) -> None:
        self.task.status = "processing"
        self.task.updated_at = utcnow()
        image.set_status("importing")
        image.properties[TO_STORES] = ",".join(self.stores)
        image.properties[FAILED_STORES] = ""

    async def _download(self, uri: str) -> bool:
        """web-download: Glance fetches the URI onto its staging area first, then imports as
        for glance-direct; a failed download reverts the image to `queued`."""
        staged = self.state.staged_path(self.image_id)
        size = 0
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(uri) as response,
                aiofiles.open(staged, "wb") as file,
            ):
                response.raise_for_status()
                async for chunk in response.content.iter_chunked(COPY_CHUNK_BYTES):
                    await file.write(chunk)
                    size += len(chunk)
        except (aiohttp.ClientError, OSError) as exc:
            log.info("sandbox.download_failed", image_id=self.image_id, reason=str(exc))
            image = self._image()
            if image is None:
                self._fail_task(INTERNAL_ERROR)
            else:
                self._end_queued(image, f"Failed to download {uri}: {exc}", delete_staged=True)
            return False
        image = self._image()
        if image is None:
            staged.unlink(missing_ok=True)
            self._fail_task(INTERNAL_ERROR)
            return False
        image.size = size
        return True

    def _quota_problem(self, image: Image) -> str:
        staged_mib = (image.size or 0) // MIB
        over = self.state.over_quota("image_size_total", staged_mib)
        if over is None:
            return ""
        limit, usage = over
        return (
            f"Project {image.owner} is over a limit for [Resource image_size_total is over"
            f" limit of {limit} due to current usage {usage} and delta {staged_mib}]"
        )

    async def _finish(self, image: Image) -> None:
        config = self.state.config
        if name_in(image, config.revert_names):
            self._end_queued(image, INTERNAL_ERROR, delete_staged=True)
        elif wants_virtio(image) and name_in(image, config.virtio_fail_names):
            self._end_vendor_failure(image)
        elif name_in(image, config.import_fail_names):
            self._end_upstream_failure(image, "import_fail_names")
        else:
            await self._inspect_and_store(image)

    async def _inspect_and_store(self, image: Image) -> None:
        staged = self.state.staged_path(image.id)
        verdict = await asyncio.to_thread(inspect_file, staged, image.disk_format)
        output_format = self.state.config.convert_to
        if not verdict.accepted:
            if output_format:
                # The conversion plugin inspects first, and its failure reverts the import.
                self._end_queued(image, INTERNAL_ERROR, delete_staged=True)
            else:
                self._end_upstream_failure(image, verdict.reason)
            return
        data: Path | None = staged
        if output_format not in (None, image.disk_format):
            data = await self._convert(image, staged, output_format, verdict.virtual_size)
        if data is None:
            return
        try:
            await self._store(image, data, verdict.virtual_size)
        finally:
            if data != staged:  # the converted file, as Glance deletes it once stored
                await asyncio.to_thread(data.unlink, missing_ok=True)

    async def _convert(
        self, image: Image, staged: Path, output_format: str, virtual_size: int | None
    ) -> Path | None:
        """Glance's image_conversion plugin: the staged file replaced by its conversion, the
        image given the new disk_format and size; None when the import ended instead."""
        converted = staged.with_name(f"{staged.name}.{output_format}")
        try:
            size = await asyncio.to_thread(
                convert_file, staged, converted, image.disk_format, output_format
            )
        except ConversionError as exc:
            log.info("sandbox.conversion_failed", image_id=image.id, reason=str(exc))
            current = self._image()
            if current is None:
                self._fail_task(INTERNAL_ERROR)
            else:  # the plugin's revert: back to `queued`, the staged file removed
                self._end_queued(current, INTERNAL_ERROR, delete_staged=True)
            return None
        current = self._image()
        if current is None:
            await asyncio.to_thread(converted.unlink, missing_ok=True)
            self._fail_task(INTERNAL_ERROR)
            return None
        current.virtual_size = virtual_size
        current.disk_format, current.container_format = output_format, "bare"
        current.size = size
        current.touch()
        return converted

    async def _store(self, image: Image, data: Path, virtual_size: int | None) -> None:
        """Copy the data to each store in turn, as Glance's _ImportToStore tasks do."""
        failing = self.state.config.fail_stores
        stored: Stored | None = None
        current = image
        targets: tuple[str | None, ...] = self.stores or (None,)
        for index, store in enumerate(targets):
            if index:  # one copy after the other: each store's end can be seen on its own
                await asyncio.sleep(self.state.config.import_latency_s / 2)
            took: Stored | None = None  # what this store holds now; None when it failed
            if store not in failing:
                stored = took = stored or await asyncio.to_thread(self._copy, image, data)
            found = self._image()
            if found is None:
                self._abandon()
                return
            current = found
            if took is None and self.all_stores_must_succeed:
                self._end_store_failure(current, store)
                return
            if took is None:
                _add_store(current, FAILED_STORES, store)
            else:
                current.stores = ",".join(filter(None, [current.stores, store])) or None
                if index == len(targets) - 1 or not self.all_stores_must_succeed:
                    self._activate(current, took, virtual_size)
            _remove_store(current, TO_STORES, store)
        if current.status != "active":  # no store took it: Glance's state check reverts
            self._end_queued(current, INTERNAL_ERROR, delete_staged=True)
            return
        self._complete(current)

    def _copy(self, image: Image, data: Path) -> Stored:
        """The stored bytes (blocking: call it in a thread); one file serves every store."""
        inject = self.state.config.rewrite_virtio and wants_virtio(image)
        corrupt = name_in(image, self.state.config.corrupt_names)
        return copy_to_store(data, self.state.stored_path(image.id), inject, corrupt)

    def _abandon(self) -> None:
        """The image was deleted (or its lock taken) while the data was copied."""
        self.state.stored_path(self.image_id).unlink(missing_ok=True)
        self._fail_task(INTERNAL_ERROR)

    def _activate(self, image: Image, stored: Stored, virtual_size: int | None) -> None:
        if image.status == "active":
            return
        image.size = stored.size_bytes
        image.virtual_size = virtual_size
        image.checksum = stored.md5
        image.os_hash_algo = "sha512"
        image.os_hash_value = stored.sha512
        image.set_status("active")

    def _complete(self, image: Image) -> None:
        staged_mib = (image.size or 0) // MIB
        image.properties.pop(LOCK, None)
        image.touch()
        self.state.staged_path(image.id).unlink(missing_ok=True)
        self.task.finish("success", f"Copied {staged_mib} MiB", {"image_id": image.id})
        log.info("sandbox.import_succeeded", image_id=image.id, stores=image.stores)

    def _end_store_failure(self, image: Image, store: str | None) -> None:
        """A store failed and all must succeed: the copies made are removed with their
        locations, the stores not reached stay listed to do, the image stays `importing`."""
        _add_store(image, FAILED_STORES, store)
        _remove_store(image, TO_STORES, store)
        image.stores = None
        self.state.stored_path(image.id).unlink(missing_ok=True)
        image.properties.pop(LOCK, None)
        image.touch()
        self._fail_task(INTERNAL_ERROR)
        log.info("sandbox.import_failed", image_id=image.id, reason=f"store {store} failed")

    def _end_upstream_failure(self, image: Image, reason: str) -> None:
        """No reverting plugin: the image stays `importing`, the staged file stays."""
        image.properties[TO_STORES] = ""
        image.properties[FAILED_STORES] = ",".join(self.stores)
        image.properties.pop(LOCK, None)
        image.touch()
        self._fail_task(INTERNAL_ERROR)
        log.info("sandbox.import_failed", image_id=image.id, reason=reason, status=image.status)

    def _end_vendor_failure(self, image: Image) -> None:
        """The vendor's signal: still `importing`, with os_glance_es_failed_reason set."""
        image.properties[VENDOR_REASON] = "virtio error"
        image.properties.pop(LOCK, None)
        image.touch()
        self._fail_task(INTERNAL_ERROR)
        log.info("sandbox.import_failed", image_id=image.id, reason="virtio error")

    def _end_queued(self, image: Image, message: str, *, delete_staged: bool) -> None:
        """A reverting plugin or the in-flow quota check: back to `queued`, sizes wiped."""
        image.properties[TO_STORES] = ""
        if delete_staged:
            for store in self.stores:
                _add_store(image, FAILED_STORES, store)
            self.state.staged_path(image.id).unlink(missing_ok=True)
        image.properties.pop(LOCK, None)
        image.set_status("queued")
        self._fail_task(message)
        log.info("sandbox.import_reverted", image_id=image.id)

    def _fail_task(self, message: str) -> None:
        self.task.finish("failure", message)
