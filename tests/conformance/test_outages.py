"""Outages against the real Keystone and Glance: each costs zero images.

A batch of real qemu-img disks runs with the default retry policy (one step gives up after
about 30 s of failures); while images are in flight, a service goes away for 90 s, three
times that budget, and comes back. Every disk must end `done` and verified, claimed once,
with nothing left in Glance but the rows' images and nothing in its staging directory.

The batch imports several disks at once, which Glance on SQLite loses: on the SQLite
fallback these scenarios are skipped, never claimed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conformance.conftest import Target, mariadb_only
from tests.conformance.helpers import cloud_of, qemu_vmdk, rows_of, sha512_of, submit
from tests.conformance.realstack import RealStack
from tests.fixtures.db import fetch_rows
from tests.fixtures.dblink import DatabaseLink
from worker.config import CloudSettings, load_cloud_settings
from worker.core.machine import Policies
from worker.core.policy import OutagePolicy, PollPolicy, RetryPolicy
from worker.run.app import run_worker
from worker.run.bandwidth import set_bandwidth_limit
from worker.run.consumer import RunSummary
from worker.run.settings import WorkerSettings

pytestmark = [
    pytest.mark.conformance,
    pytest.mark.parametrize("target", ["real-glance"], indirect=True),
    # A 90 s outage and the batch around it: well past the suite's default ceiling.
    pytest.mark.timeout(480),
]


MIB = 1 << 20
OUTAGE_S = 90.0
DISKS = 6
# Six disks of 24 MiB cannot be staged at this rate before the outage begins.
HELD_BYTES_PER_S = 1 * MIB
# The production retry policy, so "longer than one image's retry budget" means what it says;
# polls and the lost-import wait are shortened to keep the suite quick.
POLICIES = Policies(
    retry=RetryPolicy(),
    poll=PollPolicy(first_delay_s=0.2, max_delay_s=2.0, tasks_every_s=1.0, lost_import_s=15.0),
)
PROBING = OutagePolicy(probe_first_s=1.0, probe_max_s=5.0, warn_every_s=30.0)
RUN_TIMEOUT_S = 300.0


@pytest.fixture(autouse=True)
def _on_mariadb() -> None:
    """Every scenario here runs several imports at once (see above)."""
    mariadb_only()


@pytest.fixture(scope="module")
def disk_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Six real disks, both accepted subformats, 24 MiB of random data each."""
    directory = tmp_path_factory.mktemp("outage-disks")
    return [
        qemu_vmdk(
            directory / f"d{n}.vmdk",
            "streamOptimized" if n % 2 else "monolithicSparse",
            data_bytes=24 * MIB,
            virtual_bytes=64 * MIB,
        )
        for n in range(DISKS)
    ]


def start_worker(database_url: str, load: Callable[[], CloudSettings]) -> asyncio.Task[RunSummary]:
    settings = WorkerSettings(
        once=True,
        concurrency=4,
        stage_concurrency=2,
        idle_poll_s=0.1,
        heartbeat_s=1.0,
        policies=POLICIES,
        outage=PROBING,
        progress="off",
    )
    return asyncio.create_task(
        asyncio.wait_for(
            run_worker(
                database_url=database_url,
                cloud=load(),
                settings=settings,
                stop=asyncio.Event(),
                reload_cloud=load,
            ),
            timeout=RUN_TIMEOUT_S,
        )
    )


@asynccontextmanager
async def running(worker: asyncio.Task[RunSummary]) -> AsyncIterator[asyncio.Task[RunSummary]]:
    """The worker task, cancelled if the scenario fails before it ends."""
    try:
        yield worker
    finally:
        if not worker.done():
            worker.cancel()
            with contextlib.suppress(BaseException):
                await worker


