"""PostgreSQL persistence: jobs, the results work queue, events and schema migrations."""

from worker.store.store import (
    Claim,
    JobSummary,
    LeaseLost,
    ResultRow,
    StepEvent,
    Store,
)

__all__ = ["Claim", "JobSummary", "LeaseLost", "ResultRow", "StepEvent", "Store"]
