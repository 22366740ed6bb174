"""The ServiceMesh configuration (apiVersion mesh.ai/v1): model, loader, validator.

    cfg = load_file("deploy/examples/local.yaml")   # raises ConfigError listing every problem
    cfg.service_for_model("gpt-4")

The format is documented field by field in docs/config.md.
"""

from .load import MAX_ATTEMPTS, is_dns_label, load_dict, load_file, load_text, parse_host_port
from .schema import (
    ALGORITHMS,
    API_VERSION,
    KIND,
    MTLS_MODES,
    AuthorizationSpec,
    BackoffSpec,
    CircuitBreakerSpec,
    Endpoint,
    HeaderMatch,
    HealthCheckSpec,
    HedgeSpec,
    LoadBalancerSpec,
    MeshConfig,
    Metadata,
    ModelSpec,
    MtlsSpec,
    ObservabilitySpec,
    OutlierSpec,
    RetrySpec,
    Route,
    RouteMatch,
    SecuritySpec,
    ServiceSpec,
    TracingSpec,
    TrafficPolicy,
)
from .validate_cli import run_validate, summary

__all__ = [
    "ALGORITHMS",
    "API_VERSION",
    "KIND",
    "MAX_ATTEMPTS",
    "MTLS_MODES",
    "AuthorizationSpec",
    "BackoffSpec",
    "CircuitBreakerSpec",
    "Endpoint",
    "HeaderMatch",
    "HealthCheckSpec",
    "HedgeSpec",
    "LoadBalancerSpec",
    "MeshConfig",
    "Metadata",
    "ModelSpec",
    "MtlsSpec",
    "ObservabilitySpec",
    "OutlierSpec",
    "RetrySpec",
    "Route",
    "RouteMatch",
    "SecuritySpec",
    "ServiceSpec",
    "TracingSpec",
    "TrafficPolicy",
    "is_dns_label",
    "load_dict",
    "load_file",
    "load_text",
    "parse_host_port",
    "run_validate",
    "summary",
]
