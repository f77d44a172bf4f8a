"""The harness itself: the real stack's controls for outage scenarios, each shown to work
against the real thing (stop and start Keystone and Glance, Glance answering 503, a rotated
password, what is left), and the run summary's table of scenarios by target."""

from __future__ import annotations

import urllib.error
import urllib.request
import uuid
from typing import Any, Literal

import pytest

from tests.conformance import conftest
from tests.conformance.conftest import Target
from tests.conformance.realstack import HTTP_TIMEOUT_S, RealStack, _http_status, _request

pytestmark = pytest.mark.conformance
REAL = pytest.mark.parametrize("target", ["real-glance"], indirect=True)


def token_status(stack: RealStack, username: str, password: str) -> int | None:
    """The status Keystone answers a project-scoped password token request with (None: down)."""
    user = {"name": username, "domain": {"id": "default"}, "password": password}
    body = {
        "auth": {
            "identity": {"methods": ["password"], "password": {"user": user}},
            "scope": {"project": {"name": stack.project_name, "domain": {"id": "default"}}},
        }
    }
    try:
        with urllib.request.urlopen(
            _request("POST", f"{stack.auth_url}/auth/tokens", body), timeout=HTTP_TIMEOUT_S
        ) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None


def glance_call(stack: RealStack, method: str, path: str, body: Any = None) -> int:
    request = _request(method, f"{stack.image_url}{path}", body, stack.issue_token())
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@REAL
def test_glance_stops_and_starts_with_all_its_workers(
    target: Target, real_stack: RealStack
) -> None:
    token = real_stack.issue_token()
    assert _http_status(f"{real_stack.image_url}/v2/images", token=token) == 200

    real_stack.stop_glance()
    down = _http_status(f"{real_stack.image_url}/v2/images", token=token, timeout_s=5.0)
    real_stack.start_glance()

    assert down is None
    assert _http_status(f"{real_stack.image_url}/v2/images", token=token) == 200


@REAL
def test_keystone_stops_and_starts(target: Target, real_stack: RealStack) -> None:
    assert token_status(real_stack, real_stack.username, real_stack.password) == 201

    real_stack.stop_keystone()
    down = token_status(real_stack, real_stack.username, real_stack.password)
    real_stack.start_keystone()

    assert down is None
    assert token_status(real_stack, real_stack.username, real_stack.password) == 201


@REAL
def test_glance_answers_503_to_everything_while_unavailable(
    target: Target, real_stack: RealStack
) -> None:
    token = real_stack.issue_token()
    with real_stack.glance_unavailable():
        during = {
            path: _http_status(f"{real_stack.image_url}{path}", token=token)
            for path in ("/", "/v2/images", "/v2/info/import")
        }
    after = _http_status(f"{real_stack.image_url}/v2/images", token=token)

    assert during == {"/": 503, "/v2/images": 503, "/v2/info/import": 503}
    assert after == 200


@REAL
def test_a_rotated_password_replaces_the_old_one(target: Target, real_stack: RealStack) -> None:
    name = f"conformance-user-{uuid.uuid4().hex[:8]}"
    real_stack.add_user(name, "first-password")
    assert token_status(real_stack, name, "first-password") == 201

    real_stack.set_password(name, "second-password")

    assert token_status(real_stack, name, "first-password") == 401
    assert token_status(real_stack, name, "second-password") == 201


@REAL
def test_leftovers_lists_images_and_staged_files(target: Target, real_stack: RealStack) -> None:
    prefix = f"conformance-leftover-{uuid.uuid4().hex[:8]}"
    image_id = str(uuid.uuid4())
    image = {"id": image_id, "name": prefix, "disk_format": "raw", "container_format": "bare"}
    assert glance_call(real_stack, "POST", "/v2/images", image) == 201
    request = _request("PUT", f"{real_stack.image_url}/v2/images/{image_id}/stage")
    request.add_header("X-Auth-Token", real_stack.issue_token())
    request.add_header("Content-Type", "application/octet-stream")
    request.data = b"\0" * 4096
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as answer:
        assert answer.status == 204

    staged = real_stack.leftovers(prefix)
    assert glance_call(real_stack, "DELETE", f"/v2/images/{image_id}") == 204
    gone = real_stack.leftovers(prefix)

    assert staged.images == [{"id": image_id, "name": prefix, "status": "uploading"}]
    assert image_id in staged.staged_files
    assert (gone.images, image_id in gone.staged_files) == ([], False)


def logreport(
    nodeid: str,
    outcome: Literal["passed", "failed", "skipped"],
    when: Literal["setup", "call", "teardown"] = "call",
) -> None:
    path, _, name = nodeid.partition("::")
    conftest.pytest_runtest_logreport(
        pytest.TestReport(nodeid, (path, 0, name), {}, outcome, None, when)
    )


def test_the_scenario_summary_finds_the_target_among_the_parameters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A table of its own; this test's own outcome lands there too and goes with it: it checks
    # the harness, it is no scenario of either target.
    monkeypatch.setattr(conftest, "SCENARIO_OUTCOMES", {})
    outages = "tests/conformance/test_outages.py::test_a_90_s_outage_costs_no_image"
    for outage in ("keystone-down", "glance-down", "both-down", "glance-503"):
        logreport(f"{outages}[{outage}-real-glance]", "passed")
    rewrite = "tests/conformance/test_production.py::test_data_rewritten"
    logreport(f"{rewrite}[sandbox]", "passed")
    logreport(f"{rewrite}[real-glance]", "failed")
    logreport("tests/conformance/test_production.py::test_batch[real-glance]", "skipped", "setup")
    logreport("tests/conformance/test_x.py::test_first[real-glance-slow]", "passed")
    logreport("tests/conformance/test_own_cloud.py::test_own[quota-5]", "passed")
    logreport("tests/conformance/test_contract.py::test_case[sandbox-token]", "passed")

    rows = [line.split() for line in conftest.scenario_lines()]

    assert rows == [
        ["scenario", "sandbox", "real-glance"],
        ["test_outages:", "a_90_s_outage_costs_no_image[keystone-down]", "-", "passed"],
        ["test_outages:", "a_90_s_outage_costs_no_image[glance-down]", "-", "passed"],
        ["test_outages:", "a_90_s_outage_costs_no_image[both-down]", "-", "passed"],
        ["test_outages:", "a_90_s_outage_costs_no_image[glance-503]", "-", "passed"],
        ["test_production:", "data_rewritten", "passed", "failed"],
        ["test_production:", "batch", "-", "skipped"],
        ["test_x:", "first[slow]", "-", "passed"],
        ["test_own_cloud:", "own[quota-5]", "passed", "-"],
    ]
