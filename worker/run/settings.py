"""What a worker is told, composed once: each setting and its default are written here only.

The CLI takes its option defaults from `WorkerSettings` and builds one; tests build one too.
`run_worker` hands it whole to the parts it wires: the consumer and the image runner each
declare, as a Protocol, the few settings they read of it (`ConsumerSettings` in
worker/run/consumer.py, `RunnerSettings` in worker/run/runner.py), so nothing is copied field by
field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from worker.config import default_worker_id
from worker.core.machine import Policies
from worker.core.model import DEFAULT_HASH_ALGO, SOURCE_CONCURRENCY
from worker.core.policy import OutagePolicy

if TYPE_CHECKING:  # the sender, and aiohttp with it, is imported only by a run with a webhook
    from worker.observe.notify import WebhookSettings


@dataclass(frozen=True)
class WorkerSettings:
    """Everything `vmdk-migrate run` needs besides the cloud and the database."""

    worker_id: str = field(default_factory=default_worker_id)
    concurrency: int = 8  # images in flight (creating, staging or importing)
    stage_concurrency: int = 4  # of those, how many may be sending bytes at once (at most)
    source_concurrency: int = SOURCE_CONCURRENCY  # URL sources read at once from one host
    # Start uploads at fewer and add one while the upload rate grows with it (worker/run/gate.py).
    adaptive_stages: bool = True
    chunk_bytes: int = 1 << 20
    hash_algo: str = DEFAULT_HASH_ALGO  # must be the cloud's os_hash_algo to verify
    verify_md5: bool = False  # also hash md5 and compare Glance's legacy `checksum`
    lease_s: float = 60.0  # a claimed row is ours this long without a heartbeat
    heartbeat_s: float = 15.0
    idle_poll_s: float = 2.0  # how often an idle worker looks for new rows
    grace_s: float = 60.0  # after a stop request, images in flight get this long to finish
    once: bool = False  # exit when there is nothing left to claim
    policies: Policies = field(default_factory=Policies)
    outage: OutagePolicy = field(default_factory=OutagePolicy)
    progress: str = "auto"  # auto (bars on a terminal, else log lines) | bars | log | off
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None  # None: no endpoint; 0: any free port
    webhook: WebhookSettings | None = None
