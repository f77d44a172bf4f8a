"""The rate of bytes moved follows the real one within seconds, and the ETA comes from it."""

from __future__ import annotations

import random
from uuid import uuid4

import pytest

from worker.observe.rates import (
    RATE_WINDOW_S,
    ByteRate,
    JobRates,
    eta_s,
    format_bytes,
    format_eta,
    format_rate,
)

MIB = 1 << 20
GIB = 1 << 30


def test_the_rate_follows_a_step_change_within_three_seconds_of_sample_time() -> None:
    meter = ByteRate()
    moved, at = 0, 0.0
    for _ in range(20):  # 20 s at 40 MiB/s, a sample each second
        at += 1.0
        moved += 40 * MIB
        meter.add(at, moved)
    assert meter.rate_bytes_per_s == pytest.approx(40 * MIB)

    step_at = at  # the cap is halved here
    rates = []
    while at < step_at + 5:
        at += 1.0
        moved += 20 * MIB
        meter.add(at, moved)
        rates.append((at - step_at, meter.rate_bytes_per_s))

    # On the way down it lies between the two rates, and from 3 s after the step on it is
    # the new one.
    assert all(20 * MIB <= rate <= 40 * MIB for _, rate in rates if rate is not None)
    assert all(rate == pytest.approx(20 * MIB) for after, rate in rates if after >= 3)
    assert RATE_WINDOW_S <= 3


def test_the_rate_follows_within_three_seconds_when_samples_come_unevenly() -> None:
    step_at = 30.0

    def moved(at: float) -> int:  # 40 MiB/s until the step, 20 MiB/s after it
        return int(40 * MIB * min(at, step_at) + 20 * MIB * max(0.0, at - step_at))

    jitter = random.Random(7)
    meter = ByteRate()
    at = 0.0
    meter.add(at, moved(at))
    while at < 40:
        at += jitter.uniform(0.7, 1.3)  # a busy reader samples a little late or early
        meter.add(at, moved(at))
        rate = meter.rate_bytes_per_s
        assert rate is not None
        if at >= step_at + 3:
            assert rate == pytest.approx(20 * MIB, rel=0.001), at
        elif at <= step_at:
            assert rate == pytest.approx(40 * MIB, rel=0.001), at
        else:
            assert 20 * MIB <= rate <= 40 * MIB


def test_before_two_samples_there_is_no_rate_and_a_shrinking_total_is_no_progress() -> None:
    meter = ByteRate()
    assert meter.rate_bytes_per_s is None
    meter.add(0.0, 100 * MIB)
    assert meter.rate_bytes_per_s is None
    meter.add(1.0, 130 * MIB)
    assert meter.rate_bytes_per_s == pytest.approx(30 * MIB)
    # An image failed and took 50 MiB of staged bytes along; the others moved on.
    meter.add(2.0, 80 * MIB)
    meter.add(3.0, 110 * MIB)
    assert meter.rate_bytes_per_s == pytest.approx(60 * MIB / 3)
    # Samples further apart than the window: the rate spans the last two.
    meter.add(13.0, 210 * MIB)
    assert meter.rate_bytes_per_s == pytest.approx(10 * MIB)


def test_the_eta_of_a_run_of_large_disks_is_within_a_fifth_of_the_truth() -> None:
    """Eight 100 GiB disks moving at 30 MiB/s, sampled about once a second (unevenly)."""
    disks = [100 * GIB] * 8
    rate = 30 * MIB
    total = sum(disks)
    job_id = uuid4()
    rates = JobRates()  # fed by hand, as its sample() feeds it
    jitter = random.Random(11)
    at = 0.0
    checked = 0
    while True:
        at += jitter.uniform(0.8, 1.2)
        moved = min(total, int(rate * at))
        rates.observe([{"job_id": job_id, "bytes_moved": moved}], at)
        left = total - moved
        if left == 0:
            break
        truth_s = left / rate
        estimate = rates.eta_s(job_id, left)
        if at >= 2:
            assert estimate is not None
            assert abs(estimate - truth_s) <= 0.2 * truth_s, (at, estimate, truth_s)
            checked += 1
    assert checked > 1000
    assert rates.eta_s(job_id, 0) == 0.0


def test_with_nothing_moving_there_is_no_eta() -> None:
    assert eta_s(10 * GIB, None) is None
    assert eta_s(10 * GIB, 0.0) is None
    assert eta_s(0, None) == 0.0
    assert eta_s(30 * MIB * 60, 30 * MIB) == pytest.approx(60)


def test_units_are_iec() -> None:
    assert format_rate(30 * MIB) == "30.0 MiB/s"
    assert format_rate(1.5 * GIB) == "1.5 GiB/s"
    assert format_rate(512) == "512 B/s"
    assert format_rate(None) == "–"
    assert format_bytes(2.5 * (1 << 40)) == "2.5 TiB"
    assert format_bytes(64 << 10) == "64.0 KiB"
    assert format_eta(30) == "30 s"
    assert format_eta(13 * 60 + 5) == "13 min 5 s"
    assert format_eta(None) == "–"
