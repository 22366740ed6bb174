"""The ServiceMesh config: the reference and local examples, every validation rule (by the
exact path it reports), RouteMatch.matches, the summary and `config validate`."""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aimesh.mesh.config import (
    CircuitBreakerSpec,
    HeaderMatch,
    MeshConfig,
    RetrySpec,
    RouteMatch,
    load_dict,
    load_file,
    load_text,
    run_validate,
    summary,
)
from aimesh.mesh.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "deploy" / "examples" / "reference.yaml"
LOCAL = ROOT / "deploy" / "examples" / "local.yaml"
INFERENCE = "aimesh.inference.v1.Inference"

BASE: dict[str, Any] = {
    "apiVersion": "mesh.ai/v1",
    "kind": "ServiceMesh",
    "metadata": {"name": "m"},
    "spec": {
        "services": [{"name": "a", "models": ["gpt-4"]}, {"name": "b"}],
        "trafficPolicies": [{"name": "p", "routes": [{"destination": "a"}]}],
    },
}


def doc(**spec: Any) -> dict[str, Any]:
    """BASE with some spec keys replaced."""
    d = copy.deepcopy(BASE)
    d["spec"].update(spec)
    return d


def policy(**fields: Any) -> dict[str, Any]:
    """A one-policy document; `fields` replace the policy's."""
    return doc(trafficPolicies=[{"name": "p", "routes": [{"destination": "a"}], **fields}])


def service(**fields: Any) -> dict[str, Any]:
    """A one-service document; `fields` replace the service's."""
    return doc(services=[{"name": "a", **fields}])


