"""Backoff, retry budget, circuit breaker, concurrency limits and the retry decision.

All pure: driven with a fake clock and seeded rngs, never sleeping or patching time.
"""

from __future__ import annotations

import bisect
import random
import re

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aimesh.interceptors.backoff import Backoff, from_pushback
from aimesh.interceptors.breaker import CircuitBreaker, State
from aimesh.interceptors.budget import RetryBudget, SlidingCounts
from aimesh.interceptors.limits import ConcurrencyLimits, LimitExceeded
from aimesh.interceptors.retry_policy import Retry, RetryPolicy, Stop, decide
from aimesh.mesh.config import BackoffSpec, CircuitBreakerSpec, RetrySpec

# Deterministic: the same examples every run, like the seeded rngs below.
PROPERTY = settings(max_examples=60, derandomize=True, deadline=None)

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# -- backoff ----------------------------------------------------------------------------


@PROPERTY
@given(
    st.floats(0, 10),
    st.floats(0, 100),
    st.floats(1, 4),
    st.integers(0, 2**32),
)
def test_backoff_delays_within_monotone_capped_ceilings(
    base: float, extra: float, multiplier: float, seed: int
) -> None:
    b = Backoff(base, base + extra, multiplier)
    rng = random.Random(seed)
    ceilings = [b.ceiling(n) for n in range(1, 80)] + [b.ceiling(10**6)]
    assert ceilings[0] == base
    assert ceilings == sorted(ceilings)
    assert all(c <= b.maximum for c in ceilings)
    assert ceilings[-1] == b.maximum or multiplier == 1 or base == 0
    for n in (1, 2, 3, 5, 8, 40, 10**6):
        d = b.delay(n, rng)
        assert 0 <= d <= b.ceiling(n)


def test_backoff_doubles_to_the_cap_with_full_jitter() -> None:
    b = Backoff(0.025, 0.25)
    assert [b.ceiling(n) for n in range(1, 7)] == [0.025, 0.05, 0.1, 0.2, 0.25, 0.25]
    rng = random.Random(3)
    delays = [b.delay(4, rng) for _ in range(2000)]
    # Full jitter: spread over the whole [0, 0.2], not clustered near the ceiling.
    assert min(delays) < 0.01 and max(delays) > 0.19
    assert 0.09 < sum(delays) / len(delays) < 0.11
    assert Backoff(0, 0).delay(3, rng) == 0.0
    assert repr(b) == "<Backoff 25ms..250ms x2>"
    assert Backoff.from_spec(BackoffSpec(base=0.1, max=2.0)) == Backoff(0.1, 2.0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((-1, 1), "base must not be negative, got -1"),
        ((float("nan"), 1), "base must not be negative"),
        ((1, 0.5), r"maximum must be at least base \(1\), got 0.5"),
        ((1, float("inf")), "maximum must be at least base"),
        ((1, 2, 0.5), "multiplier must be at least 1, got 0.5"),
    ],
)
def test_backoff_rejects_bad_arguments(args: tuple[float, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Backoff(*args)


def test_backoff_attempts_start_at_one() -> None:
    with pytest.raises(ValueError, match="attempt must be at least 1"):
        Backoff(1, 2).ceiling(0)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("0", 0.0),
        ("250", 0.25),
        ("2147483647", 2147483.647),
        ("-1", "stop"),
        ("-2147483648", "stop"),
        ("-0", "stop"),
        ("2147483648", "stop"),  # not an int32
        ("", "stop"),
        ("abc", "stop"),
        ("1.5", "stop"),
        ("1e3", "stop"),
        ("+5", "stop"),
        (" 100", "stop"),
        ("007", "stop"),  # A6: no unnecessary leading zeros
        ("١٢", "stop"),  # Arabic-Indic digits are not ASCII
    ],
)
def test_pushback_parsing(value: str | None, expected: object) -> None:
    assert from_pushback(value) == expected


