"""Online preflight against the sandbox cloud: each finding, and `validate --online` exit codes."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from pathlib import Path

import pytest

from tests.fixtures.cli import WORKER_CLI
from worker.clients.glance import open_glance
from worker.config import CloudSettings, load_cloud_settings
from worker.core.model import DiskSpec, JobSpec
from worker.intake.preflight import BLOCKING, OK, WARN, Finding, format_findings, run_preflight
from worker.intake.sampledisks import write_monolithic_sparse
from worker.sandbox import Sandbox, SandboxConfig

MIB = 1 << 20


def cloud_for(sb: Sandbox, *, password: str | None = None) -> CloudSettings:
    return load_cloud_settings(sb.os_environment(), overrides={"password": password})


def job_of(*sizes_mib: int, prefix: str = "disk") -> JobSpec:
    disks = tuple(
        DiskSpec(disk_index=n, name=f"{prefix}-{n}", source=f"/d/{n}.vmdk", size_bytes=size * MIB)
        for n, size in enumerate(sizes_mib)
    )
    return JobSpec(name="job", disks=disks)


def by_check(findings: list[Finding]) -> dict[str, Finding]:
    return {finding.check: finding for finding in findings}


def config(**changes: object) -> SandboxConfig:
    return SandboxConfig(import_latency_s=0.05, **changes)  # type: ignore[arg-type]


# The checks, in process -----------------------------------------------------------------------


async def test_a_healthy_cloud_passes_every_check(sandbox: Sandbox) -> None:
    findings = await run_preflight(job_of(8, 8), cloud_for(sandbox))

    assert [(f.check, f.status) for f in findings] == [
        ("credentials", OK),
        ("image endpoint", OK),
        ("import method", OK),
        ("stores", OK),
        ("quota", OK),
        ("existing names", OK),
    ]
    checks = by_check(findings)
    assert checks["import method"].detail.startswith("glance-direct is enabled")
    assert checks["stores"].detail == "1 store(s): fs (default)"
    assert format_findings(findings).endswith("the cloud can take this job")


@pytest.mark.parametrize(
    "sandbox_config", [config(import_methods=("web-download",))], indirect=True
)
async def test_a_cloud_without_glance_direct_is_blocking(sandbox: Sandbox) -> None:
    finding = by_check(await run_preflight(job_of(8), cloud_for(sandbox)))["import method"]

    assert finding.status == BLOCKING
    assert finding.detail.startswith("glance-direct is not enabled (enabled: web-download)")


QUOTA = {
    "image_count_total": 100,
    "image_size_total": 100,
    "image_stage_total": 100,
    "image_count_uploading": 10,
}


@pytest.mark.parametrize(
    ("quota", "sizes_mib", "concurrency", "check", "status", "detail"),
    [
        ({**QUOTA, "image_size_total": 20}, (8, 8, 8), 8, "image_size_total", BLOCKING,
         "0 of 20 MiB used, 20 free; the job needs 24: too small for this job"),
        ({**QUOTA, "image_count_total": 2}, (1, 1, 1), 8, "image_count_total", BLOCKING,
         "0 of 2 image(s) used, 2 free; the job needs 3: too small for this job"),
        ({**QUOTA, "image_stage_total": 20}, (8, 8, 8), 8, "image_stage_total", WARN,
         "0 of 20 MiB used, 20 free; the job needs 24: lower --concurrency to 2 or expect 413s"),
        ({**QUOTA, "image_stage_total": 20}, (8, 8, 8), 2, "image_stage_total", OK,
         "0 of 20 MiB used, 20 free; the job needs 16"),
        ({**QUOTA, "image_stage_total": 4}, (8, 1), 8, "image_stage_total", BLOCKING,
         "0 of 4 MiB used, 4 free; the job needs 16: too small for this job"),
        ({**QUOTA, "image_count_uploading": 0}, (1,), 8, "image_count_uploading", BLOCKING,
         "0 of 0 image(s) used, 0 free; the job needs 1: too small for this job"),
        ({**QUOTA, "image_count_uploading": 3}, (1,) * 5, 4, "image_count_uploading", WARN,
         "0 of 3 image(s) used, 3 free; the job needs 4: lower --concurrency to 3 or expect 413s"),
        ({**QUOTA, "image_size_total": -1}, (8,), 8, "image_size_total", OK, "unlimited"),
    ],
)  # fmt: skip
async def test_quota_headroom_against_the_job(
    make_sandbox: object,
    quota: dict[str, int],
    sizes_mib: tuple[int, ...],
    concurrency: int,
    check: str,
    status: str,
    detail: str,
) -> None:
    async with make_sandbox(config(quota=quota)) as sb:  # type: ignore[operator]
        findings = await run_preflight(job_of(*sizes_mib), cloud_for(sb), concurrency=concurrency)

    quota_findings = {f.check: f for f in findings if f.check.startswith("quota ")}
    assert set(quota_findings) == {f"quota {name}" for name in QUOTA}
    assert (quota_findings[f"quota {check}"].status, quota_findings[f"quota {check}"].detail) == (
        status,
        detail,
    )


async def test_usage_already_counted_reduces_the_room(make_sandbox: object) -> None:
    async with make_sandbox(config(quota={"image_count_total": 4})) as sb:  # type: ignore[operator]
        async with open_glance(cloud_for(sb)) as glance:
            for n in range(3):
                await glance.create_image({"name": f"other-{n}", "disk_format": "raw"})
        findings = await run_preflight(job_of(1, 1), cloud_for(sb))

    finding = by_check(findings)["quota image_count_total"]
    assert (finding.status, finding.detail) == (
        BLOCKING,
        "3 of 4 image(s) used, 1 free; the job needs 2: too small for this job",
    )


@pytest.mark.parametrize(
    ("stores", "status", "detail"),
    [
        ((), OK, "single store (no multi-store backends): nothing to choose"),
        (({"id": "ceph", "default": True}, {"id": "nfs"}), OK, "2 store(s): ceph (default), nfs"),
        (({"id": "ceph"}, {"id": "nfs"}), WARN, "no default store among ceph, nfs"),
    ],
)
async def test_stores(
    make_sandbox: object, stores: tuple[dict[str, object], ...], status: str, detail: str
) -> None:
    async with make_sandbox(config(stores=stores)) as sb:  # type: ignore[operator]
        finding = by_check(await run_preflight(job_of(1), cloud_for(sb)))["stores"]

    assert finding.status == status
    assert finding.detail.startswith(detail)


@pytest.mark.parametrize("disk_count", [3, 60])  # one lookup per name, and one full listing
async def test_names_already_in_glance_are_a_warning(sandbox: Sandbox, disk_count: int) -> None:
    cloud = cloud_for(sandbox)
    async with open_glance(cloud) as glance:
        for name in ("disk-1", "unrelated"):
            await glance.create_image({"name": name, "disk_format": "raw"})

    finding = by_check(await run_preflight(job_of(*[1] * disk_count), cloud))["existing names"]

    assert (finding.status, finding.detail) == (
        WARN,
        "1 image name(s) already exist in Glance: disk-1 "
        "(the job adds a second image of each name)",
    )


async def test_refused_credentials_stop_the_checks(sandbox: Sandbox) -> None:
    findings = await run_preflight(job_of(1), cloud_for(sandbox, password="wrong"))

    assert [(f.check, f.status) for f in findings] == [
        ("credentials", BLOCKING),
        ("image endpoint", WARN),
    ]
    assert "HTTP 401" in findings[0].detail
    assert "wrong" not in format_findings(findings)
    assert sandbox.count("GET", r".*/v2/.*") == 0


async def test_an_unreachable_keystone_is_blocking(sandbox: Sandbox) -> None:
    settings = cloud_for(sandbox)
    unreachable = dataclasses.replace(settings, auth_url="http://127.0.0.1:9/v3")

    findings = await run_preflight(job_of(1), unreachable)

    assert [(f.check, f.status) for f in findings] == [
        ("identity service", BLOCKING),
        ("credentials", WARN),
    ]
    assert findings[0].detail == (
        "cannot connect to the identity service (Keystone) at http://127.0.0.1:9/v3: "
        "connection refused"
    )


# The command ----------------------------------------------------------------------------------


def cloud_env(sb: Sandbox) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OS_", "VMDK_MIGRATE_"))}
    env.pop("DATABASE_URL", None)  # validate needs no database
    env.update(sb.os_environment())
    return env


def write_job(tmp_path: Path, count: int = 3, **defaults: object) -> Path:
    entries = []
    for number in range(count):
        path = tmp_path / f"d{number}.vmdk"
        data = bytes([number + 1]) * (2 * MIB)
        write_monolithic_sparse(path, virtual_size_bytes=2 << 30, data=data, seed=number)
        entries.append({"source": path.name, "name": f"cli-{number}"})
    manifest = tmp_path / "job.json"
    manifest.write_text(json.dumps({"job": "cli", "defaults": defaults, "disks": entries}))
    return manifest


async def validate(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *WORKER_CLI, "validate", *args,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def line_of(output: str, check: str) -> str:
    return next(line for line in output.splitlines() if line.startswith(check))


async def test_validate_online_passes_on_a_healthy_cloud_and_prints_warnings(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    code, out, err = await validate(
        str(write_job(tmp_path, min_disk=1)), "--online", env=cloud_env(sandbox)
    )

    assert code == 0, out + err
    assert line_of(out, "import method").split()[2] == OK
    assert "the cloud can take this job" in out
    assert "warning: disks[0].min_disk: min_disk 1 GiB is below" in err


@pytest.mark.parametrize(
    ("sandbox_config", "check", "detail", "exit_code"),
    [
        (config(quota={**QUOTA, "image_size_total": 5}), "quota image_size_total",
         "0 of 5 MiB used, 5 free; the job needs", 2),
        # The cloud, not the job, is the problem: a configuration error.
        (config(import_methods=("web-download",)), "import method",
         "glance-direct is not enabled (enabled: web-download)", 3),
    ],
    indirect=["sandbox_config"],
)  # fmt: skip
async def test_validate_online_exits_2_or_3_on_a_blocking_finding(
    sandbox: Sandbox, tmp_path: Path, check: str, detail: str, exit_code: int
) -> None:
    code, out, _ = await validate(str(write_job(tmp_path)), "--online", env=cloud_env(sandbox))

    assert code == exit_code
    line = line_of(out, check)
    assert BLOCKING in line
    assert detail in line
    assert "1 blocking finding(s)" in out


async def test_validate_without_online_never_calls_the_cloud(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    code, out, _ = await validate(str(write_job(tmp_path)), env=cloud_env(sandbox))

    assert code == 0
    assert "valid: job 'cli', 3 disk(s)" in out
    assert sandbox.requests == []


async def test_validate_refuses_sources_outside_the_root_from_the_environment(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    manifest = write_job(tmp_path, count=1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**cloud_env(sandbox), "VMDK_MIGRATE_SOURCE_ROOT": str(elsewhere)}

    code, _, err = await validate(str(manifest), env=env)
    inside_code, _, _ = await validate(str(manifest), "--source-root", str(tmp_path), env=env)

    assert code == 2
    assert "disks[0].source: outside the allowed source root" in err
    assert inside_code == 0