def errors(data: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_dict(data, "test")
    assert info.value.source == "test"
    return info.value.errors


def error(data: object) -> str:
    found = errors(data)
    assert len(found) == 1, found
    return found[0]


# --- the examples -------------------------------------------------------------------------


def test_control_plane_example_loads_without_warnings() -> None:
    cfg = load_file(ROOT / "deploy" / "examples" / "control-plane.yaml")
    assert cfg.warnings == [] or cfg.warnings == ()
    assert all(not s.endpoints for s in cfg.services)  # instances come from the registry
    [canary] = cfg.traffic_policies
    assert canary.match.models == ("gpt-4",)
    assert canary.shares() == (("gpt4-gateway", 0.9), ("gpt4-gateway-v2", 0.1))


def test_reference_document_loads_with_its_warnings() -> None:
    cfg = load_file(REFERENCE)
    svc = cfg.services[0]
    assert (cfg.api_version, cfg.kind, cfg.metadata.name) == (
        "mesh.ai/v1",
        "ServiceMesh",
        "ai-gateway-mesh",
    )
    assert cfg.metadata.namespace == "default"
    assert svc.load_balancer.algorithm == "least_connections"
    assert svc.load_balancer.health_check.interval == 10.0
    assert svc.load_balancer.health_check.threshold == 3
    assert svc.circuit_breaker.enabled and svc.circuit_breaker.error_threshold == 0.5
    canary = cfg.traffic_policies[0]
    assert canary.shares() == (("gpt4-gateway", 0.9), ("gpt4-gateway-v2", 0.1))
    assert cfg.security.mtls.mode == "STRICT" and cfg.security.authorization.enabled
    assert [w.split(":")[0] for w in cfg.warnings] == [
        "spec.trafficPolicies[0].routes[1].destination",
        "spec.security.mtls.mode",
    ]
    assert [r.name for r in cfg.security.authorization.rules] == [
        "no-batch-to-gpt4",
        "inference-api",
    ]
    assert cfg.warnings[0] == (
        'spec.trafficPolicies[0].routes[1].destination: service "gpt4-gateway-v2" is not '
        "declared in spec.services; it will only get endpoints from the control plane or "
        "--endpoint flags"
    )
    assert "applies to the proxies and backends that have a mesh identity" in cfg.warnings[1]


def test_local_example_uses_every_feature_without_warnings() -> None:
    cfg = load_file(LOCAL)
    assert cfg.warnings == ()
    counts = {s.name: (s.models, len(s.endpoints)) for s in cfg.services}
    assert counts == {
        "gpt4-gateway": (("gpt-4",), 3),
        "claude-gateway": (("claude-3-5-sonnet",), 2),
        "custom-llm": (("llama-3-8b",), 3),
    }
    assert all(e.host == "127.0.0.1" for s in cfg.services for e in s.endpoints)
    ab, llama, canary, default = cfg.traffic_policies
    assert [h.kind for h in ab.match.headers] == ["exact", "regex", "present"]
    assert llama.match.models == ("llama-3-8b",) and llama.retry is not None
    assert llama.retry.retry_on == (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert canary.backups == ("custom-llm",) and default.match == RouteMatch()
    assert cfg.destinations() == {"gpt4-gateway", "claude-gateway", "custom-llm"}
    claude = cfg.service_for_model("claude-3-5-sonnet")
    assert claude is not None and claude is cfg.service("claude-gateway")
    assert cfg.service_for_model("nope") is None and cfg.service("nope") is None


def test_defaults_fill_what_the_document_leaves_out() -> None:
    cfg = load_dict(BASE)
    svc = cfg.services[1]
    assert svc.load_balancer.health_check.timeout == 1.0
    assert svc.load_balancer.outlier_detection.max_ejection_percent == 0.5
    assert svc.circuit_breaker == CircuitBreakerSpec()
    assert svc.circuit_breaker.max_open_duration == 300.0
    assert (svc.timeout, svc.max_message_bytes) == (None, None)
    pol = cfg.traffic_policies[0]
    assert pol.routes[0].weight == 100 and pol.resume and pol.retry is None
    assert cfg.security.mtls.mode == "DISABLE" and cfg.warnings == ()


def test_explicit_null_means_the_default() -> None:
    cfg = load_dict(service(timeout=None, loadBalancer=None, models=None))
    assert cfg.services[0].timeout is None and cfg.services[0].models == ()


# --- document-level errors ----------------------------------------------------------------


def test_api_version_and_kind_say_what_is_expected() -> None:
    d = copy.deepcopy(BASE)
    d["apiVersion"], d["kind"] = "mesh.ai/v2", "Mesh"
    assert errors(d) == [
        'apiVersion: must be "mesh.ai/v1", got "mesh.ai/v2"',
        'kind: must be "ServiceMesh", got "Mesh"',
    ]
    del d["apiVersion"]
    assert errors(d)[0] == 'apiVersion: required; must be "mesh.ai/v1"'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the document is empty"),
        ("# only a comment\n", "the document is empty"),
        ("- a\n- b\n", "the document must be a mapping"),
        ("just text", "the document must be a mapping"),
        ("a: b\n  c: d\n", "line 2, column 4: invalid YAML: mapping values are not allowed"),
        ("a: [1,\n", "line 2, column 1: invalid YAML"),
        ("kind: x\nkind: y\n", 'line 2, column 1: invalid YAML: duplicate key "kind"'),
    ],
)
def test_unreadable_documents(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(text, "f.yaml")
    assert info.value.source == "f.yaml"
    assert len(info.value.errors) == 1 and info.value.errors[0].startswith(message)


def test_metadata() -> None:
    d = copy.deepcopy(BASE)
    d["metadata"] = {"name": "Mesh_1", "namespace": "prod", "labels": {"tier": 1}}
    assert errors(d) == [
        'metadata.name: "Mesh_1" is not a DNS-1123 label (lowercase letters, digits and '
        "'-', starting and ending with a letter or digit, at most 63 characters)",
        'metadata.labels.tier: must be a string, got 1 (quote it: "1")',
    ]
    d["metadata"] = {"namespace": "prod"}
    assert errors(d) == ["metadata.name: required"]


def test_all_errors_are_collected_at_once() -> None:
    d = doc()
    d["kind"] = "Mesh"
    d["spec"]["services"][1]["circuitBreaker"] = {"errorThreshold": "150%"}
    d["spec"]["trafficPolicies"][0]["timeout"] = "soon"
    assert errors(d) == [
        'kind: must be "ServiceMesh", got "Mesh"',
        'spec.services[1].circuitBreaker.errorThreshold: "150%" is not between 0% and 100%',
        'spec.trafficPolicies[0].timeout: "soon" is not a duration; '
        "write it like 10s, 250ms, 1m or 1h",
    ]


# --- unknown fields and wrong types -------------------------------------------------------


def test_unknown_field_names_the_path_and_the_allowed_keys() -> None:
    assert error(service(loadBalancr={})) == (
        "spec.services[0].loadBalancr: unknown field; allowed: name, models, endpoints, "
        "loadBalancer, circuitBreaker, timeout, maxMessageBytes"
    )
    d = copy.deepcopy(BASE)
    d["status"] = {}
    assert error(d) == "status: unknown field; allowed: apiVersion, kind, metadata, spec"
    nested = service(loadBalancer={"healthCheck": {"intervall": "1s"}})
    assert error(nested).startswith(
        "spec.services[0].loadBalancer.healthCheck.intervall: unknown field; allowed: enabled, "
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (doc(services={"name": "a"}), "spec.services: must be a list, got a mapping"),
        (doc(services=["a"]), 'spec.services[0]: must be a mapping, got "a"'),
        (
            service(loadBalancer=["x"]),
            "spec.services[0].loadBalancer: must be a mapping, got a list",
        ),
        (service(models="gpt-4"), 'spec.services[0].models: must be a list, got "gpt-4"'),
        (service(models=[""]), "spec.services[0].models[0]: must not be empty"),
        (
            service(maxMessageBytes="1MB"),
            'spec.services[0].maxMessageBytes: must be an integer >= 1, got "1MB"',
        ),
        (
            service(loadBalancer={"healthCheck": {"enabled": "yes please"}}),
            "spec.services[0].loadBalancer.healthCheck.enabled: "
            'must be true or false, got "yes please"',
        ),
        (
            service(loadBalancer={"healthCheck": {"threshold": True}}),
            "spec.services[0].loadBalancer.healthCheck.threshold: "
            "must be an integer >= 1, got true",
        ),
        (
            service(loadBalancer={"algorithm": "fastest"}),
            "spec.services[0].loadBalancer.algorithm: must be one of round_robin, "
            'weighted_round_robin, least_connections, latency, random, load_aware; got "fastest"',
        ),
        (
            doc(security={"mtls": {"mode": "strict"}}),
            'spec.security.mtls.mode: must be one of STRICT, PERMISSIVE, DISABLE; got "strict"',
        ),
        (
            doc(security={"authorization": {"rules": [{"from": "x"}, 3]}}),
            "spec.security.authorization.rules[1]: must be a mapping, got 3",
        ),
        (doc(security=[]), "spec.security: must be a mapping, got an empty list"),
    ],
)
def test_wrong_types(data: dict[str, Any], message: str) -> None:
    assert error(data) == message