async def in_flight(database_url: str, job_id: uuid.UUID) -> None:
    """Hold until an image is staging or importing while most of the job is left."""
    deadline = time.monotonic() + 60
    while True:
        rows = await fetch_rows(database_url, "SELECT phase FROM results WHERE job_id = $1", job_id)
        phases = [row["phase"] for row in rows]
        if any(phase in ("staging", "importing") for phase in phases):
            break
        assert time.monotonic() < deadline, f"the batch never started: {phases}"
        await asyncio.sleep(0.05)
    assert sum(phase not in ("done", "failed") for phase in phases) >= 3, phases


async def outcomes(database_url: str, job_id: uuid.UUID) -> str:
    """Each row's phase and error, and the events of the failed ones: what a failure shows."""
    rows = await rows_of(database_url, job_id)
    lines = [
        f"{name}: {row.phase} {row.error_code or ''} {row.error_message or ''}"
        for name, row in rows.items()
    ]
    failed = [row.id for row in rows.values() if row.phase == "failed"]
    events = await fetch_rows(
        database_url,
        "SELECT result_id, event, error_code, message FROM events"
        " WHERE result_id = ANY($1) ORDER BY id",
        failed,
    )
    lines += [
        f"  {e['result_id']} {e['event']} {e['error_code'] or ''} {e['message'] or ''}"
        for e in events
    ]
    return "\n".join(lines)


async def paused_services(database_url: str) -> set[str]:
    return {
        row["service"]
        for row in await fetch_rows(database_url, "SELECT service FROM worker_pauses")
    }


async def assert_nothing_lost(
    database_url: str,
    stack: RealStack,
    job_id: uuid.UUID,
    prefix: str,
    disks: dict[str, Path],
    *,
    glance_killed: bool = False,
) -> None:
    rows = await rows_of(database_url, job_id)
    assert {row.phase for row in rows.values()} == {"done"}
    assert {row.verification for row in rows.values()} == {"verified"}
    assert {row.attempts for row in rows.values()} == {1}
    for name, row in rows.items():
        assert row.glance_os_hash_value == sha512_of(disks[name])
    left = stack.leftovers(prefix)
    assert sorted(image["id"] for image in left.images) == sorted(
        str(row.glance_image_id) for row in rows.values()
    )
    assert {image["status"] for image in left.images} == {"active"}
    ours = {str(row.glance_image_id) for row in rows.values()}
    staged = {name.split(".", 1)[0] for name in left.staged_files} & ours
    if glance_killed:
        # Glance marks an image active before it deletes its staged file: killed in between,
        # it leaves the file for good (its start-up clean-up spares files of live images).
        # Only such files may be left, of images that are active and verified.
        assert staged <= {image["id"] for image in left.images}, staged
    else:
        assert staged == set()
    assert await fetch_rows(database_url, "SELECT * FROM worker_pauses") == []


async def submit_batch(
    database_url: str, tmp_path: Path, disk_files: list[Path]
) -> tuple[uuid.UUID, str, dict[str, Path]]:
    prefix = f"conformance-outage-{uuid.uuid4().hex[:8]}"
    disks = {f"{prefix}-{n}": path for n, path in enumerate(disk_files)}
    return await submit(database_url, tmp_path, disks), prefix, disks


def stop_both(stack: RealStack) -> None:
    stack.stop_keystone()
    stack.stop_glance()


def start_both(stack: RealStack) -> None:
    stack.start_keystone()
    stack.start_glance()


OUTAGES: dict[str, tuple[Callable[[RealStack], Any], Callable[[RealStack], Any]]] = {
    "keystone-down": (RealStack.stop_keystone, RealStack.start_keystone),
    "glance-down": (RealStack.stop_glance, RealStack.start_glance),
    "both-down": (stop_both, start_both),
    "glance-503": (
        lambda stack: stack.set_glance_unavailable(True),
        lambda stack: stack.set_glance_unavailable(False),
    ),
}


