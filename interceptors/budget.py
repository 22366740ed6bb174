"""A retry budget (Linkerd, Finagle): retries may add at most a fixed share of load.

Per-call attempt limits do not stop a retry storm: when a backend fails every call, three
attempts per call triple its load exactly when it can least take it. A budget caps
retries across all calls to a service instead: within any `window` seconds, at most
`ratio` * (original calls in those seconds) + `min_per_second` * `window` retries. The
floor lets a quiet service still retry its occasional failure.

Counts live in a ring of time buckets, so each operation is O(1) and memory is fixed
whatever the rate. Pure: time comes from the injected `clock`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

Clock = Callable[[], float]


class SlidingCounts:
    """Event counts over the last `window` seconds, in `buckets` time buckets.

    A bucketed ring cannot say exactly which events fell in the last `window` seconds,
    only which buckets did, so it answers two questions that bracket the truth:

    - `over(now, field)`: every event of the last `window` seconds, and up to one bucket
      older (a superset). Use it for what must not exceed a limit.
    - `within(now, field)`: only events of the last `window` seconds, missing up to one
      bucket at the old end (a subset). Use it for what a limit is derived from.

    Limiting a superset by a subset keeps a bound exact despite the bucketing. The ring
    holds `buckets + 1` slots: the current, partly filled bucket and `buckets` full ones.
    Times are the caller's clock readings; a reading earlier than the last one counts in
    the current bucket, so a clock that steps back cannot corrupt the ring.
    """

    __slots__ = ("_counts", "_index", "_sums", "_width", "buckets", "window")

    def __init__(self, window: float, buckets: int = 10, fields: int = 2) -> None:
        if not (math.isfinite(window) and window > 0):
            raise ValueError(f"window must be a positive number of seconds, got {window}")
        if buckets < 1:
            raise ValueError(f"buckets must be at least 1, got {buckets}")
        self.window = window
        self.buckets = buckets
        self._width = window / buckets
        self._counts = [[0] * fields for _ in range(buckets + 1)]
        self._sums = [0] * fields  # over all buckets + 1 slots
        self._index: int | None = None  # bucket number of the newest slot

    def _advance(self, now: float) -> int:
        """The current bucket's slot, after clearing the slots that fell out of the ring."""
        index = math.floor(now / self._width)
        slots = len(self._counts)
        last = self._index
        if last is None or index > last:
            if last is not None:
                # Clear each slot reused since the last call; at most the whole ring, so
                # a long idle gap costs the same as a short one.
                for n in range(last + 1, last + 1 + min(index - last, slots)):
                    stale = self._counts[n % slots]
                    for f, count in enumerate(stale):
                        self._sums[f] -= count
                        stale[f] = 0
            self._index = last = index
        return last % slots

    def add(self, now: float, field: int, n: int = 1) -> None:
        self._counts[self._advance(now)][field] += n
        self._sums[field] += n

    def over(self, now: float, field: int) -> int:
        self._advance(now)
        return self._sums[field]

    def within(self, now: float, field: int) -> int:
        slot = self._advance(now)
        # The slot after the current one is the oldest: the one spanning the window's start.
        return self._sums[field] - self._counts[(slot + 1) % len(self._counts)][field]

    def reset(self) -> None:
        for slot in self._counts:
            slot[:] = [0] * len(slot)
        self._sums = [0] * len(self._sums)

    def __repr__(self) -> str:
        return f"<SlidingCounts {self.window:g}s/{self.buckets} sums={self._sums}>"


_REQUESTS = 0
_RETRIES = 1


class RetryBudget:
    """At most `ratio` * requests + `min_per_second` * `window` retries per `window` seconds.

    Call `record_request()` for every original call (not for retries), and `try_acquire()`
    just before sending a retry: it says whether the retry fits and, if it does, counts it.
    Checking and counting in one step means two callers cannot both take the last retry.
    `can_retry()` only looks.

    The bound holds whenever a retry is granted: retries over (a superset of) the last
    `window` seconds, this one included, never exceed the allowance from requests within
    (a subset of) them. With `buckets` buckets the allowance is up to 1/`buckets` lower
    than the exact one, never higher.
    """

    def __init__(
        self,
        ratio: float = 0.2,
        min_per_second: float = 10.0,
        window: float = 10.0,
        clock: Clock = time.monotonic,
        *,
        buckets: int = 10,
    ) -> None:
        if not (math.isfinite(ratio) and ratio >= 0):
            raise ValueError(f"ratio must not be negative, got {ratio}")
        if not (math.isfinite(min_per_second) and min_per_second >= 0):
            raise ValueError(f"min_per_second must not be negative, got {min_per_second}")
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.window = window
        self._clock = clock
        self._counts = SlidingCounts(window, buckets, fields=2)
        # The floor in retries per window; fixed, so computed once.
        self._reserve = min_per_second * window
        self.retries_allowed = 0
        self.retries_denied = 0

    def record_request(self) -> None:
        self._counts.add(self._clock(), _REQUESTS)

    def _allowance(self, now: float) -> float:
        return self.ratio * self._counts.within(now, _REQUESTS) + self._reserve

    def _fits(self, now: float) -> bool:
        return self._counts.over(now, _RETRIES) + 1 <= self._allowance(now)

    def allowance(self) -> float:
        """Retries the current window may hold in total."""
        return self._allowance(self._clock())

    def remaining(self) -> int:
        """Retries that would be granted now, if asked for one after another."""
        now = self._clock()
        return max(0, math.floor(self._allowance(now) - self._counts.over(now, _RETRIES)))

    def can_retry(self) -> bool:
        return self._fits(self._clock())

    def try_acquire(self) -> bool:
        """Counts a retry and returns True if it fits the budget; else False, counting nothing."""
        # One clock reading for the check and the count, so both see the same window.
        now = self._clock()
        if not self._fits(now):
            self.retries_denied += 1
            return False
        self._counts.add(now, _RETRIES)
        self.retries_allowed += 1
        return True

    def __repr__(self) -> str:
        return (
            f"<RetryBudget {self.ratio:.0%}+{self.min_per_second:g}/s per {self.window:g}s "
            f"remaining={self.remaining()} allowed={self.retries_allowed} "
            f"denied={self.retries_denied}>"
        )
