"""Chaos: three `python -m worker run` processes on ~100 disks, SIGKILLed at chosen phases.

The sandbox cloud runs in this process and the workers share this test's database. The killer
has the sandbox hold a worker's call while it is creating, staging, requesting the import
or polling, checks in the results table that the call is of that step, SIGKILLs the worker
while the call is held (so every phase is hit, whatever the machine's load), then starts a
new worker in its place after a seeded pause. At the end every row must be terminal and the
cloud must hold exactly one verified image per done row: no duplicate, no orphan, no lost row.

Re-run with a given seed: CHAOS_SEED=1234 pytest tests/test_chaos.py -s
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs

import asyncpg
import pytest

from tests.fixtures.batch import submit_disks
from tests.fixtures.cli import WORKER_CLI, cloud_env
from worker.sandbox import Fault, Sandbox, SandboxConfig

PROJECT = Path(__file__).parent.parent
DISKS = 100
WORKERS = 3
LEASE_S = 2.0
KILLS = 8  # two in each phase
DEADLINE_S = 80.0

# What to kill in: the call a worker is held inside, and the condition its row must meet
# then (the database says which step the call belongs to: a GET may be a size check or a
# poll, an import request is told apart from the polls that follow it).
TARGETS = {
    "create": (("POST", r"/v2/images"), "phase = 'creating'"),
    "stage": (("PUT", r"/v2/images/[^/]+/stage"), "phase = 'staging' AND staged_at IS NULL"),
    "import": (
        ("POST", r"/v2/images/[^/]+/import"),
        "phase = 'importing' AND import_requested_at IS NULL",
    ),
    # Imports are watched with list calls (?id=in:...) naming only the caller's images.
    "poll": (
        ("GET", r"/v2/images"),
        "phase = 'importing' AND import_requested_at IS NOT NULL",
    ),
}
HOLD_TIMEOUT_S = 10.0
# ~0.5 s per stage.
CHAOS_CLOUD = SandboxConfig(import_latency_s=0.1, stage_rate_bytes_per_s=96 << 10)


@dataclass
class Fleet:
    """The worker processes, one per slot, restarted under a new id after each kill."""

    env: dict[str, str]
    log_dir: Path
    processes: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    started: int = 0

    async def start(self, slot: int) -> None:
        self.started += 1
        worker_id = f"w{slot}-{self.started}"
        log = (self.log_dir / f"{worker_id}.log").open("wb")
        self.processes[worker_id] = await asyncio.create_subprocess_exec(
            *WORKER_CLI,
            "run",
            "--worker-id",
            worker_id,
            "--concurrency",
            "6",
            "--stage-concurrency",
            "6",
            "--lease",
            str(LEASE_S),
            env=self.env,
            cwd=PROJECT,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=log,
        )
        log.close()

    async def kill(self, worker_id: str) -> None:
        process = self.processes.pop(worker_id)
        process.send_signal(signal.SIGKILL)
        await process.wait()

    async def stop_all(self) -> list[int | None]:
        for process in self.processes.values():
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        codes: list[int | None] = []
        for process in self.processes.values():
            try:
                codes.append(await asyncio.wait_for(process.wait(), timeout=30))
            except TimeoutError:
                process.kill()
                codes.append(await process.wait())
        return codes


async def kill_at_phases(
    conn: asyncpg.Connection, fleet: Fleet, sandbox: Sandbox, rng: random.Random
) -> list[tuple[str, str]]:
    """SIGKILL a worker while it is inside a call of each target phase in turn; restart it.

    The sandbox holds the call until the kill has landed, so each phase is hit for sure.
    """
    kills: list[tuple[str, str]] = []
    while len(kills) < KILLS:
        target = list(TARGETS)[len(kills) % len(TARGETS)]
        worker_id = await _held_worker(conn, fleet, sandbox, *TARGETS[target])
        if worker_id is None:
            break  # the batch is over: nothing is making that call any more
        kills.append((target, worker_id))
        await asyncio.sleep(rng.uniform(0.0, 0.4))
        await fleet.start(int(worker_id[1]))
        await asyncio.sleep(rng.uniform(0.8, 2.0))
    return kills


async def _held_worker(
    conn: asyncpg.Connection,
    fleet: Fleet,
    sandbox: Sandbox,
    call: tuple[str, str],
    condition: str,
) -> str | None:
    """Hold the next matching call; if its row meets `condition`, kill its worker meanwhile.

    Returns the killed worker, or None when no such call came for HOLD_TIMEOUT_S.
    """
    while True:
        release = asyncio.Event()
        fault = Fault(*call, hold=release)
        sandbox.inject(fault)
        try:
            await asyncio.wait_for(fault.reached.wait(), timeout=HOLD_TIMEOUT_S)
        except TimeoutError:
            sandbox.withdraw(fault)
            return None
        try:
            image_id = _image_of(fault)
            if image_id is None and call[0] == "GET":
                continue  # a list call not made for the import watch
            worker_id = await _holder_of(conn, condition, image_id, fleet)
            if worker_id is not None:
                await fleet.kill(worker_id)
                return worker_id
        finally:
            release.set()


def _image_of(fault: Fault) -> str | None:
    """The image a held call is about: /v2/images/{id}/... names it, a list call for the
    import watch names its images in `id=in:` (the first will do); a create's is in its body."""
    parts = (fault.held_path or "").split("/")
    if len(parts) > 3:
        return parts[3]
    listed = parse_qs(fault.held_query or "").get("id", [""])[0]
    return listed.removeprefix("in:").split(",")[0] or None