# --- durations and percentages ------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("10x", '"10x" is not a duration; write it like 10s, 250ms, 1m or 1h'),
        ("-1s", '"-1s" is not a duration; write it like 10s, 250ms, 1m or 1h'),
        (-1, "-1 is negative; a duration must be 0 or more"),
        ("0s", '"0s" must be more than 0'),
        (True, "true is not a duration; write it like 10s or 250ms"),
        ([1], "a list is not a duration; write it like 10s or 250ms"),
    ],
)
def test_bad_durations(value: object, message: str) -> None:
    assert error(service(timeout=value)) == f"spec.services[0].timeout: {message}"


@pytest.mark.parametrize(
    ("value", "seconds"), [("10s", 10.0), ("250ms", 0.25), ("1m", 60.0), (2, 2.0)]
)
def test_good_durations(value: object, seconds: float) -> None:
    assert load_dict(service(timeout=value)).services[0].timeout == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("150%", '"150%" is not between 0% and 100%'),
        ("half", '"half" is not a percentage; write it like 50%'),
        (50, "50 is not between 0% and 100%; write percentages like 50%"),
    ],
)
def test_bad_percentages(value: object, message: str) -> None:
    path = "spec.services[0].circuitBreaker.errorThreshold"
    assert error(service(circuitBreaker={"errorThreshold": value})) == f"{path}: {message}"


