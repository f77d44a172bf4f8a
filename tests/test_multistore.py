"""Multi-store import: the manifest's stores, their check online, the sandbox's stores, and
rows that record the stores that took each image and those that failed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.fixtures.batch import make_disks, migrate, rows_of, sha512_of, submit_manifest
from tests.fixtures.cli import cloud_env, run_cli
from worker.clients.glance import GlanceClient, open_glance
from worker.config import CloudSettings, load_cloud_settings
from worker.core.events import Event
from worker.core.model import DiskSpec, JobSpec
from worker.errors import BadRequest, Conflict, InvalidManifest
from worker.intake.manifest import parse_manifest
from worker.intake.preflight import BLOCKING, OK, run_preflight
from worker.intake.sampledisks import write_monolithic_sparse
from worker.sandbox import Fault, Sandbox, SandboxConfig
from worker.store.store import open_store

STORES = ({"id": "fast", "default": True}, {"id": "slow"}, {"id": "cold"})
# `slow` refuses every write, as a full store or an unwritable directory does.
SLOW_FAILS = SandboxConfig(import_latency_s=0.05, stores=STORES, fail_stores=("slow",))


def cloud_for(sb: Sandbox) -> CloudSettings:
    return load_cloud_settings(sb.os_environment())


# The manifest ---------------------------------------------------------------------------------


def load(tmp_path: Path, defaults: dict[str, Any], *disks: dict[str, Any]) -> list[DiskSpec]:
    for number in range(len(disks)):
        write_monolithic_sparse(tmp_path / f"d{number}.vmdk", virtual_size_bytes=1 << 20, data=None)
    document = {
        "job": "stores",
        "defaults": defaults,
        "disks": [{"source": f"d{n}.vmdk", **disk} for n, disk in enumerate(disks)],
    }
    loaded = parse_manifest(json.dumps(document), base_dir=tmp_path, fmt="json")
    return list(loaded.job.disks)


def problems(tmp_path: Path, defaults: dict[str, Any], *disks: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(InvalidManifest) as caught:
        load(tmp_path, defaults, *disks)
    return {problem.location: problem.message for problem in caught.value.problems}


def test_a_disks_choice_of_stores_replaces_the_defaults(tmp_path: Path) -> None:
    inherits, own, every, default_store = load(
        tmp_path,
        {"stores": ["fast", "slow"], "all_stores_must_succeed": False},
        {},
        {"stores": ["cold"]},
        {"all_stores": True},
        {"all_stores": False},
    )

    assert (inherits.stores, inherits.all_stores, inherits.all_stores_must_succeed) == (
        ("fast", "slow"),
        False,
        False,
    )
    assert (own.stores, own.all_stores) == (("cold",), False)
    assert (every.stores, every.all_stores, every.all_stores_must_succeed) == ((), True, False)
    # No store named: Glance's default store, and its default rule.
    assert (default_store.stores, default_store.all_stores) == ((), False)
    assert default_store.all_stores_must_succeed is True
    assert "stores" not in inherits.properties  # a migration setting, not an image property


def test_store_settings_glance_would_refuse_are_problems_named_where_they_are(
    tmp_path: Path,
) -> None:
    found = problems(
        tmp_path,
        {},
        {"stores": []},
        {"stores": ["fast", "fast"]},
        {"stores": ["fast"], "all_stores": True},
        {"all_stores_must_succeed": True},
        {"stores": "fast"},
        {"properties": {"stores": "fast"}},
    )

    assert found == {
        "disks[0].stores": "must list at least 1 item(s)",
        "disks[1].stores": "must be a list of unique strings, got a list of 2 item(s)",
        "disks[2].all_stores": (
            "cannot be combined with 'stores' (Glance answers 400): keep one of them"
        ),
        "disks[3].all_stores_must_succeed": (
            "applies only to an import to chosen stores: give 'stores' or 'all_stores' too"
        ),
        "disks[4].stores": 'must be a list of unique strings, got "fast"',
        "disks[5].properties.stores": (
            "'stores' is an attribute Glance maintains itself; to choose the stores the "
            "import copies to, set 'stores' beside 'properties'"
        ),
    }
    # In the defaults, where no disk names stores for it to apply to.
    assert problems(tmp_path, {"all_stores_must_succeed": False}, {}) == {
        "defaults.all_stores_must_succeed": (
            "applies only to an import to chosen stores: give 'stores' or 'all_stores' too"
        )
    }


# validate --online ----------------------------------------------------------------------------


def job_with(*disks: DiskSpec) -> JobSpec:
    return JobSpec(name="job", disks=disks)


def disk(**stores: Any) -> DiskSpec:
    return DiskSpec(disk_index=0, name="d", source="/d.vmdk", size_bytes=1 << 20, **stores)


@pytest.mark.parametrize(
    ("config", "job", "status", "detail"),
    [
        (
            SLOW_FAILS,
            job_with(disk(stores=("fast", "slow"))),
            OK,
            "3 store(s): fast (default), slow, cold; the job uses fast, slow",
        ),
        (
            SLOW_FAILS,
            job_with(disk(stores=("fast", "ceph"))),
            BLOCKING,
            "the job names store(s) the cloud lacks: ceph (it has fast (default), slow, cold): "
            "Glance would refuse the import (409)",
        ),
        (
            SandboxConfig(stores=()),
            job_with(disk(all_stores=True)),
            BLOCKING,
            "the job names stores (all_stores) but the cloud has a single store (no multi-store "
            "backends): remove stores and all_stores from the manifest",
        ),
    ],
)
async def test_the_stores_a_job_names_are_checked_against_the_clouds(
    make_sandbox: Any, config: SandboxConfig, job: JobSpec, status: str, detail: str
) -> None:
    async with make_sandbox(config) as sb:
        findings = {f.check: f for f in await run_preflight(job, cloud_for(sb))}

    assert (findings["stores"].status, findings["stores"].detail) == (status, detail)


@pytest.mark.parametrize("sandbox_config", [SLOW_FAILS], indirect=True)
async def test_where_v2_info_stores_is_missing_the_vendors_list_is_read(sandbox: Sandbox) -> None:
    sandbox.inject(Fault("GET", r"/v2/info/stores$", status=404, times=5))

    findings = {
        f.check: f
        for f in await run_preflight(job_with(disk(stores=("cold",))), cloud_for(sandbox))
    }

    assert findings["stores"].status == OK
    assert sandbox.count("GET", r"/image/v2/stores/available") == 1


# The sandbox's refusals, as Glance's ----------------------------------------------------------


async def staged_image(glance: GlanceClient, tmp_path: Path) -> str:
    [path] = make_disks(tmp_path, ["refused"])
    image = await glance.create_image(
        {"name": "refused", "disk_format": "vmdk", "container_format": "bare"}
    )
    await glance.stage(image.id, path, size_bytes=path.stat().st_size)
    return image.id


@pytest.mark.parametrize("sandbox_config", [SLOW_FAILS], indirect=True)
async def test_an_unknown_store_is_refused_409_and_stores_with_all_stores_400(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    async with open_glance(cloud_for(sandbox)) as glance:
        image_id = await staged_image(glance, tmp_path)
        with pytest.raises(Conflict) as unknown:
            await glance.import_image(image_id, request_id="req-1", stores=["ceph"])
        token = await glance.auth.token()
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{sandbox.image_url}/v2/images/{image_id}/import",
            json={"method": {"name": "glance-direct"}, "stores": ["fast"], "all_stores": True},
            headers={"X-Auth-Token": token},
        ) as both,
    ):
        both_status, both_text = both.status, await both.text()

    assert "Store for identifier ceph not found" in str(unknown.value)
    assert both_status == 400
    assert "All_stores parameter can't be used" in both_text
    assert (sandbox.image(image_id) or {}).get("status") == "uploading"  # nothing started


@pytest.mark.parametrize("sandbox_config", [SandboxConfig(stores=())], indirect=True)
async def test_a_single_store_cloud_refuses_all_stores_must_succeed_false(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    async with open_glance(cloud_for(sandbox)) as glance:
        image_id = await staged_image(glance, tmp_path)
        with pytest.raises(BadRequest) as refused:
            await glance.import_image(
                image_id, request_id="req-1", stores=["fast"], all_stores_must_succeed=False
            )

    assert "can only be set with enabled_backends" in str(refused.value)


# Migrations to several stores, end to end -----------------------------------------------------


@pytest.mark.parametrize("sandbox_config", [SLOW_FAILS], indirect=True)
async def test_each_row_records_the_stores_that_took_its_image_and_those_that_failed(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    settings: dict[str, dict[str, Any]] = {
        "two": {"stores": ["fast", "cold"]},
        # The failing store first: the image is `importing` with a failed store while `fast`
        # still copies, which is no failure when not all stores must succeed.
        "allowed": {"stores": ["slow", "fast"], "all_stores_must_succeed": False},
        "required": {"stores": ["fast", "slow"]},
        "every": {"all_stores": True, "all_stores_must_succeed": False},
        "none-took-it": {"stores": ["slow"], "all_stores_must_succeed": False},
        "default": {},
    }
    paths = dict(zip(settings, make_disks(tmp_path / "disks", list(settings)), strict=True))
    job_id = await submit_manifest(
        database_url,
        tmp_path,
        {
            "job": "stores",
            "defaults": {"es_virtio_enabled": "no"},
            "disks": [
                {"source": str(paths[name]), "name": name, **values}
                for name, values in settings.items()
            ],
        },
    )

    summary = await migrate(database_url, sandbox, concurrency=3)

    assert summary.by_phase == {"done": 4, "failed": 2}
    rows = await rows_of(database_url, job_id)
    recorded = {
        name: (row.phase, row.error_code, row.glance_stores, row.glance_failed_stores)
        for name, row in rows.items()
    }
    assert recorded == {
        "two": ("done", None, ("fast", "cold"), ()),
        "allowed": ("done", None, ("fast",), ("slow",)),
        "required": ("failed", "import_failed", (), ("slow",)),
        "every": ("done", None, ("fast", "cold"), ("slow",)),
        "none-took-it": ("failed", "import_reverted", (), ("slow",)),
        "default": ("done", None, ("fast",), ()),
    }
    for name in ("two", "allowed", "every", "default"):
        row = rows[name]
        assert row.verification == "verified"
        assert row.glance_os_hash_value == sha512_of(paths[name])
        image = sandbox.image(str(row.glance_image_id))
        assert image is not None
        assert image["stores"] == ",".join(row.glance_stores or ())
    assert rows["required"].error_message == "import failed for store(s): slow"
    assert rows["none-took-it"].error_message == (
        "image dropped back to queued after the import was accepted "
        "(import failed for store(s): slow)"
    )
    assert {image["name"] for image in sandbox.images()} == {"two", "allowed", "every", "default"}
    async with open_store(database_url) as store:
        events = await store.events(result_id=rows["allowed"].id)
    finished = [e for e in events if e["event"] == Event.IMAGE_FINISHED]
    assert [event["detail"] for event in finished] == [{"failed_stores": ["slow"]}]
    # `status` shows where each image went, since some were imported to stores by name.
    code, out, _ = await run_cli("status", str(job_id), env=cloud_env(sandbox, database_url))
    assert code == 0
    lines = [line.split() for line in out.splitlines()]
    header = next(cells for cells in lines if cells[:2] == ["#", "image"])
    shown = {
        cells[1]: dict(zip(header, cells, strict=True)) for cells in lines if cells[0].isdigit()
    }
    assert {name: (row["stores"], row["failed_stores"]) for name, row in shown.items()} == {
        "two": ("fast,cold", "-"),
        "allowed": ("fast", "slow"),
        "required": ("-", "slow"),
        "every": ("fast,cold", "slow"),
        "none-took-it": ("-", "slow"),
        "default": ("fast", "-"),
    }

    # What each import asked for, as the import tasks record it.
    inputs = {
        name: sandbox.tasks(str(rows[name].glance_image_id))[-1]["input"]
        for name in ("two", "allowed", "every", "default")
    }
    glance_direct = {"method": {"name": "glance-direct"}}
    assert {name: given["import_req"] for name, given in inputs.items()} == {
        "two": {**glance_direct, "stores": ["fast", "cold"], "all_stores_must_succeed": True},
        "allowed": {
            **glance_direct,
            "stores": ["slow", "fast"],
            "all_stores_must_succeed": False,
        },
        "every": {**glance_direct, "all_stores": True, "all_stores_must_succeed": False},
        "default": glance_direct,  # no store named: a body any cloud takes
    }
    backends = {name: given["backend"] for name, given in inputs.items()}
    assert backends == {
        "two": ["fast", "cold"],
        "allowed": ["slow", "fast"],
        "every": ["fast", "slow", "cold"],
        "default": ["fast"],
    }
