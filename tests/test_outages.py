"""An outage of the cloud, the credentials or the database costs zero images.

Each scenario starts a batch, takes a service away while images are in flight, keeps it away
until the breaker has opened and been probed for several times one image's whole retry
budget, then brings it back. Every image must end `done` and verified, with its claim counted
once, and nothing may be left in the cloud but the images of the rows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import re
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import yaml
from structlog.testing import capture_logs

from tests.fixtures.batch import rows_of, submit
from tests.fixtures.cli import cloud_env, run_cli, write_job
from tests.fixtures.cli import submit as submit_cli
from tests.fixtures.db import fetch_rows
from tests.fixtures.dblink import DatabaseLink
from tests.fixtures.webhooks import Receiver, serving
from worker.config import load_cloud_settings, with_env_file
from worker.core.machine import Policies
from worker.core.policy import OutagePolicy, PollPolicy, RetryPolicy
from worker.errors import ConnectionFailed
from worker.observe.notify import WebhookSettings
from worker.run.app import run_worker
from worker.run.consumer import RunSummary
from worker.run.outage import Outages, OutageTooLong, Service
from worker.run.settings import WorkerSettings
from worker.sandbox import Fault, Sandbox, SandboxConfig

# One image's retry budget runs out in well under a second: 3 tries, 0.05 s then 0.1 s apart.
TIGHT = Policies(
    retry=RetryPolicy(max_attempts=3, base_delay_s=0.05, max_delay_s=0.1, quota_delay_s=0.1),
    poll=PollPolicy(first_delay_s=0.02, max_delay_s=0.1, tasks_every_s=0.05),
)
BUDGET_S = 0.05 + 0.1
PROBING = OutagePolicy(probe_first_s=0.05, probe_factor=2.0, probe_max_s=0.2, warn_every_s=0.3)
# The outage lasts at least this many retry budgets, and until the breaker saw this many probes.
BUDGETS = 10
PROBES = 4
SLOW_STAGES = SandboxConfig(stage_rate_bytes_per_s=512 << 10)
SLOWER_STAGES = SandboxConfig(stage_rate_bytes_per_s=256 << 10)
DISKS = [f"out{n}" for n in range(6)]
Logs = list[MutableMapping[str, Any]]


async def until(check: Callable[[], Awaitable[bool]], *, timeout_s: float = 60.0) -> None:
    """Return once `check()` holds (polled); fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.02)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def settings(**extra: Any) -> WorkerSettings:
    options: dict[str, Any] = {
        "once": True,
        "idle_poll_s": 0.05,
        "heartbeat_s": 0.5,
        "concurrency": 4,
        "stage_concurrency": 2,
        "policies": TIGHT,
        "outage": PROBING,
        **extra,
    }
    return WorkerSettings(**options)


def start_worker(
    database_url: str,
    sandbox: Sandbox,
    *,
    reload_env: Callable[[], dict[str, str]] | None = None,
    **extra: Any,
) -> asyncio.Task[RunSummary]:
    def load() -> Any:
        env = reload_env() if reload_env is not None else sandbox.os_environment()
        return load_cloud_settings(env, cloud=env.get("OS_CLOUD"))

    return asyncio.create_task(
        run_worker(
            database_url=database_url,
            cloud=load(),
            settings=settings(**extra),
            stop=asyncio.Event(),
            reload_cloud=load,
        )
    )


async def some_images_in_flight(database_url: str, job_id: str) -> None:
    """Hold until the batch is under way: an image is made, and most of the job is left."""

    async def under_way() -> bool:
        rows = await fetch_rows(database_url, "SELECT phase FROM results WHERE job_id = $1", job)
        phases = [r["phase"] for r in rows]
        return any(p in ("staging", "importing") for p in phases)

    job = uuid.UUID(job_id)
    await until(under_way)
    unfinished = await fetch_rows(
        database_url,
        "SELECT id FROM results WHERE job_id = $1 AND phase NOT IN ('done', 'failed')",
        job,
    )
    assert len(unfinished) >= 3, "the batch went too fast for the outage to meet it"


async def outage_seen(sandbox: Sandbox, database_url: str, service: str) -> None:
    """Hold until the worker has paused for `service`, been probed PROBES times, and waited
    at least BUDGETS times one image's retry budget."""
    began = time.monotonic()
    seen_before = len(sandbox.requests)

    async def paused() -> bool:
        rows = await fetch_rows(database_url, "SELECT service FROM worker_pauses")
        return service in {r["service"] for r in rows}

    await until(paused)
    await until(lambda: _true(len(sandbox.requests) - seen_before >= PROBES))
    left_s = BUDGETS * BUDGET_S - (time.monotonic() - began)
    if left_s > 0:
        await asyncio.sleep(left_s)  # a lower bound on the outage's length, not a race


