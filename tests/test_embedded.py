"""The embedded server: started on demand, shared between processes, stopped by the last one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import psutil
import pytest

from tests.fixtures.cli import run_cli, submit, write_job
from worker.store.embedded import (
    DATA_DIR_ENV,
    drop_dead_pids,
    install_sigterm_exit,
    release_embedded,
    resolve_database_url,
)
from worker.store.embedded import data_dir as user_data_dir

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Starts a CHILD in a mode ("once" or "wait"); returns the process and the DSN it printed.
Spawn = Callable[[str], tuple[subprocess.Popen[str], str]]

# A command that uses the embedded server: joins it, queries it, prints its DSN, then either
# exits or waits to be signalled.
CHILD = """
import asyncio, sys, time
from pathlib import Path
import asyncpg
from worker.store.embedded import embedded_dsn, install_sigterm_exit

install_sigterm_exit()
dsn = embedded_dsn(Path(sys.argv[1]))

async def query():
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()

asyncio.run(query())
print(dsn, flush=True)
if sys.argv[2] == "wait":
    time.sleep(60)
"""


def postmaster_pid(pgdata: Path) -> int | None:
    """PID of the server running on pgdata, None when it is stopped."""
    try:
        return int((pgdata / "postmaster.pid").read_text().splitlines()[0])
    except FileNotFoundError:
        return None


def server_running(pgdata: Path) -> bool:
    pid = postmaster_pid(pgdata)
    if pid is None:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def handle_pids(pgdata: Path) -> list[int]:
    return list(json.loads((pgdata / ".handle_pids.json").read_text() or "[]"))


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A project data directory (the server's PGDATA is data_dir/pg); nothing left after.

    Not under pytest's tmp_path, which another pytest session may make untraversable for the
    `pgserver` user the server runs as when tests run as root.
    """
    parent = Path(tempfile.mkdtemp(prefix="vmdk-embedded-"))
    yield parent
    pgdata = parent / "pg"
    release_embedded(pgdata)
    pid = postmaster_pid(pgdata)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)  # a failed test left it running: fast shutdown
    shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture
def spawn(data_dir: Path) -> Iterator[Spawn]:
    """Start CHILD processes on data_dir/pg; any still running at the end is killed."""
    children: list[subprocess.Popen[str]] = []

    def start(mode: str) -> tuple[subprocess.Popen[str], str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(data_dir / "pg"), mode],
            cwd=PROJECT_ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        children.append(proc)
        assert proc.stdout is not None
        return proc, proc.stdout.readline().strip()

    yield start
    for proc in children:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _probe(dsn: str) -> int:
    command = [sys.executable, "-m", "worker.store.probe", dsn]
    return subprocess.run(command, cwd=PROJECT_ROOT, timeout=30, check=False).returncode


async def test_embedded_server_starts_is_reachable_and_is_shared_by_a_second_process(
    data_dir: Path, spawn: Spawn
) -> None:
    pgdata = data_dir / "pg"
    dsn = resolve_database_url({"VMDK_MIGRATE_DATA_DIR": str(data_dir)})
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()
    server_pid = postmaster_pid(pgdata)

    child, child_dsn = spawn("once")
    assert child.wait(timeout=30) == 0

    assert child_dsn == dsn
    assert postmaster_pid(pgdata) == server_pid
    assert server_running(pgdata), "the child's exit must not stop a server still in use"
    assert _probe(dsn) == 0
    release_embedded(pgdata)
    assert not server_running(pgdata)
    assert _probe(dsn) == 1


async def test_the_server_stops_when_the_last_user_exits_by_sigterm(
    data_dir: Path, spawn: Spawn
) -> None:
    pgdata = data_dir / "pg"
    first, first_dsn = spawn("wait")
    second, second_dsn = spawn("wait")
    assert first_dsn == second_dsn
    assert sorted(handle_pids(pgdata)) == sorted([first.pid, second.pid])

    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=30) == 128 + signal.SIGTERM
    assert server_running(pgdata)

    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=30) == 128 + signal.SIGTERM
    assert not server_running(pgdata)
    assert handle_pids(pgdata) == []