def test_breaker_open_durations_are_ordered() -> None:
    data = service(circuitBreaker={"enabled": True, "openDuration": "1m", "maxOpenDuration": "10s"})
    assert error(data) == (
        "spec.services[0].circuitBreaker.maxOpenDuration: "
        "must be at least openDuration (60s), got 10s"
    )


# --- services, endpoints, models ----------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "host", "port"),
    [
        ("127.0.0.1:50051", "127.0.0.1", 50051),
        ("GPU-1.local:1", "gpu-1.local", 1),
        ("[::1]:80", "::1", 80),
    ],
)
def test_endpoint_addresses(address: str, host: str, port: int) -> None:
    e = load_dict(service(endpoints=[{"address": address}])).services[0].endpoints[0]
    assert (e.address, e.host, e.port, e.weight, e.zone) == (address, host, port, 1, "")


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("127.0.0.1", "the port is missing"),
        (":80", "the host is empty"),
        ("h:0", "the port must be a number from 1 to 65535"),
        ("h:65536", "the port must be a number from 1 to 65535"),
        ("h:http", "the port must be a number from 1 to 65535"),
        ("::1:80", "write IPv6 addresses in brackets"),
        ("[::1]", "is not [IPV6]:PORT"),
        ("[nope]:80", "is not an IPv6 address"),
    ],
)
def test_bad_endpoint_addresses(address: str, problem: str) -> None:
    message = error(service(endpoints=[{"address": address}]))
    assert message.startswith("spec.services[0].endpoints[0].address: ") and problem in message


def test_endpoint_fields_and_duplicates() -> None:
    data = service(
        endpoints=[
            {"address": "[::1]:80"},
            {"address": "[0::1]:80", "weight": 0},
            {"weight": 2},
        ]
    )
    assert errors(data) == [
        "spec.services[0].endpoints[1].weight: must be an integer >= 1, got 0",
        "spec.services[0].endpoints[2].address: required",
        'spec.services[0].endpoints[1].address: duplicate address "[::1]:80" '
        "(also spec.services[0].endpoints[0].address)",
    ]


def test_duplicate_service_names() -> None:
    data = doc(services=[{"name": "a"}, {"name": "b"}, {"name": "a"}])
    assert (
        error(data)
        == 'spec.services[2].name: duplicate service name "a" (also spec.services[0].name)'
    )


def test_a_model_is_served_by_one_service() -> None:
    data = doc(
        services=[{"name": "a", "models": ["gpt-4"]}, {"name": "b", "models": ["x", "gpt-4"]}]
    )
    assert error(data) == (
        'spec.services[1].models[1]: model "gpt-4" is served by both "a" (spec.services[0]) '
        'and "b"; a model may be served by one service only'
    )


def test_service_name_must_be_a_dns_label() -> None:
    assert error(service(name="GPT4")).startswith(
        'spec.services[0].name: "GPT4" is not a DNS-1123 label'
    )


# --- traffic policies ---------------------------------------------------------------------


def test_route_weights() -> None:
    data = policy(routes=[{"destination": "a", "weight": 9}, {"destination": "b", "weight": "ten"}])
    assert (
        error(data)
        == 'spec.trafficPolicies[0].routes[1].weight: must be an integer >= 0, got "ten"'
    )
    data = policy(routes=[{"destination": "a", "weight": 9}, {"destination": "b"}])
    assert error(data) == (
        "spec.trafficPolicies[0].routes[1].weight: required when a policy has more than one route"
    )
    data = policy(routes=[{"destination": "a", "weight": 0}, {"destination": "b", "weight": 0}])
    assert error(data) == (
        "spec.trafficPolicies[0].routes: "
        "weights sum to 0; at least one route needs a weight above 0"
    )
    assert error(policy(routes=[])) == (
        "spec.trafficPolicies[0].routes: must list at least one route, got an empty list"
    )
    data = policy(routes=[{"destination": "a", "weight": 1}, {"destination": "a", "weight": 1}])
    assert error(data) == (
        'spec.trafficPolicies[0].routes[1].destination: duplicate destination "a" '
        "(also spec.trafficPolicies[0].routes[0].destination)"
    )


