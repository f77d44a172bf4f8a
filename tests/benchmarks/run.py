"""`make bench`: every benchmark printed as a table beside its peer, saved to docs/benchmarks.md.

Needs a PostgreSQL server (DATABASE_URL, default the local one) for the scale, recipe and
bandwidth runs; each of them works in a database of its own, dropped after.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import structlog

from tests.benchmarks import throughput
from tests.benchmarks.bandwidth import CapFigures, measure_cap
from tests.benchmarks.scale import (
    ROOT,
    ScaleFigures,
    fresh_database,
    run_recipe_against_worker,
    run_scale,
)
from worker.sandbox import Sandbox, SandboxConfig

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
FIGURES = ROOT / "docs" / "benchmarks.md"
MB = 1_000_000
SCALE = {"import_latency_s": 2.0, "concurrency": 100, "stage_concurrency": 8}


class Report:
    """Tables printed as they are made and kept for the figures file."""

    def __init__(self) -> None:
        self.sections: list[str] = []

    def table(self, title: str, note: str, header: Sequence[str], rows: list[list[str]]) -> None:
        lines = [f"### {title}", "", note, ""] if note else [f"### {title}", ""]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" for _ in header) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        text = "\n".join(lines) + "\n"
        print(text, flush=True)
        self.sections.append(text)

    def verdicts(self, targets: list[tuple[str, str, bool]]) -> None:
        rows = [[target, figure, "met" if met else "**missed**"] for target, figure, met in targets]
        self.table("Targets", "", ["target", "figure", "result"], rows)


def _mb(rate: float) -> str:
    return f"{rate / MB:,.0f} MB/s"


def stage_section(report: Report) -> list[tuple[str, str, bool]]:
    size, rates = throughput.measure_throughput()
    curl = rates["curl -T"][1]
    sha = rates["sha512sum"][1]
    rows = [
        [name, what, _mb(rate), f"{rate / curl:.2f}", f"{rate / min(curl, sha):.2f}"]
        for name, (what, rate) in rates.items()
    ]
    report.table(
        "Stage throughput",
        f"One {size >> 30} GiB file from page cache to a discard sink on loopback; best of 3 "
        "interleaved rounds. The sink ceiling row is the sink alone (a sender with no file).",
        ["peer", "what", "throughput", "× curl", "× min(curl, sha512sum)"],
        rows,
    )
    off = rates["worker, verification off"][1]
    on = rates["worker, verification on"][1]
    python_client = rates["glance image-stage"][1]
    return [
        ("verification off ≥ 0.9 × curl", f"{off / curl:.2f} ×", off >= 0.9 * curl),
        (
            "verification on ≥ 0.9 × min(curl, sha512sum)",
            f"{on / min(curl, sha):.2f} ×",
            on >= 0.9 * min(curl, sha),
        ),
        (
            "verification off ≥ 1.0 × glanceclient",
            f"{off / python_client:.2f} ×",
            off >= python_client,
        ),
        (
            "verification on ≥ 1.0 × glanceclient",
            f"{on / python_client:.2f} ×",
            on >= python_client,
        ),
    ]


def memory_section(report: Report) -> list[tuple[str, str, bool]]:
    figures = throughput.measure_memory()
    rows = [
        [
            str(count),
            f"{figure['peak_rss_bytes'] / (1 << 20):.1f} MiB",
            _mb(figure["bytes"] / figure["seconds"]),
        ]
        for count, figure in figures.items()
    ]
    report.table(
        "Memory",
        "Peak RSS (VmHWM) of one worker process staging sparse 1 GiB files at once, sha512 on.",
        ["concurrent stages", "peak RSS", "total throughput"],
        rows,
    )
    one = figures[1]["peak_rss_bytes"]
    sixteen = figures[16]["peak_rss_bytes"]
    return [
        ("16 stages under 150 MiB", f"{sixteen / (1 << 20):.1f} MiB", sixteen < 150 << 20),
        ("16 stages within 1.5 × one", f"{sixteen / one:.2f} ×", sixteen <= 1.5 * one),
    ]


async def cap_section(report: Report) -> list[tuple[str, str, bool]]:
    async with (
        fresh_database(DATABASE_URL) as database_url,
        Sandbox(SandboxConfig()).serve() as sandbox,
    ):
        with tempfile.TemporaryDirectory() as workdir:
            figures: CapFigures = await measure_cap(database_url, sandbox, Path(workdir))
    rows = [
        ["before the change", _mib(figures.first_limit_bytes_per_s),
         _mib(figures.first_rate_bytes_per_s), f"{figures.first_error:+.1%}"],
        [f"from {figures.settle_s:g} s after it", _mib(figures.second_limit_bytes_per_s),
         _mib(figures.second_rate_bytes_per_s), f"{figures.second_error:+.1%}"],
    ]  # fmt: skip
    report.table(
        "Bandwidth cap",
        "One stage to the sandbox; the cap changed in the database mid-stage; the rate is the "
        "slope of the staged file's size as the cloud wrote it.",
        ["window", "cap", "received", "error"],
        rows,
    )
    held = abs(figures.first_error) <= 0.05
    changed = abs(figures.second_error) <= 0.05
    return [
        ("cap holds within 5 %", f"{figures.first_error:+.1%}", held),
        ("a change holds within 2 s (±5 %)", f"{figures.second_error:+.1%}", changed),
    ]


def _mib(rate: float) -> str:
    return f"{rate / (1 << 20):.3f} MiB/s"


async def scale_section(report: Report) -> list[tuple[str, str, bool]]:
    runs: list[ScaleFigures] = []
    for disks in (1_000, 10_000):
        with tempfile.TemporaryDirectory() as workdir:
            runs.append(await run_scale(DATABASE_URL, Path(workdir), disks=disks, **SCALE))
    rows = [
        [f"{run.disks:,}", f"{run.done:,}", f"{run.wall_s:.1f} s", f"{run.ideal_s:.1f} s",
         f"{run.wall_s / run.ideal_s:.2f}", f"{run.requests_per_image:.2f}",
         f"{run.statements_per_image:.2f}"]
        for run in runs
    ]  # fmt: skip
    report.table(
        "Scale",
        f"Small disks through the whole pipeline against the sandbox (its own process), "
        f"--concurrency {SCALE['concurrency']}, --stage-concurrency "
        f"{SCALE['stage_concurrency']}. Each import takes {runs[0].import_s:g} s in the "
        f"sandbox (import_latency_s={SCALE['import_latency_s']:g}: the flow starts latency/2 "
        "after the 202, then takes the latency); ideal = disks × import time / concurrency. "
        "Requests from the sandbox's log; statements = Store calls (one SQL statement each), "
        "besides one statement a second per worker for the bandwidth control.",
        [
            "disks",
            "done",
            "wall",
            "ideal",
            "× ideal",
            "HTTP requests / image",
            "statements / image",
        ],
        rows,
    )
    for run in runs:
        detail = [[key, f"{count / run.disks:.3f}"] for key, count in sorted(run.requests.items())]
        detail += [
            [f"Store.{key}", f"{n / run.disks:.3f}"] for key, n in sorted(run.statements.items())
        ]
        report.table(f"Scale: {run.disks:,} disks, per image", "", ["call", "per image"], detail)
    small, large = runs

    def flat(before: float, after: float) -> bool:
        return abs(after - before) <= 0.05 * before

    return [
        ("10,000 disks within 1.15 × ideal", f"{large.wall_s / large.ideal_s:.2f} ×",
         large.wall_s <= 1.15 * large.ideal_s),
        ("requests / image flat 1k → 10k",
         f"{small.requests_per_image:.2f} → {large.requests_per_image:.2f}",
         flat(small.requests_per_image, large.requests_per_image)),
        ("statements / image flat 1k → 10k",
         f"{small.statements_per_image:.2f} → {large.statements_per_image:.2f}",
         flat(small.statements_per_image, large.statements_per_image)),
    ]  # fmt: skip


async def recipe_section(report: Report) -> list[tuple[str, str, bool]]:
    with tempfile.TemporaryDirectory() as workdir:
        figures = await run_recipe_against_worker(
            DATABASE_URL, Path(workdir), disks=20, disk_bytes=64 << 20, import_latency_s=2.0
        )
    rows = [
        ["vendor curl recipe, sequential loop", f"{figures.recipe_s:.1f} s", "1.00"],
        ["vmdk-migrate run (defaults)", f"{figures.worker_s:.1f} s",
         f"{figures.recipe_s / figures.worker_s:.2f}"],
    ]  # fmt: skip
    report.table(
        "Batch against the recipe",
        f"{figures.disks} disks of {figures.disk_bytes >> 20} MiB into the sandbox (import "
        "latency 2 s): POST create, PUT stage (--data-binary), POST import, poll GET each second.",
        ["how", "wall", "speed-up"],
        rows,
    )
    return [("worker batch faster than the recipe", f"{figures.recipe_s / figures.worker_s:.2f} ×",
             figures.worker_s < figures.recipe_s)]  # fmt: skip


def _machine() -> str:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), platform.processor())  # fmt: skip
    load = os.getloadavg()[0]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    return (
        f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, commit {commit}, "
        f"load average {load:.1f} at the start"
    )


async def main() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    report = Report()
    started = time.perf_counter()
    machine = _machine()
    targets = stage_section(report)
    targets += memory_section(report)
    targets += await cap_section(report)
    targets += await recipe_section(report)
    targets += await scale_section(report)
    report.verdicts(targets)
    elapsed_min = (time.perf_counter() - started) / 60
    FIGURES.parent.mkdir(exist_ok=True)
    FIGURES.write_text(
        "# Benchmarks\n\n"
        "Written by `make bench` (`python -m tests.benchmarks.run`); do not edit by hand.\n\n"
        f"Machine: {machine}. The run took {elapsed_min:.1f} minutes.\n\n"
        + "\n".join(report.sections)
    )
    print(f"figures written to {FIGURES.relative_to(ROOT)}")


if __name__ == "__main__":
    asyncio.run(main())
