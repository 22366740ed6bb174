"""Whether and when to retry a failed attempt: the retry policy and its decision.

`decide()` weighs, in order, everything that can rule a retry out (gRFC A6 plus a
budget): the status must be one the policy retries, attempts must remain, the server
must not have pushed back with "stop", the wait must end before the deadline, and the
service's retry budget must have room. The budget comes last because asking it spends
it: only a retry that will really be sent is charged.

Whether a call can be retried at all (nothing committed to the caller yet, a stream that
can resume) is the caller's question; this module only answers "may we, and when".
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

import grpc

from aimesh.mesh.config import MAX_ATTEMPTS, RetrySpec

from .backoff import Backoff, from_pushback
from .budget import RetryBudget

StopReason = Literal["not_retryable", "attempts_exhausted", "pushback", "deadline", "budget"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How one route retries: up to `attempts` tries in all (the first one included)."""

    attempts: int
    per_try_timeout: float | None
    retry_on: frozenset[grpc.StatusCode]
    backoff: Backoff

    def __post_init__(self) -> None:
        if not 1 <= self.attempts <= MAX_ATTEMPTS:
            raise ValueError(
                f"attempts must be between 1 and {MAX_ATTEMPTS} (the first try included), "
                f"got {self.attempts}"
            )
        if self.per_try_timeout is not None and not self.per_try_timeout > 0:
            raise ValueError(f"per_try_timeout must be positive, got {self.per_try_timeout}")
        if grpc.StatusCode.OK in self.retry_on:
            raise ValueError("retry_on must not contain OK: success is not retried")

    @classmethod
    def from_spec(cls, spec: RetrySpec) -> RetryPolicy:
        # A6 treats a larger maxAttempts as 5 rather than rejecting the config.
        return cls(
            attempts=min(spec.attempts, MAX_ATTEMPTS),
            per_try_timeout=spec.per_try_timeout,
            retry_on=frozenset(spec.retry_on),
            backoff=Backoff.from_spec(spec.backoff),
        )

    def __repr__(self) -> str:
        codes = ",".join(sorted(c.name for c in self.retry_on))
        per_try = f" per_try={self.per_try_timeout:g}s" if self.per_try_timeout else ""
        return f"<RetryPolicy {self.attempts}x on {codes}{per_try} {self.backoff!r}>"


@dataclass(frozen=True, slots=True)
class Retry:
    """Retry after `delay` seconds. `pushback`: the server chose the delay, so A6 restarts
    the backoff sequence at its first step for any retry after this one."""

    delay: float
    pushback: bool = False

    def __str__(self) -> str:
        source = " (server pushback)" if self.pushback else ""
        return f"retry after {self.delay * 1000:.0f}ms{source}"


@dataclass(frozen=True, slots=True)
class Stop:
    """Do not retry: `reason` is for metrics labels, `detail` for logs and people."""

    reason: StopReason
    detail: str

    def __str__(self) -> str:
        return f"stop: {self.detail}"


RetryDecision = Retry | Stop


def decide(
    policy: RetryPolicy,
    attempt: int,
    code: grpc.StatusCode,
    pushback: str | None,
    deadline_left: float | None,
    budget: RetryBudget,
    rng: random.Random,
    *,
    backoff_attempt: int | None = None,
) -> RetryDecision:
    """What to do after try number `attempt` (1 = the original call) failed with `code`.

    `pushback` is the `grpc-retry-pushback-ms` trailer as received (None if absent);
    `deadline_left` is seconds until the call's deadline (None: no deadline).
    `backoff_attempt` is the retry's step in the backoff sequence when it differs from
    `attempt`: A6 restarts the sequence after a retry made on server pushback, so pass
    the number of tries since the last `Retry(pushback=True)`.

    The one side effect: a `Retry` has taken a retry from `budget`.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be at least 1 (the original call), got {attempt}")
    if code not in policy.retry_on:
        return Stop("not_retryable", f"{code.name} is not a status this route retries")
    if attempt >= policy.attempts:
        return Stop("attempts_exhausted", f"all {policy.attempts} attempts used")
    pushed = from_pushback(pushback)
    if pushed == "stop":
        return Stop("pushback", f"the server asked not to be retried ({pushback!r})")
    if pushed is None:
        delay = policy.backoff.delay(attempt if backoff_attempt is None else backoff_attempt, rng)
    else:
        delay = pushed
    if deadline_left is not None and delay >= deadline_left:
        return Stop(
            "deadline",
            f"{max(0.0, deadline_left) * 1000:.0f}ms left before the deadline, "
            f"less than the {delay * 1000:.0f}ms wait before a retry",
        )
    if not budget.try_acquire():
        return Stop(
            "budget",
            f"retry budget spent: retries already reached {budget.ratio:.0%} of calls "
            f"plus {budget.min_per_second:g}/s over the last {budget.window:g}s",
        )
    return Retry(delay, pushback=pushed is not None)
