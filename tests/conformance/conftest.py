"""The `target` fixture: each conformance test runs on the sandbox and on a real Glance."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conformance import report
from tests.conformance.realstack import GlanceProfile, RealStack
from worker.sandbox import Sandbox, SandboxConfig

TARGETS = ["sandbox", "real-glance"]
REAL_ENV = {
    "auth_url": "REAL_GLANCE_AUTH_URL",
    "image_url": "REAL_GLANCE_IMAGE_URL",
    "username": "REAL_GLANCE_USERNAME",
    "password": "REAL_GLANCE_PASSWORD",
    "project_name": "REAL_GLANCE_PROJECT_NAME",
    "domain": "REAL_GLANCE_DOMAIN",
}
HTTP_TIMEOUT_S = 30.0


@dataclass
class Target:
    """Where one cloud answers, its credentials, and raw HTTP sessions to talk to it."""

    name: str
    auth_url: str
    image_url: str
    username: str
    password: str
    project_name: str
    domain: str
    extra: dict[str, str] = field(default_factory=dict)
    _token: str = field(default="", repr=False)
    _token_renew_at: float = field(default=0.0, repr=False)

    @property
    def credentials(self) -> dict[str, str]:
        return {
            "username": self.username,
            "password": self.password,
            "project_name": self.project_name,
            "domain": self.domain,
        }

    def sqlite_lock_errors(self) -> int:
        """How often the real Glance logged SQLite's "database is locked" so far (0 elsewhere).

        Glance's import thread writes task progress without its own lock retry; on the test
        bed's SQLite that write sometimes fails and the import with it. That is the test bed,
        not Glance's contract: a case that saw the count grow may be run again."""
        base_dir = self.extra.get("REAL_GLANCE_BASE_DIR")
        if not base_dir:
            return 0
        log = Path(base_dir) / "log" / "glance-api.log"
        try:
            return log.read_text(errors="replace").count("database is locked")
        except OSError:
            return 0

    def glance(self, path: str) -> str:
        """The absolute URL of a Glance path such as `/v2/images`."""
        return f"{self.image_url}{path}"

    def token_request(self, password: str | None = None) -> dict[str, Any]:
        """The Keystone v3 password-method body for this target's user and project."""
        domain = {"name": self.domain}
        user = {"name": self.username, "domain": domain, "password": password or self.password}
        return {
            "auth": {
                "identity": {"methods": ["password"], "password": {"user": user}},
                "scope": {"project": {"name": self.project_name, "domain": domain}},
            }
        }

    async def token(self, http: aiohttp.ClientSession, *, fresh: bool = False) -> str:
        """A project-scoped token (the X-Subject-Token header of a 201), reused until half of
        its lifetime is gone unless `fresh` (issuing one costs Keystone about half a second)."""
        if self._token and not fresh and time.monotonic() < self._token_renew_at:
            return self._token
        url = f"{self.auth_url}/auth/tokens"
        async with http.post(url, json=self.token_request()) as answer:
            body = await answer.json(content_type=None)
            assert answer.status == 201, f"{self.name}: token request gave {answer.status}: {body}"
            token = answer.headers["X-Subject-Token"]
        expires = datetime.fromisoformat(body["token"]["expires_at"].replace("Z", "+00:00"))
        lifetime_s = (expires - datetime.now(UTC)).total_seconds()
        self._token, self._token_renew_at = token, time.monotonic() + lifetime_s / 2
        return token

    @asynccontextmanager
    async def session(
        self, *, authenticated: bool = True, fresh_token: bool = False
    ) -> AsyncIterator[aiohttp.ClientSession]:
        """A raw aiohttp session; when `authenticated`, every request carries X-Auth-Token."""
        timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
        headers: dict[str, str] = {}
        if authenticated:
            async with aiohttp.ClientSession(timeout=timeout) as plain:
                headers["X-Auth-Token"] = await self.token(plain, fresh=fresh_token)
        async with aiohttp.ClientSession(timeout=timeout, headers=headers) as http:
            yield http


def real_target() -> Target:
    """The real stack `make conformance` started, from the REAL_GLANCE_* environment."""
    missing = [var for var in REAL_ENV.values() if not os.environ.get(var)]
    if missing:
        pytest.fail(
            f"no real Glance to test against ({', '.join(missing)} unset): "
            "run `make conformance`, which starts a real Keystone + Glance and sets them",
            pytrace=False,
        )
    values: dict[str, Any] = {attr: os.environ[var] for attr, var in REAL_ENV.items()}
    extra = {
        key: value
        for key, value in os.environ.items()
        if key.startswith("REAL_GLANCE_") and key not in REAL_ENV.values()
    }
    return Target(name="real-glance", extra=extra, **values)


