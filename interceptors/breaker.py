"""A circuit breaker: stop sending to a target that keeps failing, then probe it.

CLOSED     Calls flow; outcomes are counted over a sliding `window`. It trips when the
           error rate reaches `error_threshold` over at least `min_requests` calls (fewer
           calls say too little to act on), or on `consecutive_errors` errors in a row
           (a hard failure should not wait for `min_requests` calls to pile up).
OPEN       Calls are refused until `open_until`. Each trip in a row doubles the open
           period, up to `max_open_duration`, so a target that keeps failing is probed
           less and less often; +-20% jitter from `rng` keeps the breakers of many
           proxies from probing a recovering target in the same instant.
HALF_OPEN  One probe call at a time. Success closes the breaker; failure reopens it
           with the next, longer, period. The trip count goes back to 0 once the
           breaker has stayed closed for `reset_after` seconds.

Outcomes that arrive while OPEN belong to calls sent before the trip; they are ignored,
so the outage that tripped the breaker does not also lengthen its open period. After the
open period any outcome decides, the probe's or a late call's alike.
Pure: time and randomness come in as `clock` and `rng`; nothing here awaits.
"""

from __future__ import annotations

import enum
import math
import random
import time
from collections.abc import Callable

from aimesh.mesh.config import CircuitBreakerSpec

from .budget import SlidingCounts

Clock = Callable[[], float]

_CALLS = 0
_ERRORS = 1
_JITTER = 0.2  # open periods vary by +-20%


class State(enum.Enum):
    CLOSED = "CLOSED"
    OPEN = "OPEN"
    HALF_OPEN = "HALF_OPEN"


