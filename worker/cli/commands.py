"""Command line: arguments, exit codes, settings and logging set-up; the work happens elsewhere.

Exit codes (also in the README):
    0  success (run: every image it finished is `done`)
    1  run finished, but at least one image ended `failed`
    2  bad input: invalid manifest, unknown job, bad option
    3  configuration or environment problem: cloud settings, credentials refused at start,
       database unreachable, an outage longer than --max-outage
  130  interrupted before the work finished (Ctrl-C in any command, or `run --once` stopped
       by a signal before the queue was drained)
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID

import click

# Only light modules at the top: `--help`, `--version` and shell completion import nothing
# else; each command imports what it needs (aiohttp, asyncpg and structlog take most of a
# second to import).
from worker.config import (
    CloudSettings,
    Secret,
    default_worker_id,
    environment,
    load_cloud_settings,
    with_env_file,
)
from worker.core.events import Event
from worker.core.model import JobSpec, Phase
from worker.errors import ConfigError, InvalidManifest, os_reason
from worker.run.settings import WorkerSettings

if TYPE_CHECKING:
    from worker.observe.notify import WebhookSettings
    from worker.sandbox import Sandbox
    from worker.store.store import JobSummary, ResultRow, Store

EXIT_OK, EXIT_FAILED_IMAGES, EXIT_BAD_INPUT, EXIT_CONFIG, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
DEFAULT_STATUS_ROWS = 20
# `run --once` serves cron and batch runs: an outage longer than this ends the run (exit 3).
_ONCE_MAX_OUTAGE_S = 900.0
T = TypeVar("T")
FORMATS = ("table", "json", "csv")  # what worker.cli.report writes


def _database_url(explicit: str | None, *, reading: bool = False) -> str:
    """--database-url (or DATABASE_URL); else the embedded server, which read commands name."""
    if explicit:
        return explicit
    from worker.store.embedded import DATA_DIR_ENV, embedded_pgdata, resolve_database_url

    env = environment()
    if reading:
        click.echo(
            f"database: the embedded PostgreSQL in {embedded_pgdata(env)} "
            f"(DATABASE_URL or {DATA_DIR_ENV} chooses another)",
            err=True,
        )
    return resolve_database_url(env)


def _webhook_settings(url: str | None, secret: str | None) -> WebhookSettings | None:
    from worker.observe.notify import WebhookSettings

    if not url:
        return None
    return WebhookSettings(url, secret=Secret(secret) if secret else None)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    import asyncpg

    from worker.observe import logs
    from worker.run.outage import OutageTooLong

    try:
        return asyncio.run(coro)
    except ConfigError as exc:
        click.echo(f"configuration error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    except OutageTooLong as exc:
        click.echo(
            f"gave up waiting: {exc}, longer than --max-outage; the unfinished images were "
            "left to the next run",
            err=True,
        )
        sys.exit(EXIT_CONFIG)
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        if logs.debugging():
            raise
        click.echo(f"database error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    except OSError as exc:
        if logs.debugging():
            raise
        click.echo(f"cannot reach a service: {exc}", err=True)
        sys.exit(EXIT_CONFIG)


source_root_option = click.option(
    "--source-root",
    envvar="VMDK_MIGRATE_SOURCE_ROOT",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Refuse any source (or flat extent) that resolves to a file outside this directory.",
)
database_option = click.option(
    "--database-url",
    envvar="DATABASE_URL",
    help="PostgreSQL DSN. Unset: an embedded PostgreSQL in $XDG_DATA_HOME/vmdk-migrate "
    "(~/.local/share/vmdk-migrate; VMDK_MIGRATE_DATA_DIR overrides it).",
)
format_option = click.option(
    "--format",
    "-f",
    "fmt",
    type=click.Choice(FORMATS),
    default="table",
    show_default=True,
    help="table for people; json and csv, with the database's column names, for scripts.",
)


class _Commands(click.Group):
    """The command group: Ctrl-C in any command ends it with one line and exit 130.

    Click would print "Aborted!" and exit 1. Commands that Ctrl-C normally ends (`run`,
    `status --watch`, `dashboard`, `sandbox`) handle the signal themselves and never get here.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("interrupted before the work finished", err=True)
            sys.exit(EXIT_INTERRUPTED)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vmdk-migrate", prog_name="vmdk-migrate")
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
@click.option(
    "--log-format",
    type=click.Choice(["auto", "json", "console"]),
    default="auto",
    show_default=True,
    help="auto: readable on a terminal, JSON lines otherwise.",
)
def cli(log_level: str, log_format: str) -> None:
    """Migrate VMware VMDK disks into OpenStack Glance images, in bulk.

    Shell completion: eval "$(_VMDK_MIGRATE_COMPLETE=bash_source vmdk-migrate)" (zsh_source,
    fish_source for those shells).
    """
    from worker.observe import logs

    json_logs = None if log_format == "auto" else log_format == "json"
    logs.configure(level=log_level, json=json_logs)


