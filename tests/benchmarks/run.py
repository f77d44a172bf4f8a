"""`make bench`: every benchmark printed as a table beside its peer, saved to docs/benchmarks.md.

Needs a PostgreSQL server (DATABASE_URL, default the local one) for the scale, recipe,
bandwidth and real-Glance runs; each of them works in a database of its own, dropped after.
The real-Glance part also needs the local MariaDB the conformance stack uses.

`python -m tests.benchmarks.run` runs everything; `python -m tests.benchmarks.run real-glance`
(or `sandbox`) only that part, rewriting only that part of docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from tests.benchmarks import realglance, throughput
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
SCALE: dict[str, Any] = {"import_latency_s": 2.0, "concurrency": 100, "stage_concurrency": 8}


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


async def real_glance_section(report: Report) -> list[tuple[str, str, bool]]:
    settings = realglance.Settings.from_env(DATABASE_URL)
    bench, stack_description = await realglance.run_bench(settings)
    by_key = {contender.key: contender for contender in bench.contenders}
    best_peer = min(c.median(lambda r: r.wall_s) for c in bench.contenders if c.peer)
    total_bytes = sum(disk.size for disk in bench.disks)

    def gap(contender: realglance.Contender) -> str:
        gaps = [g for run in contender.runs for g in run.active_to_done_s]
        return f"{statistics.median(gaps):.1f} s" if gaps else "–"

    rows = []
    for contender in bench.contenders:
        wall = contender.median(lambda r: r.wall_s)
        rows.append([
            contender.label, f"{wall:.1f} s", f"{best_peer / wall:.2f}",
            f"{contender.median(lambda r: r.cpu_s):.1f}",
            f"{contender.median(lambda r: r.peak_rss_mib):.0f} MiB",
            f"{contender.median(lambda r: r.glance_requests) / settings.disks:.1f}",
            gap(contender),
        ])  # fmt: skip
    report.table(
        "Real Glance: one batch, every way",
        f"{settings.disks} streamOptimized VMDKs (qemu-img, {settings.disk_mib} MiB of random "
        f"data each, {total_bytes / MB:,.0f} MB in all) into Glance 33 + Keystone 30 on "
        f"loopback ({stack_description}); medians of {settings.rounds} interleaved rounds, "
        "the order rotated each round. Wall: from the start to every image active, each then "
        "checked (os_hash_value = sha512 of the file) and deleted. × best peer: the best wall "
        "of the first three rows over this row's. CPU: user+sys seconds of the contender's "
        "process tree; peak RSS: its largest process. The worker's rows include `vmdk-migrate "
        "submit` and its start. Requests: lines of Glance's access log during the run (the "
        "wait for glanceclient's images to become active is this benchmark's, not counted). "
        "active → done: the row's finished_at "
        "minus Glance's updated_at once active, which MariaDB keeps to the second, so each "
        "figure reads up to 1 s long.",
        [
            "how",
            "wall",
            "× best peer",
            "CPU s",
            "peak RSS",
            "Glance requests / image",
            "median active → done",
        ],
        rows,
    )
    ceiling = statistics.median(bench.ceiling_mb_s)
    report.table(
        "Real Glance: ingest ceiling",
        f"PUT /stage only (no import) of the same {settings.disks} disks, "
        f"{realglance.PARALLEL} `curl -T` at once, into images created beforehand.",
        ["what", "median", "rounds", "the batch at this rate"],
        [[f"{realglance.PARALLEL} × curl -T, stage only", f"{ceiling:,.0f} MB/s",
          ", ".join(f"{rate:,.0f}" for rate in bench.ceiling_mb_s) + " MB/s",
          f"{total_bytes / MB / ceiling:.1f} s"]],
    )  # fmt: skip
    recipe8 = by_key["recipe8"].median(lambda r: r.wall_s)
    defaults = by_key["worker"].median(lambda r: r.wall_s)
    wide = by_key["worker16"].median(lambda r: r.wall_s)
    targets = [
        (f"worker defaults ≥ 1.15 × recipe under xargs -P {realglance.PARALLEL}",
         f"{recipe8 / defaults:.2f} ×", recipe8 / defaults >= 1.15),
        ("--concurrency 16 --stage-concurrency 16 ≥ 1.0 × defaults",
         f"{defaults / wide:.2f} ×", defaults / wide >= 1.0),
    ]  # fmt: skip
    for key in ("worker", "worker16"):
        contender = by_key[key]
        gaps = [g for run in contender.runs for g in run.active_to_done_s]
        median_gap = statistics.median(gaps)
        rss = max(run.peak_rss_mib for run in contender.runs)
        targets += [
            (f"median active → done ≤ 1 s ({contender.label})", f"{median_gap:.1f} s",
             median_gap <= 1.0),
            (f"peak RSS < 150 MiB ({contender.label})", f"{rss:.0f} MiB", rss < 150),
        ]  # fmt: skip
    return targets


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


async def sandbox_part(report: Report) -> None:
    targets = stage_section(report)
    targets += memory_section(report)
    targets += await cap_section(report)
    targets += await recipe_section(report)
    targets += await scale_section(report)
    report.verdicts(targets)


async def real_glance_part(report: Report) -> None:
    report.verdicts(await real_glance_section(report))


# Each part is a level-2 section of the figures file, so that running one part rewrites only
# its own figures. The real Glance comes first: it is what an operator will see.
PARTS = {
    "real-glance": ("Against a real Glance", real_glance_part),
    "sandbox": ("Against the sandbox: the client alone", sandbox_part),
}
HEADER = (
    "# Benchmarks\n\n"
    "Written by `make bench` (`python -m tests.benchmarks.run`); do not edit by hand. "
    "`python -m tests.benchmarks.run PART` (PART: " + ", ".join(PARTS) + ") rewrites one part.\n"
)


def _existing_parts(text: str) -> dict[str, str]:
    """The parts of an existing figures file by title. A file from before the parts existed
    holds only sandbox figures: all of it after the header becomes the sandbox part."""
    sections: dict[str, str] = {}
    if "\n## " not in text:
        body = text.split("do not edit by hand.", 1)[-1].strip()
        if body:
            sections[PARTS["sandbox"][0]] = body + "\n"
        return sections
    for chunk in text.split("\n## ")[1:]:
        title, _, body = chunk.partition("\n")
        sections[title.strip()] = body.strip() + "\n"
    return sections


def write_figures(done: dict[str, str]) -> None:
    """Rewrite the figures file with the parts just run, keeping the others as they were."""
    old = _existing_parts(FIGURES.read_text()) if FIGURES.exists() else {}
    old.update(done)
    titles = [title for title, _ in PARTS.values() if title in old]
    titles += [title for title in old if title not in titles]
    FIGURES.parent.mkdir(exist_ok=True)
    FIGURES.write_text(HEADER + "".join(f"\n## {title}\n\n{old[title]}" for title in titles))


async def main(argv: Sequence[str]) -> int:
    wanted = list(argv) or list(PARTS)
    unknown = [name for name in wanted if name not in PARTS]
    if unknown:
        print(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
        return 2
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    done: dict[str, str] = {}
    for name in wanted:
        title, part = PARTS[name]
        print(f"## {title}\n", flush=True)
        report = Report()
        started = time.perf_counter()
        machine = _machine()
        await part(report)
        elapsed_min = (time.perf_counter() - started) / 60
        done[title] = (
            f"Machine: {machine}. This part took {elapsed_min:.1f} minutes.\n\n"
            + "\n".join(report.sections)
        )
    write_figures(done)
    print(f"figures written to {FIGURES.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main(sys.argv[1:])))
