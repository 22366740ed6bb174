"""Load balancing: endpoints and the pickers that choose among them (pure, no I/O)."""

from __future__ import annotations

from .endpoint import Endpoint
from .pickers import (
    ALGORITHMS,
    BasePicker,
    Latency,
    LeastConnections,
    LoadAware,
    NoEndpointError,
    Picker,
    Random,
    RoundRobin,
    WeightedRoundRobin,
    make_picker,
)

__all__ = [
    "ALGORITHMS",
    "BasePicker",
    "Endpoint",
    "Latency",
    "LeastConnections",
    "LoadAware",
    "NoEndpointError",
    "Picker",
    "Random",
    "RoundRobin",
    "WeightedRoundRobin",
    "make_picker",
]