def test_policy_names_are_required_and_unique() -> None:
    route = [{"destination": "a"}]
    data = doc(
        trafficPolicies=[
            {"name": "p", "routes": route},
            {"name": "p", "routes": route},
            {"routes": route},
        ]
    )
    assert errors(data) == [
        "spec.trafficPolicies[2].name: required",
        'spec.trafficPolicies[1].name: duplicate policy name "p" '
        "(also spec.trafficPolicies[0].name)",
    ]


@given(st.lists(st.integers(min_value=0, max_value=10_000), min_size=2, max_size=8).filter(any))
def test_any_valid_weight_list_round_trips(weights: list[int]) -> None:
    routes = [{"destination": f"s{i}", "weight": w} for i, w in enumerate(weights)]
    cfg = load_dict(policy(routes=routes))
    pol = cfg.traffic_policies[0]
    assert [r.weight for r in pol.routes] == weights
    assert sum(share for _, share in pol.shares()) == pytest.approx(1.0)
    assert cfg.destinations() == {f"s{i}" for i in range(len(weights))}


def test_undeclared_destinations_and_backups_are_warnings() -> None:
    cfg = load_dict(
        policy(
            routes=[{"destination": "a", "weight": 1}, {"destination": "x", "weight": 1}],
            backups=["b", "y"],
        )
    )
    assert [w.split(":")[0] for w in cfg.warnings] == [
        "spec.trafficPolicies[0].routes[1].destination",
        "spec.trafficPolicies[0].backups[1]",
    ]
    assert 'service "y" is not declared in spec.services' in cfg.warnings[1]
    assert cfg.destinations() == {"a", "x", "b", "y"}


def test_backups_must_be_service_names_without_repeats() -> None:
    assert errors(policy(backups=["b", "b", "B"])) == [
        'spec.trafficPolicies[0].backups[2]: "B" is not a DNS-1123 label (lowercase letters, '
        "digits and '-', starting and ending with a letter or digit, at most 63 characters)",
        'spec.trafficPolicies[0].backups[1]: duplicate backup "b" '
        "(also spec.trafficPolicies[0].backups[0])",
    ]


def test_a_catch_all_policy_before_others_is_a_warning() -> None:
    route = [{"destination": "a"}]
    cfg = load_dict(
        doc(trafficPolicies=[{"name": "all", "routes": route}, {"name": "late", "routes": route}])
    )
    assert cfg.warnings == (
        'spec.trafficPolicies[0].match: policy "all" matches every call, so the policies '
        "after it (late) never apply",
    )


def test_header_regexes_re2_cannot_compile_are_a_warning() -> None:
    headers = {
        "x-tenant": {"regex": "(?!internal).*"},  # lookahead
        "x-pair": {"regex": "(a)\\1"},  # backreference
        "x-team": {"regex": "team-[a-z]+"},  # fine in both
    }
    cfg = load_dict(policy(match={"headers": headers}))
    assert [w.split(":")[0] for w in cfg.warnings] == [
        "spec.trafficPolicies[0].match.headers.x-tenant",
        "spec.trafficPolicies[0].match.headers.x-pair",
    ]
    assert "Envoy and gRPC clients on xDS reject the route table" in cfg.warnings[0]


def test_breaker_settings_while_disabled_are_a_warning() -> None:
    cfg = load_dict(service(circuitBreaker={"errorThreshold": "10%"}))
    assert cfg.warnings[0].startswith(
        "spec.services[0].circuitBreaker.enabled: false (the default)"
    )


# --- retry --------------------------------------------------------------------------------


