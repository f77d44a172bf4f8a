"""The Grafana dashboard: every panel's SQL runs on a migrated database and returns its columns.

Grafana expands a few macros before it sends a query; the test does the same, by hand:
- `$__timeFilter(column)` becomes `true` (Grafana: `column BETWEEN <from> AND <to>`), so every
  row counts whatever the dashboard's time range;
- `$job` (the dashboard variable, used as `'$job'`) becomes `all` or a job id.
Any other macro or variable in a query fails the test, so the list stays this short.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
import pytest
import yaml

from tests.fixtures.views import Disk, seed_job
from worker.core.model import Phase
from worker.store import Store

GRAFANA = Path(__file__).parent.parent / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "vmdk-migrate.json"
DATASOURCE = GRAFANA / "provisioning" / "datasources" / "vmdk-migrate.yaml"
PROVIDER = GRAFANA / "provisioning" / "dashboards" / "vmdk-migrate.yaml"

TIME_FILTER = re.compile(r"\$__timeFilter\([^()]*\)")
ANY_MACRO = re.compile(r"\$\{?\w+")

# Panel title -> the columns its query returns, in order.
EXPECTED_COLUMNS = {
    "Jobs overview": [
        "job",
        "state",
        "images",
        "done",
        "failed",
        "in progress",
        "pending",
        "finished %",
        "bytes done",
        "bytes left",
        "throughput",
        "ETA",
        "workers",
        "submitted",
        "job id",
    ],
    "Images by phase": ["phase", "images"],
    "Throughput": ["time", "migrated bytes/s"],
    "ETA": ["job", "time left"],
    "Failures by error code": ["error_code", "images"],
    "Failures by error code, all jobs": [
        "error",
        "images",
        "jobs",
        "bytes",
        "last failed",
        "last message",
    ],
    "Recent failures": [
        "failed at",
        "job",
        "image",
        "error",
        "message",
        "attempts",
        "cleanup",
        "image id",
    ],
    "Per-image progress": [
        "job",
        "#",
        "image",
        "phase",
        "upload %",
        "size",
        "attempts",
        "worker",
        "elapsed",
        "error",
        "updated",
    ],
}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> list[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    found = []
    for panel in dashboard()["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return [p for p in found if p.get("type") != "row"]


def expand(sql: str, *, job: str) -> str:
    """The query as Grafana would send it, with the time filter always true."""
    expanded = TIME_FILTER.sub("true", sql).replace("$job", job)
    leftover = ANY_MACRO.findall(expanded)
    assert leftover == [], f"unknown macro or variable in {sql!r}"
    return expanded


@pytest.fixture
async def seeded(store: Store) -> dict[str, UUID]:
    """A finished job with failures, then a running one (pending rows: seeded last)."""
    finished = await seed_job(
        store,
        "finished",
        [
            Disk("f-ok", 1000, Phase.DONE, finish_after_s=30),
            Disk("f-virtio", 2000, Phase.FAILED, "virtio_failed", finish_after_s=60),
        ],
    )
    running = await seed_job(
        store,
        "running",
        [
            Disk("r-ok", 1000, Phase.DONE),
            Disk("r-up", 1000, Phase.STAGING, bytes_staged=500),
            Disk("r-wait", 1000),
        ],
    )
    return {"finished": finished.job_id, "running": running.job_id}


async def columns_and_rows(database_url: str, sql: str) -> tuple[list[str], list[asyncpg.Record]]:
    conn = await asyncpg.connect(database_url)
    try:
        statement = await conn.prepare(sql)
        names = [attribute.name for attribute in statement.get_attributes()]
        return names, await statement.fetch()
    finally:
        await conn.close()


async def test_every_panel_query_runs_and_returns_its_columns_and_rows(
    database_url: str, seeded: dict[str, UUID]
) -> None:
    titles = []
    for panel in panels():
        for target in panel["targets"]:
            names, rows = await columns_and_rows(database_url, expand(target["rawSql"], job="all"))
            assert names == EXPECTED_COLUMNS[panel["title"]], panel["title"]
            assert rows, f"{panel['title']}: no rows from a database with data"
        titles.append(panel["title"])
    assert sorted(titles) == sorted(EXPECTED_COLUMNS)


async def test_the_job_variable_narrows_every_panel_to_one_job(
    database_url: str, seeded: dict[str, UUID]
) -> None:
    running = str(seeded["running"])
    results = {}
    for panel in panels():
        sql = expand(panel["targets"][0]["rawSql"], job=running)
        results[panel["title"]] = await columns_and_rows(database_url, sql)

    for title, (names, _) in results.items():
        assert names == EXPECTED_COLUMNS[title]
    overview = results["Jobs overview"][1]
    assert [(r["job"], r["done"], r["in progress"], r["pending"]) for r in overview] == [
        ("running", 1, 1, 1)
    ]
    assert [r["job"] for r in results["ETA"][1]] == ["running"]
    assert results["Failures by error code"][1] == []
    assert {r["image"] for r in results["Per-image progress"][1]} == {"r-ok", "r-up", "r-wait"}
    # The all-jobs table ignores the variable on purpose.
    assert [r["error"] for r in results["Failures by error code, all jobs"][1]] == ["virtio_failed"]


async def test_the_job_variable_lists_all_jobs_then_each_job(
    database_url: str, seeded: dict[str, UUID]
) -> None:
    (variable,) = dashboard()["templating"]["list"]
    names, rows = await columns_and_rows(database_url, expand(variable["query"], job="all"))
    assert names == ["__value", "__text"]
    assert rows[0]["__value"] == "all"
    assert {r["__value"] for r in rows[1:]} == {str(job_id) for job_id in seeded.values()}
    assert variable["current"]["value"] == "all"


def test_every_panel_uses_the_provisioned_data_source() -> None:
    (source,) = yaml.safe_load(DATASOURCE.read_text())["datasources"]
    expected = {"type": source["type"], "uid": source["uid"]}
    assert source["type"] == "grafana-postgresql-datasource"
    for panel in panels():
        assert panel["datasource"] == expected, panel["title"]
        assert all(t["datasource"] == expected for t in panel["targets"]), panel["title"]
        assert all(t["rawQuery"] and t["editorMode"] == "code" for t in panel["targets"])
    assert dashboard()["templating"]["list"][0]["datasource"] == expected


def test_panels_do_not_overlap_and_ids_are_unique() -> None:
    cells: set[tuple[int, int]] = set()
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids))
    for panel in panels():
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine


def test_the_dashboard_provider_points_at_a_folder_of_json_files() -> None:
    (provider,) = yaml.safe_load(PROVIDER.read_text())["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].startswith("/")
    assert dashboard()["uid"] == "vmdk-migrate"