@cli.command()
@click.argument("manifest", type=click.Path(path_type=Path))
@source_root_option
@click.option("--online", is_flag=True, help="Also check the cloud: auth, import, stores, quota.")
@click.option("--cloud", "cloud_name", default=None, help="Entry of clouds.yaml (or OS_CLOUD).")
@click.option(
    "--concurrency",
    default=WorkerSettings.concurrency,
    show_default=True,
    type=click.IntRange(1, 512),
    help="The run's planned concurrency, for the staging quota check.",
)
def validate(
    manifest: Path, source_root: Path | None, online: bool, cloud_name: str | None, concurrency: int
) -> None:
    """Check a job manifest without writing anything; --online also checks the cloud."""
    from worker.cli.report import print_problems
    from worker.intake.manifest import load_manifest
    from worker.intake.preflight import ENVIRONMENT_CHECKS, format_findings, run_preflight
    from worker.observe.logs import printable

    try:
        loaded = load_manifest(manifest, source_root=source_root)
    except InvalidManifest as exc:
        print_problems(exc)
        sys.exit(EXIT_BAD_INPUT)
    job = loaded.job
    for warning in loaded.warnings:
        click.echo(f"warning: {printable(str(warning))}", err=True)
    click.echo(
        f"{manifest}: valid: job {job.name!r}, {len(job.disks)} disk(s), {job.total_bytes} bytes"
    )
    if online:
        try:
            cloud = load_cloud_settings(environment(), cloud=cloud_name)
        except ConfigError as exc:
            click.echo(f"configuration error: {exc}", err=True)
            sys.exit(EXIT_CONFIG)
        findings = _run(run_preflight(job, cloud, concurrency=concurrency))
        click.echo(format_findings(findings))
        if any(f.blocking and f.check in ENVIRONMENT_CHECKS for f in findings):
            sys.exit(EXIT_CONFIG)  # the cloud or its settings, not the job, are the problem
        sys.exit(EXIT_BAD_INPUT if any(f.blocking for f in findings) else EXIT_OK)


@cli.command()
@click.argument("manifest", type=click.Path(path_type=Path))
@source_root_option
@database_option
@click.option(
    "--at",
    "at_time",
    default=None,
    help="Start no disk before this RFC 3339 time, e.g. 2025-03-01T22:00:00+01:00 "
    "(overrides the manifest's not_before).",
)
@click.option(
    "--again",
    is_flag=True,
    help="Make a new job even when a job of the same manifest exists (migrates every disk "
    "once more).",
)
def submit(
    manifest: Path,
    source_root: Path | None,
    database_url: str | None,
    at_time: str | None,
    again: bool,
) -> None:
    """Validate a manifest and queue its disks; prints the job id.

    A manifest whose normalized content equals that of an existing job queues nothing: the
    id of that job is printed (and stderr says so). --again makes a new job all the same.
    """
    from worker.cli.report import print_problems
    from worker.intake.manifest import load_manifest
    from worker.store.store import open_store

    not_before = _parse_at(at_time)
    try:
        loaded = load_manifest(manifest, source_root=source_root)
    except InvalidManifest as exc:
        print_problems(exc)
        sys.exit(EXIT_BAD_INPUT)

    async def go() -> str:
        async with open_store(_database_url(database_url)) as store:
            submission = loaded.job, loaded.document, loaded.sha256, not_before or loaded.not_before
            job_id, created = await _submit(store, *submission, again=again)
            if not created:
                (summary,) = await store.job_summaries(str(job_id))
                click.echo(_already_submitted(summary), err=True)
            return str(job_id)

    click.echo(_run(go()))