def test_retry_defaults_and_values() -> None:
    assert load_dict(policy(retry={})).traffic_policies[0].retry == RetrySpec()
    retry = (
        load_dict(
            policy(
                retry={
                    "attempts": 5,
                    "perTryTimeout": "2s",
                    "retryOn": ["unavailable", 8, "UNAVAILABLE"],
                    "backoff": {"base": "10ms", "max": "1s"},
                }
            )
        )
        .traffic_policies[0]
        .retry
    )
    assert retry is not None
    assert (retry.attempts, retry.per_try_timeout) == (5, 2.0)
    assert retry.retry_on == (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert (retry.backoff.base, retry.backoff.max) == (0.01, 1.0)


@pytest.mark.parametrize(
    ("retry", "message"),
    [
        (
            {"attempts": 6},
            "retry.attempts: 6 is above the cap of 5 attempts (the first try included)",
        ),
        ({"attempts": 0}, "retry.attempts: must be an integer >= 1, got 0"),
        (
            {"retryOn": ["UNAVALABLE"]},
            'retry.retryOn[0]: unknown gRPC status "UNAVALABLE"; use a name (',
        ),
        ({"retryOn": ["OK"]}, "retry.retryOn[0]: OK is success, not something to retry"),
        ({"retryOn": []}, "retry.retryOn: must list at least one status"),
        (
            {"backoff": {"base": "1s", "max": "10ms"}},
            "retry.backoff.max: must be at least base (1s), got 10ms",
        ),
        ({"perTryTimeout": "fast"}, 'retry.perTryTimeout: "fast" is not a duration'),
    ],
)
def test_bad_retry(retry: dict[str, Any], message: str) -> None:
    assert error(policy(retry=retry)).startswith(f"spec.trafficPolicies[0].{message}")


# --- matches ------------------------------------------------------------------------------


def match_of(match: dict[str, Any]) -> RouteMatch:
    return load_dict(policy(match=match)).traffic_policies[0].match


def test_match_on_service_and_method() -> None:
    m = match_of({"service": INFERENCE, "method": "GenerateStream"})
    assert m.matches(INFERENCE, "GenerateStream", {}, None)
    assert not m.matches(INFERENCE, "Generate", {}, None)
    assert not m.matches("grpc.health.v1.Health", "GenerateStream", {}, None)
    service_only = match_of({"service": INFERENCE})
    assert service_only.matches(INFERENCE, "Embed", {}, "gpt-4")
    assert RouteMatch().matches("any.Service", "Any", {}, None)


def test_match_on_models() -> None:
    m = match_of({"models": ["gpt-4", "llama-3-8b"]})
    assert m.matches(INFERENCE, "Generate", {}, "llama-3-8b")
    assert not m.matches(INFERENCE, "Generate", {}, "claude-3-5-sonnet")
    assert not m.matches(INFERENCE, "ListModels", {}, None)


def test_match_on_headers() -> None:
    m = match_of(
        {
            "headers": {
                "X-AB-Group": "b",
                "x-tenant": {"prefix": "team-"},
                "x-user": {"regex": "vip-[0-9]+"},
                "x-debug": {"present": False},
            }
        }
    )
    assert [h.name for h in m.headers] == ["x-ab-group", "x-tenant", "x-user", "x-debug"]
    good = {"x-ab-group": "b", "x-tenant": "team-red", "x-user": "vip-42"}
    assert m.matches(INFERENCE, "Generate", good, None)
    assert not m.matches(INFERENCE, "Generate", {**good, "x-debug": "1"}, None)
    assert not m.matches(INFERENCE, "Generate", {**good, "x-ab-group": "a"}, None)
    assert not m.matches(INFERENCE, "Generate", {**good, "x-tenant": "red-team"}, None)
    # A regex must match the whole value, not a part of it.
    assert not m.matches(INFERENCE, "Generate", {**good, "x-user": "not-vip-42"}, None)
    assert not m.matches(INFERENCE, "Generate", {"x-tenant": "team-red", "x-user": "vip-1"}, None)


def test_header_match_values() -> None:
    assert HeaderMatch("x", "present").matches("")
    assert not HeaderMatch("x", "present").matches(None)
    assert HeaderMatch("x", "present", present=False).matches(None)
    assert not HeaderMatch("x", "exact", "a").matches(None)


@pytest.mark.parametrize(
    ("match", "message"),
    [
        (
            {"headers": {"x-user": {"regex": "("}}},
            'headers.x-user.regex: invalid regular expression "(": '
            "missing ), unterminated subpattern",
        ),
        (
            {"headers": {"x-a": {"exact": "a", "prefix": "b"}}},
            "headers.x-a: must have exactly one of exact, prefix, regex, present",
        ),
        (
            {"headers": {"x-a": {}}},
            "headers.x-a: must have exactly one of exact, prefix, regex, present",
        ),
        (
            {"headers": {"x-a": {"exakt": "a"}}},
            "headers.x-a.exakt: unknown field; allowed: exact, prefix",
        ),
        (
            {"headers": {"x-a": {"present": "yes"}}},
            'headers.x-a.present: must be true or false, got "yes"',
        ),
        (
            {"headers": {"x-a": 1}},
            "headers.x-a: must be a string (exact match) or a mapping with one of",
        ),
        ({"headers": {"x a": "1"}}, 'headers.x a: "x a" is not a header name'),
        ({"headers": {"trace-bin": "1"}}, 'headers.trace-bin: "trace-bin" is binary metadata'),
        ({"headers": {"X-A": "1", "x-a": "2"}}, 'headers.x-a: duplicate header "x-a"'),
        ({"headers": ["x-a"]}, "headers: must be a mapping of header name to match, got a list"),
        ({"method": "Generate"}, "method: requires match.service"),
        ({"service": "/aimesh.inference.v1.Inference/Generate"}, 'service: "/aimesh.inference.v1'),
        ({"service": INFERENCE, "method": "Gen.erate"}, 'method: "Gen.erate" is not a gRPC name'),
        ({"models": []}, "models: must list at least one model"),
        ({"model": ["gpt-4"]}, "model: unknown field; allowed: service, method, headers, models"),
    ],
)
def test_bad_matches(match: dict[str, Any], message: str) -> None:
    assert error(policy(match=match)).startswith(f"spec.trafficPolicies[0].match.{message}")


# --- summary and `config validate` --------------------------------------------------------


def test_summary_shows_services_policies_and_warnings() -> None:
    text = summary(load_file(REFERENCE))
    assert "ServiceMesh ai-gateway-mesh (namespace default)" in text
    assert "gpt4-gateway: no models; endpoints from the control plane; least_connections" in text
    assert "canary-rollout: every call -> gpt4-gateway 90%, gpt4-gateway-v2 10%" in text
    assert "warnings (2):" in text
    local = summary(load_file(LOCAL))
    assert "gpt4-gateway: gpt-4; 3 endpoints; least_connections" in local
    assert 'llama-traffic: header x-tenant starts with "team-" and model in [llama-3-8b]' in local


def test_summary_shows_splits_as_percentages() -> None:
    routes = [{"destination": d, "weight": 1} for d in ("a", "b", "c")]
    assert "p: every call -> a 33.3%, b 33.3%, c 33.3%" in summary(load_dict(policy(routes=routes)))


def test_validate_a_good_file() -> None:
    out, err = io.StringIO(), io.StringIO()
    assert run_validate(str(LOCAL), out, err) == 0
    assert out.getvalue() == summary(load_file(LOCAL)) + "\n"
    assert err.getvalue() == ""


def test_validate_a_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        REFERENCE.read_text().replace("50%", "150%").replace("weight: 10", "weight: ten")
    )
    out, err = io.StringIO(), io.StringIO()
    assert run_validate(str(bad), out, err) == 1
    assert out.getvalue() == ""
    assert err.getvalue().splitlines() == [
        f"{bad}: 2 error(s)",
        '  spec.services[0].circuitBreaker.errorThreshold: "150%" is not between 0% and 100%',
        '  spec.trafficPolicies[0].routes[1].weight: must be an integer >= 0, got "ten"',
    ]


def test_validate_a_missing_file(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    missing = tmp_path / "nope.yaml"
    assert run_validate(str(missing), out, err) == 2
    assert err.getvalue() == f"{missing}: no such file\n" and out.getvalue() == ""


def test_config_is_frozen() -> None:
    cfg: MeshConfig = load_file(REFERENCE)
    with pytest.raises(AttributeError):
        cfg.services = ()  # type: ignore[misc]
