"""What the CLI prints: manifest problems, and jobs and their images as tables, JSON or CSV.

JSON and CSV use the column names of the jobs and results tables. The shapes:

- `jobs`: one object per job: id, name, state, submitted_at, disk_count, one count per phase
  (pending ... failed), bytes_done, bytes_staged, total_bytes.
- `status`: one object per job, the same fields, plus `images` (results rows, every column)
  and `images_matched` (rows in the chosen phases; more than `images` holds when capped).
- `report`: an array of results rows, every column.

Rows (in `status` and `report`) also carry `vm_name`: the VM of a disk of an OVA or OVF
source, null for a loose disk. `status` lists a job's VMs, each with its counts by phase.

CSV has one line per object, without the nested `images` (status CSV lists the image rows).
"""

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
from worker.intake.vms import VmCounts, vm_name_of
from worker.observe.logs import printable
from worker.run.outage import Service, format_duration
from worker.store.store import JobSummary, Pause, ResultRow

FORMATS = ("table", "json", "csv")

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
    ("cleanup", "cleanup"),
    ("image_id", "glance_image_id"),
)
# Shown before `verification` when some image of the table was imported to stores by name
# (a multi-store cloud): where its data went, and the stores the import failed for.
_STORE_COLUMNS = (("stores", "glance_stores"), ("failed_stores", "glance_failed_stores"))


def _status_columns(rows: Sequence[ResultRow]) -> tuple[tuple[str, str], ...]:
    """The per-image columns of `status` for these rows."""
    if all(row.glance_stores is None and not row.glance_failed_stores for row in rows):
        return _STATUS_COLUMNS
    at = [attr for _, attr in _STATUS_COLUMNS].index("verification")
    return (*_STATUS_COLUMNS[:at], *_STORE_COLUMNS, *_STATUS_COLUMNS[at:])


def pause_lines(pauses: Sequence[Pause]) -> list[str]:
    """'paused: image service unreachable for 3 min 20 s (worker host:42)', one per pause."""
    return [
        f"paused: {Service(p.service).label} {p.reason} for {format_duration(p.paused_s)} "
        f"(worker {p.worker_id})"
        for p in pauses
    ]


def print_problems(error: InvalidManifest) -> None:
    """One line per problem, naming the entry and the field."""
    source = error.source or "manifest"
    click.echo(f"{source}: invalid: {len(error.problems)} problem(s)", err=True)
    for problem in error.problems:
        click.echo(printable(f"  {problem.location}: {problem.message}"), err=True)


def print_job_status(
    summary: JobSummary,
    rows: Sequence[ResultRow],
    *,
    matched: int = 0,
    vms: Sequence[VmCounts] = (),
) -> None:
    """A job's counts by phase, its VMs (of OVA and OVF sources) with theirs, then a table of
    its images with failures explained.

    `matched` > len(rows): the table was capped; a last line says how many rows were left out.
    """
    counts = "  ".join(
        f"{phase}={summary.counts.get(phase, 0)}" for phase in Phase if summary.counts.get(phase, 0)
    )
    state = " (cancelled)" if summary.cancelled else ""
    click.echo(
        f"job {printable(summary.name)} {summary.job_id}{state}: {summary.disk_count} image(s), "
        f"{summary.bytes_staged}/{summary.total_bytes} bytes staged  {counts}"
    )
    if summary.cleanups_owed:
        click.echo(f"  {summary.cleanups_owed} image deletion(s) owed: done once Glance answers")
    for vm in vms:
        vm_counts = "  ".join(
            f"{phase}={vm.counts.get(phase, 0)}" for phase in Phase if vm.counts.get(phase, 0)
        )
        click.echo(
            f"  vm {printable(vm.vm_name)}: {vm.state}, {vm.disk_count} disk(s)  {vm_counts}"
        )
    if not rows:
        return
    columns = _status_columns(rows)
    table = [[_cell(getattr(row, attr)) for _, attr in columns] for row in rows]
    headers = [header for header, _ in columns]
    lines = _table_lines(headers, table)
    click.echo("  " + lines[0])
    for row, line in zip(rows, lines[1:], strict=True):
        click.echo("  " + line)
        if row.error_message:
            click.echo(f"      {row.error_code}: {printable(row.error_message)}")
    if matched > len(rows):
        click.echo(
            f"  ... and {matched - len(rows)} more (--limit 0 shows all; "
            f"report {summary.job_id} exports every row)"
        )