@PROPERTY
@given(st.integers(-(2**40), 2**40) | st.text(max_size=12))
def test_pushback_is_a_wait_only_for_canonical_non_negative_int32(value: int | str) -> None:
    text = str(value)
    parsed = from_pushback(text)
    if re.fullmatch(r"0|[1-9][0-9]*", text) and int(text) < 2**31:
        assert parsed == int(text) / 1000
    else:
        assert parsed == "stop"


# -- sliding counts and the retry budget -------------------------------------------------


@PROPERTY
@given(st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 3)), max_size=80))
def test_sliding_counts_bracket_the_exact_window(steps: list[tuple[int, int]]) -> None:
    # Integer milliseconds, so bucket edges and window edges agree exactly.
    counts = SlidingCounts(window=10.0, buckets=10, fields=1)
    now_ms = 0
    events: list[int] = []
    for dt, n in steps:
        now_ms += dt
        counts.add(now_ms / 1000, 0, n)
        events.extend([now_ms] * n)
        exact = sum(1 for t in events if t > now_ms - 10_000)
        assert counts.within(now_ms / 1000, 0) <= exact <= counts.over(now_ms / 1000, 0)
        # The brackets are at most one bucket (1 s) wider or narrower than the window.
        assert counts.over(now_ms / 1000, 0) <= sum(1 for t in events if t > now_ms - 11_000)
        assert counts.within(now_ms / 1000, 0) >= sum(1 for t in events if t >= now_ms - 9_000)


def in_window(times: list[int], end: int, width: int = 10_000) -> int:
    """How many of the sorted `times` fall in (end - width, end]."""
    return bisect.bisect_right(times, end) - bisect.bisect_right(times, end - width)


def test_budget_caps_a_retry_storm_and_recovers() -> None:
    """60 s of 100 rps where every try fails, each call wanting 2 retries."""
    clock = FakeClock(0.0)
    budget = RetryBudget(ratio=0.2, min_per_second=10.0, window=10.0, clock=clock)
    requests: list[int] = []
    retries: list[int] = []
    wanted = 0
    for ms in range(0, 60_000, 10):
        clock.now = ms / 1000
        budget.record_request()
        requests.append(ms)
        for _ in range(2):
            wanted += 1
            if not budget.try_acquire():
                break
            retries.append(ms)
    assert budget.retries_allowed == len(retries)
    assert budget.retries_allowed + budget.retries_denied == wanted
    # The bound, exactly, at every granted retry: 20% of the window's calls + 10/s * 10 s.
    for t in retries:
        assert in_window(retries, t) <= 0.2 * in_window(requests, t) + 100
    # Steady traffic puts 1000 calls in every full window, so any 10 s holds <= 300 retries.
    assert all(in_window(retries, end) <= 300 for end in range(10_000, 60_000, 10))
    # ... and the budget is not much stingier than that (bucketing costs up to 10%).
    assert len(retries) >= 0.85 * 300 * 6
    assert budget.retries_denied > 0
    assert not budget.can_retry()

    # The storm ends: calls succeed (no retries asked) and the spent retries age out.
    for ms in range(60_000, 71_000, 10):
        clock.now = ms / 1000
        budget.record_request()
    assert budget.can_retry()
    assert budget.remaining() >= 280
    assert budget.try_acquire()


def test_budget_floor_allows_retries_without_traffic() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, min_per_second=10.0, window=10.0, clock=clock)
    assert budget.remaining() == 100
    assert sum(budget.try_acquire() for _ in range(150)) == 100
    assert (budget.retries_allowed, budget.retries_denied) == (100, 50)
    assert budget.remaining() == 0
    clock.advance(5.0)
    assert not budget.can_retry()  # still within the window
    clock.advance(6.0)
    assert budget.can_retry() and budget.remaining() == 100
    assert "remaining=100 allowed=100 denied=50" in repr(budget)


