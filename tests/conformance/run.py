"""`python -m tests.conformance.run [pytest args]`: start a real Glance, run conformance on it;
`--cloud [NAME]`: check your own cloud instead (see own_cloud.py)."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from tests.conformance import own_cloud
from tests.conformance.realstack import PROJECT_ROOT, RealStack, RealStackError, new_run_dir
from worker.store.probe import can_connect

NO_TESTS_COLLECTED = 5
DEFAULT_TOKEN_EXPIRATION_S = 60
# As in `make test`: DATABASE_URL when set, else this server when it answers, else the
# tests start an embedded PostgreSQL of their own.
LOCAL_PG = "postgresql://postgres@127.0.0.1:5432/postgres"


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m tests.conformance.run",
        description="Run tests/conformance against the sandbox and a real Glance + Keystone; "
        "unknown arguments go to pytest.",
        add_help=False,
        allow_abbrev=False,
    )
    # Short tokens, so that the renewal scenario sees one expire within a minute.
    parser.add_argument("--token-expiration-s", type=int, default=DEFAULT_TOKEN_EXPIRATION_S)
    parser.add_argument("--keystone-port", type=int, default=15000)
    parser.add_argument("--glance-port", type=int, default=19292)
    # auto: MariaDB when it answers on 127.0.0.1:3306, else SQLite (said in the summary).
    parser.add_argument("--glance-database", choices=("auto", "mariadb", "sqlite"), default="auto")
    # Alone: the cloud OS_CLOUD or the OS_* variables describe; with a name: that clouds.yaml entry.
    parser.add_argument("--cloud", nargs="?", const="", default=None)
    return parser.parse_known_args(list(argv))


def database_environment(env: Mapping[str, str]) -> dict[str, str]:
    """DATABASE_URL for the tests, chosen by the same rule as `make test`."""
    if env.get("DATABASE_URL", "").strip():
        print("== database: DATABASE_URL", flush=True)
        return {}
    if asyncio.run(can_connect(LOCAL_PG)):
        print(f"== database: the local PostgreSQL at {LOCAL_PG}", flush=True)
        return {"DATABASE_URL": LOCAL_PG}
    print("== database: no local PostgreSQL, the tests start an embedded one", flush=True)
    return {}


def _pytest(stack: RealStack, pytest_args: list[str]) -> int:
    # `-m conformance` comes after the configured addopts (`-m 'not conformance'`) and wins.
    argv = [sys.executable, "-m", "pytest", "tests/conformance", "-m", "conformance", "-v"]
    env = {**os.environ, **database_environment(os.environ), **stack.environment()}
    return subprocess.run([*argv, *pytest_args], cwd=PROJECT_ROOT, env=env, check=False).returncode


def main(argv: Sequence[str]) -> int:
    options, pytest_args = _parse(argv)
    if options.cloud is not None:
        if pytest_args:
            print(f"--cloud takes no pytest arguments: {' '.join(pytest_args)}", file=sys.stderr)
            return 2
        return own_cloud.main(options.cloud, dict(os.environ))
    stack = RealStack(
        new_run_dir(),
        keystone_port=options.keystone_port,
        glance_port=options.glance_port,
        token_expiration_s=options.token_expiration_s,
        database=options.glance_database,
    )
    started = time.monotonic()
    print(f"== real Glance + Keystone: state in {stack.base_dir}", flush=True)
    try:
        with stack.running():
            print(
                f"== real stack up in {time.monotonic() - started:.1f} s: "
                f"keystone {stack.auth_url}, glance {stack.image_url}, "
                f"token expiration {stack.token_expiration_s} s",
                flush=True,
            )
            print(f"== Glance database: {stack.database_description()}", flush=True)
            code = _pytest(stack, pytest_args)
    except RealStackError as exc:
        print(f"== the real stack failed: {exc}", file=sys.stderr)
        return 3
    print(f"== real stack stopped; logs in {stack.base_dir / 'log'}", flush=True)
    print(
        f"== conformance {'passed' if code == 0 else f'FAILED (pytest exit {code})'} in "
        f"{time.monotonic() - started:.0f} s; Glance ran on {stack.database_description()}"
        + ("" if stack.database_kind != "mariadb" else " (dropped)"),
        flush=True,
    )
    if code == NO_TESTS_COLLECTED:
        print("== pytest collected no conformance tests: that is a failure", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
