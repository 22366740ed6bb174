"""Endpoint: what the balancer knows about one backend address.

The balancer owns these objects and hands the eligible ones to a picker on every call;
the picker's `started`/`finished` keep the counters and estimates up to date. Plain
mutable state with `__slots__`: it is read on the proxy's hot path.
"""

from __future__ import annotations

from ..orca import LoadReport


class Endpoint:
    """Mutable per-endpoint state; `address` ("HOST:PORT") is the identity."""

    __slots__ = (
        "address",
        "ewma",
        "ewma_at",
        "inflight",
        "load",
        "load_at",
        "load_inflight",
        "weight",
        "zone",
    )

    def __init__(self, address: str, weight: int = 1, zone: str = "") -> None:
        if not address:
            raise ValueError("address must not be empty; use HOST:PORT")
        if weight < 1:
            raise ValueError(f"weight must be at least 1, got {weight} for {address}")
        self.address = address
        self.weight = weight
        self.zone = zone
        # Calls started and not yet finished (kept by the picker's started/finished).
        self.inflight = 0
        # Last ORCA report from this endpoint, and the clock time it arrived.
        self.load: LoadReport | None = None
        self.load_at = 0.0
        # `inflight` just after that report arrived: calls sent since then are
        # `inflight - load_inflight`, which the report cannot know about yet.
        self.load_inflight = 0
        # Peak-EWMA latency estimate in seconds (0.0: nothing observed yet).
        self.ewma = 0.0
        self.ewma_at = 0.0

    def __repr__(self) -> str:
        parts = [f"<Endpoint {self.address} w={self.weight} inflight={self.inflight}"]
        if self.load is not None:
            parts.append(f"q={self.load.queue_depth:g}")
        if self.ewma:
            parts.append(f"ewma={self.ewma * 1000:.0f}ms")
        if self.zone:
            parts.append(f"zone={self.zone}")
        return " ".join(parts) + ">"
