"""Building the package: the metadata is declared the current way, so pip prints no warning."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_the_licence_is_an_spdx_expression() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"


def test_building_the_wheel_prints_no_deprecation_warning(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    output = built.stdout + built.stderr
    assert built.returncode == 0, output
    assert "deprecat" not in output.lower(), output
    (wheel,) = tmp_path.glob("vmdk_migrate-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        assert "License-Expression: Apache-2.0" in archive.read(metadata).decode()
        # Every file of named queries ships with the code that loads it.
        shipped = set(archive.namelist())
        for sql in (ROOT / "worker" / "store").glob("*.sql"):
            assert f"worker/store/{sql.name}" in shipped, sql.name


def test_help_imports_none_of_the_heavy_libraries() -> None:
    """`--help`, `--version` and completion start in a fraction of a second: aiohttp, asyncpg,
    structlog and the sandbox are imported by the commands that use them."""
    probe = (
        "import sys\n"
        "from worker.cli.commands import cli\n"
        "try:\n"
        "    cli.main(['--help'], standalone_mode=False)\n"
        "finally:\n"
        "    heavy = {'aiohttp', 'asyncpg', 'structlog', 'rich', 'jsonschema', 'worker.sandbox'}\n"
        "    print(sorted(heavy & set(sys.modules)))\n"
    )
    answer = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert answer.stdout.strip().splitlines()[-1] == "[]"
