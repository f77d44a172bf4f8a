"""The bandwidth cap measured from the cloud's side: the rate it holds, and how fast a change lands.

One stage runs against the sandbox under a cap set in the database; the staged file's size is
sampled as it grows, and the rate is the least-squares slope of size over time in a window
(robust to a late sample on a busy machine, unlike the two end points).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

from tests.fixtures.batch import cloud_for
from worker.clients.glance import open_glance
from worker.run.bandwidth import following_bandwidth, set_bandwidth_limit
from worker.sandbox import Sandbox

MIB = 1 << 20
SAMPLE_EVERY_S = 0.05


@dataclass(frozen=True)
class CapFigures:
    """The set rates and what the cloud received: before the change and from 2 s after it."""

    first_limit_bytes_per_s: int
    first_rate_bytes_per_s: float
    second_limit_bytes_per_s: int
    second_rate_bytes_per_s: float  # measured from `settle_s` after the change on
    settle_s: float

    @property
    def first_error(self) -> float:
        return self.first_rate_bytes_per_s / self.first_limit_bytes_per_s - 1

    @property
    def second_error(self) -> float:
        return self.second_rate_bytes_per_s / self.second_limit_bytes_per_s - 1


def slope(samples: list[tuple[float, int]], start_s: float, end_s: float) -> float:
    """Least-squares bytes per second of the samples taken between start_s and end_s."""
    window = [(t, b) for t, b in samples if start_s <= t <= end_s]
    if len(window) < 3:
        raise AssertionError(f"only {len(window)} samples between {start_s} and {end_s}")
    mean_t = sum(t for t, _ in window) / len(window)
    mean_b = sum(b for _, b in window) / len(window)
    covariance = sum((t - mean_t) * (b - mean_b) for t, b in window)
    variance = sum((t - mean_t) ** 2 for t, _ in window)
    return covariance / variance


def _size_bytes(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


async def _sample(path: Path, samples: list[tuple[float, int]], started: float) -> None:
    while True:
        size_bytes = _size_bytes(path)
        if size_bytes is not None:
            samples.append((time.monotonic() - started, size_bytes))
        await asyncio.sleep(SAMPLE_EVERY_S)


async def measure_cap(
    database_url: str,
    sandbox: Sandbox,
    workdir: Path,
    *,
    first_limit_bytes_per_s: int = 2 * MIB,
    second_limit_bytes_per_s: int = 1 * MIB,
    first_s: float = 3.0,
    settle_s: float = 2.0,
    measure_s: float = 2.5,
) -> CapFigures:
    """Stage under the first cap, change it in the database, and measure both rates."""
    size_bytes = int(first_limit_bytes_per_s * first_s + second_limit_bytes_per_s * 8) & ~4095
    source = workdir / "capped.raw"
    source.write_bytes(bytes(size_bytes))
    await set_bandwidth_limit(database_url, first_limit_bytes_per_s)
    samples: list[tuple[float, int]] = []
    async with (
        following_bandwidth(database_url, worker_id="bandwidth-check") as throttle,
        open_glance(cloud_for(sandbox), throttle=throttle) as glance,
    ):
        await asyncio.sleep(0.2)  # the follower's first read of the cap
        image = await glance.create_image(
            {"name": "capped", "disk_format": "raw", "container_format": "bare"}
        )
        staged = sandbox.state.staged_path(image.id)
        started = time.monotonic()
        sampler = asyncio.create_task(_sample(staged, samples, started))
        stage = asyncio.create_task(glance.stage(image.id, source, size_bytes=size_bytes))
        try:
            await asyncio.sleep(first_s)
            changed_s = time.monotonic() - started
            await set_bandwidth_limit(database_url, second_limit_bytes_per_s)
            await asyncio.sleep(settle_s + measure_s)
            await set_bandwidth_limit(database_url, None)  # let the rest go at full speed
            await stage
        finally:
            sampler.cancel()
            stage.cancel()
            await asyncio.gather(sampler, stage, return_exceptions=True)
    first_rate = slope(samples, 0.5, changed_s)
    second_rate = slope(samples, changed_s + settle_s, changed_s + settle_s + measure_s)
    return CapFigures(
        first_limit_bytes_per_s=first_limit_bytes_per_s,
        first_rate_bytes_per_s=first_rate,
        second_limit_bytes_per_s=second_limit_bytes_per_s,
        second_rate_bytes_per_s=second_rate,
        settle_s=settle_s,
    )