async def _submit(
    store: Store,
    job: JobSpec,
    manifest: dict[str, object],
    manifest_sha256: str,
    not_before: datetime | None,
    *,
    again: bool,
) -> tuple[UUID, bool]:
    """(job id, whether it is new): a new job with `again`, else unless one has this manifest."""
    if again:
        job_id = await store.submit_job(
            job, manifest=manifest, manifest_sha256=manifest_sha256, not_before=not_before
        )
        return job_id, True
    return await store.submit_job_once(
        job, manifest=manifest, manifest_sha256=manifest_sha256, not_before=not_before
    )


def _already_submitted(summary: JobSummary) -> str:
    """What submit says when the manifest is that of an existing job."""
    job_id = summary.job_id
    said = f"job {job_id} ({summary.name}, {summary.state}) has the same manifest: nothing queued"
    if summary.state == "cancelled":
        return f"{said}; `retry {job_id}` lifts the cancel, `submit --again` makes a new job"
    if summary.state == "finished" and summary.counts.get("failed"):
        return (
            f"{said}; `retry {job_id}` queues its failed images again, "
            "`submit --again` migrates every disk once more"
        )
    if summary.state == "finished":
        return f"{said}; `submit --again` migrates every disk once more"
    return f"{said}; `submit --again` makes a second job of the same disks"


