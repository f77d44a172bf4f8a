"""Online preflight: before a job runs, check that the cloud can take it, and say what blocks it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import aiohttp

from worker.clients.glance import GlanceClient, Quota, open_glance
from worker.config import CloudSettings
from worker.core.model import JobSpec
from worker.errors import (
    AuthExpired,
    ConnectionFailed,
    EndpointNotFound,
    MigrationError,
    RequestTimeout,
    os_reason,
)
from worker.observe.logs import printable

OK, WARN, BLOCKING = "ok", "warn", "BLOCKING"
# Checks whose blocking finding is about the cloud or its settings rather than the job:
# `validate --online` exits 3 (configuration) for them, 2 for the others.
ENVIRONMENT_CHECKS = frozenset(
    {"credentials", "identity service", "image endpoint", "import method"}
)
MIB = 1 << 20
# Up to this many names are looked up one by one; more, and one listing of every image is cheaper.
NAME_LOOKUP_LIMIT = 50
NAME_LOOKUP_CONCURRENCY = 8
_NAMES_SHOWN = 5


@dataclass(frozen=True)
class Finding:
    """One line of the preflight table."""

    check: str
    status: str  # ok | warn | BLOCKING
    detail: str

    @property
    def blocking(self) -> bool:
        return self.status == BLOCKING


@dataclass(frozen=True)
class _Need:
    """What the job asks of the cloud, in Glance's units."""

    images: int
    total_mib: int
    largest_mib: int
    parallel: int  # images staged or importing at once


Check = Callable[[GlanceClient, JobSpec, _Need], Awaitable[list[Finding]]]


async def run_preflight(
    job: JobSpec, cloud: CloudSettings, *, concurrency: int = 8
) -> list[Finding]:
    """Every finding about `cloud` for running `job` with `concurrency` images in flight."""
    async with open_glance(cloud) as glance:
        return await check_cloud(glance, job, concurrency=concurrency, cloud=cloud)


async def check_cloud(
    glance: GlanceClient, job: JobSpec, *, concurrency: int, cloud: CloudSettings | None = None
) -> list[Finding]:
    """The checks, in order; when the cloud cannot be reached the later ones are not run."""
    try:
        methods = await glance.import_methods()
    except MigrationError as exc:
        return _access_findings(exc, cloud or CloudSettings())
    findings = [
        Finding("credentials", OK, "the cloud accepted them (a token was issued)"),
        Finding("image endpoint", OK, "answered GET /v2/info/import"),
        *_import_findings(methods, job),
    ]
    need = _need(job, concurrency)
    checks: Sequence[tuple[str, Check]] = (
        ("stores", _store_findings),
        ("quota", _quota_findings),
        ("existing names", _name_findings),
    )
    for name, check in checks:
        try:
            findings += await check(glance, job, need)
        except MigrationError as exc:
            findings.append(Finding(name, WARN, f"could not check: {exc}"))
    return findings


def format_findings(findings: Sequence[Finding]) -> str:
    """A table: check, status, detail; the last line counts what blocks the job."""
    # Details quote names from the manifest and from Glance: escaped for the terminal.
    rows = [("CHECK", "STATUS", "DETAIL")]
    rows += [(f.check, f.status, printable(f.detail)) for f in findings]
    check_width = max(len(row[0]) for row in rows)
    status_width = max(len(row[1]) for row in rows)
    lines = [f"{c:<{check_width}}  {s:<{status_width}}  {d}" for c, s, d in rows]
    blocking = sum(f.blocking for f in findings)
    lines.append(f"{blocking} blocking finding(s)" if blocking else "the cloud can take this job")
    return "\n".join(lines)


def _access_findings(exc: MigrationError, cloud: CloudSettings) -> list[Finding]:
    unreachable = describe_unreachable(exc, cloud)
    if exc.operation == "authenticate" and unreachable:
        return [
            Finding("identity service", BLOCKING, unreachable),
            Finding("credentials", WARN, "not checked: Keystone did not answer"),
        ]
    if exc.operation == "authenticate" or isinstance(exc, AuthExpired):
        return [
            Finding("credentials", BLOCKING, str(exc)),
            Finding("image endpoint", WARN, "not checked: no token"),
        ]
    detail = str(exc) if isinstance(exc, EndpointNotFound) else f"GET /v2/info/import: {exc}"
    detail = unreachable or detail
    return [
        Finding("credentials", OK, "the cloud accepted them (a token was issued)"),
        Finding("image endpoint", BLOCKING, detail),
    ]


