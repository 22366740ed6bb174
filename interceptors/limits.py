"""Concurrency limits per service, as Envoy's circuit-breaker thresholds.

Three counters, each with a cap: calls in flight (`max_requests`), calls waiting for a
connection or a slot (`max_pending`) and retries in flight (`max_retries`). Unlike the
error-rate breaker these need no history: they bound how much one slow service can hold
of the proxy (tasks, memory, sockets) at any moment, so it cannot starve the others.

A call over a limit fails at once with UNAVAILABLE, which callers may retry elsewhere;
queueing it instead would hold the very resources the limit protects. A retry over
`max_retries` is not an error for the caller: the retry logic catches `LimitExceeded` and
returns the call's own failure instead of retrying. Pure counters; nothing here awaits.
"""

from __future__ import annotations

from typing import Literal

import grpc

from aimesh.mesh.config import CircuitBreakerSpec
from aimesh.mesh.errors import MeshError

Limit = Literal["max_requests", "max_pending", "max_retries"]

# The YAML key of each limit, so a message says what to change.
_KEYS: dict[Limit, str] = {
    "max_requests": "circuitBreaker.maxRequests",
    "max_pending": "circuitBreaker.maxPending",
    "max_retries": "circuitBreaker.maxRetries",
}
_WHAT: dict[Limit, str] = {
    "max_requests": "calls in flight",
    "max_pending": "calls waiting for a connection",
    "max_retries": "retries in flight",
}


class LimitExceeded(MeshError):
    """A call or retry refused because `service` is at one of its concurrency limits."""

    def __init__(self, service: str, limit: Limit, cap: int, current: int) -> None:
        super().__init__(
            grpc.StatusCode.UNAVAILABLE,
            f"{service}: {limit} ({cap}) reached, {current} {_WHAT[limit]}; "
            f"try again later, or raise {_KEYS[limit]} if the service can take more",
        )
        self.service = service
        self.limit = limit
        self.cap = cap


class ConcurrencyLimits:
    """Counts calls, pending calls and retries for one service; raises at a cap.

    Each `start_*` that returns must be paired with its `finish_*`, in a `finally`. A
    retry is a call too: `start_retry()` takes both a retry and a request slot, and
    `finish_retry()` gives both back, so a retry needs no `start()` of its own. Finishes
    without a start (a bug elsewhere) never drive a count below zero, which would
    silently raise the limit.
    """

    def __init__(
        self,
        max_requests: int = 1024,
        max_pending: int = 1024,
        max_retries: int = 3,
        *,
        service: str = "service",
    ) -> None:
        if max_requests < 1:
            raise ValueError(f"max_requests must be at least 1, got {max_requests}")
        if max_pending < 0:
            raise ValueError(f"max_pending must not be negative, got {max_pending}")
        if max_retries < 0:
            raise ValueError(f"max_retries must not be negative, got {max_retries}")
        self.service = service
        self.max_requests = max_requests
        self.max_pending = max_pending
        self.max_retries = max_retries
        self.requests = 0
        self.pending = 0
        self.retries = 0
        # Refusals per limit, for metrics: how often each cap was the reason.
        self.rejected: dict[Limit, int] = dict.fromkeys(_KEYS, 0)

    @classmethod
    def from_spec(cls, service: str, spec: CircuitBreakerSpec) -> ConcurrencyLimits:
        return cls(spec.max_requests, spec.max_pending, spec.max_retries, service=service)

    def _refuse(self, limit: Limit, cap: int, current: int) -> LimitExceeded:
        self.rejected[limit] += 1
        return LimitExceeded(self.service, limit, cap, current)

    def start(self) -> None:
        """A call is about to be sent; raises LimitExceeded at max_requests."""
        if self.requests >= self.max_requests:
            raise self._refuse("max_requests", self.max_requests, self.requests)
        self.requests += 1

    def finish(self) -> None:
        self.requests = max(0, self.requests - 1)

    def start_pending(self) -> None:
        """A call starts waiting for a connection or slot; raises LimitExceeded at max_pending."""
        if self.pending >= self.max_pending:
            raise self._refuse("max_pending", self.max_pending, self.pending)
        self.pending += 1

    def finish_pending(self) -> None:
        self.pending = max(0, self.pending - 1)

    def start_retry(self) -> None:
        """A retry is about to be sent; raises LimitExceeded at max_retries or max_requests."""
        if self.retries >= self.max_retries:
            raise self._refuse("max_retries", self.max_retries, self.retries)
        self.start()  # checks max_requests before the retry slot is taken
        self.retries += 1

    def finish_retry(self) -> None:
        self.retries = max(0, self.retries - 1)
        self.finish()

    def __repr__(self) -> str:
        return (
            f"<Limits {self.service} requests {self.requests}/{self.max_requests} "
            f"pending {self.pending}/{self.max_pending} retries {self.retries}/{self.max_retries}>"
        )
