"""Every event name comes from worker/core/events.py, and the README documents each one."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from worker.core.events import Event
from worker.core.model import Phase

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "worker"
# What an event name looks like: `area.what_happened`, in one of the areas the enum uses.
AREAS = sorted({event.value.split(".")[0] for event in Event})
NAME = re.compile(rf"^(?:{'|'.join(AREAS)})\.[a-z_]+$")
# Strings of that shape that are no event: file and package names.
# Package names and file names that look like `area.what` names.
NOT_EVENTS = frozenset({"dashboard.html", "worker.store", "worker.cli", "worker.intake"})
LOG_METHODS = frozenset({"debug", "info", "warning", "error", "exception", "critical"})


def _product_modules() -> list[Path]:
    """The worker's modules; the sandbox cloud's lines are its own."""
    return [
        path
        for path in sorted(WORKER.rglob("*.py"))
        if "sandbox" not in path.relative_to(WORKER).parts and path.name != "events.py"
    ]


def test_no_module_spells_an_event_name_itself() -> None:
    spelled = [
        f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}"
        for path in _product_modules()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and NAME.match(node.value)
        and node.value not in NOT_EVENTS
    ]
    assert spelled == [], "use worker.core.events.Event instead"


def test_every_log_line_is_named_by_the_enum() -> None:
    """A log call names its line with an `Event`, never with a string of its own (mypy checks
    that the variables passed instead, such as `step.event`, are typed `Event`)."""
    unnamed = []
    for path in _product_modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "log"
            ):
                continue
            method = node.func.attr
            if method in LOG_METHODS:
                name = node.args[0] if node.args else None
            elif method == "log":
                name = node.args[1] if len(node.args) > 1 else None
            else:
                continue
            if name is None or isinstance(name, ast.Constant | ast.JoinedStr | ast.BinOp):
                unnamed.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert unnamed == []


def test_the_events_the_sql_writes_are_on_the_list() -> None:
    store = WORKER / "store"
    texts = [store / "queries.sql", *sorted((store / "migrations").glob("*.sql"))]
    written = {
        found
        for path in texts
        for found in re.findall(r"'([a-z]+\.[a-z_]+)'", path.read_text(encoding="utf-8"))
        if NAME.match(found)
    }
    assert written, "the queries write event names: the pattern must find them"
    assert written - {event.value for event in Event} == set()


def test_every_event_name_is_documented_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `([a-z]+\.[a-z_]+)` \|", readme, flags=re.M))
    assert {event.value for event in Event} - documented == set()
    assert documented - {event.value for event in Event} == set()


@pytest.mark.parametrize("phase", list(Phase))
def test_every_phase_has_its_event(phase: Phase) -> None:
    assert Event.entered(phase) == f"image.{phase}"
