"""Staging a disk of a big OVA reads it straight from its byte range: memory stays flat."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from tests.benchmarks.throughput import ROOT, sink
from tests.fixtures.member_stage import write_sparse_ova
from worker.intake.ova import read_members

GIB = 1 << 30
MIB = 1 << 20


def _zeros_digest(name: str, size_bytes: int) -> str:
    digest = hashlib.new(name)
    block = bytes(16 * MIB)
    for _ in range(size_bytes // len(block)):
        digest.update(block)
    return digest.hexdigest()


def test_staging_a_member_of_a_2_gib_ova_keeps_memory_flat(tmp_path: Path) -> None:
    ova = tmp_path / "big.ova"
    member = "big-" + "long-name-" * 12 + "disk1.vmdk"  # a pax long name too
    write_sparse_ova(ova, member=member, size_bytes=2 * GIB)
    assert ova.stat().st_blocks * 512 < 16 * MIB  # a hole, not 2 GiB on disk
    with ova.open("rb") as file:
        assert [(m.name, m.size_bytes) for m in read_members(file)][-1] == (member, 2 * GIB)

    with sink() as url:
        answer = subprocess.run(
            [sys.executable, "-m", "tests.fixtures.member_stage", url, str(ova), member],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=100,
            check=True,
        )
    figures = json.loads(answer.stdout)

    assert figures["staged_bytes"] == 2 * GIB
    assert figures["digests"]["sha256"] == _zeros_digest("sha256", 2 * GIB)
    # The stage adds a few buffers of chunks, not anything in proportion to the 2 GiB.
    assert figures["rss_after"] - figures["rss_before"] < 64 * MIB
