"""Shared fixtures live in tests/fixtures/; each module there owns one kind of resource."""

pytest_plugins = [
    "tests.fixtures.db",
    "tests.fixtures.cloud",
    "tests.fixtures.cli",
]
