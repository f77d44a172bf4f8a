"""The sandbox cloud in a process of its own (so the worker has the other core), with its log.

    python -m tests.benchmarks.sandbox_child IMPORT_LATENCY_S

Prints the port, serves until its standard input closes, then prints one JSON line: the
requests it answered, counted by method and path with ids replaced by {id}.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections import Counter

import structlog

from worker.sandbox import Sandbox, SandboxConfig

_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


async def serve(import_latency_s: float) -> Counter[str]:
    sandbox = Sandbox(SandboxConfig(import_latency_s=import_latency_s))
    async with sandbox.serve(host="127.0.0.1", port=0):
        print(sandbox.base_url.rsplit(":", 1)[1], flush=True)
        # Served until the benchmark closes our standard input.
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        return Counter(f"{r.method} {_ID.sub('{id}', r.path)}" for r in sandbox.requests)


if __name__ == "__main__":
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    counts = asyncio.run(serve(float(sys.argv[1])))
    print(json.dumps(dict(counts)), flush=True)
