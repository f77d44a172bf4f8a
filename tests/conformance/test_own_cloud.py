"""`run --cloud`: the own-cloud checks, pointed at each target the way an operator points them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.conformance.conftest import Target, sandbox_target
from tests.conformance.helpers import cloud_of, os_environment, run_python_module
from tests.conformance.own_cloud import NAME_PREFIX, check_cloud
from worker.sandbox import SandboxConfig

pytestmark = pytest.mark.conformance

CHECKS = [
    "token",
    "image endpoint",
    "GET /v2/info/import",
    "GET /v2/info/stores",
    "GET /v2/info/usage",
    "image create",
    "image stage",
    "image import",
    "image active",
    "image hash",
    "image delete",
]


async def own_cloud_run(env: dict[str, str], *args: str) -> tuple[int, str]:
    code, out, _ = await run_python_module(
        "tests.conformance.run", "--cloud", *args, env=env, timeout_s=120, merge_stderr=True
    )
    return code, out


def report_lines(output: str) -> dict[str, tuple[str, str]]:
    """check -> (ok | FAILED, detail) from the printed report (columns apart by 2+ spaces)."""
    found = {}
    for line in output.splitlines():
        columns = re.split(r"\s{2,}", line, maxsplit=2)
        if columns[0] in CHECKS and len(columns) == 3:
            found[columns[0]] = (columns[1], columns[2])
    return found


async def all_images(target: Target) -> list[dict[str, Any]]:
    """Every image the target lists (one page is plenty for these test clouds)."""
    async with (
        target.session() as http,
        http.get(target.glance("/v2/images"), params={"limit": "1000"}) as answer,
    ):
        assert answer.status == 200, await answer.text()
        return list((await answer.json(content_type=None))["images"])


async def test_own_cloud_mode_passes_and_leaves_the_cloud_as_it_was(target: Target) -> None:
    before = await all_images(target)

    code, output = await own_cloud_run(os_environment(target))

    assert code == 0, output
    lines = report_lines(output)
    assert list(lines) == CHECKS, output
    assert {status for status, _ in lines.values()} == {"ok"}, output
    assert lines["image endpoint"][1] == f"{target.image_url} (catalog, public)"
    assert lines["image hash"][1] == "size and sha512 equal the file's"
    assert lines["image delete"][1].endswith(" deleted")
    assert f"{len(CHECKS)} of {len(CHECKS)} checks passed" in output
    assert target.password not in output
    # Nothing else was touched: the same images, unchanged, and no test image left.
    assert await all_images(target) == before


async def test_own_cloud_mode_reads_a_clouds_yaml_entry(tmp_path: Path) -> None:
    async with sandbox_target() as sandbox:
        clouds = {
            "clouds": {
                "mine": {
                    "auth": {
                        "auth_url": sandbox.auth_url,
                        "username": sandbox.username,
                        "password": sandbox.password,
                        "project_name": sandbox.project_name,
                        "user_domain_name": sandbox.domain,
                        "project_domain_name": sandbox.domain,
                    },
                    "region_name": "RegionOne",
                }
            }
        }
        (tmp_path / "clouds.yaml").write_text(json.dumps(clouds))
        env = {k: v for k, v in os_environment(sandbox).items() if not k.startswith("OS_")}
        env["OS_CLIENT_CONFIG_FILE"] = str(tmp_path / "clouds.yaml")

        code, output = await own_cloud_run(env, "mine")

        assert code == 0, output
        assert "== own cloud (clouds.yaml:mine" in output
        assert f"{len(CHECKS)} of {len(CHECKS)} checks passed" in output


async def test_a_failed_import_is_reported_and_its_image_deleted(tmp_path: Path) -> None:
    config = SandboxConfig(import_latency_s=0.05, import_fail_names=(f"{NAME_PREFIX}*",))
    async with sandbox_target(config) as sandbox:
        checks = await check_cloud(cloud_of(sandbox), tmp_path, import_timeout_s=30.0)
        left = await all_images(sandbox)

    outcome = {check.name: check.ok for check in checks}
    assert outcome == {name: name != "image active" for name in CHECKS if name != "image hash"}
    failed = next(check for check in checks if not check.ok)
    assert "import failed" in failed.detail or "import task failed" in failed.detail
    assert left == []


async def test_refused_credentials_stop_before_anything_is_made(tmp_path: Path) -> None:
    async with sandbox_target() as sandbox:
        env = os_environment(sandbox) | {"OS_PASSWORD": "not-the-password-4711"}

        code, output = await own_cloud_run(env)
        left = await all_images(sandbox)

    assert code == 1, output
    assert report_lines(output)["token"][0] == "FAILED"
    assert "image create" not in report_lines(output)
    assert "not-the-password-4711" not in output
    assert left == []
