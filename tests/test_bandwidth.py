"""The bandwidth cap from the database: held within 5 % as the cloud sees it, changed in 2 s."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from structlog.testing import capture_logs

from tests.benchmarks.bandwidth import measure_cap
from tests.fixtures.db import fetch_rows
from tests.fixtures.dblink import DatabaseLink
from worker.cli.commands import cli
from worker.clients.throttle import Throttle
from worker.core.events import Event
from worker.run.bandwidth import (
    BandwidthFollower,
    format_rate,
    get_bandwidth_limit,
    parse_rate,
    set_bandwidth_limit,
    worker_share,
)
from worker.sandbox import Sandbox

MIB = 1 << 20


async def test_the_cap_holds_and_a_lower_cap_applies_within_two_seconds(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    figures = await measure_cap(database_url, sandbox, tmp_path)

    # Measured from the bytes the cloud received, not from the client's own count.
    assert abs(figures.first_error) <= 0.05, figures
    # From 2 s after the change, the new cap holds (a slower change would drag the old rate in).
    assert abs(figures.second_error) <= 0.05, figures


async def test_the_command_sets_shows_and_lifts_the_cap(database_url: str) -> None:
    def limit(*options: str) -> Result:
        # In a thread: the command runs its own event loop.
        return CliRunner().invoke(cli, ["limit", "--database-url", database_url, *options])

    set_result = await asyncio.to_thread(limit, "--bandwidth", "50MiB/s")
    assert set_result.exit_code == 0, set_result.output
    assert "50.0 MiB/s" in set_result.output
    assert await get_bandwidth_limit(database_url) == 50 * MIB

    shown = await asyncio.to_thread(limit)
    assert "50.0 MiB/s" in shown.output

    lifted = await asyncio.to_thread(limit, "--bandwidth", "off")
    assert lifted.exit_code == 0
    assert "off" in lifted.output
    assert await get_bandwidth_limit(database_url) is None

    refused = await asyncio.to_thread(limit, "--bandwidth", "fast")
    assert refused.exit_code == 2
    assert await get_bandwidth_limit(database_url) is None


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("50MiB/s", 50 * MIB),
        ("200 MB/s", 200_000_000),
        ("1.5GiB", 1536 * MIB),
        ("1000000", 1_000_000),
        ("64 KiB / s", 64 << 10),
        ("off", None),
    ],
)
def test_rates_are_read_in_the_units_operators_write(text: str, rate: int | None) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["fast", "0MiB/s", "-5MB/s", "10 parsecs/s", ""])
def test_what_is_not_a_rate_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="rate"):
        parse_rate(text)


def test_rates_print_in_binary_units() -> None:
    assert format_rate(50 * MIB) == "50.0 MiB/s"
    assert format_rate(None) == "off"


def test_workers_share_the_cap_by_the_uploads_they_send() -> None:
    assert worker_share(None, mine=3, others=5) is None
    assert worker_share(100 * MIB, mine=2, others=0) == 100 * MIB
    assert worker_share(100 * MIB, mine=1, others=3) == 25 * MIB
    # An idle worker holds a part ready for the upload it may start before its next report.
    assert worker_share(100 * MIB, mine=0, others=4) == 50 * MIB
    assert worker_share(100 * MIB, mine=0, others=0) == 100 * MIB


async def test_a_failed_report_keeps_the_last_rate_and_the_next_one_follows_again(
    database_url: str,
) -> None:
    link = DatabaseLink(database_url)
    await link.up()
    follower = BandwidthFollower(link.dsn, "worker-a", Throttle())
    try:
        await set_bandwidth_limit(database_url, 40 * MIB)
        await follower.follow_once()
        assert follower.throttle.rate_bytes_per_s == 40 * MIB

        await link.down()
        await set_bandwidth_limit(database_url, 20 * MIB)
        with capture_logs() as logs:
            await follower.follow_once()
        # The database is out of reach: the cap stays, it is not lifted.
        assert follower.throttle.rate_bytes_per_s == 40 * MIB
        assert [line["event"] for line in logs] == [Event.WORKER_CONTROLS_UNREAD]

        await link.up()
        await follower.follow_once()
        assert follower.throttle.rate_bytes_per_s == 20 * MIB
        reported = await fetch_rows(database_url, "SELECT worker_id FROM worker_streams")
        assert [row["worker_id"] for row in reported] == ["worker-a"]
    finally:
        await follower.stop()
        await link.down()
    # A follower that stops takes itself out of the split.
    assert await fetch_rows(database_url, "SELECT worker_id FROM worker_streams") == []
