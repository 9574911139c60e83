"""Token buckets per key, on a clock the test moves."""

from cluster.core.rate_limit import RateLimiter, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_passes_then_the_rate_applies_with_whole_seconds_to_wait():
    clock = Clock()
    limiter = RateLimiter(rate_per_s=2.0, burst=3, clock=clock)
    assert [limiter.retry_after("a") for _ in range(3)] == [0, 0, 0]
    assert limiter.retry_after("a") == 1  # half a second to the next token, rounded up
    clock.now += 0.5
    assert limiter.retry_after("a") == 0
    assert limiter.retry_after("a") == 1


def test_a_slow_rate_asks_for_a_longer_wait():
    clock = Clock()
    limiter = RateLimiter(rate_per_s=0.1, burst=1, clock=clock)
    assert limiter.retry_after("a") == 0
    assert limiter.retry_after("a") == 10
    clock.now += 4
    assert limiter.retry_after("a") == 6


def test_keys_have_their_own_buckets():
    clock = Clock()
    limiter = RateLimiter(rate_per_s=1.0, burst=1, clock=clock)
    assert limiter.retry_after("a") == 0 and limiter.retry_after("a") == 1
    assert limiter.retry_after("b") == 0


def test_refused_requests_take_nothing_and_an_idle_bucket_refills_only_to_the_burst():
    clock = Clock()
    limiter = RateLimiter(rate_per_s=1.0, burst=2, clock=clock)
    assert [limiter.retry_after("a") for _ in range(5)] == [0, 0, 1, 1, 1]
    clock.now += 1.0
    assert limiter.retry_after("a") == 0  # the refusals cost no tokens
    clock.now += 3600
    assert [limiter.retry_after("a") for _ in range(3)] == [0, 0, 1]


def test_rate_zero_turns_limiting_off():
    limiter = RateLimiter(rate_per_s=0.0, burst=1, clock=Clock())
    assert not limiter.enabled
    assert all(limiter.retry_after("a") == 0 for _ in range(1000))


def test_a_bucket_never_holds_more_than_its_capacity():
    bucket = TokenBucket(capacity=2, rate_per_s=10, tokens=0, updated=0.0)
    assert bucket.take(100.0) == 0.0 and bucket.tokens == 1.0
    assert bucket.full(100.2)
