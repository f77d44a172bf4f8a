"""Every SQL statement of the program lives in worker/store/: none is written anywhere else."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

WORKER = Path(__file__).parent.parent / "worker"
# The store owns the SQL; the sandbox cloud is a test double that uses no database.
SQL_HOMES = (WORKER / "store", WORKER / "sandbox")

# Shapes of statements, not bare keywords: prose may say "select" or "FOR UPDATE", and an
# HTTP client passes "DELETE" as a method. A SELECT and its FROM stay within one paragraph.
STATEMENT_SHAPES = (
    re.compile(r"\bSELECT\b(?:(?!\n[ \t]*\n).){1,400}?\bFROM\b", re.DOTALL),
    re.compile(r"\bUPDATE\s+\w+(?:\.\w+)?\s+SET\b"),
    re.compile(r"\bINSERT\s+INTO\b"),
    re.compile(r"\bDELETE\s+FROM\b"),
    re.compile(r"\b(?:CREATE|ALTER|DROP)\s+(?:TABLE|VIEW|INDEX|SCHEMA|DATABASE)\b"),
)


def statements_in(text: str) -> list[str]:
    """The first words of every SQL statement shape found in `text`."""
    return [match.group(0)[:60] for shape in STATEMENT_SHAPES for match in shape.finditer(text)]


def modules_outside_the_store() -> list[Path]:
    return [
        path
        for path in sorted(WORKER.rglob("*.py"))
        if not any(path.is_relative_to(home) for home in SQL_HOMES)
    ]


def test_no_module_outside_worker_store_holds_sql() -> None:
    modules = modules_outside_the_store()
    assert WORKER / "cli" / "dashboard.py" in modules
    found = {
        str(path.relative_to(WORKER.parent)): statements
        for path in modules
        if (statements := statements_in(path.read_text(encoding="utf-8")))
    }
    assert found == {}, "move these statements into worker/store/ (a .sql file of its own)"


@pytest.mark.parametrize(
    "text",
    [
        '_GET_LIMIT = "SELECT bandwidth_bytes_per_s FROM controls WHERE id"',
        '"""\nSELECT job_id, name,\n       state\nFROM dashboard.job_progress\n"""',
        "UPDATE controls SET bandwidth_bytes_per_s = $1",
        "UPDATE dashboard.x SET a = 1",
        "WITH r AS (INSERT INTO worker_streams (worker_id) VALUES ($1))",
        '_FORGET = "DELETE FROM worker_streams WHERE worker_id = $1"',
        "await conn.execute('CREATE TABLE t (a int)')",
    ],
)
def test_statements_are_found_wherever_they_are_written(text: str) -> None:
    assert statements_in(text)


@pytest.mark.parametrize(
    "text",
    [
        "One feeder claims rows (FOR UPDATE SKIP LOCKED, with a lease) when a pipeline is free",
        'await self._call("DELETE", f"/v2/images/{image_id}")',
        "Select the rows you want from the table, then update the set of them.",
        "SELECT the newest job.\n\nIt comes FROM the database.",
    ],
)
def test_prose_and_http_methods_are_not_statements(text: str) -> None:
    assert statements_in(text) == []