async def test_a_sigkilled_user_does_not_keep_the_server_running(
    data_dir: Path, spawn: Spawn
) -> None:
    pgdata = data_dir / "pg"
    killed, _ = spawn("wait")
    killed.kill()
    killed.wait(timeout=30)
    assert handle_pids(pgdata) == [killed.pid]
    assert server_running(pgdata)

    later, _ = spawn("once")
    assert later.wait(timeout=30) == 0

    assert not server_running(pgdata)
    assert handle_pids(pgdata) == []


def test_drop_dead_pids_keeps_live_processes(data_dir: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    pgdata = data_dir / "pg"
    assert drop_dead_pids(pgdata) == []
    pgdata.mkdir()
    (pgdata / ".handle_pids.json").write_text(json.dumps([gone.pid, os.getpid()]))

    assert drop_dead_pids(pgdata) == [gone.pid]
    assert handle_pids(pgdata) == [os.getpid()]


def test_database_url_wins_over_the_embedded_server(data_dir: Path) -> None:
    url = "postgresql://someone@db.example:5432/migrations"
    env = {"DATABASE_URL": url, "VMDK_MIGRATE_DATA_DIR": str(data_dir)}
    assert resolve_database_url(env) == url
    assert not (data_dir / "pg").exists()


async def test_sigterm_exit_is_installed_only_where_no_handler_is_set() -> None:
    previous = signal.getsignal(signal.SIGTERM)
    loop = asyncio.get_running_loop()
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        loop.add_signal_handler(signal.SIGTERM, lambda: None)
        assert install_sigterm_exit() is False
        loop.remove_signal_handler(signal.SIGTERM)

        assert install_sigterm_exit() is True
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
        assert install_sigterm_exit() is False
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, previous)


def test_the_data_directory_is_the_users_not_the_working_directory() -> None:
    home = {"HOME": "/home/op"}
    assert user_data_dir(home) == Path("/home/op/.local/share/vmdk-migrate")
    assert user_data_dir({**home, "XDG_DATA_HOME": "/srv/data"}) == Path("/srv/data/vmdk-migrate")
    # A relative XDG_DATA_HOME is invalid by the specification and ignored.
    assert user_data_dir({**home, "XDG_DATA_HOME": "data"}) == Path(
        "/home/op/.local/share/vmdk-migrate"
    )
    override = {**home, "XDG_DATA_HOME": "/srv/data", "VMDK_MIGRATE_DATA_DIR": "/var/lib/vm"}
    assert user_data_dir(override) == Path("/var/lib/vm")


@pytest.fixture
def xdg_data_home() -> Iterator[Path]:
    """An XDG_DATA_HOME of its own (under /tmp, see data_dir); its server stopped after."""
    parent = Path(tempfile.mkdtemp(prefix="vmdk-xdg-"))
    yield parent
    pid = postmaster_pid(parent / "vmdk-migrate" / "pg")
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
    shutil.rmtree(parent, ignore_errors=True)


async def test_two_shells_in_different_directories_see_the_same_jobs(
    xdg_data_home: Path, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", DATA_DIR_ENV)}
    env["XDG_DATA_HOME"] = str(xdg_data_home)
    first_shell, second_shell = tmp_path / "one", tmp_path / "two"
    second_shell.mkdir()
    manifest = write_job(first_shell, 2, name="shared")

    job_id = await submit(Path(manifest.name), env=env, cwd=first_shell)

    listed = await run_cli("jobs", "-f", "json", env=env, cwd=second_shell)
    assert listed.code == 0, listed.err
    assert [job["id"] for job in listed.json()] == [job_id]
    pgdata = xdg_data_home / "vmdk-migrate" / "pg"
    note = f"database: the embedded PostgreSQL in {pgdata} (DATABASE_URL or {DATA_DIR_ENV} "
    assert note in listed.err
    status = await run_cli("status", "shared", env=env, cwd=second_shell)
    assert status.code == 0
    assert f"job shared {job_id}" in status.out
    assert note in status.err
    report = await run_cli("report", "shared", "-f", "json", env=env, cwd=second_shell)
    assert report.code == 0, report.err
    assert len(report.json()) == 2
    assert note in report.err
    assert not (first_shell / ".data").exists()
    assert not (second_shell / ".data").exists()
    assert not server_running(pgdata), "the last command to exit stops the server"