@pytest.mark.parametrize("outage", list(OUTAGES))
async def test_a_90_s_outage_costs_no_image(
    target: Target,
    real_stack: RealStack,
    database_url: str,
    tmp_path: Path,
    disk_files: list[Path],
    outage: str,
) -> None:
    begin, end = OUTAGES[outage]
    job_id, prefix, disks = await submit_batch(database_url, tmp_path, disk_files)
    # The uploads are held to a trickle until the outage is in place: on loopback the batch
    # would otherwise be done in seconds, before stopping a service has taken effect.
    await set_bandwidth_limit(database_url, HELD_BYTES_PER_S)
    try:
        async with running(start_worker(database_url, lambda: cloud_of(target))) as worker:
            await in_flight(database_url, job_id)
            await asyncio.to_thread(begin, real_stack)
            await asyncio.sleep(OUTAGE_S)
            paused = await paused_services(database_url)
            await asyncio.to_thread(end, real_stack)
            await set_bandwidth_limit(database_url, None)
            summary = await worker
    finally:
        await set_bandwidth_limit(database_url, None)

    assert summary.by_phase == {"done": DISKS}, await outcomes(database_url, job_id)
    # Keystone down alone may pass unnoticed while Glance's cached tokens last; anything
    # else must have paused the worker.
    if outage != "keystone-down":
        assert paused, "the worker never paused"
    killed = outage in ("glance-down", "both-down")
    await assert_nothing_lost(database_url, real_stack, job_id, prefix, disks, glance_killed=killed)


async def test_credentials_rotated_mid_run_and_fixed_in_clouds_yaml_60_s_later(
    target: Target, real_stack: RealStack, database_url: str, tmp_path: Path, disk_files: list[Path]
) -> None:
    user = f"conformance-rotated-{uuid.uuid4().hex[:8]}"
    real_stack.add_user(user, "first-secret", role="admin")
    clouds_yaml = tmp_path / "clouds.yaml"

    def write_clouds(password: str) -> None:
        auth = {
            "auth_url": target.auth_url,
            "username": user,
            "password": password,
            "project_name": target.project_name,
            "user_domain_name": target.domain,
            "project_domain_name": target.domain,
        }
        clouds_yaml.write_text(yaml.safe_dump({"clouds": {"rotated": {"auth": auth}}}))

    def load() -> CloudSettings:
        env = {"OS_CLOUD": "rotated", "OS_CLIENT_CONFIG_FILE": str(clouds_yaml)}
        return load_cloud_settings(env, cloud="rotated")

    write_clouds("first-secret")
    job_id, prefix, disks = await submit_batch(database_url, tmp_path, disk_files)
    # The batch must outlast the token (60 s here, renewed 15 s before it ends): a cap of
    # 2 MiB/s stretches its 144 MiB over more than a minute.
    await set_bandwidth_limit(database_url, 2 * MIB, updated_by="conformance")
    async with running(start_worker(database_url, load)) as worker:
        await in_flight(database_url, job_id)
        await asyncio.to_thread(real_stack.set_password, user, "second-secret")
        deadline = time.monotonic() + 120  # tokens live 60 s here: the next renewal is refused
        while "identity" not in await paused_services(database_url):
            assert not worker.done(), "the batch ended without noticing the rotation"
            assert time.monotonic() < deadline, "the rotated password never paused the worker"
            await asyncio.sleep(0.2)
        await asyncio.sleep(60.0)
        write_clouds("second-secret")
        summary = await worker

    assert summary.by_phase == {"done": DISKS}
    await assert_nothing_lost(database_url, real_stack, job_id, prefix, disks)


async def test_a_postgresql_restart_costs_no_image(
    target: Target, real_stack: RealStack, database_url: str, tmp_path: Path, disk_files: list[Path]
) -> None:
    job_id, prefix, disks = await submit_batch(database_url, tmp_path, disk_files)
    link = DatabaseLink(database_url)
    await link.up()
    try:
        async with running(start_worker(link.dsn, lambda: cloud_of(target))) as worker:
            await in_flight(database_url, job_id)
            await link.down()  # every connection reset and new ones refused, as in a restart
            await asyncio.sleep(10.0)
            await link.up()
            summary = await worker
    finally:
        await link.down()

    assert summary.by_phase == {"done": DISKS}
    await assert_nothing_lost(database_url, real_stack, job_id, prefix, disks)