async def leases_expired(database_url: str, job_id: str) -> bool:
    """Whether every lease of the job's unfinished rows has run out in the database."""
    rows = await fetch_rows(
        database_url,
        "SELECT id FROM results WHERE job_id = $1 AND lease_expires_at >= now()",
        uuid.UUID(job_id),
    )
    return not rows


async def _true(value: bool) -> bool:
    return value


async def logged(logs: Logs, event: str) -> None:
    """Hold until `event` is among the logs."""
    await until(lambda: _true(any(e["event"] == event for e in logs)))


async def assert_nothing_lost(database_url: str, sandbox: Sandbox, job_id: str) -> None:
    """Every row done and verified, claimed once; the cloud holds exactly the rows' images."""
    rows = await rows_of(database_url, job_id)
    assert {row.phase for row in rows.values()} == {"done"}
    assert {row.verification for row in rows.values()} == {"verified"}
    assert {row.attempts for row in rows.values()} == {1}
    images = {image["id"]: image for image in sandbox.images()}
    assert sorted(images) == sorted(str(row.glance_image_id) for row in rows.values())
    assert {image["status"] for image in images.values()} == {"active"}
    assert not any(sandbox.has_staged_data(image_id) for image_id in images)
    assert await fetch_rows(database_url, "SELECT * FROM worker_pauses") == []


@pytest.mark.parametrize("sandbox_config", [SLOW_STAGES], indirect=True)
@pytest.mark.parametrize(
    ("services", "mode", "paused_for"),
    [
        (("identity",), "down", "image"),  # Glance cannot check tokens: it answers 503
        (("image",), "down", "image"),
        (("identity", "image"), "down", "image"),
        (("image",), "503", "image"),
    ],
    ids=["keystone-down", "glance-down", "both-down", "glance-503"],
)
async def test_an_outage_longer_than_the_retry_budget_costs_no_image(
    database_url: str,
    sandbox: Sandbox,
    tmp_path: Path,
    services: tuple[str, ...],
    mode: str,
    paused_for: str,
) -> None:
    job_id, _ = await submit(database_url, tmp_path, DISKS)
    with capture_logs() as logs:
        worker = start_worker(database_url, sandbox)
        await some_images_in_flight(database_url, job_id)
        for service in services:
            sandbox.set_outage(service, mode)
        await outage_seen(sandbox, database_url, paused_for)
        sandbox.clear_outage()
        summary = await asyncio.wait_for(worker, timeout=60)

    assert summary.by_phase == {"done": len(DISKS)}
    await assert_nothing_lost(database_url, sandbox, job_id)
    events = [entry["event"] for entry in logs]
    assert events.count("outage.started") >= 1
    assert events.count("outage.ended") == events.count("outage.started")
    assert "image.retry_scheduled" not in events  # no attempt of any image was spent
    started = next(e for e in logs if e["event"] == "outage.started")
    assert started["log_level"] == "warning"


@pytest.mark.parametrize("sandbox_config", [SLOW_STAGES], indirect=True)
async def test_a_breaker_shows_in_readyz_the_gauge_the_logs_and_status(
    database_url: str, sandbox: Sandbox, env: dict[str, str], tmp_path: Path
) -> None:
    job_id, _ = await submit(database_url, tmp_path, DISKS)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with capture_logs() as logs:
        worker = start_worker(database_url, sandbox, metrics_port=port)
        await some_images_in_flight(database_url, job_id)
        sandbox.set_outage("image", "down")
        await outage_seen(sandbox, database_url, "image")
        # Long enough for the once-a-minute warning (0.3 s here) to have been said.
        await logged(logs, "outage.ongoing")
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/readyz") as response:
                ready_status, ready = response.status, await response.json()
            async with http.get(f"{base}/metrics") as response:
                exposition = await response.text()
        code, status_out, _ = await run_cli("status", "--no-images", env=env)
        sandbox.clear_outage()
        await asyncio.wait_for(worker, timeout=60)

    assert ready_status == 503
    assert ready["status"] == "not_ready"
    assert ready["reason"].startswith("paused: image service unreachable for ")
    assert 'vmdk_migrate_outage{service="image"} 1.0' in exposition
    assert 'vmdk_migrate_outage{service="identity"} 0.0' in exposition
    ongoing = next(e for e in logs if e["event"] == "outage.ongoing")
    assert ongoing["log_level"] == "warning"
    assert ongoing["message"].startswith("image service unreachable for ")
    assert code == 0
    assert "paused: image service unreachable for " in status_out
    await assert_nothing_lost(database_url, sandbox, job_id)


