"""Every byte that moved is verified: damaged data fails with both hashes, rewrites are marked."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.fixtures.batch import migrate, rows_of, sha512_of, submit
from worker.sandbox import Sandbox, SandboxConfig


@pytest.mark.parametrize(
    "sandbox_config",
    [SandboxConfig(corrupt_names=("damaged",), truncate_stage_names=("short",))],
    indirect=True,
)
async def test_damaged_data_fails_with_its_code_and_both_hashes(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    job_id, paths = await submit(database_url, tmp_path, ["intact", "damaged", "short"])

    summary = await migrate(database_url, sandbox)

    rows = await rows_of(database_url, job_id)
    assert summary.by_phase == {"done": 1, "failed": 2}
    assert rows["intact"].verification == "verified"

    damaged = rows["damaged"]
    assert damaged.phase == "failed"
    assert damaged.error_code == "checksum_mismatch"
    assert damaged.verification == "mismatch"
    assert damaged.source_hash_value == sha512_of(paths["damaged"])
    assert damaged.glance_os_hash_value is not None
    assert damaged.glance_os_hash_value != damaged.source_hash_value
    assert damaged.glance_size == damaged.source_size_bytes  # same size: only the hash tells

    short = rows["short"]
    assert short.phase == "failed"
    assert short.error_code == "stage_size_mismatch"
    assert str(short.source_size_bytes - 512) in (short.error_message or "")
    # Neither bad image is left in the cloud; nothing was imported from the short stage.
    assert [image["name"] for image in sandbox.images()] == ["intact"]


@pytest.mark.parametrize("sandbox_config", [SandboxConfig(rewrite_virtio=True)], indirect=True)
async def test_an_image_the_cloud_rewrites_is_active_and_marked_transformed(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    job_id, paths = await submit(database_url, tmp_path, ["guest"], es_virtio_enabled="yes")

    summary = await migrate(database_url, sandbox)

    row = (await rows_of(database_url, job_id))["guest"]
    assert summary.by_phase == {"done": 1}
    assert row.verification == "transformed"
    assert row.glance_status == "active"
    assert row.source_hash_value == sha512_of(paths["guest"])
    assert row.glance_os_hash_value not in (None, row.source_hash_value)


async def test_md5_is_hashed_recorded_and_compared_when_asked_for(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    job_id, paths = await submit(database_url, tmp_path, ["one", "two"])

    summary = await migrate(database_url, sandbox, verify_md5=True)

    assert summary.by_phase == {"done": 2}
    for name, row in (await rows_of(database_url, job_id)).items():
        md5 = hashlib.md5(paths[name].read_bytes()).hexdigest()
        assert row.source_md5 == row.glance_checksum == md5
        assert row.verification == "verified"


@pytest.mark.parametrize("sandbox_config", [SandboxConfig(corrupt_names=("bad",))], indirect=True)
async def test_without_md5_nothing_md5_is_recorded(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    job_id, _ = await submit(database_url, tmp_path, ["plain", "bad"])

    await migrate(database_url, sandbox)

    rows = await rows_of(database_url, job_id)
    assert rows["plain"].source_md5 is None
    assert rows["bad"].error_code == "checksum_mismatch"
    assert "sha512" in (rows["bad"].error_message or "")
