"""Worker metrics over real HTTP: a sandbox batch, then the series, /healthz and /readyz."""

from __future__ import annotations

import asyncio
import errno
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from tests.fixtures.batch import FAST, cloud_for, rows_of, submit
from tests.fixtures.events import record
from worker.core.events import Event
from worker.observe.metrics import WorkerMetrics, serving_metrics
from worker.run.app import run_worker
from worker.run.consumer import RunSummary
from worker.run.settings import WorkerSettings
from worker.sandbox import Fault, Sandbox, SandboxConfig

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(http: aiohttp.ClientSession, url: str) -> Samples:
    async with http.get(f"{url}/metrics") as response:
        assert response.status == 200
        return parse(await response.text())


async def run_with_metrics(
    database_url: str, sb: Sandbox, *, finished: int, **options: Any
) -> tuple[Samples, dict[str, Any], dict[str, Any], RunSummary]:
    """Run a worker with metrics on; scrape once `finished` images are terminal, then stop."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    stop = asyncio.Event()
    settings = WorkerSettings(
        idle_poll_s=0.05, heartbeat_s=0.5, policies=FAST, metrics_port=port, **options
    )
    worker = asyncio.create_task(
        run_worker(database_url=database_url, cloud=cloud_for(sb), settings=settings, stop=stop)
    )
    try:
        async with aiohttp.ClientSession() as http:
            samples = await _until_finished(http, url, finished, worker)
            async with http.get(f"{url}/healthz") as response:
                health = {"status_code": response.status, **await response.json()}
            async with http.get(f"{url}/readyz") as response:
                ready = {"status_code": response.status, **await response.json()}
    finally:
        stop.set()
    return samples, health, ready, await worker


async def _until_finished(
    http: aiohttp.ClientSession, url: str, finished: int, worker: asyncio.Task[Any]
) -> Samples:
    for _ in range(400):
        assert not worker.done(), "the worker stopped early"
        try:
            samples = await scrape(http, url)
        except aiohttp.ClientConnectionError:
            samples = {}
        total = sum(
            value(samples, "vmdk_migrate_images_finished_total", outcome=o)
            for o in ("done", "failed")
        )
        if total >= finished:
            await asyncio.sleep(0.2)  # the last events (image.finished) follow the row
            return await scrape(http, url)
        await asyncio.sleep(0.05)
    raise AssertionError("the batch did not finish")


@pytest.mark.parametrize(
    "sandbox_config",
    [SandboxConfig(import_latency_s=0.05, virtio_fail_names=("broken",), rewrite_virtio=False)],
    indirect=True,
)
async def test_a_batch_is_counted_by_outcome_bytes_retries_and_durations(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    names = ["one", "two", "three", "broken"]
    job_id, _ = await submit(database_url, tmp_path, names, es_virtio_enabled="yes")
    sandbox.inject(Fault("POST", r"/v2/images$", status=503, times=2))

    samples, health, ready, summary = await run_with_metrics(
        database_url, sandbox, finished=4, concurrency=4, stage_concurrency=2
    )

    assert summary.by_phase == {"done": 3, "failed": 1}
    rows = await rows_of(database_url, job_id)
    assert value(samples, "vmdk_migrate_images_finished_total", outcome="done") == 3
    assert value(samples, "vmdk_migrate_images_finished_total", outcome="failed") == 1
    assert value(samples, "vmdk_migrate_image_failures_total", error_code="virtio_failed") == 1
    assert value(samples, "vmdk_migrate_staged_bytes_total") == sum(
        row.source_size_bytes for row in rows.values()
    )
    assert value(samples, "vmdk_migrate_retries_total", error_code="cloud_unavailable") == 2
    assert value(samples, "vmdk_migrate_stages_in_flight") == 0
    for phase in ("creating", "staging", "importing", "verifying"):
        assert value(samples, "vmdk_migrate_images_in_phase", phase=phase) == 0
    assert value(samples, "vmdk_migrate_stage_duration_seconds_count") == 4
    assert value(samples, "vmdk_migrate_import_duration_seconds_count", outcome="done") == 3
    assert value(samples, "vmdk_migrate_import_duration_seconds_count", outcome="failed") == 1
    assert health["status_code"] == 200
    assert health["status"] == "ok"
    assert ready == {"status_code": 200, "status": "ready", "database": "ok", "cloud": "ok"}


@pytest.mark.parametrize(
    "sandbox_config", [SandboxConfig(token_ttl_s=1.0, import_latency_s=0.4)], indirect=True
)
async def test_token_renewals_are_counted(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    await submit(database_url, tmp_path, [f"disk-{n}" for n in range(3)])

    samples, _, _, summary = await run_with_metrics(
        database_url, sandbox, finished=3, concurrency=1, stage_concurrency=1
    )

    assert summary.by_phase == {"done": 3}
    renewals = sum(v for (n, _), v in samples.items() if n == "vmdk_migrate_token_renewals_total")
    assert renewals == sandbox.issued_tokens - 1 >= 1
    assert value(samples, "vmdk_migrate_token_renewals_total", reason="expiring") >= 1


async def test_readiness_fails_without_the_database_and_after_a_cloud_refusal() -> None:
    async def unreachable() -> None:
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    async def reachable() -> int:
        return 0

    healthy = WorkerMetrics()
    refused = WorkerMetrics()
    refused.observe(
        record(Event.IMAGE_FINISHED, result_id=7, phase="failed", error_code="auth_failed")
    )
    async with (
        serving_metrics(healthy, unreachable, host="127.0.0.1", port=0) as no_db,
        serving_metrics(refused, reachable, host="127.0.0.1", port=0) as no_cloud,
        aiohttp.ClientSession() as http,
    ):
        async with http.get(f"{no_db}/readyz") as response:
            assert response.status == 503
            assert (await response.json())["database"] == "unreachable: connection refused"
        async with http.get(f"{no_cloud}/readyz") as response:
            assert response.status == 503
            assert (await response.json())["cloud"] == "refused"
        async with http.get(f"{no_db}/healthz") as response:
            assert response.status == 200


async def test_a_taken_metrics_port_does_not_stop_the_worker(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    await submit(database_url, tmp_path, ["only"])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = WorkerSettings(once=True, idle_poll_s=0.05, policies=FAST, metrics_port=port)
        with capture_logs() as logs:
            summary = await run_worker(
                database_url=database_url,
                cloud=cloud_for(sandbox),
                settings=settings,
                stop=asyncio.Event(),
            )
    assert summary.by_phase == {"done": 1}
    (warning,) = [line for line in logs if line["event"] == "metrics.unavailable"]
    assert warning["port"] == port
