"""Log levels say what matters, and every end of an image is one `image.summary`.

Failures and retries are warnings, a crashed image ends like any failed one (its summary is
what webhooks and progress follow), and progress counts each finished image once.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from tests.fixtures.batch import migrate, rows_of, submit
from worker.consumer import Consumer, ConsumerSettings
from worker.progress import RunProgress
from worker.sandbox import Fault, Sandbox, SandboxConfig
from worker.store.store import Claim, ResultRow, open_store


def by_event(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


@pytest.mark.parametrize(
    "sandbox_config", [SandboxConfig(virtio_fail_names=("bad-*",))], indirect=True
)
async def test_failures_and_retries_are_warnings_and_progress_counts_each_image_once(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    names = ["good-0", "good-1", "bad-0", "good-2", "bad-1"]
    job_id, _ = await submit(database_url, tmp_path, names, es_virtio_enabled="yes")
    sandbox.inject(Fault("POST", r"/v2/images", status=503, times=1))

    # With the context each image binds, as the worker's own log writer and observers see it.
    with capture_logs(processors=[merge_contextvars]) as logs:
        summary = await migrate(database_url, sandbox, progress="off")

    assert summary.by_phase == {"done": 3, "failed": 2}
    levels = {
        (entry["event"], entry.get("phase"), entry["log_level"])
        for entry in logs
        if entry["event"] in ("image.finished", "image.summary", "image.retry_scheduled")
    }
    assert all(entry["worker_id"] for entry in by_event(logs, "image.summary"))
    # Every line about an image names its job, the image and the worker; a step's also its
    # Glance image and phase.
    image_lines = [entry for entry in logs if str(entry["event"]).startswith("image.")]
    assert len(image_lines) >= 5 * 4
    context = ("job", "job_id", "image", "result_id", "worker_id", "image_id", "phase")
    assert [key for entry in image_lines for key in context if not entry.get(key)] == []
    assert {entry["job"] for entry in image_lines} == {"test-job"}
    assert levels == {
        ("image.retry_scheduled", "creating", "warning"),
        ("image.finished", "done", "info"),
        ("image.finished", "failed", "warning"),
        ("image.summary", "done", "info"),
        ("image.summary", "failed", "warning"),
    }

    async with open_store(database_url) as store:
        progress = RunProgress(store, mode="off")
        for entry in logs:
            progress.observe(entry)
    table = Counter(row.phase for row in (await rows_of(database_url, job_id)).values())
    assert progress.by_phase() == dict(table) == {"done": 3, "failed": 2}


async def test_a_crashed_image_ends_with_one_summary_like_any_failed_image(
    database_url: str, tmp_path: Path
) -> None:
    job_id, _ = await submit(database_url, tmp_path, ["crash-0", "crash-1"])

    async def crash(claim: Claim, _: asyncio.Event) -> ResultRow:
        raise RuntimeError(f"bug while running {claim.spec.name}")

    async with open_store(database_url) as store:
        consumer = Consumer(
            store, crash, ConsumerSettings(worker_id="w-crash", once=True, idle_poll_s=0.05)
        )
        with capture_logs(processors=[merge_contextvars]) as logs:
            summary = await consumer.run(asyncio.Event())
        progress = RunProgress(store, mode="off")
        for entry in logs:
            progress.observe(entry)

    assert summary.by_phase == {"failed": 2}
    summaries = by_event(logs, "image.summary")
    assert sorted(entry["image"] for entry in summaries) == ["crash-0", "crash-1"]
    for entry in summaries:
        assert entry["log_level"] == "warning"
        assert (entry["phase"], entry["error_code"]) == ("failed", "internal_error")
        assert entry["job_id"] == job_id
        assert "bug while running" in entry["error"]
    assert {entry["log_level"] for entry in by_event(logs, "image.crashed")} == {"error"}
    assert progress.by_phase() == {"failed": 2}
    rows = await rows_of(database_url, job_id)
    assert {(row.phase, row.error_code) for row in rows.values()} == {("failed", "internal_error")}
