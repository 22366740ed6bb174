"""ORCA load reports (xds.data.orca.v3.OrcaLoadReport) in trailing metadata.

Backends attach one to every response under `endpoint-load-metrics-bin`, the key gRPC
and Envoy read for per-call load reporting (gRFC A51), so balancers can weigh endpoints
by what they report rather than guess from latency.

grpcio's client (C-core) consumes `endpoint-load-metrics-bin` for its own LB policies and
does not hand it to the application (checked with grpcio 1.85: the trailer is on the
wire, a grpclib client sees it, `call.trailing_metadata()` does not). So the same bytes
also go under `aimesh-load-bin`, which Python balancers (the aimesh proxy, the proxyless
channel) read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from xds.data.orca.v3 import orca_load_report_pb2

ORCA_TRAILER = "endpoint-load-metrics-bin"
AIMESH_LOAD_TRAILER = "aimesh-load-bin"
LOAD_TRAILERS = (ORCA_TRAILER, AIMESH_LOAD_TRAILER)

# Named metrics the sim backend reports (and load-aware pickers read).
QUEUE_DEPTH = "queue_depth"
ACTIVE = "active_generations"
SLOTS = "slots"


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What a balancer needs from one report."""

    application_utilization: float = 0.0
    cpu_utilization: float = 0.0
    rps: float = 0.0
    named: Mapping[str, float] = field(default_factory=dict)

    @property
    def queue_depth(self) -> float:
        return self.named.get(QUEUE_DEPTH, 0.0)

    def encode(self) -> bytes:
        msg = orca_load_report_pb2.OrcaLoadReport(
            application_utilization=self.application_utilization,
            cpu_utilization=self.cpu_utilization,
            rps_fractional=self.rps,
        )
        for k, v in self.named.items():
            msg.named_metrics[k] = v
        return bytes(msg.SerializeToString())

    @classmethod
    def decode(cls, data: bytes) -> LoadReport:
        msg = orca_load_report_pb2.OrcaLoadReport.FromString(data)
        return cls(
            application_utilization=msg.application_utilization,
            cpu_utilization=msg.cpu_utilization,
            rps=msg.rps_fractional,
            named=dict(msg.named_metrics),
        )


def from_metadata(metadata: object) -> LoadReport | None:
    """Finds and decodes the report in a sequence of (key, value) metadata pairs."""
    if not metadata:
        return None
    for key, value in metadata:  # type: ignore[attr-defined]
        if key in LOAD_TRAILERS and isinstance(value, bytes):
            return LoadReport.decode(value)
    return None