@pytest.mark.parametrize("sandbox_config", [SLOW_STAGES], indirect=True)
async def test_an_outage_sends_one_webhook_notice_as_it_starts_and_one_as_it_ends(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    job_id, _ = await submit(database_url, tmp_path, DISKS)
    receiver = Receiver()
    async with serving(receiver) as url:
        worker = start_worker(database_url, sandbox, webhook=WebhookSettings(url, backoff_s=0.05))
        await some_images_in_flight(database_url, job_id)
        sandbox.set_outage("image", "down")
        await outage_seen(sandbox, database_url, "image")
        sandbox.clear_outage()
        summary = await asyncio.wait_for(worker, timeout=60)

    assert summary.by_phase == {"done": len(DISKS)}
    # Several images were in flight when Glance went away: still one notice each way, and
    # none of them about an image.
    assert [n["event"] for n in receiver.accepted] == [
        "outage.started",
        "outage.ended",
        "job.completed",
    ]
    started, ended, completed = receiver.accepted
    assert (started["service"], started["reason"]) == ("image", "unreachable")
    assert started["message"].startswith("image service unreachable for ")
    assert (ended["service"], ended["since"]) == ("image", started["since"])
    assert ended["duration_s"] > 0
    assert ended["message"].startswith("image service back after ")
    assert (completed["job_id"], completed["done"]) == (job_id, len(DISKS))
    assert len(set(receiver.keys)) == 3
    await assert_nothing_lost(database_url, sandbox, job_id)


@pytest.mark.parametrize("sandbox_config", [SLOW_STAGES], indirect=True)
async def rotate_the_password_mid_run(
    database_url: str,
    sandbox: Sandbox,
    tmp_path: Path,
    write_credentials: Callable[[str], None],
    env: Callable[[], dict[str, str]],
    *,
    new_password: str,
) -> Logs:
    """Run a job on the credentials `write_credentials` puts where `env` reads them; mid-run
    rotate the password to `new_password`, and write that once the worker has paused for it.
    Every image ends done, the credentials were read again, and the new password was never
    logged; returns the logs."""
    job_id, _ = await submit(database_url, tmp_path, DISKS)
    write_credentials(sandbox.password)
    with capture_logs() as logs:
        worker = start_worker(database_url, sandbox, reload_env=env)
        await some_images_in_flight(database_url, job_id)
        sandbox.rotate_password(new_password)
        await outage_seen(sandbox, database_url, "identity")
        write_credentials(new_password)
        summary = await asyncio.wait_for(worker, timeout=60)

    assert summary.by_phase == {"done": len(DISKS)}
    await assert_nothing_lost(database_url, sandbox, job_id)
    assert any(e["event"] == "auth.credentials_reloaded" for e in logs)
    assert new_password not in repr(logs)
    return logs


async def test_credentials_rotated_mid_run_pause_until_clouds_yaml_is_fixed(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    clouds_yaml = tmp_path / "clouds.yaml"

    def write_clouds(password: str) -> None:
        auth = {
            "auth_url": sandbox.auth_url,
            "username": sandbox.username,
            "password": password,
            "project_name": sandbox.project_name,
            "user_domain_name": sandbox.domain_name,
            "project_domain_name": sandbox.domain_name,
        }
        clouds_yaml.write_text(yaml.safe_dump({"clouds": {"sandbox": {"auth": auth}}}))

    def env() -> dict[str, str]:
        return {"OS_CLOUD": "sandbox", "OS_CLIENT_CONFIG_FILE": str(clouds_yaml)}

    logs = await rotate_the_password_mid_run(
        database_url, sandbox, tmp_path, write_clouds, env, new_password="rotated-secret"
    )

    started = [e for e in logs if e["event"] == "outage.started"]
    assert [(e["service"], e["reason"]) for e in started] == [
        ("identity", "refusing the credentials")
    ]


async def test_credentials_rotated_mid_run_pause_until_the_env_file_is_fixed(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    # As `run --env-file` reads it: OS_* lines laid over the environment, read again when
    # the credentials are refused (a systemd EnvironmentFile, a mounted k8s secret).
    env_file = tmp_path / "vmdk-migrate.env"

    def write_env(password: str) -> None:
        lines = {**sandbox.os_environment(), "OS_PASSWORD": password}
        env_file.write_text("".join(f"export {k}='{v}'\n" for k, v in lines.items()))

    def env() -> dict[str, str]:
        return with_env_file({}, env_file)

    await rotate_the_password_mid_run(
        database_url, sandbox, tmp_path, write_env, env, new_password="rotated-in-the-env-file"
    )


async def through_a_database_outage(
    database_url: str,
    sandbox: Sandbox,
    job_id: str,
    *,
    while_away: Callable[[Logs], Awaitable[None]],
    **extra: Any,
) -> Logs:
    """Run the job through a DatabaseLink; once images are in flight, cut the link (every
    connection reset, new ones refused: a restart) until `while_away(logs)` returns. Every
    image ends done and nothing is lost; returns the logs."""
    link = DatabaseLink(database_url)
    await link.up()
    try:
        with capture_logs() as logs:
            worker = start_worker(link.dsn, sandbox, **extra)
            await some_images_in_flight(database_url, job_id)
            await link.down()
            await while_away(logs)
            await link.up()
            summary = await asyncio.wait_for(worker, timeout=60)
    finally:
        await link.down()

    assert summary.by_phase == {"done": len(DISKS)}
    await assert_nothing_lost(database_url, sandbox, job_id)
    return logs


@pytest.mark.parametrize("sandbox_config", [SLOWER_STAGES], indirect=True)
async def test_a_postgresql_restart_costs_no_image_and_no_attempt(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    job_id, _ = await submit(database_url, tmp_path, DISKS)

    logs = await through_a_database_outage(
        database_url, sandbox, job_id, while_away=lambda logs: logged(logs, "outage.started")
    )

    started = [e for e in logs if e["event"] == "outage.started"]
    assert {e["service"] for e in started} == {"database"}
    assert any(e["event"] == "outage.ended" and e["service"] == "database" for e in logs)


@pytest.mark.parametrize("sandbox_config", [SLOWER_STAGES], indirect=True)
async def test_a_database_outage_longer_than_the_lease_costs_no_attempt(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    # The leases run out while the database is away: the images in flight are stopped (another
    # worker may take them once it is back), and taking them up again is not a new attempt.
    job_id, _ = await submit(database_url, tmp_path, DISKS)

    async def until_the_leases_expired(logs: Logs) -> None:
        await logged(logs, "image.lease_expired")
        await until(lambda: leases_expired(database_url, job_id))

    logs = await through_a_database_outage(
        database_url, sandbox, job_id, while_away=until_the_leases_expired, lease_s=2.0
    )

    assert not [e for e in logs if e["event"] == "image.orphan_left"]
    # Each stopped row was handed back with its attempt taken back, then claimed again.
    stopped = {e["result_id"] for e in logs if e["event"] == "image.lease_expired"}
    refunds = await fetch_rows(
        database_url,
        "SELECT result_id, detail->>'handed_back' AS handed_back FROM events"
        " WHERE job_id = $1 AND event = 'image.attempt_refunded'",
        uuid.UUID(job_id),
    )
    assert stopped
    assert stopped <= {r["result_id"] for r in refunds}
    assert {r["handed_back"] for r in refunds} == {"true"}  # no other worker took one


@pytest.mark.parametrize("sandbox_config", [SLOW_STAGES], indirect=True)
async def test_an_outage_past_max_outage_exits_and_leaves_rows_to_the_next_run(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    job_id, _ = await submit(database_url, tmp_path, DISKS)
    bounded = OutagePolicy(probe_first_s=0.05, probe_max_s=0.1, max_outage_s=0.5)
    worker = start_worker(database_url, sandbox, outage=bounded)
    await some_images_in_flight(database_url, job_id)
    sandbox.set_outage("image", "down")
    with pytest.raises(OutageTooLong, match="image service unreachable"):
        await asyncio.wait_for(worker, timeout=60)

    rows = await rows_of(database_url, job_id)
    assert "failed" not in {row.phase for row in rows.values()}
    assert {row.attempts for row in rows.values() if row.phase != "done"} <= {0}
    assert all(row.lease_expires_at is None for row in rows.values())

    sandbox.clear_outage()
    summary = await asyncio.wait_for(start_worker(database_url, sandbox), timeout=60)
    assert summary.finished == len([r for r in rows.values() if r.phase != "done"])
    rows = await rows_of(database_url, job_id)
    assert {row.phase for row in rows.values()} == {"done"}
    images = {image["id"] for image in sandbox.images()}
    assert images == {str(row.glance_image_id) for row in rows.values()}
    assert not any(sandbox.has_staged_data(image_id) for image_id in images)


async def test_wrong_credentials_at_start_exit_3_at_once_and_touch_no_row(
    database_url: str, sandbox: Sandbox, env: dict[str, str], tmp_path: Path
) -> None:
    job_id = await submit_cli(write_job(tmp_path, 4), env=env)
    env["OS_PASSWORD"] = "not-the-password"

    started = time.monotonic()
    code, _, err = await run_cli("run", "--once", "--metrics-port", "0", env=env)
    took_s = time.monotonic() - started

    assert code == 3
    assert took_s < 10
    assert "Keystone refused the credentials from environment" in err
    assert "Traceback" not in err
    assert "not-the-password" not in err
    rows = await rows_of(database_url, job_id)
    assert {(row.phase, row.attempts) for row in rows.values()} == {("pending", 0)}
    assert sandbox.images() == []


async def test_an_unreachable_keystone_past_max_outage_exits_3_naming_it_and_touches_no_row(
    database_url: str, sandbox: Sandbox, env: dict[str, str], tmp_path: Path
) -> None:
    job_id = await submit_cli(write_job(tmp_path, 3), env=env)
    auth_url = f"http://127.0.0.1:{free_port()}/v3"  # nothing listens there
    env["OS_AUTH_URL"] = auth_url

    code, out, err = await run_cli(
        "run", "--once", "--max-outage", "2", "--metrics-port", "0", env=env
    )

    assert code == 3
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(
        r"gave up waiting: identity service unreachable for \d+ s "
        rf"\(cannot connect to {re.escape(auth_url)}/auth/tokens: connection refused\), "
        r"longer than --max-outage; the unfinished images were left to the next run",
        last,
    ), last
    for unwanted in ("Traceback", "ClientConnectorError", "ssl:default"):
        assert unwanted not in out + err
    rows = await rows_of(database_url, job_id)
    assert {(row.phase, row.attempts) for row in rows.values()} == {("pending", 0)}
    assert sandbox.images() == []


def test_the_pause_line_carries_the_last_failure_in_words() -> None:
    now_s = [100.0]
    outages = Outages({}, clock=lambda: now_s[0])
    refused = "cannot connect to http://keystone:5000/v3/auth/tokens: connection refused"
    outages.open(Service.IDENTITY, ConnectionFailed(refused, operation="authenticate"))
    now_s[0] = 102.0

    assert outages.describe() == f"paused: identity service unreachable for 2 s ({refused})"

    outages.open(
        Service.DATABASE, ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed")
    )
    assert outages.explain() == (
        f"identity service unreachable for 2 s ({refused}); "
        "database unreachable for 0 s (connection refused)"
    )


async def test_each_failed_probe_becomes_the_last_failure_of_the_pause_line() -> None:
    said = ["cannot connect to http://keystone:5000/v3/auth/tokens: connection refused"]

    async def probe() -> None:
        raise ConnectionFailed(said[-1], operation="authenticate")

    outages = Outages({Service.IDENTITY: probe}, policy=PROBING)
    outages.open(Service.IDENTITY, ConnectionFailed(said[0], operation="authenticate"))
    try:
        said.append("http://keystone:5000/v3/auth/tokens: the server closed the connection")
        await until(lambda: _true(said[-1] in (outages.describe() or "")))
    finally:
        await outages.aclose()

    assert (outages.describe() or "").endswith(f"({said[-1]})")


@pytest.mark.parametrize("sandbox_config", [SandboxConfig(hold_imports=True)], indirect=True)
async def test_imports_lost_with_a_restarted_image_service_are_made_again(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    names = DISKS[:3]
    job_id, _ = await submit(database_url, tmp_path, names)
    poll = dataclasses.replace(TIGHT.poll, lost_import_s=0.3)
    worker = start_worker(database_url, sandbox, policies=dataclasses.replace(TIGHT, poll=poll))

    async def all_importing() -> bool:
        tasks = [t for image in sandbox.images() for t in sandbox.tasks(image["id"])]
        return len(tasks) == len(names) and {t["status"] for t in tasks} == {"processing"}

    await until(all_importing)
    lost = {image["id"] for image in sandbox.images()}
    sandbox.set_outage("image", "down")
    await sandbox.lose_imports()  # the API process restarts: its imports die with it
    await outage_seen(sandbox, database_url, "image")
    sandbox.release_imports()  # the imports asked for after the restart go through
    sandbox.clear_outage()
    summary = await asyncio.wait_for(worker, timeout=60)

    assert summary.by_phase == {"done": len(names)}
    await assert_nothing_lost(database_url, sandbox, job_id)
    assert not lost & {image["id"] for image in sandbox.images()}  # made again, new ids
    recreated = await fetch_rows(
        database_url, "SELECT detail FROM events WHERE event = 'image.recreating'"
    )
    assert len(recreated) == len(names)
    assert all("the import was lost" in r["detail"] for r in recreated)


@pytest.mark.parametrize(
    "sandbox_config", [SandboxConfig(virtio_fail_names=("owed*",))], indirect=True
)
async def test_a_deletion_glance_could_not_make_is_owed_and_made_by_the_next_run(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    job_id, _ = await submit(database_url, tmp_path, ["owed-1"], es_virtio_enabled="yes")
    # The image's three tries and the run's last round of owed deletions all get a 503,
    # while Glance answers everything else: the failure is this image's, not an outage.
    sandbox.inject(Fault("DELETE", r"/v2/images/[^/]+", status=503, times=4))

    first = await asyncio.wait_for(start_worker(database_url, sandbox), timeout=60)

    assert first.by_phase == {"failed": 1}
    (row,) = (await rows_of(database_url, job_id)).values()
    assert (row.error_code, row.cleanup) == ("virtio_failed", "owed")
    assert [image["id"] for image in sandbox.images()] == [str(row.glance_image_id)]
    code, out, _ = await run_cli("status", env=cloud_env(sandbox, database_url))
    assert code == 0
    assert "1 image deletion(s) owed" in out

    second = await asyncio.wait_for(start_worker(database_url, sandbox), timeout=60)

    assert second.finished == 0
    (row,) = (await rows_of(database_url, job_id)).values()
    assert (row.phase, row.cleanup) == ("failed", "deleted")
    assert sandbox.images() == []
    done = await fetch_rows(
        database_url, "SELECT event FROM events WHERE event = 'image.cleanup_done'"
    )
    assert len(done) == 1


@pytest.mark.parametrize("sandbox_config", [SLOW_STAGES], indirect=True)
async def test_images_in_flight_when_the_grace_runs_out_are_handed_back(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    job_id, _ = await submit(database_url, tmp_path, DISKS)
    stop = asyncio.Event()
    worker = asyncio.create_task(
        run_worker(
            database_url=database_url,
            cloud=load_cloud_settings(sandbox.os_environment()),
            settings=settings(once=False, grace_s=0.01),
            stop=stop,
        )
    )
    await some_images_in_flight(database_url, job_id)
    stop.set()
    summary = await asyncio.wait_for(worker, timeout=60)

    assert summary.released >= 1
    rows = await rows_of(database_url, job_id)
    unfinished = [row for row in rows.values() if row.phase not in ("done", "failed")]
    assert len(unfinished) >= summary.released
    assert all(row.lease_expires_at is None for row in unfinished)
    released = await fetch_rows(
        database_url, "SELECT event FROM events WHERE event = 'image.released'"
    )
    assert len(released) == summary.released


@pytest.mark.parametrize("sandbox_config", [SLOW_STAGES], indirect=True)
async def test_the_image_of_a_row_deleted_in_mid_stage_is_deleted_too(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    job_id, _ = await submit(database_url, tmp_path, DISKS)
    with capture_logs() as logs:
        worker = start_worker(database_url, sandbox)
        await some_images_in_flight(database_url, job_id)
        await delete_job(database_url, uuid.UUID(job_id))
        await asyncio.wait_for(worker, timeout=60)

    assert sandbox.images() == []
    assert not any(sandbox.has_staged_data(e["image_id"]) for e in by_name(logs, "orphan_deleted"))
    assert by_name(logs, "image.orphan_deleted")


async def delete_job(database_url: str, job_id: uuid.UUID) -> None:
    """What an operator's DELETE does while workers write the job's rows: PostgreSQL may
    abort it as a deadlock with a worker's update, and the operator runs it again."""
    for _ in range(50):
        try:
            await fetch_rows(database_url, "DELETE FROM jobs WHERE id = $1", job_id)
        except asyncpg.exceptions.DeadlockDetectedError:
            continue
        return
    raise AssertionError("the job could not be deleted")


def by_name(logs: list[MutableMapping[str, Any]], suffix: str) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if str(entry["event"]).endswith(suffix)]
