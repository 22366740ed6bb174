"""The ServiceMesh configuration as frozen dataclasses.

These are plain values: `load.py` is the one place that checks them, so code that receives a
`MeshConfig` may trust every field. Defaults here are the documented defaults; the loader
leaves a field out when the YAML does, and the dataclass fills it in, so each default is
written once. Durations are seconds (float), percentages are fractions from 0 to 1.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import grpc

from ..security.authz import Rule

API_VERSION = "mesh.ai/v1"
KIND = "ServiceMesh"

ALGORITHMS = (
    "round_robin",
    "weighted_round_robin",
    "least_connections",
    "latency",
    "random",
    "load_aware",
)
Algorithm = Literal[
    "round_robin",
    "weighted_round_robin",
    "least_connections",
    "latency",
    "random",
    "load_aware",
]

MTLS_MODES = ("STRICT", "PERMISSIVE", "DISABLE")
MtlsMode = Literal["STRICT", "PERMISSIVE", "DISABLE"]

HeaderMatchKind = Literal["exact", "prefix", "regex", "present"]


@dataclass(frozen=True, slots=True)
class Metadata:
    name: str
    namespace: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: str  # as written: "10.0.0.3:9000" or "[::1]:9000"
    host: str  # without brackets, so it can be handed to a resolver
    port: int
    weight: int = 1
    zone: str = ""


@dataclass(frozen=True, slots=True)
class HealthCheckSpec:
    """Active checks with grpc.health.v1."""

    enabled: bool = True
    interval: float = 10.0
    timeout: float = 1.0
    threshold: int = 3  # consecutive failures that mark an endpoint unhealthy
    healthy_threshold: int = 1  # consecutive successes that mark it healthy again
    service: str = ""  # the grpc.health.v1 service name; "" = the whole server


@dataclass(frozen=True, slots=True)
class OutlierSpec:
    """Passive ejection: endpoints that keep failing real calls are taken out for a while."""

    consecutive_errors: int = 5
    base_ejection_time: float = 30.0
    # Never eject more than this share of a service, so a bad deploy cannot empty it.
    max_ejection_percent: float = 0.5


@dataclass(frozen=True, slots=True)
class LoadBalancerSpec:
    algorithm: Algorithm = "least_connections"
    health_check: HealthCheckSpec = field(default_factory=HealthCheckSpec)
    outlier_detection: OutlierSpec = field(default_factory=OutlierSpec)


@dataclass(frozen=True, slots=True)
class CircuitBreakerSpec:
    enabled: bool = False
    error_threshold: float = 0.5  # error rate over `window` that opens the breaker
    min_requests: int = 20  # below this many calls in `window` the rate is not trusted
    window: float = 10.0
    consecutive_errors: int = 5  # opens on this many errors in a row, whatever the rate
    open_duration: float = 10.0  # first open period; repeated trips back off up to the max
    max_open_duration: float = 300.0
    max_requests: int = 1024  # concurrent calls
    max_pending: int = 1024  # calls waiting for a connection or a slot
    max_retries: int = 3  # concurrent retries


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    name: str
    models: tuple[str, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    load_balancer: LoadBalancerSpec = field(default_factory=LoadBalancerSpec)
    circuit_breaker: CircuitBreakerSpec = field(default_factory=CircuitBreakerSpec)
    timeout: float | None = None
    max_message_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    name: str  # lowercase, as gRPC metadata keys are
    kind: HeaderMatchKind
    value: str = ""  # for exact, prefix and regex
    present: bool = True  # for kind "present": True = must be sent, False = must be absent
    pattern: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def matches(self, value: str | None) -> bool:
        if self.kind == "present":
            return (value is not None) == self.present
        if value is None:
            return False
        if self.kind == "exact":
            return value == self.value
        if self.kind == "prefix":
            return value.startswith(self.value)
        # Whole-value match, as Envoy's safe_regex does: "gpt" must not match "not-gpt-4".
        return self.pattern is not None and self.pattern.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """Conditions on a call; all given ones must hold, and no conditions match every call."""

    service: str | None = None  # full gRPC service name: "aimesh.inference.v1.Inference"
    method: str | None = None  # method name within `service`: "GenerateStream"
    headers: tuple[HeaderMatch, ...] = ()
    models: tuple[str, ...] = ()  # the request's `model`, for Inference calls

    def matches(
        self,
        service: str,
        method: str,
        headers: Mapping[str, str],
        model: str | None,
    ) -> bool:
        """Whether a call matches. `headers` keys are lowercase, as gRPC delivers metadata;
        `model` is None for calls that carry no model (anything but Inference)."""
        if self.service is not None and service != self.service:
            return False
        if self.method is not None and method != self.method:
            return False
        if self.models and model not in self.models:
            return False
        return all(h.matches(headers.get(h.name)) for h in self.headers)


@dataclass(frozen=True, slots=True)
class Route:
    destination: str
    weight: int = 100
    # Ask this destination for another model (cross-provider failover: a gpt-4 call
    # served by claude-gateway must ask for a Claude model). None: the caller's model.
    model: str | None = None
    arm: str | None = None  # the experiment arm's name (default: the destination)

    @property
    def arm_name(self) -> str:
        return self.arm or self.destination


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One entry of the model catalog: who serves it and what it costs."""

    name: str
    provider: str = ""  # "openai", "anthropic", "self-hosted", ...
    input_price: float = 0.0  # USD per 1M input (prompt) tokens
    output_price: float = 0.0  # USD per 1M output (completion) tokens

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        return (tokens_in * self.input_price + tokens_out * self.output_price) / 1e6


