"""The command line as operators use it: real processes, real database, sandbox cloud over HTTP."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import random
import re
import signal
import socket
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import click
import pytest
import yaml

from tests.fixtures.archives import tar_bytes
from tests.fixtures.cli import PROJECT, WORKER_CLI, cloud_env, run_cli, submit, write_job
from worker.cli.commands import cli
from worker.config import load_cloud_settings
from worker.core.model import Phase
from worker.intake.sampledisks import write_monolithic_sparse
from worker.sandbox import Sandbox, SandboxConfig
from worker.store.store import RESULT_COLUMNS


async def test_submit_run_status_report_round_trip(env: dict[str, str], tmp_path: Path) -> None:
    manifest = write_job(tmp_path, 3)

    job_id = await submit(manifest, env=env)
    assert len(job_id) == 36

    code, _, err = await run_cli("run", "--once", "--concurrency", "2", env=env)
    assert code == 0, err
    finished = [json.loads(line) for line in err.splitlines() if '"image.finished"' in line]
    assert sorted(line["image"] for line in finished) == ["cli-job-0", "cli-job-1", "cli-job-2"]
    assert {line["phase"] for line in finished} == {"done"}

    code, out, _ = await run_cli("status", job_id, env=env)
    assert code == 0
    assert "done=3" in out

    code, out, _ = await run_cli("report", job_id, "--format", "csv", env=env)
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 3
    assert {row["phase"] for row in rows} == {"done"}
    assert all(row["source_hash_value"] == row["glance_os_hash_value"] for row in rows)

    code, out, _ = await run_cli("report", "cli-job", "--format", "json", env=env)
    assert code == 0
    assert [r["image_name"] for r in json.loads(out)] == ["cli-job-0", "cli-job-1", "cli-job-2"]


@pytest.mark.parametrize(
    "sandbox_config",
    [SandboxConfig(virtio_fail_names=("cli-job-1",), rewrite_virtio=False)],
    indirect=True,
)
async def test_run_exits_1_when_an_image_failed(env: dict[str, str], tmp_path: Path) -> None:
    manifest = write_job(tmp_path, 2, es_virtio_enabled="yes")
    code, _, err = await run_cli("submit", str(manifest), env=env)
    assert code == 0, err
    code, _, err = await run_cli("run", "--once", env=env)
    assert code == 1, err
    code, out, err = await run_cli("status", "cli-job", env=env)
    assert code == 0, err
    assert "virtio_failed" in out


async def test_invalid_manifest_is_refused_whole_with_exit_2(
    database_url: str, env: dict[str, str], tmp_path: Path
) -> None:
    manifest = write_job(tmp_path, 3)
    document = json.loads(manifest.read_text())
    document["disks"][1]["source"] = str(tmp_path / "missing.vmdk")
    document["disks"][2]["min_disk"] = "20"
    manifest.write_text(json.dumps(document))

    code, _, err = await run_cli("submit", str(manifest), env=env)

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
    code, _, err = await run_cli("run", "--once", env=env)
    assert code == 3
    assert "no credentials" in err


async def test_a_manifest_of_ten_thousand_disks_is_queued_in_one_go(
    env: dict[str, str], tmp_path: Path
) -> None:
    source = tmp_path / "one.vmdk"
    write_monolithic_sparse(source, virtual_size_bytes=1 << 20, data=None)
    disks = [{"source": str(source), "name": f"disk-{n:05d}"} for n in range(10_000)]
    manifest = tmp_path / "big.json"
    manifest.write_text(json.dumps({"job": "big", "disks": disks}))

    code, out, err = await run_cli("submit", str(manifest), env=env, timeout_s=120)

    assert code == 0, err
    code, out, _ = await run_cli("status", "big", "--no-images", env=env)
    assert "10000 image(s)" in out
    assert "pending=10000" in out


@pytest.mark.parametrize(
    "sandbox_config", [SandboxConfig(stage_rate_bytes_per_s=256 << 10)], indirect=True
)
async def test_sigterm_lets_images_in_flight_finish_and_releases_nothing_half_done(
    database_url: str, sandbox: Sandbox, env: dict[str, str], tmp_path: Path
) -> None:
    # 6 disks of ~0.5 s of upload each at the sandbox's slow link; 2 run at a time.
    await run_cli("submit", str(write_job(tmp_path, 6, fill_bytes=128 << 10)), env=env)
    process = await asyncio.create_subprocess_exec(
        *WORKER_CLI,
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


# Identity and help --------------------------------------------------------------------------


def command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            paths += command_paths(command, (*prefix, name))
        else:
            paths.append((*prefix, name))
    return paths


async def test_version_and_short_help_on_every_command() -> None:
    env = dict(os.environ)
    result = await run_cli("--version", env=env)
    assert result.code == 0
    assert result.out.strip() == "vmdk-migrate, version 0.1.0"

    for path in command_paths(cli):
        result = await run_cli(*path, "-h", env=env)
        assert result.code == 0, (path, result.err)
        assert result.out.startswith(f"Usage: vmdk-migrate {' '.join(path)}".rstrip()), path


# Listing --------------------------------------------------------------------------------------

JOB_FIELDS = [
    "id",
    "name",
    "state",
    "submitted_at",
    "disk_count",
    *(phase.value for phase in Phase),
    "bytes_done",
    "bytes_staged",
    "total_bytes",
]


async def test_jobs_lists_one_line_per_job_in_every_format(
    env: dict[str, str], tmp_path: Path
) -> None:
    first = await submit(write_job(tmp_path / "a", 2, name="first"), env=env)
    assert (await run_cli("run", "--once", "--metrics-port", "0", env=env)).code == 0
    second = await submit(write_job(tmp_path / "b", 3, name="second"), env=env)
    later = await submit(
        write_job(tmp_path / "c", 1, name="later"), "--at", "2999-01-01T00:00:00Z", env=env
    )

    listed = await run_cli("jobs", "--format", "json", env=env)
    assert listed.code == 0, listed.err
    jobs = listed.json()
    assert isinstance(jobs, list)
    assert [list(job) for job in jobs] == [JOB_FIELDS] * 3
    by_id = {job["id"]: job for job in jobs}
    assert [job["id"] for job in jobs] == [later, second, first]  # newest first
    assert (by_id[first]["state"], by_id[first]["done"], by_id[first]["pending"]) == (
        "finished", 2, 0,
    )  # fmt: skip
    assert by_id[first]["bytes_done"] == by_id[first]["total_bytes"] > 0
    assert (by_id[second]["state"], by_id[second]["pending"]) == ("scheduled", 3)
    assert by_id[second]["bytes_done"] == 0
    assert by_id[later]["state"] == "scheduled"

    table = await run_cli("jobs", env=env)
    assert table.code == 0
    header, *lines = table.out.splitlines()
    assert header.split() == [
        "id",
        "name",
        "submitted_at",
        *(p.value for p in Phase),
        "bytes",
        "state",
    ]
    assert len(lines) == 3
    assert lines[2].split()[0] == first
    assert lines[2].split()[-1] == "finished"

    as_csv = await run_cli("jobs", "-f", "csv", env=env)
    rows = list(csv.DictReader(io.StringIO(as_csv.out)))
    assert list(rows[0]) == JOB_FIELDS
    assert [row["id"] for row in rows] == [later, second, first]


async def test_status_filters_by_phase_limits_rows_and_says_how_many_more(
    database_url: str, env: dict[str, str], tmp_path: Path
) -> None:
    job_id = await submit(write_job(tmp_path, 5), env=env)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE results SET phase = 'failed', error_code = 'import_failed', "
            "error_message = 'boom' WHERE job_id = $1 AND disk_index IN (1, 3)",
            job_id,
        )
    finally:
        await conn.close()

    shown = await run_cli("status", job_id, "--limit", "2", env=env)
    assert shown.code == 0
    image_lines = [line for line in shown.out.splitlines() if "cli-job-" in line]
    assert [line.split()[1] for line in image_lines] == ["cli-job-0", "cli-job-1"]
    assert "... and 3 more" in shown.out

    failed = await run_cli("status", job_id, "--phase", "failed", "-f", "json", env=env)
    assert failed.code == 0
    (job,) = failed.json()
    assert job["id"] == job_id
    assert (job["pending"], job["failed"]) == (3, 2)
    assert [row["image_name"] for row in job["images"]] == ["cli-job-1", "cli-job-3"]
    assert job["images_matched"] == 2
    assert set(job["images"][0]) == {*RESULT_COLUMNS, "vm_name"}

    some = await run_cli(
        "status", job_id, "--phase", "pending", "--phase", "failed", "--limit", "4", "-f", "json",
        env=env,
    )  # fmt: skip
    (job,) = some.json()
    assert (len(job["images"]), job["images_matched"]) == (4, 5)

    everything = await run_cli("status", job_id, "--limit", "0", "-f", "csv", env=env)
    rows = list(csv.DictReader(io.StringIO(everything.out)))
    assert len(rows) == 5
    assert list(rows[0]) == [*RESULT_COLUMNS, "vm_name"]

    wrong = await run_cli("status", job_id, "--phase", "finished", env=env)
    assert wrong.code == 2
    assert "'finished' is not one of" in wrong.err


async def test_report_takes_every_format(env: dict[str, str], tmp_path: Path) -> None:
    job_id = await submit(write_job(tmp_path, 2), env=env)
    table = await run_cli("report", job_id, "-f", "table", env=env)
    assert table.code == 0
    assert len(table.out.splitlines()) == 3
    as_json = await run_cli("report", job_id, "-f", "json", env=env)
    assert [set(row) for row in as_json.json()] == [{*RESULT_COLUMNS, "vm_name"}] * 2


# Idempotent submit ----------------------------------------------------------------------------


async def test_the_same_manifest_submitted_again_returns_the_same_job(
    env: dict[str, str], tmp_path: Path
) -> None:
    manifest = write_job(tmp_path, 2)
    job_id = await submit(manifest, env=env)

    again = await run_cli("submit", str(manifest), env=env)
    assert again.code == 0
    assert again.out.strip() == job_id
    assert f"job {job_id} (cli-job, scheduled) has the same manifest: nothing queued" in again.err

    # The same content in YAML, with relative sources, from another directory: the same job.
    document = json.loads(manifest.read_text())
    for disk in document["disks"]:
        disk["source"] = str(Path(disk["source"]).relative_to(tmp_path))
    (tmp_path / "same.yaml").write_text(yaml.safe_dump(document, sort_keys=True))
    elsewhere = await run_cli("submit", "same.yaml", env=env, cwd=tmp_path)
    assert elsewhere.out.strip() == job_id, elsewhere.err

    listed = (await run_cli("jobs", "-f", "json", env=env)).json()
    assert [job["id"] for job in listed] == [job_id]

    assert (await run_cli("run", "--once", "--metrics-port", "0", env=env)).code == 0
    finished = await run_cli("submit", str(manifest), env=env)
    assert finished.out.strip() == job_id
    assert "finished) has the same manifest: nothing queued" in finished.err
    assert "submit --again" in finished.err

    new = await submit(manifest, "--again", env=env)
    assert new != job_id
    listed = (await run_cli("jobs", "-f", "json", env=env)).json()
    assert [job["id"] for job in listed] == [new, job_id]


async def test_retry_of_a_cancelled_job_says_it_lifts_the_cancel(
    env: dict[str, str], tmp_path: Path
) -> None:
    manifest = write_job(tmp_path, 2)
    job_id = await submit(manifest, env=env)
    assert (await run_cli("cancel", job_id, env=env)).code == 0

    resubmitted = await run_cli("submit", str(manifest), env=env)
    assert resubmitted.out.strip() == job_id
    assert f"`retry {job_id}` lifts the cancel" in resubmitted.err

    retried = await run_cli("retry", job_id, env=env)
    assert retried.code == 0
    assert (
        retried.out.strip() == f"job {job_id}: the cancel is lifted, 2 failed image(s) queued again"
    )
    retried = await run_cli("retry", job_id, env=env)
    assert retried.out.strip() == f"job {job_id}: 0 failed image(s) queued again"


# The database, and ports ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (
            {"path": "/no_such_database"},
            'PostgreSQL said: database "no_such_database" does not exist',
        ),
        ({"user": "no_such_role"}, 'PostgreSQL said: role "no_such_role" does not exist'),
        ({"port": 1}, "connection refused"),
        ({"host": "no-such-host.invalid"}, "host name not resolved"),
    ],
)
async def test_an_unusable_database_is_a_configuration_error_naming_database_url(
    pg_server_dsn: str, tmp_path: Path, change: dict[str, object], said: str
) -> None:
    parts = urlsplit(pg_server_dsn)
    host = str(change.get("host", parts.hostname or "127.0.0.1"))
    port = change.get("port", parts.port or 5432)
    user = change.get("user", parts.username or "postgres")
    url = urlunsplit(
        parts._replace(
            netloc=f"{user}:hunter2@{host}:{port}", path=str(change.get("path", parts.path))
        )
    )
    env = {**os.environ, "DATABASE_URL": url}
    manifest = write_job(tmp_path, 1)
    runs = [("info", ["submit", str(manifest)]), ("info", ["status"]), ("info", ["report", "x"])]
    runs += [(level, ["jobs"]) for level in ("info", "warning", "error")]
    for level, args in runs:
        result = await run_cli("--log-level", level, *args, env=env)
        assert result.code == 3, (args, result)
        assert result.out == ""
        (line,) = result.err.splitlines()
        assert line.startswith("configuration error: ")
        assert "DATABASE_URL=" in line
        assert said in line
        assert "hunter2" not in line
        assert ":***@" in line


async def test_a_taken_dashboard_port_names_the_port_and_the_option(database_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "DATABASE_URL": database_url}
        result = await run_cli("dashboard", "--port", str(port), env=env)
    assert result.code == 3
    assert (
        f"cannot serve the dashboard on 127.0.0.1 port {port}: address already in use" in result.err
    )
    assert "--port" in result.err


async def test_a_taken_metrics_port_names_the_port_and_the_option(
    database_url: str, sandbox: Sandbox
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = cloud_env(sandbox, database_url)
        result = await run_cli("run", "--once", "--metrics-port", str(port), env=env)
    assert result.code == 0, result.err
    (line,) = [json.loads(x) for x in result.err.splitlines() if "metrics.port_unavailable" in x]
    assert line["port"] == port
    assert "--metrics-port" in line["hint"]


async def test_a_taken_sandbox_port_names_the_port_and_the_option() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = await run_cli("sandbox", "--port", str(port), env=dict(os.environ))
    assert result.code == 3
    assert (
        f"cannot serve the sandbox on 127.0.0.1 port {port}: address already in use" in result.err
    )
    assert "--port" in result.err


# The sandbox's instructions work as printed ----------------------------------------------------


async def test_the_sandbox_banner_is_a_working_os_block_and_clouds_yaml_entry(
    tmp_path: Path,
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "sandbox", "--port", "0",
        cwd=PROJECT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        lines: list[str] = []
        while not lines or lines[-1].strip() != "interface: public":
            line = await asyncio.wait_for(process.stdout.readline(), timeout=60)
            assert line, lines
            lines.append(line.decode().rstrip("\n"))
    finally:
        process.send_signal(signal.SIGINT)
        await asyncio.wait_for(process.wait(), timeout=60)
    banner = "\n".join(lines)
    exports = dict(
        line.removeprefix("export ").split("=", 1) for line in lines if line.startswith("export ")
    )
    assert set(exports) == {
        "OS_AUTH_URL", "OS_USERNAME", "OS_PASSWORD", "OS_PROJECT_NAME", "OS_USER_DOMAIN_NAME",
        "OS_PROJECT_DOMAIN_NAME",
    }  # fmt: skip
    clouds_yaml = yaml.safe_load(banner[banner.index("clouds:") :])
    assert clouds_yaml["clouds"]["sandbox"]["auth"]["auth_url"] == exports["OS_AUTH_URL"]

    settings_from_env = load_cloud_settings(exports)
    (tmp_path / "clouds.yaml").write_text(yaml.safe_dump(clouds_yaml))
    env = {"OS_CLIENT_CONFIG_FILE": str(tmp_path / "clouds.yaml")}
    settings_from_yaml = load_cloud_settings(env, cloud="sandbox")
    assert settings_from_yaml == settings_from_env


async def test_validate_online_exit_codes_and_messages_for_a_cloud_that_refuses_or_is_away(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    manifest = write_job(tmp_path, 1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
    good = {**env, **sandbox.os_environment()}

    wrong_password = await run_cli(
        "validate", "--online", str(manifest), env={**good, "OS_PASSWORD": "nope"}
    )
    assert wrong_password.code == 3
    assert "credentials" in wrong_password.out
    assert "nope" not in wrong_password.out + wrong_password.err

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    away_url = f"http://127.0.0.1:{port}/identity/v3"
    away = await run_cli(
        "validate", "--online", str(manifest), env={**good, "OS_AUTH_URL": away_url}
    )
    assert away.code == 3
    line = next(line for line in away.out.splitlines() if line.startswith("identity service"))
    assert line.split(None, 3)[3] == (
        f"cannot connect to the identity service (Keystone) at {away_url}: connection refused"
    )
    assert "ssl:default" not in away.out
    assert not re.search(r"\b[A-Z]\w+(Error|Exception)\b", away.out + away.err)

    (tmp_path / "clouds.yaml").write_text(
        yaml.safe_dump(
            {"clouds": {"sandbox": {"auth": {"auth_url": sandbox.auth_url}}, "prod": {}}}
        )
    )
    misspelt = await run_cli(
        "validate", "--online", "--cloud", "sandbx", str(manifest),
        env={**env, "OS_CLIENT_CONFIG_FILE": str(tmp_path / "clouds.yaml")},
    )  # fmt: skip
    assert misspelt.code == 3
    assert "no such cloud in clouds.yaml; did you mean 'sandbox'?" in misspelt.err


# Messages ---------------------------------------------------------------------------------------


async def test_a_json_trailing_comma_is_pointed_at(tmp_path: Path) -> None:
    manifest = tmp_path / "job.json"
    manifest.write_text('{"job": "x",\n "disks": [\n  {"source": "a.vmdk"},\n ]\n}\n')
    result = await run_cli("validate", str(manifest), env=dict(os.environ))
    assert result.code == 2
    assert (
        "line 4, column 2: Expecting value (a trailing comma at line 3, column 23: "
        "JSON allows none; remove it)"
    ) in result.err


async def test_files_that_are_no_disk_image_are_named_through_the_cli(tmp_path: Path) -> None:
    disks = {
        "notes.vmdk": b"some notes, not a disk\n" * 30,
        "appliance.vmdk": tar_bytes({"appliance.ovf": b"<Envelope/>", "disk1.vmdk": bytes(512)}),
        "noise.vmdk": random.Random(3).randbytes(1 << 16),
    }
    for name, data in disks.items():
        (tmp_path / name).write_bytes(data)
    manifest = tmp_path / "job.json"
    manifest.write_text(json.dumps({"job": "x", "disks": [{"source": n} for n in disks]}))
    result = await run_cli("validate", str(manifest), env=dict(os.environ))
    assert result.code == 2
    lines = result.err.splitlines()
    assert lines[1].endswith("not a VMDK: the file is not a disk image (text)")
    assert "OVA: the OVF envelope describes no VirtualSystem" in lines[2]  # read as an OVA
    assert "disk_format: raw" not in lines[1] + lines[2]
    assert "not a disk image (random data); if it is a raw disk" in lines[3]


# Ctrl-C -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("blocked_on", ["database", "cloud"])
async def test_ctrl_c_in_a_command_exits_130_with_one_line(
    sandbox: Sandbox, tmp_path: Path, blocked_on: str
) -> None:
    """`jobs` waiting for a database, `validate --online` for Keystone: each one's server
    accepts the connection and never answers, so the command is surely inside its work when
    the signal comes."""
    heard = asyncio.Event()

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await reader.read(1):
            heard.set()
        await reader.read()  # until the command has gone
        writer.close()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    if blocked_on == "database":
        args = ["jobs", "--database-url", f"postgresql://postgres@127.0.0.1:{port}/postgres"]
    else:
        env.update(sandbox.os_environment(), OS_AUTH_URL=f"http://127.0.0.1:{port}/v3")
        args = ["validate", "--online", str(write_job(tmp_path, 1))]
    try:
        process = await asyncio.create_subprocess_exec(
            *WORKER_CLI, *args,
            env=env, cwd=PROJECT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await asyncio.wait_for(heard.wait(), timeout=60)
        process.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    finally:
        server.close()

    assert process.returncode == 130, (out, err)
    assert err.decode().splitlines() == ["interrupted before the work finished"]
    assert "Traceback" not in out.decode()
