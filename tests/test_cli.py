"""The command line as operators use it: real processes, real database, sandbox cloud over HTTP."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import signal
import sys
from pathlib import Path

import asyncpg
import pytest

from worker.sampledisks import write_monolithic_sparse
from worker.sandbox import Sandbox, SandboxConfig

PROJECT = Path(__file__).parent.parent


def cloud_env(sb: Sandbox, database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
    env.update(sb.os_environment(), DATABASE_URL=database_url)
    return env


async def vmdk_migrate(
    *args: str, env: dict[str, str], timeout_s: float = 60.0
) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "--log-format",
        "json",
        *args,
        env=env,
        cwd=PROJECT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=timeout_s)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def write_job(
    tmp_path: Path,
    count: int,
    *,
    name: str = "cli-job",
    fill_bytes: int = 64 << 10,
    **defaults: str,
) -> Path:
    disks = tmp_path / "disks"
    disks.mkdir(exist_ok=True)
    entries = []
    for number in range(count):
        path = disks / f"d{number}.vmdk"
        data = number.to_bytes(4, "big") * (fill_bytes // 4)
        write_monolithic_sparse(path, virtual_size_bytes=8 << 20, data=data, seed=number)
        entries.append({"source": str(path), "name": f"{name}-{number}"})
    manifest = tmp_path / f"{name}.json"
    manifest.write_text(
        json.dumps(
            {"job": name, "defaults": {"es_virtio_enabled": "no", **defaults}, "disks": entries}
        )
    )
    return manifest


async def test_submit_run_status_report_round_trip(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    env = cloud_env(sandbox, database_url)
    manifest = write_job(tmp_path, 3)

    code, out, _ = await vmdk_migrate("submit", str(manifest), env=env)
    assert code == 0
    job_id = out.strip()
    assert len(job_id) == 36

    code, _, err = await vmdk_migrate("run", "--once", "--concurrency", "2", env=env)
    assert code == 0, err
    finished = [json.loads(line) for line in err.splitlines() if '"image.summary"' in line]
    assert sorted(line["image"] for line in finished) == ["cli-job-0", "cli-job-1", "cli-job-2"]
    assert {line["phase"] for line in finished} == {"done"}

    code, out, _ = await vmdk_migrate("status", job_id, env=env)
    assert code == 0
    assert "done=3" in out

    code, out, _ = await vmdk_migrate("report", job_id, "--format", "csv", env=env)
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 3
    assert {row["phase"] for row in rows} == {"done"}
    assert all(row["source_hash_value"] == row["glance_os_hash_value"] for row in rows)

    code, out, _ = await vmdk_migrate("report", "cli-job", "--format", "json", env=env)
    assert code == 0
    assert [r["image_name"] for r in json.loads(out)] == ["cli-job-0", "cli-job-1", "cli-job-2"]


@pytest.mark.parametrize(
    "sandbox_config",
    [SandboxConfig(virtio_fail_names=("cli-job-1",), rewrite_virtio=False)],
    indirect=True,
)
async def test_run_exits_1_when_an_image_failed(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    env = cloud_env(sandbox, database_url)
    manifest = write_job(tmp_path, 2, es_virtio_enabled="yes")
    code, _, err = await vmdk_migrate("submit", str(manifest), env=env)
    assert code == 0, err
    code, _, err = await vmdk_migrate("run", "--once", env=env)
    assert code == 1, err
    code, out, err = await vmdk_migrate("status", "cli-job", env=env)
    assert code == 0, err
    assert "virtio_failed" in out


async def test_invalid_manifest_is_refused_whole_with_exit_2(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    env = cloud_env(sandbox, database_url)
    manifest = write_job(tmp_path, 3)
    document = json.loads(manifest.read_text())
    document["disks"][1]["source"] = str(tmp_path / "missing.vmdk")
    document["disks"][2]["min_disk"] = "20"
    manifest.write_text(json.dumps(document))

    code, _, err = await vmdk_migrate("submit", str(manifest), env=env)

    assert code == 2
    assert "disks[1].source: no such file" in err
    assert "disks[2].min_disk" in err
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM jobs") == 0
        assert await conn.fetchval("SELECT count(*) FROM results") == 0
    finally:
        await conn.close()


async def test_bad_cloud_settings_exit_3_without_touching_rows(
    database_url: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
    env["DATABASE_URL"] = database_url
    code, _, err = await vmdk_migrate("run", "--once", env=env)
    assert code == 3
    assert "no credentials" in err


async def test_a_manifest_of_ten_thousand_disks_is_queued_in_one_go(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    env = cloud_env(sandbox, database_url)
    source = tmp_path / "one.vmdk"
    write_monolithic_sparse(source, virtual_size_bytes=1 << 20, data=None)
    disks = [{"source": str(source), "name": f"disk-{n:05d}"} for n in range(10_000)]
    manifest = tmp_path / "big.json"
    manifest.write_text(json.dumps({"job": "big", "disks": disks}))

    code, out, err = await vmdk_migrate("submit", str(manifest), env=env, timeout_s=120)

    assert code == 0, err
    code, out, _ = await vmdk_migrate("status", "big", "--no-images", env=env)
    assert "10000 image(s)" in out
    assert "pending=10000" in out


@pytest.mark.parametrize(
    "sandbox_config", [SandboxConfig(stage_rate_bytes_per_s=256 << 10)], indirect=True
)
async def test_sigterm_lets_images_in_flight_finish_and_releases_nothing_half_done(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    env = cloud_env(sandbox, database_url)
    # 6 disks of ~0.5 s of upload each at the sandbox's slow link; 2 run at a time.
    await vmdk_migrate("submit", str(write_job(tmp_path, 6, fill_bytes=128 << 10)), env=env)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "--log-format",
        "json",
        "run",
        "--concurrency",
        "2",
        env=env,
        cwd=PROJECT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    conn = await asyncpg.connect(database_url)
    try:
        for _ in range(200):  # wait until the worker is uploading
            if await conn.fetchval("SELECT count(*) FROM results WHERE phase = 'staging'"):
                break
            await asyncio.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), timeout=60)
        assert process.returncode == 0, err.decode()
        phases = dict(await conn.fetch("SELECT phase, count(*) FROM results GROUP BY phase"))
        leased = await conn.fetchval(
            "SELECT count(*) FROM results WHERE lease_expires_at IS NOT NULL"
        )
    finally:
        await conn.close()
    # What was in flight finished; nothing new started; nothing is left leased.
    assert phases.get("done", 0) >= 1
    assert phases.get("pending", 0) >= 1
    assert set(phases) <= {"done", "pending"}
    assert leased == 0
    assert b"worker.stopping" in err