@PROPERTY
@given(
    st.lists(st.tuples(st.integers(0, 2500), st.sampled_from(["request", "retry"])), max_size=300)
)
def test_budget_bound_holds_for_any_traffic(ops: list[tuple[int, str]]) -> None:
    clock = FakeClock(0.0)
    budget = RetryBudget(ratio=0.5, min_per_second=0.3, window=10.0, clock=clock)
    now_ms = 0
    requests: list[int] = []
    retries: list[int] = []
    for dt, op in ops:
        now_ms += dt
        clock.now = now_ms / 1000
        if op == "request":
            budget.record_request()
            requests.append(now_ms)
        elif budget.try_acquire():
            retries.append(now_ms)
            assert in_window(retries, now_ms) <= 0.5 * in_window(requests, now_ms) + 3


def test_budget_counts_only_recent_calls_and_every_recent_retry() -> None:
    clock = FakeClock(0.0)
    budget = RetryBudget(ratio=0.2, min_per_second=10.0, window=10.0, clock=clock)
    for _ in range(1000):
        budget.record_request()
    clock.now = 9.999  # calls inside the window back retries...
    assert budget.remaining() == 300
    clock.now = 10.0  # ... and no longer once they leave it (t=0 is outside (0, 10])
    assert budget.remaining() == 100

    clock = FakeClock(0.5)
    budget = RetryBudget(ratio=0.2, min_per_second=10.0, window=10.0, clock=clock)
    assert sum(budget.try_acquire() for _ in range(100)) == 100
    clock.now = 10.2  # retries at 0.5 are still in (0.2, 10.2]
    assert not budget.can_retry()
    clock.now = 11.0  # and gone one bucket after they left the window, at the latest
    assert budget.remaining() == 100