@cli.command()
@database_option
@click.option("--once", is_flag=True, help="Exit when nothing is left to claim (cron, batch).")
@click.option(
    "--concurrency",
    default=WorkerSettings.concurrency,
    show_default=True,
    type=click.IntRange(1, 512),
    help="Images in flight at once.",
)
@click.option(
    "--stage-concurrency",
    default=WorkerSettings.stage_concurrency,
    show_default=True,
    type=click.IntRange(1, 256),
    help="Of those, how many may be uploading bytes at once (at most; see --fixed-stages).",
)
@click.option(
    "--source-concurrency",
    default=WorkerSettings.source_concurrency,
    show_default=True,
    type=click.IntRange(1, 256),
    help="URL sources read at once from one host (a datastore's ESXi host limits them).",
)
@click.option(
    "--fixed-stages",
    is_flag=True,
    help="Upload --stage-concurrency at once from the start, instead of starting at 4 and "
    "adding one while the upload rate grows with it.",
)
@click.option(
    "--chunk-mib",
    default=WorkerSettings.chunk_bytes >> 20,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Size of each read from the source and write to the socket.",
)
@click.option("--worker-id", default=None, help="Name in rows and logs (default host:pid).")
@click.option(
    "--lease",
    "lease_s",
    default=WorkerSettings.lease_s,
    show_default=True,
    type=click.FloatRange(1.0),
    help="Seconds a claimed image stays this worker's unrenewed; renewed 4 times as often.",
)
@click.option(
    "--grace",
    "grace_s",
    default=WorkerSettings.grace_s,
    show_default=True,
    type=float,
    help="Seconds images in flight get to finish after SIGINT/SIGTERM.",
)
@click.option("--cloud", "cloud_name", default=None, help="Entry of clouds.yaml (or OS_CLOUD).")
@click.option(
    "--hash-algo",
    "--hash-algorithm",  # the name it had before
    "hash_algo",
    default=WorkerSettings.hash_algo,
    show_default=True,
    help="Must match the cloud's os_hash_algo for verification.",
)
@click.option(
    "--verify-md5",
    is_flag=True,
    help="Also hash md5 and compare Glance's legacy checksum (costs most of a core).",
)
@click.option(
    "--progress",
    type=click.Choice(["auto", "bars", "log", "off"]),
    default=WorkerSettings.progress,
    show_default=True,
    help="auto: bars on a terminal, a worker.progress log line every 10 s otherwise.",
)
@click.option(
    "--metrics-port",
    default=9108,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port of /metrics, /healthz and /readyz; 0 turns them off.",
)
@click.option(
    "--metrics-host",
    envvar="VMDK_MIGRATE_METRICS_HOST",
    default=WorkerSettings.metrics_host,
    show_default=True,
    help="Address the metrics server binds: 0.0.0.0 for probes from outside the host or pod.",
)
@click.option(
    "--webhook",
    "webhook_url",
    envvar="VMDK_MIGRATE_WEBHOOK_URL",
    default=None,
    help="POST a JSON notice here on each failed image and each completed job.",
)
@click.option(
    "--max-outage",
    "max_outage_s",
    type=click.FloatRange(0),
    default=None,
    help="Seconds to wait out an outage of Keystone or Glance before exiting 3 with the "
    "rows left pending. Default: 900 with --once, forever otherwise.",
)
@click.option(
    "--env-file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="VMDK_MIGRATE_ENV_FILE",
    default=None,
    help="KEY=VALUE lines (OS_* variables) laid over the environment; read again, with "
    "clouds.yaml and secure.yaml, when the credentials are refused.",
)
@click.option(
    "--webhook-secret",
    envvar="VMDK_MIGRATE_WEBHOOK_SECRET",
    default=None,
    help="Sign each notice: X-Vmdk-Migrate-Signature is sha256=HMAC-SHA256(secret, body).",
)
def run(
    database_url: str | None,
    once: bool,
    concurrency: int,
    stage_concurrency: int,
    source_concurrency: int,
    fixed_stages: bool,
    chunk_mib: int,
    worker_id: str | None,
    lease_s: float,
    grace_s: float,
    cloud_name: str | None,
    hash_algo: str,
    verify_md5: bool,
    progress: str,
    metrics_port: int,
    metrics_host: str,
    webhook_url: str | None,
    max_outage_s: float | None,
    env_file: Path | None,
    webhook_secret: str | None,
) -> None:
    """Work the queue: migrate claimed images until stopped (or drained, with --once)."""
    from worker.core.policy import OutagePolicy
    from worker.run.app import run_worker

    def load_cloud() -> CloudSettings:
        return load_cloud_settings(with_env_file(environment(), env_file), cloud=cloud_name)

    try:
        cloud = load_cloud()
    except ConfigError as exc:
        click.echo(f"configuration error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    if max_outage_s is None and once:
        max_outage_s = _ONCE_MAX_OUTAGE_S
    settings = WorkerSettings(
        concurrency=concurrency,
        stage_concurrency=min(stage_concurrency, concurrency),
        source_concurrency=source_concurrency,
        adaptive_stages=not fixed_stages,
        chunk_bytes=chunk_mib << 20,
        hash_algo=hash_algo,
        verify_md5=verify_md5,
        grace_s=grace_s,
        once=once,
        lease_s=lease_s,
        heartbeat_s=lease_s / 4,
        progress=progress,
        metrics_host=metrics_host,
        metrics_port=metrics_port or None,
        webhook=_webhook_settings(webhook_url, webhook_secret),
        outage=OutagePolicy(max_outage_s=max_outage_s),
    )
    if worker_id:
        settings = dataclasses.replace(settings, worker_id=worker_id)

    async def go() -> int:
        stop = _stop_on_signals()
        summary = await run_worker(
            database_url=_database_url(database_url),
            cloud=cloud,
            settings=settings,
            stop=stop,
            reload_cloud=load_cloud,
        )
        if stop.is_set() and once:
            return EXIT_INTERRUPTED
        return EXIT_FAILED_IMAGES if summary.by_phase.get("failed") else EXIT_OK

    sys.exit(_run(go()))


@cli.command()
@database_option
@format_option
def jobs(database_url: str | None, fmt: str) -> None:
    """One line per job, newest first: counts by phase, bytes done of total, state."""
    from worker.cli.report import write_jobs
    from worker.store.store import open_store

    async def go() -> int:
        async with open_store(_database_url(database_url, reading=True)) as store:
            summaries = await store.job_summaries()
        if not summaries and fmt == "table":
            click.echo("no jobs", err=True)
            return EXIT_OK
        write_jobs(summaries, fmt=fmt, stream=sys.stdout)
        return EXIT_OK

    sys.exit(_run(go()))


@cli.command()
@click.argument("job", required=False)
@database_option
@click.option(
    "--images/--no-images",
    default=True,
    show_default=True,
    help="Show the per-image table under each job.",
)
@click.option(
    "--phase",
    "phases",
    multiple=True,
    type=click.Choice([phase.value for phase in Phase]),
    help="Only images in this phase; repeat for several.",
)
@click.option(
    "--limit",
    default=DEFAULT_STATUS_ROWS,
    show_default=True,
    type=click.IntRange(0),
    help="Image rows shown per job (0: all); a last line says how many more there are.",
)
@format_option
@click.option("--watch", is_flag=True, help="Follow every job and worker live until Ctrl-C.")
@click.option(
    "--interval",
    "interval_s",
    default=2.0,
    show_default=True,
    type=click.FloatRange(0.1),
    help="Seconds between redraws with --watch.",
)
def status(
    job: str | None,
    database_url: str | None,
    images: bool,
    phases: tuple[str, ...],
    limit: int,
    fmt: str,
    watch: bool,
    interval_s: float,
) -> None:
    """Counts by phase per job, and its first images; --watch follows the whole fleet."""
    from worker.cli.fleet import watch_fleet
    from worker.cli.report import pause_lines, print_job_status, write_status
    from worker.store.store import open_store
    from worker.store.views import Views

    async def go() -> int:
        url = _database_url(database_url, reading=True)
        async with open_store(url) as store:
            if watch:
                views = await Views.connect(url, max_size=1, application_name="vmdk-migrate-status")
                try:
                    await watch_fleet(store, views, interval_s=interval_s, stop=_stop_on_signals())
                finally:
                    await views.close()
                return EXIT_OK
            summaries = await store.job_summaries(job)
            if job and not summaries:
                click.echo(f"no job {job!r}", err=True)
                return EXIT_BAD_INPUT
            if not summaries:
                click.echo("no jobs", err=True)
            # Said on stderr in the json and csv formats, so their output stays parseable.
            for line in pause_lines(await store.pauses()):
                click.echo(line, err=fmt != "table")
            pages: list[tuple[JobSummary, Sequence[ResultRow], int]] = []
            vms = []
            for summary in summaries:
                rows, matched = await store.result_page(
                    summary.job_id, phases=phases or None, limit=limit or None
                )
                pages.append((summary, rows if images else (), matched))
                vms.append(await store.job_vms(summary.job_id))
        if fmt != "table":
            write_status(pages, fmt=fmt, stream=sys.stdout, vms=vms)
            return EXIT_OK
        for (summary, shown, matched), job_vms in zip(pages, vms, strict=True):
            print_job_status(summary, shown, matched=matched if images else 0, vms=job_vms)
        return EXIT_OK

    sys.exit(_run(go()))


@cli.command()
@click.argument("job")
@database_option
@click.option(
    "--format",
    "-f",
    "fmt",
    type=click.Choice(FORMATS),
    default="csv",
    show_default=True,
    help="csv and json hold every column, named as in the results table.",
)
@click.option("--output", "-o", type=click.File("w"), default="-", help="Default: stdout.")
def report(job: str, database_url: str | None, fmt: str, output: Any) -> None:
    """Export every image row of a job (no cap) as CSV, JSON or a table."""
    from worker.cli.report import write_rows
    from worker.store.store import open_store

    async def go() -> int:
        async with open_store(_database_url(database_url, reading=True)) as store:
            job_ids = await store.find_job_ids(job)
            if not job_ids:
                click.echo(f"no job {job!r}", err=True)
                return EXIT_BAD_INPUT
            rows = [row for job_id in job_ids for row in await store.result_rows(job_id)]
            write_rows(rows, fmt=fmt, stream=output)
            return EXIT_OK

    sys.exit(_run(go()))


@cli.command()
@database_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8780, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--allowed-host",
    "allowed_hosts",
    multiple=True,
    envvar="VMDK_MIGRATE_DASHBOARD_HOSTS",
    help="A host name the page may be reached by, besides loopback and --host (repeatable; "
    "the variable takes several separated by spaces).",
)
def dashboard(
    database_url: str | None, host: str, port: int, allowed_hosts: tuple[str, ...]
) -> None:
    """Serve a read-only web page of jobs and images that refreshes itself every 2 s."""
    from worker.cli.dashboard import serving_dashboard

    async def go() -> None:
        stop = _stop_on_signals()
        async with serving_dashboard(
            _database_url(database_url, reading=True),
            host=host,
            port=port,
            extra_hosts=allowed_hosts,
        ) as served:
            click.echo(f"dashboard: {served.url}")
            await stop.wait()

    _run(go())


