"""The README documents every column dashboards read, and every CLI command; `make demo`
does what the README says of it."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import asyncpg
import pytest
from click.testing import CliRunner

from worker.cli.commands import cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def documented_columns(table: str) -> set[str]:
    section = README.split(f"#### `{table}`", 1)[1].split("\n\n", 2)[1]
    return set(re.findall(r"^\| `(\w+)` \|", section, flags=re.M))


async def test_every_dashboard_column_is_documented(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        for table in ("jobs", "results", "events"):
            rows = await conn.fetch(
                "SELECT column_name FROM information_schema.columns WHERE table_name = $1",
                table,
            )
            assert {r["column_name"] for r in rows} == documented_columns(table), table
    finally:
        await conn.close()


def test_every_command_is_in_the_readme() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    commands = re.findall(r"^  (\w+)\s", result.output.split("Commands:", 1)[1], flags=re.M)
    assert commands
    for command in commands:
        if command == "demo":
            assert "make demo" in README
        else:
            assert f"vmdk-migrate {command}" in README, command


def test_using_it_documents_listings_idempotent_submit_and_the_data_directory() -> None:
    using_it = README.split("## Using it", 1)[1].split("\n## ", 1)[0]
    for needed in (
        "vmdk-migrate jobs",
        "--format table|json|csv",
        "--phase",
        "--limit",
        "Submitting is idempotent",
        "submit --again",
        "$XDG_DATA_HOME/vmdk-migrate",
        "VMDK_MIGRATE_DATA_DIR",
        "pipx install .",
        "uv tool install .",
        ". .venv/bin/activate",
        "_VMDK_MIGRATE_COMPLETE",
    ):
        assert needed in using_it, needed


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_keeps_its_own_database_and_says_how_to_get_the_command() -> None:
    # The commands of the target as make would run them (-n: printed, none run).
    planned = subprocess.run(
        ["make", "--no-print-directory", "-n", "demo"],
        cwd=ROOT, capture_output=True, text=True, timeout=30, check=True,
    ).stdout.splitlines()  # fmt: skip
    (demo,) = [line for line in planned if "-m worker demo" in line]
    assert demo.startswith(f'VMDK_MIGRATE_DATA_DIR="{ROOT}/.data" '), demo
    echoes = [line for line in planned if line.startswith("echo")]
    printed = subprocess.run(
        ["sh", "-c", "; ".join(echoes)], capture_output=True, text=True, timeout=30, check=True
    ).stdout.splitlines()
    assert "To use the command from this shell:  . .venv/bin/activate" in printed
