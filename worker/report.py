"""What the CLI prints: manifest problems, job status tables, CSV and JSON reports."""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Sequence
from datetime import datetime
from typing import IO, Any
from uuid import UUID

import click

from worker.core.model import Phase
from worker.errors import InvalidManifest
from worker.logs import printable
from worker.store.store import JobSummary, ResultRow

# Columns of the per-image table in `status`, in order: (header, attribute).
_STATUS_COLUMNS = (
    ("#", "disk_index"),
    ("image", "image_name"),
    ("phase", "phase"),
    ("bytes", "source_size_bytes"),
    ("glance_size", "glance_size"),
    ("glance_status", "glance_status"),
    ("hash", "glance_os_hash_value"),
    ("verification", "verification"),
    ("error_code", "error_code"),
    ("image_id", "glance_image_id"),
)


def print_problems(error: InvalidManifest) -> None:
    """One line per problem, naming the entry and the field."""
    source = error.source or "manifest"
    click.echo(f"{source}: invalid: {len(error.problems)} problem(s)", err=True)
    for problem in error.problems:
        click.echo(printable(f"  {problem.location}: {problem.message}"), err=True)


def print_job_status(summary: JobSummary, rows: Sequence[ResultRow]) -> None:
    """A job's counts by phase, then a table of its images with failures explained."""
    counts = "  ".join(
        f"{phase}={summary.counts.get(phase, 0)}" for phase in Phase if summary.counts.get(phase, 0)
    )
    state = " (cancelled)" if summary.cancelled else ""
    click.echo(
        f"job {printable(summary.name)} {summary.job_id}{state}: {summary.disk_count} image(s), "
        f"{summary.bytes_staged}/{summary.total_bytes} bytes staged  {counts}"
    )
    if not rows:
        return
    table = [[_cell(getattr(row, attr)) for _, attr in _STATUS_COLUMNS] for row in rows]
    headers = [header for header, _ in _STATUS_COLUMNS]
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(headers)]
    click.echo("  " + "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    for row, cells in zip(rows, table, strict=True):
        click.echo("  " + "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)))
        if row.error_message:
            click.echo(f"      {row.error_code}: {printable(row.error_message)}")


def write_report(rows: Sequence[ResultRow], *, fmt: str, stream: IO[str]) -> None:
    """Every column of every row, as CSV (header first) or a JSON array."""
    records = [{k: _jsonable(v) for k, v in dataclasses.asdict(row).items()} for row in rows]
    if fmt == "json":
        json.dump(records, stream, indent=2)
        stream.write("\n")
        return
    names = [f.name for f in dataclasses.fields(ResultRow)]
    writer = csv.DictWriter(stream, fieldnames=names)
    writer.writeheader()
    for record in records:
        writer.writerow({k: _csv_cell(v) for k, v in record.items()})


def _cell(value: object) -> str:
    if value is None:
        return "-"
    text = printable(str(value))  # names are data: an ESC or a newline must not reach the TTY
    return text[:12] + "…" if len(text) > 40 else text  # long hashes: a prefix identifies them


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _csv_cell(value: Any) -> Any:
    if isinstance(value, dict | list):
        return json.dumps(value)
    return value