def test_budget_survives_a_clock_stepping_back() -> None:
    clock = FakeClock(100.0)
    budget = RetryBudget(ratio=0.0, min_per_second=0.2, window=10.0, clock=clock)
    assert budget.try_acquire() and budget.try_acquire()
    clock.now = 50.0
    assert not budget.try_acquire()  # counted in the current bucket, not a fresh ring


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": -0.1}, "ratio must not be negative"),
        ({"min_per_second": -1}, "min_per_second must not be negative"),
        ({"window": 0}, "window must be a positive number of seconds"),
        ({"buckets": 0}, "buckets must be at least 1"),
    ],
)
def test_budget_rejects_bad_arguments(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetryBudget(**kwargs)  # type: ignore[arg-type]


# -- circuit breaker ---------------------------------------------------------------------

NAME = "gpt4-gateway/10.0.0.3:9000"


def make_breaker(clock: FakeClock, seed: int = 1, **changes: float) -> CircuitBreaker:
    settings_: dict[str, float] = {
        "error_threshold": 0.5,
        "min_requests": 20,
        "window": 10.0,
        "consecutive_errors": 5,
        "open_duration": 10.0,
        "max_open_duration": 300.0,
    }
    settings_.update(changes)
    return CircuitBreaker(
        NAME,
        error_threshold=settings_["error_threshold"],
        min_requests=int(settings_["min_requests"]),
        window=settings_["window"],
        consecutive_errors=int(settings_["consecutive_errors"]),
        open_duration=settings_["open_duration"],
        max_open_duration=settings_["max_open_duration"],
        clock=clock,
        rng=random.Random(seed),
    )


def test_breaker_opens_at_the_error_rate_only_after_min_requests() -> None:
    clock = FakeClock()
    b = make_breaker(clock, consecutive_errors=100)
    for i in range(19):  # F, O, F, O, ...: 10 errors in 19 calls
        assert b.allow()
        b.record(ok=i % 2 == 1)
        clock.advance(0.1)
    assert b.state is State.CLOSED  # 53% errors, but too few calls to trust
    b.record(ok=True)  # the 20th call: 10 of 20 = 50%
    assert b.state is State.OPEN
    assert not b.allow()
    assert b.trips == 1


def test_breaker_stays_closed_below_the_rate_and_forgets_old_errors() -> None:
    clock = FakeClock()
    b = make_breaker(clock, consecutive_errors=100)
    for i in range(100):  # 40% errors
        b.record(ok=i % 5 >= 2)
        clock.advance(0.05)
    assert b.state is State.CLOSED
    for _ in range(15):
        b.record(ok=False)
    clock.advance(11.0)  # those errors leave the window
    for _ in range(20):
        b.record(ok=True)
    assert b.state is State.CLOSED


def test_breaker_opens_on_consecutive_errors_whatever_the_rate() -> None:
    clock = FakeClock()
    b = make_breaker(clock)
    for ok in [False] * 4 + [True] + [False] * 4:
        b.record(ok)
    assert b.state is State.CLOSED
    b.record(ok=False)  # the fifth in a row; 9 of 10 calls is below min_requests
    assert b.state is State.OPEN


def trip(b: CircuitBreaker) -> None:
    for _ in range(b.consecutive_errors):
        b.record(ok=False)


def test_breaker_open_period_then_one_probe_at_a_time() -> None:
    clock = FakeClock()
    b = make_breaker(clock)
    trip(b)
    until = b.open_until
    assert until is not None and 8.0 <= until - clock.now <= 12.0
    assert re.fullmatch(rf"<Breaker {NAME} OPEN \d+s>", repr(b))
    b.record(ok=False)  # a call from before the trip: ignored
    assert b.open_until == until
    clock.now = until - 0.001
    assert not b.allow()
    clock.now = until
    assert b.state is State.HALF_OPEN and b.open_until is None
    assert repr(b) == f"<Breaker {NAME} HALF_OPEN ready>"
    assert b.allow()  # the probe
    assert repr(b) == f"<Breaker {NAME} HALF_OPEN probing>"
    clock.advance(1.0)
    assert not b.allow() and not b.allow()  # one at a time
    b.record(ok=True)
    assert b.state is State.CLOSED
    assert all(b.allow() for _ in range(10))
    assert repr(b) == f"<Breaker {NAME} CLOSED>"


def test_breaker_failed_probes_reopen_for_doubling_jittered_capped_periods() -> None:
    clock = FakeClock()
    b = make_breaker(clock)
    trip(b)
    periods = []
    for expected_trips in range(2, 10):
        until = b.open_until
        assert until is not None
        clock.now = until
        assert b.allow()
        b.record(ok=False)  # the probe fails
        assert b.state is State.OPEN and b.trips == expected_trips
        new_until = b.open_until
        assert new_until is not None
        periods.append(new_until - clock.now)
    bases = [20, 40, 80, 160, 300, 300, 300, 300]
    for period, base in zip(periods, bases, strict=True):
        assert 0.8 * base <= period <= min(300, 1.2 * base)
    assert len({round(p, 6) for p in periods[4:]}) == 4  # jittered even at the cap
    assert f"trips={b.trips}>" in repr(b)


def test_breaker_trip_count_resets_after_a_period_of_health() -> None:
    clock = FakeClock()
    b = make_breaker(clock, max_open_duration=100.0)
    trip(b)
    for _ in range(2):  # two failed probes: trips = 3
        clock.now = b.open_until or 0.0
        assert b.allow()
        b.record(ok=False)
    clock.now = b.open_until or 0.0
    assert b.allow()
    b.record(ok=True)
    assert b.state is State.CLOSED and b.trips == 3
    clock.advance(50.0)
    trip(b)  # soon after: the period keeps growing (trip 4: 80 s, +-20%)
    assert b.trips == 4
    assert 64.0 <= (b.open_until or 0.0) - clock.now <= 96.0
    clock.now = b.open_until or 0.0
    assert b.allow()
    b.record(ok=True)
    clock.advance(100.0)  # healthy for reset_after (= max_open_duration)
    assert b.trips == 0
    trip(b)
    assert b.trips == 1
    assert 8.0 <= (b.open_until or 0.0) - clock.now <= 12.0


def test_breaker_replaces_a_probe_that_never_reports() -> None:
    clock = FakeClock()
    b = make_breaker(clock)
    trip(b)
    period = (b.open_until or 0.0) - clock.now
    clock.now = b.open_until or 0.0
    assert b.allow()
    clock.advance(period - 0.01)
    assert not b.allow()
    clock.advance(0.02)  # the probe is presumed lost
    assert b.allow()


def test_breaker_outcomes_after_the_open_period_decide_without_allow() -> None:
    """A caller may gate calls itself (ejecting an endpoint until open_until)."""
    clock = FakeClock()
    b = make_breaker(clock)
    trip(b)
    clock.now = b.open_until or 0.0
    b.record(ok=False)
    assert b.state is State.OPEN and b.trips == 2
    clock.now = b.open_until or 0.0
    b.record(ok=True)
    assert b.state is State.CLOSED
    trip(b)  # and it trips again: records were not ignored for good
    assert b.state is State.OPEN and b.trips == 3


def test_breaker_from_spec_and_validation() -> None:
    spec = CircuitBreakerSpec(
        enabled=True, error_threshold=0.3, min_requests=10, consecutive_errors=3
    )
    b = CircuitBreaker.from_spec("svc", spec, FakeClock(), random.Random(1))
    assert (b.error_threshold, b.min_requests, b.window) == (0.3, 10, 10.0)
    assert (b.consecutive_errors, b.open_duration, b.max_open_duration) == (3, 10.0, 300.0)
    for ok in [False, True, False, True, False, True, True, True, True]:
        b.record(ok)
    assert b.state is State.CLOSED
    b.record(ok=True)  # 3 errors in 10 calls: exactly 30% trips, though 0.3 * 10 > 3 in floats
    assert b.state is State.OPEN
    with pytest.raises(ValueError, match=r"error_threshold must be in \(0, 1\], got 1.5"):
        make_breaker(FakeClock(), error_threshold=1.5)
    with pytest.raises(ValueError, match=r"max_open_duration must be at least open_duration"):
        make_breaker(FakeClock(), max_open_duration=5.0)
    with pytest.raises(ValueError, match="min_requests must be at least 1, got 0"):
        make_breaker(FakeClock(), min_requests=0)


@PROPERTY
@given(
    st.lists(
        st.sampled_from(["allow", "ok", "fail", "tick", "wait"]),
        max_size=200,
    ),
    st.integers(0, 1000),
)
def test_breaker_invariants_under_any_sequence(ops: list[str], seed: int) -> None:
    clock = FakeClock()
    b = make_breaker(clock, seed, min_requests=4, consecutive_errors=3, max_open_duration=40.0)
    for op in ops:
        if op == "tick":
            clock.advance(0.5)
        elif op == "wait":
            clock.advance(7.0)
        elif op == "allow":
            before = b.state
            until = b.open_until
            allowed = b.allow()
            if before is State.CLOSED:
                assert allowed
            elif before is State.OPEN:
                assert not allowed and until is not None and clock.now < until
            if allowed and before is not State.CLOSED:
                assert b.state is State.HALF_OPEN
                assert not b.allow()  # never two probes at once
        else:
            b.record(op == "ok")
        if b.state is State.OPEN:
            until = b.open_until
            assert until is not None and 0 < until - clock.now <= 40.0
        assert b.trips >= 0


# -- concurrency limits ------------------------------------------------------------------


def test_limits_refuse_at_max_requests_with_an_actionable_error() -> None:
    limits = ConcurrencyLimits(max_requests=2, max_pending=0, max_retries=1, service="gpt4")
    limits.start()
    limits.start()
    with pytest.raises(LimitExceeded) as caught:
        limits.start()
    err = caught.value
    assert err.code is UNAVAILABLE and err.limit == "max_requests"
    assert err.message.startswith("gpt4: max_requests (2) reached, 2 calls in flight")
    assert "circuitBreaker.maxRequests" in err.message
    limits.finish()
    limits.start()  # a slot came free
    assert repr(limits) == "<Limits gpt4 requests 2/2 pending 0/0 retries 0/1>"
    with pytest.raises(LimitExceeded, match=r"gpt4: max_pending \(0\) reached"):
        limits.start_pending()
    assert limits.rejected == {"max_requests": 1, "max_pending": 1, "max_retries": 0}


def test_limits_retries_take_a_retry_and_a_request_slot() -> None:
    limits = ConcurrencyLimits(max_requests=3, max_retries=1, service="svc")
    limits.start_retry()
    assert (limits.requests, limits.retries) == (1, 1)
    with pytest.raises(LimitExceeded, match=r"svc: max_retries \(1\) reached, 1 retries"):
        limits.start_retry()
    limits.finish_retry()
    limits.start()
    limits.start()
    limits.start()
    with pytest.raises(LimitExceeded, match="max_requests"):
        limits.start_retry()
    assert limits.retries == 0  # the refused retry took no retry slot
    for _ in range(5):  # finishes without starts never go below zero
        limits.finish()
        limits.finish_retry()
        limits.finish_pending()
    assert (limits.requests, limits.pending, limits.retries) == (0, 0, 0)


def test_limits_from_spec_and_validation() -> None:
    spec = CircuitBreakerSpec(max_requests=7, max_pending=8, max_retries=0)
    limits = ConcurrencyLimits.from_spec("svc", spec)
    assert (limits.max_requests, limits.max_pending, limits.max_retries) == (7, 8, 0)
    with pytest.raises(LimitExceeded, match="max_retries"):
        limits.start_retry()
    with pytest.raises(ValueError, match="max_requests must be at least 1, got 0"):
        ConcurrencyLimits(max_requests=0)
    with pytest.raises(ValueError, match="max_retries must not be negative"):
        ConcurrencyLimits(max_retries=-1)


# -- retry policy and decide() -----------------------------------------------------------


def policy(attempts: int = 3) -> RetryPolicy:
    return RetryPolicy(
        attempts=attempts,
        per_try_timeout=None,
        retry_on=frozenset({UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}),
        backoff=Backoff(0.1, 1.0),
    )


def budget(retries: int = 100) -> RetryBudget:
    """A budget of exactly `retries` retries while no calls are recorded."""
    return RetryBudget(ratio=0.2, min_per_second=retries / 10, window=10.0, clock=FakeClock())


def test_decide_retries_after_a_jittered_backoff() -> None:
    rng = random.Random(5)
    b = budget()
    d = decide(policy(), 1, UNAVAILABLE, None, 5.0, b, rng)
    assert isinstance(d, Retry) and 0 <= d.delay <= 0.1 and not d.pushback
    d = decide(policy(), 2, UNAVAILABLE, None, None, b, rng)
    assert isinstance(d, Retry) and 0 <= d.delay <= 0.2
    # After a retry on pushback, A6 restarts the backoff sequence.
    delays = [
        decide(policy(5), 4, UNAVAILABLE, None, None, b, rng, backoff_attempt=1) for _ in range(50)
    ]
    assert all(isinstance(d, Retry) and d.delay <= 0.1 for d in delays)
    assert b.retries_allowed == 52


def test_decide_pushback_sets_the_delay() -> None:
    d = decide(policy(), 1, UNAVAILABLE, "250", 5.0, budget(), random.Random(1))
    assert d == Retry(0.25, pushback=True)
    assert str(d) == "retry after 250ms (server pushback)"


@pytest.mark.parametrize(
    ("attempt", "code", "pushback", "deadline_left", "reason"),
    [
        (1, grpc.StatusCode.INVALID_ARGUMENT, None, None, "not_retryable"),
        (1, grpc.StatusCode.OK, None, None, "not_retryable"),
        (3, UNAVAILABLE, None, None, "attempts_exhausted"),
        (3, UNAVAILABLE, "100", None, "attempts_exhausted"),  # pushback cannot add attempts
        (1, UNAVAILABLE, "-1", None, "pushback"),
        (1, UNAVAILABLE, "soon", None, "pushback"),
        (1, UNAVAILABLE, "500", 0.4, "deadline"),
        (1, UNAVAILABLE, "0", 0.0, "deadline"),
        (1, UNAVAILABLE, None, -1.0, "deadline"),
    ],
)
def test_decide_stop_reasons(
    attempt: int,
    code: grpc.StatusCode,
    pushback: str | None,
    deadline_left: float | None,
    reason: str,
) -> None:
    b = budget()
    d = decide(policy(), attempt, code, pushback, deadline_left, b, random.Random(1))
    assert isinstance(d, Stop) and d.reason == reason
    assert str(d).startswith("stop: ")
    # Only a retry that will be sent is charged to the budget, and no stop counts as denied.
    assert (b.retries_allowed, b.retries_denied) == (0, 0)


def test_decide_stops_when_the_budget_is_spent() -> None:
    b = budget(retries=1)
    rng = random.Random(1)
    assert isinstance(decide(policy(), 1, UNAVAILABLE, None, None, b, rng), Retry)
    d = decide(policy(), 1, UNAVAILABLE, None, None, b, rng)
    assert isinstance(d, Stop) and d.reason == "budget"
    assert "retry budget spent" in d.detail
    assert (b.retries_allowed, b.retries_denied) == (1, 1)


@PROPERTY
@given(
    st.integers(1, 6),
    st.sampled_from(list(grpc.StatusCode)),
    st.none() | st.sampled_from(["0", "50", "-1", "x", "2000"]),
    st.none() | st.floats(-1, 3),
    st.integers(0, 1000),
)
def test_decide_retries_only_when_everything_allows(
    attempt: int,
    code: grpc.StatusCode,
    pushback: str | None,
    deadline_left: float | None,
    seed: int,
) -> None:
    p = policy(attempts=4)
    d = decide(p, attempt, code, pushback, deadline_left, budget(), random.Random(seed))
    if isinstance(d, Retry):
        assert code in p.retry_on and attempt < p.attempts
        parsed = from_pushback(pushback)
        assert parsed != "stop"
        assert (
            d.delay == parsed if parsed is not None else 0 <= d.delay <= p.backoff.ceiling(attempt)
        )
        assert deadline_left is None or d.delay < deadline_left


def test_retry_policy_from_spec_caps_attempts_per_a6() -> None:
    spec = RetrySpec(
        attempts=9,
        per_try_timeout=2.0,
        retry_on=(UNAVAILABLE, UNAVAILABLE),
        backoff=BackoffSpec(base=0.05, max=0.5),
    )
    p = RetryPolicy.from_spec(spec)
    assert p == RetryPolicy(5, 2.0, frozenset({UNAVAILABLE}), Backoff(0.05, 0.5))
    assert repr(p) == "<RetryPolicy 5x on UNAVAILABLE per_try=2s <Backoff 50ms..500ms x2>>"
    with pytest.raises(ValueError, match="attempts must be between 1 and 5"):
        RetryPolicy(0, None, frozenset({UNAVAILABLE}), Backoff(0, 0))
    with pytest.raises(ValueError, match="retry_on must not contain OK"):
        RetryPolicy(2, None, frozenset({grpc.StatusCode.OK}), Backoff(0, 0))
    with pytest.raises(ValueError, match="attempt must be at least 1"):
        decide(p, 0, UNAVAILABLE, None, None, budget(), random.Random(1))