BALANCES = ("weighted", "cost")
Balance = Literal["weighted", "cost"]


@dataclass(frozen=True, slots=True)
class BackoffSpec:
    base: float = 0.025
    max: float = 0.25


@dataclass(frozen=True, slots=True)
class RetrySpec:
    attempts: int = 1  # total tries including the first, so 1 = no retry
    per_try_timeout: float | None = None
    retry_on: tuple[grpc.StatusCode, ...] = (grpc.StatusCode.UNAVAILABLE,)
    backoff: BackoffSpec = field(default_factory=BackoffSpec)


@dataclass(frozen=True, slots=True)
class HedgeSpec:
    """Hedged unary calls: if no answer after `delay`, send the call again elsewhere."""

    delay: float = 0.05
    attempts: int = 2  # in all, the first included


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    name: str
    routes: tuple[Route, ...]
    match: RouteMatch = field(default_factory=RouteMatch)
    backups: tuple[str, ...] = ()  # failover order when every route destination is down
    timeout: float | None = None
    retry: RetrySpec | None = None
    resume: bool = True  # resume broken token streams on another endpoint
    hedge: HedgeSpec | None = None  # unary calls only; a policy has retry or hedge, not both
    # "weighted": split by the routes' weights. "cost": the cheapest destination (by the
    # model catalog's prices) that is healthy, not rate-limited and meets the latency
    # objective; the others in price order are its failover.
    balance: Balance = "weighted"
    latency_objective: float | None = None  # seconds: time to first token (or answer)
    experiment: str | None = None  # tag calls with the experiment and their arm

    def shares(self) -> tuple[tuple[str, float], ...]:
        """(destination, fraction of calls) per route; fractions sum to 1."""
        total = sum(r.weight for r in self.routes)
        return tuple((r.destination, r.weight / total if total else 0.0) for r in self.routes)


@dataclass(frozen=True, slots=True)
class MtlsSpec:
    mode: MtlsMode = "DISABLE"


@dataclass(frozen=True, slots=True)
class AuthorizationSpec:
    enabled: bool = False
    # Parsed and checked at load time (mesh/security/authz.py: parse_rules); in order.
    rules: tuple[Rule, ...] = ()


@dataclass(frozen=True, slots=True)
class SecuritySpec:
    mtls: MtlsSpec = field(default_factory=MtlsSpec)
    authorization: AuthorizationSpec = field(default_factory=AuthorizationSpec)


@dataclass(frozen=True, slots=True)
class TracingSpec:
    """Distributed tracing with OpenTelemetry: spans exported over OTLP/gRPC. Settings
    left out (None) come from the standard OTEL_* environment variables."""

    enabled: bool = False  # false: only --otlp-endpoint or OTEL_* variables turn it on
    endpoint: str | None = None  # the collector, HOST:PORT (or http(s)://HOST:PORT)
    sampling_ratio: float | None = None  # share of new traces kept, 0 to 1 (default 1)
    service_name: str | None = None  # resource service.name (default aimesh-proxy, ...)


@dataclass(frozen=True, slots=True)
class ObservabilitySpec:
    tracing: TracingSpec = field(default_factory=TracingSpec)


@dataclass(frozen=True, slots=True)
class MeshConfig:
    metadata: Metadata
    services: tuple[ServiceSpec, ...] = ()
    # In order: the first policy whose match holds decides where a call goes.
    traffic_policies: tuple[TrafficPolicy, ...] = ()
    models: tuple[ModelSpec, ...] = ()  # the model catalog: providers and prices
    security: SecuritySpec = field(default_factory=SecuritySpec)
    observability: ObservabilitySpec = field(default_factory=ObservabilitySpec)
    api_version: str = API_VERSION
    kind: str = KIND
    warnings: tuple[str, ...] = ()  # found while loading; never fatal

    # Linear scans: configs hold tens of services, and the data path builds its own tables.
    def service(self, name: str) -> ServiceSpec | None:
        return next((s for s in self.services if s.name == name), None)

    def model(self, name: str) -> ModelSpec | None:
        return next((m for m in self.models if m.name == name), None)

    def service_for_model(self, model: str) -> ServiceSpec | None:
        return next((s for s in self.services if model in s.models), None)

    def destinations(self) -> set[str]:
        """Every service named by a route or a backup, declared or not."""
        names: set[str] = set()
        for policy in self.traffic_policies:
            names.update(r.destination for r in policy.routes)
            names.update(policy.backups)
        return names
