"""What a worker does about outages besides waiting: say it is paused, and settle owed deletions."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

from worker.background import alongside
from worker.clients.glance import GlanceClient
from worker.core.events import Event
from worker.errors import MigrationError, NotFound
from worker.observe.bus import publisher
from worker.run.outage import Outage, Outages, Service
from worker.store.store import Store

events = publisher(__name__)

_SETTLE_EVERY_S = 60.0


class PauseBoard:
    """Mirrors the open breakers into `worker_pauses`, where `status` reads them."""

    def __init__(self, store: Store, *, worker_id: str) -> None:
        self._store = store
        self._worker_id = worker_id
        self._writes: set[asyncio.Future[None]] = set()

    def on_change(self, outage: Outage, is_open: bool) -> None:
        """The breakers' hook: an outage began (or is still on), or ended."""
        if outage.service is Service.DATABASE:
            return  # nothing can be written there while it is down
        write = asyncio.ensure_future(self._write(outage, is_open))
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)

    async def _write(self, outage: Outage, is_open: bool) -> None:
        try:
            if is_open:
                await self._store.set_pause(
                    worker_id=self._worker_id,
                    service=str(outage.service),
                    reason=outage.reason,
                    since=outage.started_at,
                )
            else:
                await self._store.clear_pause(
                    worker_id=self._worker_id, service=str(outage.service)
                )
        except Exception as exc:  # advisory: status shows less, the work goes on
            events.warning(
                Event.OUTAGE_PAUSE_NOT_RECORDED, service=str(outage.service), error=str(exc)
            )

    async def aclose(self) -> None:
        await asyncio.gather(*self._writes, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._store.clear_pause(worker_id=self._worker_id)


async def discard_if_orphaned(
    store: Store, glance: GlanceClient, result_id: int, image_id: uuid.UUID | None
) -> None:
    """A row lost in mid-work: if another worker took it over, its image is theirs; if the row
    itself is gone (its job deleted), nobody will ever clean its image up but us."""
    if image_id is None:
        return
    try:
        if await store.result_exists(result_id):
            return
        await glance.delete_image(str(image_id))
    except NotFound:
        pass
    except Exception as exc:  # the database or Glance is away: say what is left, for an operator
        events.error(
            Event.IMAGE_ORPHAN_LEFT, result_id=result_id, image_id=str(image_id), error=str(exc)
        )
        return
    events.warning(Event.IMAGE_ORPHAN_DELETED, result_id=result_id, image_id=str(image_id))


async def settle_owed_cleanups(
    store: Store, glance: GlanceClient, outages: Outages, *, worker_id: str
) -> int:
    """Delete the images of failed rows whose deletion is owed; how many were settled.

    Stops at the first failure that is not "already gone": Glance is still away, and the rest
    wait for the next round.
    """
    settled = 0
    for result_id, image_id in await store.owed_cleanups():
        await outages.wait_clear()
        try:
            await glance.delete_image(str(image_id))
        except NotFound:
            pass  # gone already: nothing is owed
        except MigrationError as exc:
            events.warning(
                Event.IMAGE_CLEANUP_STILL_OWED,
                result_id=result_id,
                image_id=str(image_id),
                error=str(exc),
            )
            break
        await store.cleanup_done(result_id, worker_id=worker_id)
        events.info(Event.IMAGE_CLEANUP_DONE, result_id=result_id, image_id=str(image_id))
        settled += 1
    return settled


@contextlib.asynccontextmanager
async def settling_owed_cleanups(
    store: Store,
    glance: GlanceClient,
    outages: Outages,
    *,
    worker_id: str,
    every_s: float = _SETTLE_EVERY_S,
) -> AsyncIterator[None]:
    """Settle owed deletions at start and every `every_s` while the block runs."""

    async def loop() -> None:
        while True:
            try:
                await settle_owed_cleanups(store, glance, outages, worker_id=worker_id)
            except Exception as exc:  # the database is away: try again next round
                events.warning(Event.IMAGE_CLEANUP_ROUND_FAILED, error=str(exc))
            await asyncio.sleep(every_s)

    try:
        async with alongside(loop(), name="owed-cleanups"):
            yield
    finally:
        if outages.describe() is None:  # one last round for what the run itself left owed
            with contextlib.suppress(Exception):
                await settle_owed_cleanups(store, glance, outages, worker_id=worker_id)
