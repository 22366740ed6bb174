"""Fault settings of a sim instance and the pure decisions made from them."""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc


@dataclass(frozen=True, slots=True)
class Faults:
    error_rate: float = 0.0
    error_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    extra_latency: float = 0.0  # seconds
    die_after_tokens: int = 0  # 0 = never
    die_exits_process: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"error_rate must be between 0 and 1, got {self.error_rate}")
        if self.error_code == grpc.StatusCode.OK:
            raise ValueError("error_code must be an error status, not OK")
        if self.extra_latency < 0:
            raise ValueError(f"extra_latency must not be negative, got {self.extra_latency}")
        if self.die_after_tokens < 0:
            raise ValueError(f"die_after_tokens must not be negative, got {self.die_after_tokens}")

    def injected_error(self, rng: random.Random) -> grpc.StatusCode | None:
        """The status this call fails with, or None; draws from rng only when needed."""
        if self.error_rate > 0.0 and rng.random() < self.error_rate:
            return self.error_code
        return None
