"""The bandwidth token bucket, on a clock the tests move: rates, bursts, fairness, changes."""

from __future__ import annotations

import asyncio

import pytest

from worker.clients.throttle import Throttle

MIB = 1 << 20


class FakeClock:
    """Time that passes only when someone sleeps."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s

    async def sleep(self, delay_s: float) -> None:
        self.now_s += delay_s
        await asyncio.sleep(0)


def throttle_on(clock: FakeClock, rate_bytes_per_s: float | None, **options: float) -> Throttle:
    return Throttle(rate_bytes_per_s, clock=clock, sleep=clock.sleep, **options)


async def send(throttle: Throttle, total_bytes: int, chunk_bytes: int) -> None:
    for _ in range(total_bytes // chunk_bytes):
        await throttle.acquire(chunk_bytes)


async def test_no_limit_never_waits() -> None:
    clock = FakeClock()
    throttle = throttle_on(clock, None)

    await send(throttle, 100 * MIB, MIB)

    assert clock.now_s == 1000.0


async def test_a_stream_takes_size_over_rate() -> None:
    clock = FakeClock()
    throttle = throttle_on(clock, 10 * MIB)

    await send(throttle, 50 * MIB, 256 << 10)

    # 5 s, less the small burst the bucket starts with.
    assert clock.now_s - 1000.0 == pytest.approx(5.0, abs=0.06)


async def test_streams_sharing_it_get_the_rate_together_and_equal_shares() -> None:
    clock = FakeClock()
    throttle = throttle_on(clock, 8 * MIB)
    finished_at: list[float] = []

    async def stream() -> None:
        await send(throttle, 16 * MIB, 64 << 10)
        finished_at.append(clock.now_s - 1000.0)

    await asyncio.gather(*(stream() for _ in range(4)))

    # 64 MiB at 8 MiB/s: 8 s in all, and taking turns, every stream ends near the end.
    assert max(finished_at) == pytest.approx(8.0, abs=0.1)
    assert min(finished_at) > 7.5


async def test_idle_time_builds_only_a_small_burst() -> None:
    clock = FakeClock()
    throttle = throttle_on(clock, 10 * MIB, burst_s=0.1)
    clock.now_s += 3600.0  # an hour idle

    await send(throttle, 20 * MIB, MIB)

    assert clock.now_s - 1000.0 - 3600.0 == pytest.approx(1.9, abs=0.11)


async def test_raising_the_rate_applies_to_a_waiter_at_its_next_check() -> None:
    clock = FakeClock()
    throttle = throttle_on(clock, 1 * MIB)
    waiter = asyncio.ensure_future(throttle.acquire(10 * MIB))  # 10 s at the first rate
    await asyncio.sleep(0)
    assert not waiter.done()
    changed_at_s = clock.now_s

    throttle.set_rate(100 * MIB)
    await waiter

    # Well under the 10 s the first rate implied: the waiter re-read the rate within 0.1 s.
    assert clock.now_s - changed_at_s <= 0.2


async def test_removing_the_limit_releases_waiters() -> None:
    clock = FakeClock()
    throttle = throttle_on(clock, 1.0)
    waiter = asyncio.ensure_future(throttle.acquire(MIB))
    await asyncio.sleep(0)

    throttle.set_rate(None)
    await waiter

    assert clock.now_s - 1000.0 <= 0.11
    assert throttle.rate_bytes_per_s is None


async def test_a_change_midway_gives_each_part_its_own_rate() -> None:
    clock = FakeClock()
    throttle = throttle_on(clock, 4 * MIB)

    await send(throttle, 8 * MIB, 128 << 10)
    middle_s = clock.now_s
    throttle.set_rate(1 * MIB)
    await send(throttle, 2 * MIB, 128 << 10)

    assert middle_s - 1000.0 == pytest.approx(2.0, abs=0.06)
    assert clock.now_s - middle_s == pytest.approx(2.0, abs=0.06)


def test_slices_follow_the_rate_within_bounds() -> None:
    clock = FakeClock()
    throttle = throttle_on(clock, None)
    assert throttle.slice_bytes(MIB) == MIB
    throttle.set_rate(1 * MIB)
    assert throttle.slice_bytes(MIB) == MIB // 20
    throttle.set_rate(1000.0)
    assert throttle.slice_bytes(MIB) == 16 << 10
    throttle.set_rate(1000 * MIB)
    assert throttle.slice_bytes(MIB) == MIB


def test_zero_means_no_limit_and_a_negative_rate_is_refused() -> None:
    throttle = Throttle(0)
    assert throttle.rate_bytes_per_s is None
    with pytest.raises(ValueError, match="negative"):
        throttle.set_rate(-1.0)


def test_sending_counts_the_streams_in_flight() -> None:
    throttle = Throttle(None)
    with throttle.sending():
        with throttle.sending():
            assert throttle.streams == 2
        assert throttle.streams == 1
    assert throttle.streams == 0
