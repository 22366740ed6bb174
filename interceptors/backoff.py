"""Retry backoff as gRPC defines it (gRFC A6), and the server's pushback trailer.

A6: the n-th retry waits `random(0, min(initialBackoff * backoffMultiplier**(n-1),
maxBackoff))`. Full jitter (the whole range from 0, not +-x% around the ceiling) spreads
the retries of many clients that failed together, so they do not hit the recovering
backend in one wave.

A server may override the wait with the `grpc-retry-pushback-ms` trailer: a
non-negative integer is the exact wait, anything else means "do not retry".

Pure: no clock, no sleeping; randomness comes in as `rng`.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Final, Literal

from aimesh.mesh.config import BackoffSpec

PUSHBACK_KEY: Final = "grpc-retry-pushback-ms"

# A6: "an ASCII encoded signed 32-bit integer with no unnecessary leading zeros".
_PUSHBACK = re.compile(r"0|-?[1-9][0-9]*")
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True, slots=True, repr=False)
class Backoff:
    """Exponential backoff with full jitter; `attempt` 1 is the first retry.

    `base` may be 0 (the config allows it): every retry is then immediate. `multiplier`
    is at least 1 so the ceilings never shrink: a later retry never waits less than an
    earlier one could have.
    """

    base: float
    maximum: float
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.base) and self.base >= 0):
            raise ValueError(f"base must not be negative, got {self.base:g}")
        if not math.isfinite(self.maximum) or self.maximum < self.base:
            raise ValueError(f"maximum must be at least base ({self.base:g}), got {self.maximum:g}")
        if not (math.isfinite(self.multiplier) and self.multiplier >= 1):
            raise ValueError(f"multiplier must be at least 1, got {self.multiplier:g}")

    @classmethod
    def from_spec(cls, spec: BackoffSpec) -> Backoff:
        return cls(spec.base, spec.max)

    def ceiling(self, attempt: int) -> float:
        """The longest wait before retry number `attempt` (1-based)."""
        if attempt < 1:
            raise ValueError(f"attempt must be at least 1 (the first retry), got {attempt}")
        try:
            grown = self.base * self.multiplier ** (attempt - 1)
        except OverflowError:  # a huge attempt number: long past the cap
            return self.maximum
        return min(self.maximum, grown)

    def delay(self, attempt: int, rng: random.Random) -> float:
        """A wait drawn uniformly from [0, ceiling(attempt)]."""
        # random() < 1, so ceiling * random() never exceeds ceiling, even after rounding.
        return self.ceiling(attempt) * rng.random()

    def __repr__(self) -> str:
        return f"<Backoff {self.base * 1000:g}ms..{self.maximum * 1000:g}ms x{self.multiplier:g}>"


def from_pushback(ms: str | None) -> float | Literal["stop"] | None:
    """The `grpc-retry-pushback-ms` trailer's meaning (gRFC A6).

    None when the trailer is absent (use the backoff); seconds to wait when it is a
    non-negative int32; "stop" when it is negative or malformed, since A6 reads anything
    unparseable as the server asking not to be retried. Strict on purpose: a server that
    sends " 100" or "1e3" gets no retry rather than a guess at what it meant.
    """
    if ms is None:
        return None
    if not _PUSHBACK.fullmatch(ms):
        return "stop"
    value = int(ms)
    if value < 0 or value > _INT32_MAX:
        return "stop"
    return value / 1000.0
