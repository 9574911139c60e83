import random

import pytest

from serve_app.answers.deadline import Deadline, RetryPolicy, parse_retry_after


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_each_call_gets_what_remains_of_the_deadline_up_to_its_cap():
    clock = Clock()
    deadline = Deadline.after(1.0, clock)
    assert deadline.call_timeout(cap_s=5.0) == pytest.approx(1.0)
    assert deadline.call_timeout(cap_s=0.3) == pytest.approx(0.3)
    clock.now += 0.75
    assert deadline.remaining() == pytest.approx(0.25) and not deadline.expired
    assert deadline.call_timeout(cap_s=5.0) == pytest.approx(0.25)
    clock.now += 1.0
    assert deadline.remaining() == 0.0 and deadline.expired and deadline.call_timeout(5.0) == 0.0


def test_an_overrun_is_the_budgets_when_the_deadline_set_the_timeout():
    assert Deadline.overrun_reason(timeout_s=0.4, cap_s=5.0) == "budget"
    assert Deadline.overrun_reason(timeout_s=5.0, cap_s=5.0) == "timeout"


def test_backoff_is_full_jitter_under_a_doubling_cap_unless_the_server_says():
    policy = RetryPolicy(attempts=4, base_delay_s=0.1, max_delay_s=0.3)
    rng = random.Random(0)
    for attempt, bound in ((1, 0.1), (2, 0.2), (3, 0.3), (4, 0.3)):
        delays = [policy.delay(attempt, None, rng) for _ in range(200)]
        assert 0.0 <= min(delays) and max(delays) <= bound and max(delays) > 0.8 * bound
    assert policy.delay(1, 2.5, rng) == 2.5


def test_retry_after_in_seconds_is_read_and_a_date_is_not_guessed():
    assert parse_retry_after("3") == 3.0 and parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("Wed, 21 Oct 2026 07:28:00 GMT") is None
