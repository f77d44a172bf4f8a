"""Loads the named queries and the numbered migrations shipped beside this module.

Every SQL statement of the program lives in this package: queries.sql for the Store,
views.sql for the read-only readers of the dashboard views (worker/store/views.py), and
controls.sql for the run-time controls (worker/store/controls.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from importlib import resources

_PACKAGE = "worker.store"
# A block starts at `-- name: x` (a statement), `-- template: x` (the shared part of several
# statements) or `-- step: x` (a statement made from the `step` template: see queries.sql).
_BLOCK_LINE = re.compile(r"^-- (?P<kind>name|template|step): (?P<name>\S+)[ \t]*$", re.MULTILINE)
_EVENT_ERROR_LINE = re.compile(r"^-- event error: (?P<values>.+)$", re.MULTILINE)
# In a step block, `{glance_columns $11}`: the columns of that template, its $1 read as $11.
_INCLUDE = re.compile(r"\{(?P<name>[a-z_][a-z0-9_]*) \$(?P<first>\d+)\}")
_PARAMETER = re.compile(r"\$(?P<number>\d+)")
_VALID_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_MIGRATION_FILE = re.compile(r"(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql")


@dataclass(frozen=True)
class Migration:
    """One numbered schema change: migrations/0001_initial.sql is version 1, name 'initial'."""

    version: int
    name: str
    sql: str


def parse_queries(text: str) -> dict[str, str]:
    """Split a queries file into {name: sql}; the text before the first block is a header.

    A `-- step: x` block holds only the columns its statement sets (and, on a
    `-- event error: a, b` line, the error code and message of its event): it becomes the
    `step` template with `{columns}` and `{event_error}` filled in. Columns that several
    steps set alike are a template of their own, numbered from $1, which a step block takes
    in with `{template $N}`: its parameters then start at $N.
    """
    parts = _BLOCK_LINE.split(text)
    queries: dict[str, str] = {}
    templates: dict[str, str] = {}
    steps: dict[str, str] = {}
    # re.split with two groups repeats: header, kind, name, body, kind, name, body, ...
    for kind, name, body in zip(parts[1::3], parts[2::3], parts[3::3], strict=True):
        if not _VALID_NAME.fullmatch(name):
            raise ValueError(f"invalid query name {name!r}")
        taken = templates if kind == "template" else {**queries, **steps}
        if name in taken:
            raise ValueError(f"query {name!r} is defined twice")
        blocks = templates if kind == "template" else steps if kind == "step" else queries
        sql = body.strip()
        if not _code_of(sql):
            raise ValueError(f"query {name!r} is empty")
        blocks[name] = sql
    for name, sql in steps.items():
        if "step" not in templates:
            raise ValueError(f"step {name!r} needs a `-- template: step` block")
        error = _EVENT_ERROR_LINE.search(sql)
        columns = _INCLUDE.sub(partial(_included, templates, name), _code_of(sql))
        queries[name] = (
            templates["step"]
            .replace("{columns}", columns.replace("\n", "\n        "))
            .replace("{event_error}", error["values"].strip() if error else "NULL, NULL")
        )
    return queries


def _included(templates: Mapping[str, str], step: str, include: re.Match[str]) -> str:
    """The template `include` names, its parameters $1, $2, ... renumbered from its $N."""
    if include["name"] not in templates:
        raise ValueError(f"step {step!r} takes in {include['name']!r}, which is no template")
    shift = int(include["first"]) - 1
    return _PARAMETER.sub(
        lambda m: f"${int(m['number']) + shift}", _code_of(templates[include["name"]])
    )


def _code_of(sql: str) -> str:
    """`sql` without its comment lines."""
    return "\n".join(line for line in sql.splitlines() if not line.startswith("--")).strip()


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
