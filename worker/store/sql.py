"""Loads the named queries and the numbered migrations shipped beside this module.

Every SQL statement of the program lives in this package: queries.sql for the Store,
views.sql for the read-only readers of the dashboard views (worker/store/views.py), and
controls.sql for the run-time controls (worker/store/controls.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources

_PACKAGE = "worker.store"
_NAME_LINE = re.compile(r"^-- name: (?P<name>\S+)[ \t]*$", re.MULTILINE)
_VALID_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_MIGRATION_FILE = re.compile(r"(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql")


@dataclass(frozen=True)
class Migration:
    """One numbered schema change: migrations/0001_initial.sql is version 1, name 'initial'."""

    version: int
    name: str
    sql: str


def parse_queries(text: str) -> dict[str, str]:
    """Split a queries file into {name: sql}; the text before the first name is a header."""
    parts = _NAME_LINE.split(text)
    queries: dict[str, str] = {}
    # re.split with one group alternates: header, name, body, name, body, ...
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if not _VALID_NAME.fullmatch(name):
            raise ValueError(f"invalid query name {name!r}")
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        sql = body.strip()
        if not sql:
            raise ValueError(f"query {name!r} is empty")
        queries[name] = sql
    return queries


def load_queries(filename: str = "queries.sql") -> dict[str, str]:
    """The queries of one file of named queries beside this module, by name."""
    text = resources.files(_PACKAGE).joinpath(filename).read_text(encoding="utf-8")
    return parse_queries(text)


def load_migrations() -> list[Migration]:
    """Every migration file, in version order; a gap or a duplicate version is an error."""
    folder = resources.files(_PACKAGE).joinpath("migrations")
    migrations = []
    for entry in folder.iterdir():
        match = _MIGRATION_FILE.fullmatch(entry.name)
        if match is None:
            continue
        sql = entry.read_text(encoding="utf-8")
        migrations.append(Migration(int(match["version"]), match["name"], sql))
    migrations.sort(key=lambda m: m.version)
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"migration versions must run 1, 2, 3 ... without gaps: {versions}")
    return migrations


QUERIES: Mapping[str, str] = load_queries()
