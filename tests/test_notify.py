"""Webhooks over real HTTP: one notice per failed image and per completed job, retried."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.fixtures.batch import FAST, cloud_for, rows_of, submit
from tests.fixtures.events import record
from tests.fixtures.webhooks import SECRET_PATH, Receiver, serving
from worker.cli.commands import _webhook_settings, cli
from worker.config import Secret
from worker.core.events import Event, EventRecord
from worker.observe.notify import WebhookNotifier, WebhookSettings, notifying, safe_target
from worker.run.app import run_worker
from worker.run.consumer import RunSummary
from worker.run.settings import WorkerSettings
from worker.sandbox import Sandbox, SandboxConfig


async def migrate(database_url: str, sb: Sandbox, webhook: WebhookSettings) -> RunSummary:
    settings = WorkerSettings(
        once=True, idle_poll_s=0.05, heartbeat_s=0.5, policies=FAST, webhook=webhook
    )
    return await run_worker(
        database_url=database_url, cloud=cloud_for(sb), settings=settings, stop=asyncio.Event()
    )


BROKEN = SandboxConfig(
    import_latency_s=0.05, virtio_fail_names=("broken-*",), rewrite_virtio=False, password="pw-x9"
)


@pytest.mark.parametrize("sandbox_config", [BROKEN], indirect=True)
@pytest.mark.parametrize("failures_first", [0, 2])
async def test_one_post_per_failure_and_one_per_completed_job_even_after_500s(
    database_url: str, sandbox: Sandbox, tmp_path: Path, failures_first: int
) -> None:
    names = ["good-1", "broken-1", "good-2", "broken-2"]
    job_id, _ = await submit(database_url, tmp_path, names, es_virtio_enabled="yes")
    receiver = Receiver(failures_first=failures_first)

    async with serving(receiver) as url:
        summary = await migrate(database_url, sandbox, WebhookSettings(url, backoff_s=0.05))

    assert summary.by_phase == {"done": 2, "failed": 2}
    rows = await rows_of(database_url, job_id)
    failed = sorted((n for n in receiver.accepted if n["event"] == "image.failed"), key=str)
    assert {n["image"] for n in failed} == {"broken-1", "broken-2"}
    for notice in failed:
        row = rows[notice["image"]]
        assert notice["result_id"] == row.id
        assert notice["job_id"] == job_id
        assert notice["image_id"] == str(row.glance_image_id)
        assert notice["error_code"] == row.error_code == "virtio_failed"
        assert notice["error"] == row.error_message
    completed = [n for n in receiver.accepted if n["event"] == "job.completed"]
    assert len(completed) == 1
    assert completed[0]["job_id"] == job_id
    assert (completed[0]["done"], completed[0]["failed"], completed[0]["disk_count"]) == (2, 2, 4)
    assert len(receiver.accepted) == 3
    assert len(set(receiver.keys)) == 3
    assert receiver.seen == 3 + failures_first
    assert not any(sandbox.password in body for body in receiver.raw)


async def test_a_hanging_receiver_never_holds_up_the_batch(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    await submit(database_url, tmp_path, ["a", "b"])
    receiver = Receiver(delay_s=30.0)

    async with serving(receiver) as url:
        started = time.monotonic()
        webhook = WebhookSettings(url, timeout_s=0.2, attempts=2, backoff_s=0.05, drain_s=1.0)
        summary = await migrate(database_url, sandbox, webhook)
        elapsed_s = time.monotonic() - started

    assert summary.by_phase == {"done": 2}
    assert receiver.seen == 2  # one notice (job.completed), tried twice, each cut off at 0.2 s
    assert elapsed_s < 5.0


def test_log_lines_name_the_receiver_without_its_secret_path() -> None:
    assert safe_target(f"https://hooks.example.com:8443{SECRET_PATH}?token=x") == (
        "https://hooks.example.com:8443"
    )


README = (Path(__file__).parent.parent / "README.md").read_text()


def readme_verify() -> Any:
    """The `verify` function of the README's webhook section, as a receiver would copy it."""
    section = README.split("### Webhooks", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(code, namespace)  # the documentation is the code under test here
    return namespace["verify"]


def failed_event(image: str, result_id: int) -> EventRecord:
    return record(Event.IMAGE_FINISHED, level=logging.WARNING, job_id="j1", phase="failed",
                  image=image, result_id=result_id, error_code="virtio_failed")  # fmt: skip


async def no_jobs(job_id: str) -> list[Any]:
    return []


async def test_each_notice_is_signed_and_the_readme_snippet_verifies_it() -> None:
    receiver = Receiver()
    async with serving(receiver) as url:
        settings = WebhookSettings(url, secret=Secret("wh-s3cret"))
        notifier = WebhookNotifier(settings, no_jobs, worker_id="w1")
        with capture_logs() as logs:
            async with notifying(notifier):
                notifier.observe(failed_event("a", 1))
                notifier.observe(failed_event("b", 2))

    verify = readme_verify()
    assert len(receiver.raw) == 2
    for body, headers in zip(receiver.raw, receiver.headers, strict=True):
        header = headers["X-Vmdk-Migrate-Signature"]
        assert header.startswith("sha256=")
        assert verify(b"wh-s3cret", body.encode(), header)
        assert not verify(b"another-secret", body.encode(), header)
        assert not verify(b"wh-s3cret", body.replace("virtio_failed", "none").encode(), header)
    assert "wh-s3cret" not in repr(logs)
    assert "wh-s3cret" not in repr(settings)


async def test_unsigned_without_a_secret() -> None:
    receiver = Receiver()
    async with serving(receiver) as url:
        notifier = WebhookNotifier(WebhookSettings(url), no_jobs, worker_id="w1")
        async with notifying(notifier):
            notifier.observe(failed_event("a", 1))

    (headers,) = receiver.headers
    assert "X-Vmdk-Migrate-Signature" not in headers


async def test_every_notice_dropped_at_exit_is_logged_when_the_receiver_hangs() -> None:
    receiver = Receiver(delay_s=30.0)
    async with serving(receiver) as url:
        settings = WebhookSettings(url, timeout_s=10.0, drain_s=0.3)
        notifier = WebhookNotifier(settings, no_jobs, worker_id="w1")
        with capture_logs() as logs:
            async with notifying(notifier):
                notifier.observe(failed_event("a", 1))
                notifier.observe(failed_event("b", 2))

    dropped = [entry for entry in logs if entry["event"] == "notify.dropped"]
    assert all(entry["log_level"] == "warning" for entry in dropped)
    # Each image.finished queues its failure notice and a job completion check.
    assert sorted((e["kind"], e["result_id"]) for e in dropped) == [
        ("check_job", None),
        ("check_job", None),
        ("image.failed", 1),
        ("image.failed", 2),
    ]
    assert {e["reason"] for e in dropped} <= {"shutdown: in flight", "shutdown: still queued"}
    assert notifier.dropped == 4
    assert notifier.sent == 0
    assert all(entry["target"] == safe_target(url) for entry in dropped)


def test_the_secret_comes_from_the_option_or_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VMDK_MIGRATE_WEBHOOK_SECRET", "from-env")
    run = cli.commands["run"]
    from_env = run.make_context("run", ["--webhook", "https://h.example/x"]).params
    from_flag = run.make_context("run", ["--webhook-secret", "from-flag"]).params

    assert from_env["webhook_secret"] == "from-env"
    assert from_flag["webhook_secret"] == "from-flag"
    settings = _webhook_settings(from_env["webhook_url"], from_env["webhook_secret"])
    assert settings is not None
    assert settings.secret == Secret("from-env")
    assert _webhook_settings(None, "from-env") is None