@asynccontextmanager
async def sandbox_target(config: SandboxConfig | None = None) -> AsyncIterator[Target]:
    """A sandbox cloud on a free loopback port, described as a Target."""
    async with Sandbox(config or SandboxConfig()).serve(host="127.0.0.1", port=0) as sb:
        yield Target(
            name="sandbox",
            auth_url=sb.auth_url,
            image_url=sb.image_url,
            username=sb.username,
            password=sb.password,
            project_name=sb.project_name,
            domain=sb.domain_name,
        )


@pytest.fixture(scope="module", params=TARGETS)
async def target(request: pytest.FixtureRequest) -> AsyncIterator[Target]:
    """The cloud under test: a fresh sandbox per module, or the running real Glance."""
    if request.param == "real-glance":
        yield real_target()
        return
    async with sandbox_target() as sb:
        yield sb


@pytest.fixture
def real_stack() -> Iterator[RealStack]:
    """The real stack run.py started, to control from a scenario: stop and start Keystone or
    Glance, make Glance answer 503, rotate a password, switch Glance's profile, list what is
    left (see RealStack). Whatever the scenario did, the stack is whole again afterwards:
    both servers up, no 503s, the default profile."""
    base_dir = os.environ.get("REAL_GLANCE_BASE_DIR")
    if not base_dir:
        pytest.fail("no real stack (REAL_GLANCE_BASE_DIR unset): run `make conformance`")
    stack = RealStack.attach(Path(base_dir))
    yield stack
    stack.set_glance_unavailable(False)
    stack.start_keystone()
    if stack.profile != GlanceProfile():
        stack.restart_glance(None)
    stack.start_glance()


def mariadb_only() -> None:
    """Skip, saying why, when the real Glance runs on the SQLite fallback: its concurrent
    imports get lost, so a concurrent scenario there proves nothing (and claims nothing)."""
    database = os.environ.get("REAL_GLANCE_DATABASE", "")
    if database != "mariadb":
        pytest.skip(f"Glance runs on {database or 'no'} database, not MariaDB: not claimed")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test in this folder is a conformance test (deselected from the default run)."""
    for item in items:
        if "tests/conformance/" in str(item.path).replace(os.sep, "/"):
            item.add_marker(pytest.mark.conformance)


# scenario -> target -> outcome, for every test here but the contract table's.
SCENARIO_OUTCOMES: dict[str, dict[str, str]] = {}


def scenario_and_target(nodeid: str) -> tuple[str, str]:
    """A test id's scenario (module, test, and every parameter but the target) and the target
    it ran on: the parameter that is one of TARGETS, or a sandbox when none is.

    pytest joins parameter ids with "-", and "real-glance" has one of its own, so the target
    is found as a whole "-"-delimited run: `test_outages.py::test_x[keystone-down-real-glance]`
    is the scenario `test_outages: x[keystone-down]` on real-glance."""
    path, _, test = nodeid.partition("::")
    name, _, params = test.removeprefix("test_").partition("[")
    params = params.removesuffix("]")
    scenario = f"{Path(path).stem}: {name}"
    padded = f"-{params}-"
    for target in TARGETS:
        if f"-{target}-" in padded:
            others = padded.replace(f"-{target}-", "-", 1).strip("-")
            return (f"{scenario}[{others}]" if others else scenario), target
    return (f"{scenario}[{params}]" if params else scenario), "sandbox"


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Remember how each scenario ended on each target (unparametrized ones use a sandbox)."""
    path = report.nodeid.partition("::")[0]
    if not path.startswith("tests/conformance/") or path.endswith("test_contract.py"):
        return
    if report.when != "call" and report.outcome == "passed":
        return
    scenario, target = scenario_and_target(report.nodeid)
    outcomes = SCENARIO_OUTCOMES.setdefault(scenario, {})
    if outcomes.get(target) in (None, "passed"):
        outcomes[target] = "error" if report.when == "teardown" else report.outcome


def scenario_lines() -> list[str]:
    """One row per scenario: its outcome on each target, `-` where it did not run."""
    if not SCENARIO_OUTCOMES:
        return []
    width = max(len(name) for name in SCENARIO_OUTCOMES)
    lines = [f"{'scenario':<{width}}  " + "  ".join(f"{t:<11}" for t in TARGETS)]
    for name, outcomes in SCENARIO_OUTCOMES.items():
        cells = "  ".join(f"{outcomes.get(t, '-'):<11}" for t in TARGETS)
        lines.append(f"{name:<{width}}  {cells}")
    return lines


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the sandbox vs real Glance comparison table the contract tests recorded, and
    which scenario ran on which target."""
    database = os.environ.get("REAL_GLANCE_DATABASE_DESCRIPTION")
    if database and SCENARIO_OUTCOMES:
        terminalreporter.section("real Glance")
        terminalreporter.write_line(f"Glance 33.0.0 database: {database}")
    for title, lines in (
        ("conformance: sandbox vs real Glance", report.summary_lines()),
        ("conformance scenarios by target", scenario_lines()),
    ):
        if lines:
            terminalreporter.section(title)
            for line in lines:
                terminalreporter.write_line(line)