async def _one_job_id(store: Store, job: str) -> UUID | None:
    """The id of the job named or numbered `job`; None (with a message) unless exactly one."""
    job_ids = await store.find_job_ids(job)
    if len(job_ids) == 1:
        return job_ids[0]
    if job_ids:
        listed = ", ".join(str(job_id) for job_id in job_ids)
        click.echo(f"{len(job_ids)} jobs are named {job!r}; give one id: {listed}", err=True)
    else:
        click.echo(f"no job {job!r}", err=True)
    return None


def _on_one_job(
    job: str, database_url: str | None, act: Callable[[Store, UUID], Awaitable[int]]
) -> None:
    """Exit with what `act` answers for the one job named or numbered `job`."""
    from worker.store.store import open_store

    async def go() -> int:
        async with open_store(_database_url(database_url)) as store:
            job_id = await _one_job_id(store, job)
            return EXIT_BAD_INPUT if job_id is None else await act(store, job_id)

    sys.exit(_run(go()))


@cli.command()
@click.argument("job")
@database_option
def cancel(job: str, database_url: str | None) -> None:
    """Cancel a job: no new image starts; images in flight stop and are cleaned up."""

    async def act(store: Store, job_id: UUID) -> int:
        result = await store.cancel_job(job_id, by=default_worker_id())
        if result is None:
            return EXIT_BAD_INPUT
        click.echo(
            f"job {job_id} cancelled: {result.not_started} image(s) will not start, "
            f"{result.in_flight} in flight will stop and clean up"
        )
        return EXIT_OK

    _on_one_job(job, database_url, act)


