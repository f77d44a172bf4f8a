"""One worker process staging files to a sink, as the benchmarks' subject: prints JSON figures.

    python -m tests.benchmarks.stage_child URL FILE [FILE ...] [--verify] [--chunk-bytes N]

Every FILE is staged at once (one GlanceClient, one session, as in a worker); the answer line
gives wall time, bytes, and the process's peak RSS (VmHWM) measured from inside, after the
stages, so nothing but this process's own memory is counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from pathlib import Path

import aiohttp

from worker.clients.glance import GlanceClient
from worker.clients.keystone import StaticTokenAuth


def peak_rss_bytes() -> int:
    """VmHWM of this process: the most resident memory it ever had."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


async def stage_all(
    url: str, files: list[Path], *, verify: bool, chunk_bytes: int
) -> dict[str, float]:
    connector = aiohttp.TCPConnector(limit=len(files) + 2)
    async with aiohttp.ClientSession(connector=connector) as session:
        glance = GlanceClient(session, StaticTokenAuth("bench-token", url), chunk_bytes=chunk_bytes)
        algorithms = ("sha512",) if verify else ()
        started = time.perf_counter()
        results = await asyncio.gather(
            *(
                glance.stage(
                    str(uuid.uuid4()),
                    path,
                    size_bytes=path.stat().st_size,
                    hash_algos=algorithms,
                )
                for path in files
            )
        )
        elapsed_s = time.perf_counter() - started
    return {
        "seconds": elapsed_s,
        "bytes": sum(result.size_bytes for result in results),
        "peak_rss_bytes": peak_rss_bytes(),
        "digests": [dict(result.digests) for result in results],  # type: ignore[dict-item]
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--verify", action="store_true")
    parser.add_argument("--chunk-bytes", type=int, default=1 << 20)
    args = parser.parse_args()
    figures = asyncio.run(
        stage_all(args.url, args.files, verify=args.verify, chunk_bytes=args.chunk_bytes)
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
