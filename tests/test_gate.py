"""The stage gate: how many uploads go at once, adapted to what the server shows."""

from __future__ import annotations

import asyncio

import pytest

from worker.run.gate import SLOW_S, StageGate, Window, next_limit

MIB = 1 << 20


def window(limit: int, rate: float, **changes: bool) -> Window:
    facts = {"busy": True, "slow": False, "throttled": False} | changes
    return Window(limit=limit, rate=rate, **facts)


def test_the_limit_grows_while_the_rate_grows_and_takes_back_a_step_that_added_nothing() -> None:
    assert next_limit(window(4, 100 * MIB), None, maximum=16) == 5
    assert next_limit(window(5, 120 * MIB), 100 * MIB, maximum=16) == 6
    assert next_limit(window(6, 121 * MIB), 120 * MIB, maximum=16) == 5
    assert next_limit(window(16, 500 * MIB), 100 * MIB, maximum=16) == 16


def test_slow_small_calls_or_throttling_halve_the_limit_and_idle_slots_hold_it() -> None:
    assert next_limit(window(8, 100 * MIB, slow=True), None, maximum=16) == 4
    assert next_limit(window(8, 100 * MIB, throttled=True), None, maximum=16) == 4
    assert next_limit(window(1, 100 * MIB, slow=True), None, maximum=16) == 1
    assert next_limit(window(4, 100 * MIB, busy=False), None, maximum=16) == 4


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def enter(gate: StageGate, count: int) -> list[asyncio.Task[None]]:
    """`count` uploads asking for a slot; returns them once each has got one or is waiting."""

    async def upload() -> None:
        await gate.__aenter__()

    tasks = [asyncio.ensure_future(upload()) for _ in range(count)]
    await asyncio.sleep(0)
    return tasks


async def test_the_gate_admits_up_to_its_limit_and_more_as_the_limit_grows() -> None:
    clock = Clock()
    gate = StageGate(16, start=2, window_s=5.0, clock=clock)
    tasks = await enter(gate, 4)
    assert sum(task.done() for task in tasks) == 2  # two wait: the gate is busy
    clock.now = 5.0
    gate.sent(100 * MIB)  # the window ends with uploads waiting: one more slot
    await asyncio.sleep(0)
    assert gate.limit == 3
    assert sum(task.done() for task in tasks) == 3
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_slow_answers_halve_the_limit_and_a_released_slot_waits_for_it() -> None:
    clock = Clock()
    gate = StageGate(16, start=4, window_s=5.0, clock=clock)
    tasks = await enter(gate, 5)
    clock.now = 5.0
    gate.answered(SLOW_S * 3, 200)
    assert gate.limit == 2
    await gate.__aexit__(None, None, None)  # 3 in use now, over the new limit of 2
    await asyncio.sleep(0)
    assert not tasks[4].done()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.parametrize("maximum", [1, 3])
def test_a_fixed_gate_is_its_maximum(maximum: int) -> None:
    assert StageGate(maximum, adaptive=False).limit == maximum
    assert StageGate(maximum).limit == min(maximum, 4)