@cli.command()
@click.argument("job")
@database_option
def retry(job: str, database_url: str | None) -> None:
    """Queue a job's failed images again (lifting a cancel); done images never move again."""

    async def act(store: Store, job_id: UUID) -> int:
        (before,) = await store.job_summaries(str(job_id))
        requeued = await store.retry_job(job_id, by=default_worker_id())
        if requeued is None:
            return EXIT_BAD_INPUT
        lifted = "the cancel is lifted, " if before.cancelled else ""
        click.echo(f"job {job_id}: {lifted}{requeued} failed image(s) queued again")
        return EXIT_OK

    _on_one_job(job, database_url, act)


@cli.group()
def db() -> None:
    """Database schema commands."""


@db.command()
@database_option
def upgrade(database_url: str | None) -> None:
    """Apply pending schema migrations (run also happens on every start)."""
    from worker.store.store import open_store

    async def go() -> None:
        async with open_store(_database_url(database_url)):
            pass

    _run(go())
    click.echo("schema is up to date")


@cli.command()
@database_option
@click.option(
    "--bandwidth",
    default=None,
    help="Upload cap of all workers together, e.g. 50MiB/s or 200MB/s; `off` lifts it.",
)
def limit(database_url: str | None, bandwidth: str | None) -> None:
    """Show or change the bandwidth cap; running workers follow it within two seconds."""
    from worker.run.bandwidth import (
        format_rate,
        get_bandwidth_limit,
        parse_rate,
        set_bandwidth_limit,
    )
    from worker.store.store import open_store

    try:
        rate = parse_rate(bandwidth) if bandwidth is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--bandwidth") from exc

    async def go() -> int | None:
        url = _database_url(database_url)
        async with open_store(url):  # brings the schema up to date first
            if bandwidth is not None:
                await set_bandwidth_limit(url, rate, updated_by=default_worker_id())
            return await get_bandwidth_limit(url)

    click.echo(f"bandwidth limit: {format_rate(_run(go()))}")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8774, show_default=True, type=int)
