"""Tests share helpers through tests/fixtures/ (and tests/conformance/helpers.py), never by
importing another test module."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _imported_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
    return found


def test_no_test_module_imports_another() -> None:
    modules = sorted(TESTS.rglob("test_*.py"))
    assert len(modules) > 50  # the rule is checked where the tests are
    imports = [
        f"{path.relative_to(TESTS)}: {module}"
        for path in modules
        for module in _imported_modules(path)
        if module.split(".")[-1].startswith("test_")
    ]
    assert imports == []
