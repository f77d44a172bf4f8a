"""Every event name the worker says, and the record each one is published as.

One enum, so that a name is written once: the `EventRecord`s published on the event bus
(worker/observe/bus.py), which the log, metrics, progress and webhooks follow, and the
`events.event` column (whose names the SQL in worker/store/queries.sql writes as literals,
checked against this enum by tests/test_events.py) all use these values, and the README
documents each of them. Names are `area.what_happened`; the sandbox cloud's own lines
(`sandbox.*`) are not the worker's and are not listed here.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from worker.core.model import Phase


class Event(enum.StrEnum):
    """A stable event name; its value is what logs, tables and webhooks carry."""

    # --- one image's migration (each line carries job_id, image, result_id, worker_id) -------
    IMAGE_PENDING = "image.pending"  # the row went back to the queue
    IMAGE_CLAIMED = "image.claimed"  # a worker took the row (events table)
    IMAGE_RESUMED = "image.resumed"  # a claimed row that was started before: inspect first
    IMAGE_CREATING = "image.creating"
    IMAGE_CREATED = "image.created"
    IMAGE_ADOPTING = "image.adopting"  # our create got 409: the id is ours from a lost answer
    IMAGE_STAGING = "image.staging"
    IMAGE_STAGED = "image.staged"
    IMAGE_STAGE_LOST = "image.stage_lost"  # Glance did not keep the staged data: stage again
    IMAGE_RESUMED_QUEUED = "image.resumed_queued"  # resumed an image Glance holds as queued
    IMAGE_IMPORT_REQUESTING = "image.import_requesting"
    IMAGE_IMPORT_REQUESTED = "image.import_requested"
    IMAGE_IMPORTING = "image.importing"
    IMAGE_RESUMED_IMPORTING = "image.resumed_importing"  # resumed an import Glance still runs
    IMAGE_CONFLICT_INSPECTING = "image.conflict_inspecting"  # a 409 is answered by a look
    IMAGE_VERIFYING = "image.verifying"
    IMAGE_HASHED = "image.hashed"  # the source was hashed again (the earlier hash was lost)
    IMAGE_DONE = "image.done"
    IMAGE_RETRY_SCHEDULED = "image.retry_scheduled"
    IMAGE_RECREATING = "image.recreating"  # the image is deleted and made again
    IMAGE_WAITING = "image.waiting"  # a step failed because its service is down: waiting
    IMAGE_RESUMING = "image.resuming"  # the service is back: the step runs again
    IMAGE_FAILING = "image.failing"  # failed for good: cleaning up before the row fails
    IMAGE_FAILED = "image.failed"  # the image failed (also the failure webhook's name)
    IMAGE_FINISHED = "image.finished"  # the row reached done or failed: once per image
    IMAGE_CANCEL_REQUESTED = "image.cancel_requested"
    IMAGE_CANCELLING = "image.cancelling"
    IMAGE_CANCELLED = "image.cancelled"  # a pending row of a cancelled job (events table)
    IMAGE_RELEASED = "image.released"  # given back unfinished at shutdown (events table)
    IMAGE_ATTEMPT_REFUNDED = "image.attempt_refunded"  # a database outage costs no attempt
    IMAGE_REQUEUED = "image.requeued"  # put back to pending by `retry` (events table)
    IMAGE_LEASE_LOST = "image.lease_lost"  # another worker holds the row now: stopped here
    IMAGE_LEASE_EXPIRED = "image.lease_expired"  # the lease may have run out unrenewed
    IMAGE_ABANDONED = "image.abandoned"  # the database stayed away: nothing can be recorded
    IMAGE_CRASHED = "image.crashed"  # an unexpected error: the image fails, not the worker
    IMAGE_CRASH_NOT_RECORDED = "image.crash_not_recorded"
    IMAGE_PROGRESS_NOT_SAVED = "image.progress_not_saved"
    IMAGE_ORPHAN_DELETED = "image.orphan_deleted"  # a lost row's image was deleted
    IMAGE_ORPHAN_LEFT = "image.orphan_left"  # a lost row's image could not be deleted
    IMAGE_CLEANUP_DONE = "image.cleanup_done"  # an owed deletion was done
    IMAGE_CLEANUP_STILL_OWED = "image.cleanup_still_owed"
    IMAGE_CLEANUP_ROUND_FAILED = "image.cleanup_round_failed"

    # --- jobs ---------------------------------------------------------------------------------
    JOB_SUBMITTED = "job.submitted"
    JOB_CANCELLED = "job.cancelled"
    JOB_RETRIED = "job.retried"
    JOB_COMPLETED = "job.completed"  # every row of the job ended (webhook)

    # --- the worker process -------------------------------------------------------------------
    WORKER_STARTED = "worker.started"
    WORKER_STOPPING = "worker.stopping"
    WORKER_STOPPED = "worker.stopped"
    WORKER_RELEASED = "worker.released"
    WORKER_GRACE_EXPIRED = "worker.grace_expired"
    WORKER_HEARTBEAT_FAILED = "worker.heartbeat_failed"
    WORKER_PROGRESS = "worker.progress"
    WORKER_BANDWIDTH_CHANGED = "worker.bandwidth_changed"
    WORKER_CONTROLS_UNREAD = "worker.controls_unread"

    # --- outages ------------------------------------------------------------------------------
    OUTAGE_STARTED = "outage.started"
    OUTAGE_ONGOING = "outage.ongoing"
    OUTAGE_ENDED = "outage.ended"
    OUTAGE_GAVE_UP = "outage.gave_up"
    OUTAGE_PROBE_REFUSED = "outage.probe_refused"
    OUTAGE_PAUSE_NOT_RECORDED = "outage.pause_not_recorded"

    # --- credentials, database, endpoints and webhooks ----------------------------------------
    AUTH_TOKEN_ISSUED = "auth.token_issued"
    AUTH_TOKEN_RENEWED = "auth.token_renewed"
    AUTH_CREDENTIALS_RELOADED = "auth.credentials_reloaded"
    DB_UPGRADED = "db.upgraded"
    DB_RECONNECTING = "db.reconnecting"
    DB_CONFLICT_RETRIED = "db.conflict_retried"
    METRICS_SERVING = "metrics.serving"
    METRICS_PORT_UNAVAILABLE = "metrics.port_unavailable"
    METRICS_UNAVAILABLE = "metrics.unavailable"
    DASHBOARD_STARTED = "dashboard.started"
    DASHBOARD_HOST_REFUSED = "dashboard.host_refused"
    NOTIFY_SENT = "notify.sent"
    NOTIFY_ATTEMPT_FAILED = "notify.attempt_failed"
    NOTIFY_DROPPED = "notify.dropped"
    NOTIFY_ERROR = "notify.error"

    @classmethod
    def entered(cls, phase: Phase) -> Event:
        """The event of an image entering `phase` when no more specific event says why."""
        return cls(f"image.{phase}")


# After one of these this worker no longer works on the image: it finished (said once per
# image, a crash included), or another worker goes on with it. Observers forget it then.
LEFT_THIS_WORKER = frozenset(
    {
        Event.IMAGE_FINISHED,
        Event.IMAGE_LEASE_LOST,
        Event.IMAGE_LEASE_EXPIRED,
        Event.IMAGE_ABANDONED,
    }
)


@dataclass(frozen=True)
class EventRecord:
    """One published event, as every subscriber sees it.

    `fields` holds the context bound where it was said (job, image, worker, ...) merged with
    the keys given with it; `level` is a `logging` level number; `source` is the module that
    said it; `exception` is the error being handled, when it was said about one.
    """

    event: Event
    level: int
    fields: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""
    exception: BaseException | None = None

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    @property
    def result_id(self) -> int | None:
        """The results row the event is about, when it is about one."""
        value = self.fields.get("result_id")
        return value if isinstance(value, int) else None