@click.option("--virtio-fail", multiple=True, help="Image name glob whose virtio injection fails.")
@click.option("--import-latency", "import_latency_s", default=0.5, show_default=True, type=float)
def sandbox(host: str, port: int, virtio_fail: tuple[str, ...], import_latency_s: float) -> None:
    """Serve the sandbox cloud (Keystone + Glance) for trying the tool locally."""
    from worker.sandbox import Sandbox, SandboxConfig

    config = SandboxConfig(virtio_fail_names=virtio_fail, import_latency_s=import_latency_s)

    async def serve() -> None:
        listening = False
        try:
            async with Sandbox(config).serve(host=host, port=port) as cloud:
                listening = True
                click.echo(_sandbox_banner(cloud))
                await asyncio.Event().wait()
        except OSError as exc:
            if listening:
                raise
            raise ConfigError(
                f"cannot serve the sandbox on {host} port {port}: {os_reason(exc)}; "
                "choose another port with --port"
            ) from exc

    try:
        _run(serve())
    except KeyboardInterrupt:
        sys.exit(EXIT_OK)


def _sandbox_banner(cloud: Sandbox) -> str:
    """How to use the sandbox: an OS_* block to paste, or the equivalent clouds.yaml entry."""
    import yaml

    exports = "\n".join(f"export {k}={v}" for k, v in cloud.os_environment().items())
    entry = yaml.safe_dump({"clouds": {"sandbox": cloud.clouds_yaml_entry()}}, sort_keys=False)
    return (
        f"sandbox cloud (Keystone + Glance) at {cloud.auth_url} (Ctrl-C stops it)\n"
        "In another shell, either paste:\n\n"
        f"{exports}\n\n"
        "or add this to clouds.yaml (./clouds.yaml or ~/.config/openstack/clouds.yaml) "
        "and use --cloud sandbox (or export OS_CLOUD=sandbox):\n\n"
        f"{entry}"
    )


@cli.command()
@click.option("--disks", default=6, show_default=True, type=click.IntRange(2, 1000))
@click.option(
    "--workdir", type=click.Path(path_type=Path), default=Path(".data/demo"), show_default=True
)
def demo(disks: int, workdir: Path) -> None:
    """Migrate a generated batch into the sandbox cloud on the embedded database."""
    from worker.cli.demo import run_demo

    sys.exit(_run(run_demo(disks=disks, workdir=workdir)))


def _parse_at(text: str | None) -> datetime | None:
    """--at: an RFC 3339 time with its offset; exits with EXIT_BAD_INPUT otherwise."""
    if text is None:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        click.echo(f"--at: not an RFC 3339 time with an offset: {text!r}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    return parsed


def _stop_on_signals() -> asyncio.Event:
    """SIGINT/SIGTERM: stop claiming and let images in flight finish; a second one: exit now."""
    from worker.observe import logs

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            raise SystemExit(EXIT_INTERRUPTED)
        logs.get_logger(__name__).info(Event.WORKER_STOPPING, signal=signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    return stop


def main() -> None:
    """Entry point of `vmdk-migrate` and `python -m worker`."""
    cli(prog_name="vmdk-migrate")
