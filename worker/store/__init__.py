"""PostgreSQL persistence: jobs, the results work queue, events and schema migrations."""

from worker.store.store import (
    RECORDABLE_COLUMNS,
    Claim,
    JobSummary,
    LeaseLost,
    ResultRow,
    Store,
)

__all__ = ["RECORDABLE_COLUMNS", "Claim", "JobSummary", "LeaseLost", "ResultRow", "Store"]