def describe_unreachable(exc: MigrationError, cloud: CloudSettings) -> str | None:
    """For a cloud that did not answer: the service, its URL and the OS's reason; else None."""
    if not isinstance(exc, ConnectionFailed | RequestTimeout):
        return None
    cause = exc.__cause__
    if exc.operation == "authenticate":
        service, url = "identity service (Keystone)", cloud.auth_url or "OS_AUTH_URL"
    else:
        service = "image service (Glance)"
        url = cloud.image_endpoint or "the image endpoint of the catalog"
        if isinstance(cause, aiohttp.ClientConnectorError) and not cloud.image_endpoint:
            url = f"the catalog's image endpoint, {cause.host}:{cause.port}"
    if isinstance(exc, RequestTimeout):
        return f"no answer in time from the {service} at {url}"
    reason = "the connection failed"
    if isinstance(cause, aiohttp.ClientConnectorError):
        reason = os_reason(cause.os_error)
    elif isinstance(cause, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        reason = "the server closed the connection"
    return f"cannot connect to the {service} at {url}: {reason}"


def _import_findings(methods: Sequence[str], job: JobSpec) -> list[Finding]:
    """One finding per import method the job's disks use: is it enabled on this cloud?"""
    listed = ", ".join(methods) or "none"
    findings = []
    for method in sorted({disk.import_method for disk in job.disks}):
        if method in methods:
            findings.append(Finding("import method", OK, f"{method} is enabled ({listed})"))
            continue
        findings.append(
            Finding(
                "import method",
                BLOCKING,
                f"{method} is not enabled (enabled: {listed}): the operator must add it to "
                "Glance's enabled_import_methods",
            )
        )
    return findings


def _need(job: JobSpec, concurrency: int) -> _Need:
    sizes_mib = [-(-disk.size_bytes // MIB) for disk in job.disks]
    return _Need(
        images=len(sizes_mib),
        total_mib=sum(sizes_mib),
        largest_mib=max(sizes_mib, default=0),
        parallel=min(concurrency, len(sizes_mib)),
    )


async def _store_findings(glance: GlanceClient, job: JobSpec, _need: _Need) -> list[Finding]:
    stores = await glance.stores()
    asked = sorted({name for disk in job.disks for name in disk.stores})
    # What the manifest asks for, in its words: the stores it names, and all_stores.
    wanted = ", ".join([*asked, *(["all_stores"] if any(d.all_stores for d in job.disks) else [])])
    if not stores:
        if wanted:
            return [
                Finding(
                    "stores",
                    BLOCKING,
                    f"the job names stores ({wanted}) but the cloud has a single store "
                    "(no multi-store backends): remove stores and all_stores from the manifest",
                )
            ]
        return [Finding("stores", OK, "single store (no multi-store backends): nothing to choose")]
    listed = ", ".join(store.id + (" (default)" if store.default else "") for store in stores)
    unknown = [name for name in asked if name not in {store.id for store in stores}]
    if unknown:
        detail = f"the job names store(s) the cloud lacks: {', '.join(unknown)} (it has {listed})"
        return [Finding("stores", BLOCKING, f"{detail}: Glance would refuse the import (409)")]
    if wanted:
        return [Finding("stores", OK, f"{len(stores)} store(s): {listed}; the job uses {wanted}")]
    if any(store.default for store in stores):
        return [Finding("stores", OK, f"{len(stores)} store(s): {listed}")]
    return [Finding("stores", WARN, f"no default store among {listed}: imports must name one")]


async def _quota_findings(glance: GlanceClient, _job: JobSpec, need: _Need) -> list[Finding]:
    usage = await glance.usage()
    if not usage:
        return [Finding("quota", OK, "no unified limits reported: Glance enforces no quota")]
    # resource -> (what the whole job needs, the least that lets it progress at all, unit)
    wants = {
        "image_count_total": (need.images, need.images, "image(s)"),
        "image_size_total": (need.total_mib, need.total_mib, "MiB"),
        "image_stage_total": (need.parallel * need.largest_mib, need.largest_mib, "MiB"),
        "image_count_uploading": (need.parallel, 1, "image(s)"),
    }
    return [
        _quota_finding(name, usage[name], *wants[name], need=need)
        for name in wants
        if name in usage
    ]


def _quota_finding(
    name: str, quota: Quota, wanted: int, least: int, unit: str, *, need: _Need
) -> Finding:
    check = f"quota {name}"
    if quota.limit < 0:
        return Finding(check, OK, "unlimited")
    room = max(0, quota.limit - quota.usage)
    detail = f"{quota.usage} of {quota.limit} {unit} used, {room} free; the job needs {wanted}"
    if room >= wanted:
        return Finding(check, OK, detail)
    if room >= least and name == "image_stage_total" and need.largest_mib:
        fits = room // need.largest_mib
        return Finding(check, WARN, f"{detail}: lower --concurrency to {fits} or expect 413s")
    if room >= least and name == "image_count_uploading":
        return Finding(check, WARN, f"{detail}: lower --concurrency to {room} or expect 413s")
    return Finding(check, BLOCKING, f"{detail}: too small for this job")


async def _name_findings(glance: GlanceClient, job: JobSpec, _need: _Need) -> list[Finding]:
    names = {disk.name for disk in job.disks}
    if len(names) > NAME_LOOKUP_LIMIT:
        taken = {image.name async for image in glance.list_images()} & names
    else:
        slots = asyncio.Semaphore(NAME_LOOKUP_CONCURRENCY)

        async def exists(name: str) -> bool:
            async with slots:
                return any([True async for _ in glance.list_images(name=name)])

        found = await asyncio.gather(*(exists(name) for name in sorted(names)))
        taken = {name for name, there in zip(sorted(names), found, strict=True) if there}
    if not taken:
        return [Finding("existing names", OK, f"none of the job's {len(names)} name(s) is taken")]
    shown = ", ".join(sorted(n for n in taken if n is not None)[:_NAMES_SHOWN])
    more = f" and {len(taken) - _NAMES_SHOWN} more" if len(taken) > _NAMES_SHOWN else ""
    return [
        Finding(
            "existing names",
            WARN,
            f"{len(taken)} image name(s) already exist in Glance: {shown}{more} "
            "(the job adds a second image of each name)",
        )
    ]