async def _holder_of(
    conn: asyncpg.Connection, condition: str, image_id: str | None, fleet: Fleet
) -> str | None:
    """The live worker holding the row of `image_id` (any row, for a create) if it meets
    `condition`."""
    held = await conn.fetch(
        f"SELECT worker_id FROM results WHERE {condition} AND lease_expires_at > now()"
        " AND ($1::uuid IS NULL OR glance_image_id = $1::uuid)",
        image_id,
    )
    alive = [r["worker_id"] for r in held if r["worker_id"] in fleet.processes]
    return str(alive[0]) if alive else None


async def _all_terminal(conn: asyncpg.Connection, deadline: float) -> None:
    while time.monotonic() < deadline:
        left = await conn.fetchval(
            "SELECT count(*) FROM results WHERE phase NOT IN ('done', 'failed')"
        )
        if left == 0:
            return
        await asyncio.sleep(0.2)


@pytest.mark.parametrize("sandbox_config", [CHAOS_CLOUD], indirect=True)
async def test_chaos_workers_killed_at_every_phase_leave_no_duplicate_orphan_or_lost_row(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(1 << 32))
    rng = random.Random(seed)
    print(f"\nchaos seed: {seed} (re-run: CHAOS_SEED={seed} pytest tests/test_chaos.py -s)")
    _job_id, sources = await submit_disks(database_url, tmp_path, DISKS, fill_bytes=48 << 10)
    sandbox.inject(Fault("GET", r"/v2/images/[^/]+", status=503, times=10))
    (tmp_path / "logs").mkdir()
    fleet = Fleet(cloud_env(sandbox, database_url), tmp_path / "logs")
    conn = await asyncpg.connect(database_url)
    started = time.monotonic()
    try:
        for slot in range(WORKERS):
            await fleet.start(slot)
        kills = await kill_at_phases(conn, fleet, sandbox, rng)
        await _all_terminal(conn, started + DEADLINE_S)
        elapsed_s = time.monotonic() - started
        await fleet.stop_all()
        rows = await conn.fetch("SELECT * FROM results ORDER BY disk_index")
    finally:
        await fleet.stop_all()
        await conn.close()

    images = sandbox.images()
    by_id = {image["id"]: image for image in images}
    phases = Counter(row["phase"] for row in rows)
    owned = {str(row["glance_image_id"]) for row in rows}
    kept = {str(row["glance_image_id"]) for row in rows if row["cleanup"] == "kept"}
    duplicates = sum(n - 1 for n in Counter(image["name"] for image in images).values() if n > 1)
    orphans = sorted(set(by_id) - owned - kept)
    lost = DISKS - len(rows)
    unverified = [
        row["image_name"]
        for row in rows
        if row["phase"] == "done"
        and not _matches(by_id.get(str(row["glance_image_id"])), sources[row["image_name"]])
    ]
    print(
        f"chaos: {DISKS} disks, {WORKERS} worker processes, {len(kills)} SIGKILLs "
        f"({dict(Counter(target for target, _ in kills))}), {fleet.started} processes started, "
        f"{elapsed_s:.1f} s\n"
        f"chaos: terminal {sum(phases[p] for p in ('done', 'failed'))}/{len(rows)} "
        f"(done {phases['done']}, failed {phases['failed']}); images {len(images)}; "
        f"verified {phases['done'] - len(unverified)}/{phases['done']}; duplicates {duplicates}; "
        f"orphans {len(orphans)}; lost rows {lost}; claims {sum(r['attempts'] for r in rows)}"
    )
    assert len(kills) == KILLS
    assert {target for target, _ in kills} == set(TARGETS)
    assert set(phases) <= {"done", "failed"}
    assert phases["done"] == DISKS
    assert unverified == []
    assert duplicates == 0
    assert orphans == []
    assert lost == 0


def _matches(image: dict[str, object] | None, source: Path) -> bool:
    """The image is active with the source's size, MD5 checksum and SHA-512 hash."""
    if image is None or image["status"] != "active":
        return False
    data = source.read_bytes()
    return (
        image["size"] == len(data)
        and image["checksum"] == hashlib.md5(data, usedforsecurity=False).hexdigest()
        and image["os_hash_value"] == hashlib.sha512(data).hexdigest()
    )
