"""Levels say what matters, and every end of an image is one `image.finished`.

Failures and retries are warnings, a crashed image ends like any failed one (its
`image.finished` is what webhooks, metrics and progress follow), and progress counts each
finished image once. The records are those the run's bus published; the log lines are
what its log writer wrote of them.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tests.fixtures.batch import migrate, rows_of, submit
from tests.fixtures.events import named, published
from tests.fixtures.webhooks import Receiver, serving
from worker.core.events import Event
from worker.observe.bus import EventBus, write_log
from worker.observe.metrics import WorkerMetrics
from worker.observe.notify import WebhookNotifier, WebhookSettings, notifying
from worker.observe.progress import RunProgress
from worker.run.consumer import Consumer
from worker.run.settings import WorkerSettings
from worker.sandbox import Fault, Sandbox, SandboxConfig
from worker.store.store import Claim, ResultRow, Store, open_store


@pytest.mark.parametrize(
    "sandbox_config", [SandboxConfig(virtio_fail_names=("bad-*",))], indirect=True
)
async def test_failures_and_retries_are_warnings_and_progress_counts_each_image_once(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    names = ["good-0", "good-1", "bad-0", "good-2", "bad-1"]
    job_id, _ = await submit(database_url, tmp_path, names, es_virtio_enabled="yes")
    sandbox.inject(Fault("POST", r"/v2/images", status=503, times=1))

    with published() as records, capture_logs() as logs:
        summary = await migrate(database_url, sandbox, progress="off")

    assert summary.by_phase == {"done": 3, "failed": 2}
    levels = {
        (entry.event.value, entry.get("phase"), logging.getLevelName(entry.level).lower())
        for entry in records
        if entry.event in (Event.IMAGE_FINISHED, Event.IMAGE_RETRY_SCHEDULED)
    }
    assert levels == {
        ("image.retry_scheduled", "creating", "warning"),
        ("image.finished", "done", "info"),
        ("image.finished", "failed", "warning"),
    }
    # One image.finished per image, and the log writer wrote each record at its level.
    finished = named(records, Event.IMAGE_FINISHED)
    assert sorted(entry.get("image") for entry in finished) == sorted(names)
    worker_events = set(Event)
    written = [(e["event"], e["log_level"]) for e in logs if e["event"] in worker_events]
    said = [(e.event.value, logging.getLevelName(e.level).lower()) for e in records]
    assert written == [line for line in said if line[1] != "debug"]
    # Every record about an image names its job, the image and the worker; a step's also its
    # Glance image and phase.
    image_records = [entry for entry in records if entry.event.startswith("image.")]
    assert len(image_records) >= 5 * 4
    context = ("job", "job_id", "image", "result_id", "worker_id", "image_id", "phase")
    assert [key for entry in image_records for key in context if not entry.get(key)] == []
    assert {entry.get("job") for entry in image_records} == {"test-job"}

    async with open_store(database_url) as store:
        progress = RunProgress(store, mode="off")
        for entry in records:
            progress.observe(entry)
    table = Counter(row.phase for row in (await rows_of(database_url, job_id)).values())
    assert progress.by_phase() == dict(table) == {"done": 3, "failed": 2}


def crashing_consumer(store: Store) -> Consumer:
    """A worker whose every image raises a bug of ours."""

    async def crash(claim: Claim, _: asyncio.Event) -> ResultRow:
        raise RuntimeError(f"bug while running {claim.spec.name}")

    settings = WorkerSettings(worker_id="w-crash", once=True, idle_poll_s=0.05)
    return Consumer(store, crash, settings)


async def test_a_crashed_image_ends_with_one_image_finished_like_any_failed_image(
    database_url: str, tmp_path: Path
) -> None:
    job_id, _ = await submit(database_url, tmp_path, ["crash-0", "crash-1"])

    async with open_store(database_url) as store:
        with published() as records:
            summary = await crashing_consumer(store).run(asyncio.Event())
        progress = RunProgress(store, mode="off")
        for entry in records:
            progress.observe(entry)

    assert summary.by_phase == {"failed": 2}
    finished = named(records, Event.IMAGE_FINISHED)
    assert sorted(entry.get("image") for entry in finished) == ["crash-0", "crash-1"]
    for entry in finished:
        assert entry.level == logging.WARNING
        assert (entry.get("phase"), entry.get("error_code")) == ("failed", "internal_error")
        assert entry.get("job_id") == job_id
        assert "bug while running" in entry.get("error")
    assert {entry.level for entry in named(records, Event.IMAGE_CRASHED)} == {logging.ERROR}
    assert progress.by_phase() == {"failed": 2}
    rows = await rows_of(database_url, job_id)
    assert {(row.phase, row.error_code) for row in rows.values()} == {("failed", "internal_error")}


async def test_a_crashed_image_sends_its_failure_webhook_and_is_counted_once(
    database_url: str, tmp_path: Path
) -> None:
    job_id, _ = await submit(database_url, tmp_path, ["crash-0", "crash-1"])

    receiver = Receiver()
    metrics = WorkerMetrics()
    async with serving(receiver) as url, open_store(database_url) as store:
        notifier = WebhookNotifier(WebhookSettings(url), store.job_summaries, worker_id="w-crash")
        async with notifying(notifier):
            with EventBus([write_log, metrics.observe, notifier.observe]).active():
                await crashing_consumer(store).run(asyncio.Event())

    failures = [notice for notice in receiver.accepted if notice["event"] == "image.failed"]
    assert sorted(notice["image"] for notice in failures) == ["crash-0", "crash-1"]
    assert {notice["error_code"] for notice in failures} == {"internal_error"}
    (completed,) = [notice for notice in receiver.accepted if notice["event"] == "job.completed"]
    assert completed["job_id"] == job_id
    sample = metrics.registry.get_sample_value
    assert sample("vmdk_migrate_images_finished_total", {"outcome": "failed"}) == 2
    assert sample("vmdk_migrate_image_failures_total", {"error_code": "internal_error"}) == 2
