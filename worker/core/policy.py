"""Retry and backoff decisions as pure functions: jitter and time are passed in, never drawn."""

from __future__ import annotations

from dataclasses import dataclass

from worker.errors import MigrationError, QuotaExceeded, RetryableError

MIB = 1024 * 1024


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try one step of one image before calling it failed."""

    max_attempts: int = 6  # tries of one step, the first included
    base_delay_s: float = 1.0
    max_delay_s: float = 60.0
    quota_delay_s: float = 30.0  # back-pressure (413 quota) waits at least this long
    budget_s: float = 6 * 3600.0  # time from an image's first failure after which it stops retrying


@dataclass(frozen=True)
class PollPolicy:
    """How often to look at an importing image, and how long to wait for it.

    With an expected duration (learned from this cloud's recent imports), looks halve the time
    left until the expected end, one lands just after it, then they come every `dense_s`, and
    space out in proportion to the overrun. Without one, they follow a geometric curve.
    """

    first_delay_s: float = 0.5
    factor: float = 1.6
    max_delay_s: float = 15.0
    dense_s: float = 0.5  # the spacing of looks around the expected end
    overrun_share: float = 0.25  # past the expected end, wait this share of the overrun
    deadline_base_s: float = 600.0  # every import gets this long at least ...
    deadline_rate_bytes_per_s: float = 10 * MIB  # ... plus its size at this copy rate
    stall_s: float = 300.0  # still `uploading` this long after a 202: the task never started
    tasks_every_s: float = 10.0  # while importing, look at the image's tasks this often
    # After an outage of the image service, an import whose task has not changed since before
    # the outage began, and still not this long after it ended, died with a Glance API process
    # (Glance touches a running task at least once a minute while it copies data).
    lost_import_s: float = 120.0
    # With no outage seen by this process (it started after one, say): an import whose task
    # nobody has touched for this long, plus the time a plugin needs to rewrite the disk at
    # `stale_rate_bytes_per_s` before it copies, is lost too. Glance itself takes an import
    # lock whose task went untouched for 60 minutes as abandoned.
    stale_task_s: float = 600.0
    stale_rate_bytes_per_s: float = 100 * MIB


@dataclass(frozen=True)
class RetryDecision:
    retry: bool
    delay_s: float
    reason: str


def backoff_delay_s(failures: int, *, base_s: float, cap_s: float, jitter: float) -> float:
    """Exponential backoff with 'equal jitter': half fixed, half scaled by `jitter` in [0, 1)."""
    ceiling: float = min(cap_s, base_s * float(2 ** max(0, failures - 1)))
    return ceiling / 2 + ceiling / 2 * jitter


def decide_retry(
    error: MigrationError,
    *,
    failures: int,
    elapsed_s: float,
    policy: RetryPolicy,
    jitter: float,
) -> RetryDecision:
    """Whether to try a step again after `error`, the `failures`-th failure in a row.

    `elapsed_s` runs from the image's first failure, so the budget bounds the whole image
    while `max_attempts` bounds each step.
    """
    if not isinstance(error, RetryableError):
        return RetryDecision(False, 0.0, f"{error.code} is permanent")
    if failures >= policy.max_attempts:
        return RetryDecision(False, 0.0, f"{failures} attempts used")
    delay_s = backoff_delay_s(
        failures, base_s=policy.base_delay_s, cap_s=policy.max_delay_s, jitter=jitter
    )
    reason = f"{error.code}, attempt {failures + 1}"
    if isinstance(error, QuotaExceeded):
        # A full quota or staging area empties only as other imports finish: back-pressure.
        delay_s = max(delay_s, policy.quota_delay_s)
    if error.retry_after_s is not None:
        delay_s = max(delay_s, float(error.retry_after_s))
        reason += f", Retry-After {error.retry_after_s:g} s"
    if elapsed_s + delay_s > policy.budget_s:
        return RetryDecision(False, 0.0, f"retry budget of {policy.budget_s:.0f} s used")
    return RetryDecision(True, delay_s, reason)


def poll_delay_s(
    polls: int,
    *,
    policy: PollPolicy,
    jitter: float,
    waited_s: float = 0.0,
    expected_s: float | None = None,
) -> float:
    """Delay before the next look at an importing image, `waited_s` after its import began.

    `expected_s` is how long the import should take; without it the delay grows with each
    poll along a capped geometric curve.
    """
    if expected_s is None:
        delay_s = min(policy.max_delay_s, policy.first_delay_s * float(policy.factor**polls))
        return delay_s * (0.75 + 0.5 * jitter)
    left_s = expected_s - waited_s
    if left_s > 2 * policy.dense_s:
        delay_s = left_s / 2  # halve the time left: few looks early, more near the end
    elif left_s > 0:
        # Close to the end: the next look lands just after it, which is when the image
        # should be active.
        return left_s + policy.dense_s * (0.1 + 0.2 * jitter)
    else:
        delay_s = policy.dense_s + -left_s * policy.overrun_share
    return min(policy.max_delay_s, delay_s) * (0.9 + 0.2 * jitter)


def import_deadline_s(size_bytes: int, *, policy: PollPolicy) -> float:
    """How long an import may take: a floor plus the time to copy the data again."""
    return policy.deadline_base_s + size_bytes / policy.deadline_rate_bytes_per_s


@dataclass(frozen=True)
class OutagePolicy:
    """How often an open breaker probes, how often it says so, and how long `--once` waits."""

    probe_first_s: float = 2.0
    probe_factor: float = 2.0
    probe_max_s: float = 60.0
    warn_every_s: float = 60.0
    max_outage_s: float | None = None  # None: wait as long as it takes
