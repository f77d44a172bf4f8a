"""The migrations build exactly the schema the dashboards read, once, even when raced."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import fields
from importlib import resources

import asyncpg
import pytest

from tests.fixtures.db import create_database, drop_database, dsn_with_database, unique_name
from worker.store import ResultRow, Store
from worker.store.controls import Controls
from worker.store.sql import QUERIES, load_migrations, load_queries, parse_queries
from worker.store.views import Views

EXPECTED_COLUMNS = {
    "schema_migrations": ["version", "name", "applied_at"],
    "jobs": [
        "id",
        "name",
        "submitted_at",
        "submitted_by",
        "manifest",
        "manifest_sha256",
        "disk_count",
        "total_bytes",
        "on_failure",
        "not_before",
        "cancelled_at",
        "window",
    ],
    "results": [
        "id",
        "job_id",
        "disk_index",
        "image_name",
        "source_path",
        "source_size_bytes",
        "spec",
        "phase",
        "glance_image_id",
        "attempts",
        "bytes_staged",
        "submitted_at",
        "claimed_at",
        "image_created_at",
        "staged_at",
        "import_requested_at",
        "finished_at",
        "updated_at",
        "glance_status",
        "glance_size",
        "glance_virtual_size",
        "glance_checksum",
        "glance_os_hash_algo",
        "glance_os_hash_value",
        "source_hash_algo",
        "source_hash_value",
        "verification",
        "error_code",
        "error_message",
        "worker_id",
        "lease_expires_at",
        "next_attempt_at",
        "import_request_id",
        "request_ids",
        "cleanup",
        "source_md5",
        "cleanup_settled_at",
        "glance_stores",
        "glance_failed_stores",
    ],
    "events": [
        "id",
        "job_id",
        "result_id",
        "at",
        "event",
        "phase_from",
        "phase_to",
        "worker_id",
        "error_code",
        "message",
        "detail",
        "step_key",
    ],
    "controls": ["id", "bandwidth_bytes_per_s", "updated_at", "updated_by"],
    "worker_streams": ["worker_id", "streams", "seen_at"],
    "worker_pauses": ["worker_id", "service", "reason", "since", "updated_at"],
}


@pytest.fixture
async def empty_database_url(pg_server_dsn: str) -> AsyncIterator[str]:
    """A database with no schema at all."""
    name = unique_name("vmdk_empty")
    await create_database(pg_server_dsn, name)
    yield dsn_with_database(pg_server_dsn, name)
    await drop_database(pg_server_dsn, name)


async def _columns(dsn: str) -> dict[str, list[str]]:
    conn = await asyncpg.connect(dsn)
    try:
        records = await conn.fetch(
            """SELECT table_name, column_name FROM information_schema.columns
               WHERE table_schema = 'public' ORDER BY table_name, ordinal_position"""
        )
    finally:
        await conn.close()
    tables: dict[str, list[str]] = {}
    for record in records:
        tables.setdefault(record["table_name"], []).append(record["column_name"])
    return tables


async def test_migrations_create_exactly_the_expected_tables_and_columns(
    database_url: str,
) -> None:
    assert await _columns(database_url) == EXPECTED_COLUMNS


async def test_result_row_has_one_attribute_per_results_column() -> None:
    assert [f.name for f in fields(ResultRow)] == EXPECTED_COLUMNS["results"]


async def test_every_table_and_column_is_commented(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        uncommented = await conn.fetch(
            """SELECT c.relname, a.attname
               FROM pg_class AS c JOIN pg_attribute AS a ON a.attrelid = c.oid
               WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r'
                 AND a.attnum > 0 AND NOT a.attisdropped
                 AND col_description(c.oid, a.attnum) IS NULL"""
        )
        tables_without = await conn.fetch(
            """SELECT relname FROM pg_class
               WHERE relnamespace = 'public'::regnamespace AND relkind = 'r'
                 AND obj_description(oid, 'pg_class') IS NULL"""
        )
    finally:
        await conn.close()
    assert [tuple(r) for r in uncommented] == []
    assert [r["relname"] for r in tables_without] == []


async def test_upgrade_on_a_migrated_database_applies_nothing(store: Store) -> None:
    assert await store.upgrade() == []
    assert await store.upgrade() == []


async def test_upgrade_applies_every_migration_once_and_records_it(
    empty_database_url: str,
) -> None:
    store = await Store.connect(empty_database_url)
    try:
        first = await store.upgrade()
        second = await store.upgrade()
    finally:
        await store.close()
    assert first == [m.version for m in load_migrations()]
    assert second == []
    conn = await asyncpg.connect(empty_database_url)
    try:
        recorded = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY 1")
    finally:
        await conn.close()
    assert [(r["version"], r["name"]) for r in recorded] == [
        (m.version, m.name) for m in load_migrations()
    ]


async def test_concurrent_upgrades_from_two_pools_apply_each_migration_once(
    empty_database_url: str,
) -> None:
    stores = [await Store.connect(empty_database_url) for _ in range(3)]
    try:
        results = await asyncio.gather(*(s.upgrade() for s in stores))
    finally:
        for s in stores:
            await s.close()
    all_versions = [m.version for m in load_migrations()]
    assert sorted(results) == [[], [], all_versions]
    assert await _columns(empty_database_url) == EXPECTED_COLUMNS


# Each file of named queries beside worker/store/sql.py, and the class that runs them.
QUERY_FILES: dict[str, type] = {"queries.sql": Store, "views.sql": Views, "controls.sql": Controls}


def test_every_file_of_named_queries_has_its_class() -> None:
    folder = resources.files("worker.store")
    shipped = {entry.name for entry in folder.iterdir() if entry.name.endswith(".sql")}
    assert shipped == set(QUERY_FILES)


@pytest.mark.parametrize("filename", sorted(set(QUERY_FILES) - {"queries.sql"}))
def test_every_named_query_belongs_to_a_method_of_the_same_name(filename: str) -> None:
    queries = load_queries(filename)
    assert queries
    assert set(queries) <= set(dir(QUERY_FILES[filename]))


def test_every_named_query_belongs_to_a_store_method_of_the_same_name() -> None:
    # A query is a method's, or a step of one (`<method>_<step>`), like the upgrade's.
    helpers = {
        name for name in QUERIES if name.startswith(("upgrade_", "retry_job_", "submit_job_"))
    }
    assert {name for name in QUERIES if name not in helpers} <= set(dir(Store))
    assert helpers <= {
        "upgrade_lock",
        "upgrade_schema_exists",
        "upgrade_applied_versions",
        "upgrade_record_version",
        "retry_job_failed_rows",
        "submit_job_lock",
        "submit_job_same_manifest",
    }


def test_query_file_parsing_rejects_duplicate_and_empty_blocks() -> None:
    assert parse_queries("-- header\n-- name: a\nSELECT 1;\n-- name: b\n-- doc\nSELECT 2;\n") == {
        "a": "SELECT 1;",
        "b": "-- doc\nSELECT 2;",
    }
    with pytest.raises(ValueError, match="twice"):
        parse_queries("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;\n")
    with pytest.raises(ValueError, match="empty"):
        parse_queries("-- name: a\n\n-- name: b\nSELECT 2;\n")


def test_a_step_block_is_its_columns_put_into_the_step_template() -> None:
    text = (
        "-- template: step\nUPDATE results SET {columns} WHERE id = $1;\n"
        "INSERT INTO events VALUES ({event_error});\n"
        "-- step: mark_a\n-- doc: $8 a\na = $8,\nb = 0\n"
        "-- step: fail_a\n-- event error: $8, $9\nerror_code = $8\n"
    )
    assert parse_queries(text) == {
        "mark_a": "UPDATE results SET a = $8,\n        b = 0 WHERE id = $1;\n"
        "INSERT INTO events VALUES (NULL, NULL);",
        "fail_a": "UPDATE results SET error_code = $8 WHERE id = $1;\n"
        "INSERT INTO events VALUES ($8, $9);",
    }
    with pytest.raises(ValueError, match="template"):
        parse_queries("-- step: mark_a\na = 1\n")
    with pytest.raises(ValueError, match="twice"):
        parse_queries(
            "-- name: mark_a\nSELECT 1;\n-- template: step\n{columns}\n-- step: mark_a\na = 1\n"
        )


def test_a_step_block_takes_in_shared_columns_renumbered_from_the_place_it_names() -> None:
    text = (
        "-- template: step\nUPDATE results SET {columns} WHERE id = $1;\n"
        "-- template: pair\n-- doc: $1 a, $2 b\na = $1,\nb = coalesce($2, r.b)\n"
        "-- step: mark_a\nc = $8,\n{pair $9}\n"
        "-- step: mark_b\n{pair $12}\n"
    )
    assert parse_queries(text) == {
        "mark_a": "UPDATE results SET c = $8,\n        a = $9,\n        b = coalesce($10, r.b)"
        " WHERE id = $1;",
        "mark_b": "UPDATE results SET a = $12,\n        b = coalesce($13, r.b) WHERE id = $1;",
    }
    with pytest.raises(ValueError, match="'mark_a' takes in 'pairs', which is no template"):
        parse_queries("-- template: step\nSET {columns}\n-- step: mark_a\n{pairs $8}\n")