class CircuitBreaker:
    """Decides per call whether to send it (`allow()`), learns from outcomes (`record(ok)`)."""

    def __init__(
        self,
        name: str,
        *,
        error_threshold: float,
        min_requests: int,
        window: float,
        consecutive_errors: int,
        open_duration: float,
        max_open_duration: float,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
        reset_after: float | None = None,
    ) -> None:
        if not 0 < error_threshold <= 1:
            raise ValueError(f"error_threshold must be in (0, 1], got {error_threshold}")
        if min_requests < 1:
            raise ValueError(f"min_requests must be at least 1, got {min_requests}")
        if consecutive_errors < 1:
            raise ValueError(f"consecutive_errors must be at least 1, got {consecutive_errors}")
        if not (math.isfinite(open_duration) and open_duration > 0):
            raise ValueError(
                f"open_duration must be a positive number of seconds, got {open_duration}"
            )
        if not math.isfinite(max_open_duration) or max_open_duration < open_duration:
            raise ValueError(
                f"max_open_duration must be at least open_duration ({open_duration:g}), "
                f"got {max_open_duration}"
            )
        if reset_after is not None and not reset_after >= 0:
            raise ValueError(f"reset_after must not be negative, got {reset_after}")
        self.name = name
        self.error_threshold = error_threshold
        self.min_requests = min_requests
        self.consecutive_errors = consecutive_errors
        self.open_duration = open_duration
        self.max_open_duration = max_open_duration
        # Default: healthy for as long as the longest open period forgives past trips.
        self.reset_after = max_open_duration if reset_after is None else reset_after
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._counts = SlidingCounts(window, buckets=10, fields=2)
        self._state = State.CLOSED
        self._trips = 0  # trips in a row; see `trips` for the forgiving read
        self._streak = 0  # errors in a row while CLOSED
        self._open_until: float | None = None
        self._open_period = 0.0  # length of the last open period, jitter included
        self._closed_at: float | None = None  # when it last closed after a trip
        self._probe_at: float | None = None  # when the outstanding probe was allowed

    @classmethod
    def from_spec(
        cls,
        name: str,
        spec: CircuitBreakerSpec,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
    ) -> CircuitBreaker:
        """A breaker with `spec`'s thresholds; `spec.enabled` is for the caller to act on."""
        return cls(
            name,
            error_threshold=spec.error_threshold,
            min_requests=spec.min_requests,
            window=spec.window,
            consecutive_errors=spec.consecutive_errors,
            open_duration=spec.open_duration,
            max_open_duration=spec.max_open_duration,
            clock=clock,
            rng=rng,
        )

    # -- what tests, logs and the admin endpoint read ---------------------------------

    @property
    def state(self) -> State:
        """The state now: an OPEN breaker whose period has ended reads HALF_OPEN."""
        if self._state is State.OPEN and self._open_ended(self._clock()):
            return State.HALF_OPEN
        return self._state

    @property
    def open_until(self) -> float | None:
        """Clock time the open period ends; None unless OPEN."""
        return self._open_until if self.state is State.OPEN else None

    @property
    def trips(self) -> int:
        """Trips in a row: 0 once closed for `reset_after` seconds."""
        return 0 if self._forgiven(self._clock()) else self._trips

    @property
    def window(self) -> float:
        return self._counts.window

    # -- decisions --------------------------------------------------------------------

    def allow(self) -> bool:
        """Whether to send a call now. In HALF_OPEN a True makes that call the probe."""
        if self._state is State.CLOSED:
            return True
        now = self._clock()
        if self._state is State.OPEN:
            if not self._open_ended(now):
                return False
            self._state = State.HALF_OPEN
            self._probe_at = None
        if self._probe_at is not None and now - self._probe_at < self._open_period:
            return False
        # No probe out, or the one out has taken longer than an open period: presume it
        # lost (cancelled without a record) rather than stay half-open forever.
        self._probe_at = now
        return True

    def record(self, ok: bool) -> None:
        """The outcome of a call. A call the caller cancelled says nothing of the
        target's health: leave it out, or it would count as a success or an error."""
        now = self._clock()
        if self._state is State.CLOSED:
            self._counts.add(now, _CALLS)
            if ok:
                self._streak = 0
            else:
                self._counts.add(now, _ERRORS)
                self._streak += 1
            # A success can trip it too: the call that reaches min_requests may be one.
            if self._streak >= self.consecutive_errors or self._rate_tripped(now):
                self._trip(now)
        elif self._state is State.HALF_OPEN or self._open_ended(now):
            # Any outcome after the open period decides, the probe's or not: it is news
            # of the target as it is now, and a caller that gates calls some other way
            # (an endpoint ejected until `open_until`) never calls allow() at all.
            self._probe_at = None
            if ok:
                self._close(now)
            else:
                self._trip(now)
        # OPEN: the call was sent before the trip and fails with the same outage; it
        # must not extend the open period.

    # -- transitions ------------------------------------------------------------------

    def _rate_tripped(self, now: float) -> bool:
        calls = self._counts.within(now, _CALLS)
        if calls < self.min_requests:
            return False
        # A quotient, not errors >= threshold * calls: 0.3 * 10 is 3.0000000000000004.
        return self._counts.within(now, _ERRORS) / calls >= self.error_threshold

    def _open_ended(self, now: float) -> bool:
        return self._open_until is not None and now >= self._open_until

    def _forgiven(self, now: float) -> bool:
        return (
            self._state is State.CLOSED
            and self._closed_at is not None
            and now - self._closed_at >= self.reset_after
        )

    def _trip(self, now: float) -> None:
        if self._forgiven(now):
            self._trips = 0
        self._trips += 1
        # 2**(trips-1) overflows a float past ~1024 trips; long before that it is capped.
        period = min(self.max_open_duration, self.open_duration * 2.0 ** min(self._trips - 1, 64))
        # Jitter within what the cap leaves room for: at the cap the period is drawn from
        # [80%, 100%] of it, so capped breakers still spread out instead of all landing
        # on exactly max_open_duration.
        high = min(self.max_open_duration, period * (1 + _JITTER))
        drawn = self._rng.uniform(period * (1 - _JITTER), high)
        self._open_period = min(high, drawn)  # uniform() may round one ulp past `high`
        self._open_until = now + self._open_period
        self._state = State.OPEN
        self._probe_at = None
        self._closed_at = None

    def _close(self, now: float) -> None:
        self._state = State.CLOSED
        self._open_until = None
        self._closed_at = now
        self._streak = 0
        # A fresh start: the errors that tripped it say nothing about the target now.
        self._counts.reset()

    def __repr__(self) -> str:
        state = self.state
        parts = [f"<Breaker {self.name} {state.name}"]
        if state is State.OPEN and self._open_until is not None:
            parts.append(f"{math.ceil(self._open_until - self._clock())}s")
        elif state is State.HALF_OPEN:
            parts.append("probing" if self._probe_at is not None else "ready")
        trips = self.trips
        if trips > 1:  # only once the open period has started to grow
            parts.append(f"trips={trips}")
        return " ".join(parts) + ">"