def job_record(summary: JobSummary) -> dict[str, Any]:
    """A job as JSON and CSV show it: jobs columns, counts by phase, bytes, state."""
    record: dict[str, Any] = {
        "id": str(summary.job_id),
        "name": summary.name,
        "state": summary.state,
        "submitted_at": summary.submitted_at.isoformat(),
        "disk_count": summary.disk_count,
    }
    record.update({phase.value: summary.counts.get(phase.value, 0) for phase in Phase})
    record.update(
        bytes_done=summary.bytes_done,
        bytes_staged=summary.bytes_staged,
        total_bytes=summary.total_bytes,
    )
    return record


def row_record(row: ResultRow) -> dict[str, Any]:
    """A results row with every column, as JSON values, and its disk's VM (`vm_name`)."""
    record = {k: _jsonable(v) for k, v in dataclasses.asdict(row).items()}
    record["vm_name"] = vm_name_of(row.spec)
    return record


def write_jobs(summaries: Sequence[JobSummary], *, fmt: str, stream: IO[str]) -> None:
    """One line per job: id, name, submitted, counts by phase, bytes done of total, state."""
    records = [job_record(summary) for summary in summaries]
    if fmt != "table":
        _write_records(records, fmt=fmt, stream=stream, fields=_JOB_FIELDS)
        return
    headers = ["id", "name", "submitted_at", *(p.value for p in Phase), "bytes", "state"]
    table = [
        [
            r["id"],
            r["name"],
            summary.submitted_at.strftime("%Y-%m-%d %H:%M:%S"),
            *(str(r[p.value]) for p in Phase),
            f"{r['bytes_done']}/{r['total_bytes']}",
            r["state"],
        ]
        for r, summary in zip(records, summaries, strict=True)
    ]
    _write_table(headers, table, stream)


def write_status(
    pages: Sequence[tuple[JobSummary, Sequence[ResultRow], int]],
    *,
    fmt: str,
    stream: IO[str],
    vms: Sequence[Sequence[VmCounts]] = (),
) -> None:
    """status -f json|csv: jobs with their (capped) image rows and their VMs (`vms`, one list
    per page); CSV lists the image rows."""
    if fmt == "csv":
        write_rows([row for _, rows, _ in pages for row in rows], fmt="csv", stream=stream)
        return
    records = [
        {**job_record(s), "images": [row_record(r) for r in rows], "images_matched": matched}
        for s, rows, matched in pages
    ]
    for record, job_vms in zip(records, vms, strict=False):
        record["vms"] = [vm.record() for vm in job_vms]
    json.dump(records, stream, indent=2)
    stream.write("\n")


def write_rows(rows: Sequence[ResultRow], *, fmt: str, stream: IO[str]) -> None:
    """A table of the main columns, or every column as a JSON array or CSV with a header."""
    if fmt == "table":
        columns = _status_columns(rows)
        cells = [[_cell(getattr(row, attr)) for _, attr in columns] for row in rows]
        _write_table([header for header, _ in columns], cells, stream)
        return
    names = [*(f.name for f in dataclasses.fields(ResultRow)), "vm_name"]
    _write_records([row_record(row) for row in rows], fmt=fmt, stream=stream, fields=names)


_JOB_FIELDS = [
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


def _write_records(
    records: Sequence[dict[str, Any]], *, fmt: str, stream: IO[str], fields: Sequence[str]
) -> None:
    if fmt == "json":
        json.dump(list(records), stream, indent=2)
        stream.write("\n")
        return
    writer = csv.DictWriter(stream, fieldnames=list(fields))
    writer.writeheader()
    for record in records:
        writer.writerow({k: _csv_cell(v) for k, v in record.items()})


def _write_table(headers: Sequence[str], table: Sequence[Sequence[str]], stream: IO[str]) -> None:
    for line in _table_lines(headers, table):
        stream.write(line + "\n")


def _table_lines(headers: Sequence[str], table: Sequence[Sequence[str]]) -> list[str]:
    """The header line, then one line a row, each column as wide as its widest cell."""
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(headers)]
    return [
        "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
        for cells in [headers, *table]
    ]


def _cell(value: object) -> str:
    if value is None or value == ():
        return "-"
    if isinstance(value, tuple):  # the stores columns
        value = ",".join(str(item) for item in value)
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
