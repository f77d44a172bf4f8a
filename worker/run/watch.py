"""Watching imports: one list call per tick for every image this worker is importing.

Each importing image asks for a look at its due time, which the state machine sets. Rather
than one GET per image, the watch sends one `GET /v2/images?id=in:...` for all images that are
waiting, and hands each its image:

- at its due time (or a moment before, to share the call with others due soon);
- sooner, when the list shows that its status changed, that its import failed or that a store
  of a multi-store import finished, so an image is seen `active` within one tick of another
  image's look, whatever its own schedule.

The watch also learns how long imports take on this cloud (`ImportPace`), so that the machine
can look densely around an import's expected end instead of along a fixed curve.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from worker.clients.glance import GlanceClient, Image
from worker.errors import MigrationError

# Images per list call: 50 ids keep the URL under 2 KB, and Glance's page limit far above it.
LIST_BATCH = 50
# A waiter due this soon after a call is answered by it, saving a call of its own.
SHARE_S = 0.3
# Recent imports the pace is learned from.
PACE_WINDOW = 16


@dataclass
class ImportPace:
    """How fast this cloud imports: bytes over seconds of the last few finished imports.

    Glance's import reads, hashes and copies every byte again, and queues behind its import
    threads, so the pace of recent imports on this cloud is the best guess for the next one.
    """

    window: int = PACE_WINDOW
    _seen: deque[tuple[int, float]] = field(default_factory=deque, init=False)

    def record(self, size_bytes: int, duration_s: float) -> None:
        if duration_s <= 0:
            return
        self._seen.append((size_bytes, duration_s))
        while len(self._seen) > self.window:
            self._seen.popleft()

    def expect_s(self, size_bytes: int) -> float | None:
        """The expected duration of an import of `size_bytes`; None before any was seen."""
        if not self._seen:
            return None
        total_bytes = sum(size for size, _ in self._seen)
        total_s = sum(duration for _, duration in self._seen)
        if total_bytes <= 0:
            return total_s / len(self._seen)
        return size_bytes * total_s / total_bytes


@dataclass
class _Waiter:
    due_at: float
    seen_status: str | None
    answer: asyncio.Future[Image]
    size_bytes: int
    accepted_at: float | None  # when Glance accepted the import, to learn the pace


class ImportWatch:
    """Shares list calls among every importing image of one worker process."""

    def __init__(
        self,
        glance: GlanceClient,
        *,
        clock: Callable[[], float] = time.time,
        batch: int = LIST_BATCH,
        share_s: float = SHARE_S,
    ) -> None:
        self._glance = glance
        self._clock = clock
        self._batch = batch
        self._share_s = share_s
        self._waiters: dict[str, _Waiter] = {}
        self._busy_at: dict[str, float] = {}  # when each image was last seen still importing
        self._signals: dict[str, _Signals] = {}  # each image's signals at the last look
        self._wake = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None
        self.pace = ImportPace()
        self.list_calls = 0

    def now(self) -> float:
        return self._clock()

    async def look(
        self,
        image_id: str,
        *,
        delay_s: float,
        seen_status: str | None,
        size_bytes: int,
        accepted_at: float | None,
    ) -> Image:
        """The image as Glance shows it, `delay_s` from now or as soon as it changed.

        `seen_status` is the status last seen; `accepted_at` is when the import was accepted,
        on this watch's clock. A failed list call reaches only the waiters that were due.
        """
        answer: asyncio.Future[Image] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(self._clock() + delay_s, seen_status, answer, size_bytes, accepted_at)
        self._waiters[image_id] = waiter
        self._wake.set()
        if self._loop is None or self._loop.done():
            self._loop = asyncio.create_task(self._run(), name="import-watch")
        try:
            return await answer
        finally:
            if self._waiters.get(image_id) is waiter:
                del self._waiters[image_id]

    def forget(self, image_id: str) -> None:
        """The image's run ended: drop what the watch remembers of it."""
        self._busy_at.pop(image_id, None)
        self._signals.pop(image_id, None)

    async def close(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop

    async def _run(self) -> None:
        while self._waiters:
            self._wake.clear()
            wait_s = min(w.due_at for w in self._waiters.values()) - self._clock()
            if wait_s > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=wait_s)
                continue  # a new waiter may be due sooner: look again
            await self._tick()

    async def _tick(self) -> None:
        ids = list(self._waiters)
        for start in range(0, len(ids), self._batch):
            chunk = ids[start : start + self._batch]
            try:
                found = await self._list(chunk)
            except MigrationError as error:
                self._fail_due(chunk, error)
                continue
            except Exception as error:  # a bug, not the cloud: no waiter may hang on it
                self._fail_all(chunk, error)
                continue
            await self._deliver(chunk, found)

    async def _list(self, ids: list[str]) -> dict[str, Image]:
        self.list_calls += 1
        # Glance offers a next page whenever a page is full: one more than can match keeps
        # the answer to one page.
        images = self._glance.list_images(id="in:" + ",".join(ids), limit=str(len(ids) + 1))
        return {image.id: image async for image in images}

    async def _deliver(self, ids: list[str], found: dict[str, Image]) -> None:
        now = self._clock()
        for image_id in ids:
            waiter = self._waiters.get(image_id)
            if waiter is None or waiter.answer.done():
                continue
            image = found.get(image_id)
            due = waiter.due_at <= now + self._share_s
            if image is None:
                # Not listed: deleted, or hidden from lists (os_hidden). Its own GET says which.
                if due:
                    await self._look_alone(image_id, waiter)
                continue
            self._note(image_id, image, waiter, now)
            changed = self._changed(image_id, image, waiter.seen_status)  # remembers it too
            if due or changed:
                waiter.answer.set_result(image)

    async def _look_alone(self, image_id: str, waiter: _Waiter) -> None:
        try:
            image = await self._glance.get_image(image_id)
        except Exception as error:  # NotFound for a deleted image, or any failure: the waiter's
            if not waiter.answer.done():
                waiter.answer.set_exception(error)
            return
        if not waiter.answer.done():
            waiter.answer.set_result(image)

    def _fail_due(self, ids: list[str], error: MigrationError) -> None:
        now = self._clock()
        for image_id in ids:
            waiter = self._waiters.get(image_id)
            if waiter is not None and not waiter.answer.done() and waiter.due_at <= now:
                waiter.answer.set_exception(error)

    def _fail_all(self, ids: list[str], error: Exception) -> None:
        for image_id in ids:
            waiter = self._waiters.get(image_id)
            if waiter is not None and not waiter.answer.done():
                waiter.answer.set_exception(error)

    def _changed(self, image_id: str, image: Image, seen_status: str | None) -> bool:
        """Worth handing over before its due time: a new status, a failure signal, or (in a
        multi-store import) a store done since the last look."""
        signals = _signals_of(image)
        before = self._signals.get(image_id)
        self._signals[image_id] = signals
        if image.status != seen_status:
            return True
        if before is None:
            failed_import, es_failed_reason, _ = signals
            return bool(failed_import or es_failed_reason)
        return signals != before

    def _note(self, image_id: str, image: Image, waiter: _Waiter, now: float) -> None:
        """Learn the pace: an import seen active ended between the last busy look and now."""
        if image.status in ("uploading", "importing"):
            self._busy_at[image_id] = now
            return
        busy_at = self._busy_at.pop(image_id, None)
        if image.status == "active" and busy_at is not None and waiter.accepted_at is not None:
            self.pace.record(waiter.size_bytes, (busy_at + now) / 2 - waiter.accepted_at)


# The properties whose change is worth handing an image over before its due time: failure
# signals, and the stores a multi-store import has still to do (its end, when active).
_SIGNAL_KEYS = (
    "os_glance_failed_import",
    "os_glance_es_failed_reason",
    "os_glance_importing_to_stores",
)
_Signals = tuple[str, ...]


def _signals_of(image: Image) -> _Signals:
    return tuple(str(image.properties.get(key) or "") for key in _SIGNAL_KEYS)
