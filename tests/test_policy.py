"""Retry classification and backoff: pure functions, jitter passed in."""

from __future__ import annotations

import pytest

from worker.core.policy import (
    PollPolicy,
    RetryPolicy,
    backoff_delay_s,
    decide_retry,
    import_deadline_s,
    poll_delay_s,
)
from worker.errors import (
    BadRequest,
    ChecksumMismatch,
    CloudUnavailable,
    ConnectionFailed,
    ImageTooLarge,
    QuotaExceeded,
    RateLimited,
)


def test_backoff_grows_exponentially_and_is_capped() -> None:
    delays = [backoff_delay_s(n, base_s=1.0, cap_s=30.0, jitter=1.0) for n in range(1, 9)]
    assert delays[:5] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert max(delays) == 30.0


@pytest.mark.parametrize("jitter", [0.0, 0.3, 0.999])
def test_jitter_keeps_delay_between_half_and_full(jitter: float) -> None:
    delay = backoff_delay_s(4, base_s=1.0, cap_s=60.0, jitter=jitter)
    assert 4.0 <= delay <= 8.0


@pytest.mark.parametrize("error", [BadRequest("x"), ImageTooLarge("cap"), ChecksumMismatch("hash")])
def test_permanent_errors_are_never_retried(error: Exception) -> None:
    decision = decide_retry(error, failures=1, elapsed_s=0, policy=RetryPolicy(), jitter=0.5)  # type: ignore[arg-type]
    assert not decision.retry


def test_retry_after_is_honoured() -> None:
    error = RateLimited("slow down", retry_after_s=42.0)
    decision = decide_retry(error, failures=1, elapsed_s=0, policy=RetryPolicy(), jitter=0.0)
    assert decision.retry
    assert decision.delay_s == 42.0


def test_quota_back_pressure_waits_at_least_the_quota_delay() -> None:
    policy = RetryPolicy(quota_delay_s=25.0)
    decision = decide_retry(
        QuotaExceeded("full"), failures=1, elapsed_s=0, policy=policy, jitter=0.0
    )
    assert decision.retry
    assert decision.delay_s >= 25.0


def test_attempts_and_time_budget_bound_retries() -> None:
    policy = RetryPolicy(max_attempts=3, budget_s=100.0)
    assert decide_retry(
        ConnectionFailed("x"), failures=2, elapsed_s=0, policy=policy, jitter=0.0
    ).retry
    assert not decide_retry(
        ConnectionFailed("x"), failures=3, elapsed_s=0, policy=policy, jitter=0.0
    ).retry
    assert not decide_retry(
        CloudUnavailable("x"), failures=1, elapsed_s=99.9, policy=policy, jitter=0.0
    ).retry


def test_poll_delay_grows_to_its_cap_and_deadline_scales_with_size() -> None:
    policy = PollPolicy(first_delay_s=1.0, factor=2.0, max_delay_s=10.0)
    assert poll_delay_s(0, policy=policy, jitter=0.5) == 1.0
    assert poll_delay_s(20, policy=policy, jitter=0.5) == 10.0
    small = import_deadline_s(1 << 20, policy=PollPolicy())
    large = import_deadline_s(100 << 30, policy=PollPolicy())
    assert large > small >= PollPolicy().deadline_base_s


def test_an_expected_import_is_looked_at_densely_around_its_end_and_sparsely_when_overrun() -> None:
    policy = PollPolicy(dense_s=0.5, overrun_share=0.25, max_delay_s=15.0)

    def delay(waited_s: float) -> float:
        return poll_delay_s(3, policy=policy, jitter=0.5, waited_s=waited_s, expected_s=20.0)

    assert delay(0.0) == 10.0  # half the time left
    assert delay(16.0) == 2.0
    assert delay(19.5) == pytest.approx(0.5 + 0.1)  # just after the expected end
    assert delay(20.5) == 0.5 + 0.5 * 0.25  # past it: every dense_s, and more as it overruns
    assert delay(60.0) == 10.5  # overrun by 40 s: a quarter of that
    assert delay(600.0) == 15.0  # capped
    # The looks close in on the end, and the first that passes it lands just after it.
    waited = 0.0
    while waited < 20.0:
        waited += delay(waited)
    assert 20.0 < waited <= 20.0 + 0.3 * policy.dense_s
