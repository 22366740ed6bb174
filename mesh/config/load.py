"""ServiceMesh YAML (or already parsed data) -> a validated `MeshConfig`.

Every problem is collected, not just the first, and named by its path in the document
(`spec.services[0].circuitBreaker.errorThreshold: ...`), so one run of
`aimesh config validate` shows everything to fix. Each section is described by a table of
fields (YAML key, attribute, parser); parsers raise `_Invalid` for a bad value, and the table
walker records it at the field's path and carries on with the default. Findings that are
worth knowing but not fatal are computed from the finished config as warnings.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import grpc
import yaml

from ..errors import ConfigError, status_code_from_name
from ..security.authz import Rule, parse_rules
from ..units import format_duration, parse_duration, parse_percent
from .schema import (
    ALGORITHMS,
    API_VERSION,
    BALANCES,
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

MAX_ATTEMPTS = 5  # more tries than this multiply load on a failing backend for little gain
T = TypeVar("T")


# --- walking the document ---------------------------------------------------------------


class _Invalid(Exception):
    """A value's problem; the walker reports it at the path of the field holding the value."""


@dataclass
class _Report:
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _At:
    """A position in the document, and where problems found there are written."""

    path: str
    report: _Report

    def key(self, name: str) -> _At:
        return _At(f"{self.path}.{name}" if self.path else name, self.report)

    def index(self, i: int) -> _At:
        return _At(f"{self.path}[{i}]", self.report)

    def error(self, message: str) -> None:
        self.report.errors.append(f"{self.path}: {message}" if self.path else message)


# A parser gets a value that is not None and returns the parsed value; it raises _Invalid
# for a bad value, or reports nested problems itself and returns None if it built nothing.
Parse = Callable[[object, _At], Any]


@dataclass(frozen=True)
class _Field:
    key: str  # YAML, camelCase
    attr: str  # Python, snake_case
    parse: Parse
    required: bool = False
    missing: str = "required"


def _show(value: object) -> str:
    """A value as the user wrote it in YAML; containers by kind, since they can be long."""
    if isinstance(value, dict):
        return "a mapping" if value else "an empty mapping"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    if value is None or isinstance(value, bool | str | int | float):
        return json.dumps(value)
    return str(value)


def _requote(exc: ValueError, value: object) -> str:
    # units.py quotes with Python's repr ('150%'); config messages quote as YAML does.
    return str(exc).replace(repr(value), _show(value))


def _mapping(node: object, at: _At, allowed: Sequence[str]) -> dict[str, object] | None:
    if not isinstance(node, dict):
        at.error(f"must be a mapping, got {_show(node)}")
        return None
    for key in node:
        if not isinstance(key, str):
            at.error(f"keys must be strings, got {_show(key)}")
        elif key not in allowed:
            at.key(key).error(f"unknown field; allowed: {', '.join(allowed)}")
    return node


def _fields(node: object, at: _At, fields: Sequence[_Field]) -> dict[str, Any] | None:
    """Parsed values by attribute, for the fields present and valid. None when `node` is
    not a mapping or a required field is missing or bad, so the section cannot be built."""
    m = _mapping(node, at, [f.key for f in fields])
    if m is None:
        return None
    out: dict[str, Any] = {}
    for f in fields:
        value = m.get(f.key)
        # An explicit null (`timeout:`) means the same as leaving the key out.
        if value is None:
            if f.required:
                at.key(f.key).error(f.missing)
            continue
        parsed = _parse(f.parse, value, at.key(f.key))
        if parsed is not None:
            out[f.attr] = parsed
    if any(f.required and f.attr not in out for f in fields):
        return None
    return out


def _parse(parse: Parse, value: object, at: _At) -> Any:
    try:
        return parse(value, at)
    except _Invalid as exc:
        at.error(str(exc))
        return None


def _items(node: object, at: _At, item: Parse) -> list[tuple[int, Any]]:
    """(index, parsed) for the items that parsed; indexes keep later messages exact."""
    if not isinstance(node, list):
        raise _Invalid(f"must be a list, got {_show(node)}")
    built = ((i, _parse(item, value, at.index(i))) for i, value in enumerate(node))
    return [(i, value) for i, value in built if value is not None]


def _list_of(item: Parse) -> Parse:
    def parse(node: object, at: _At) -> tuple[Any, ...]:
        return tuple(value for _, value in _items(node, at, item))

    return parse


def _section(cls: Callable[..., T], fields: Sequence[_Field]) -> Callable[[object, _At], T | None]:
    def parse(node: object, at: _At) -> T | None:
        kwargs = _fields(node, at, fields)
        return None if kwargs is None else cls(**kwargs)

    return parse


def _duplicates(names: Iterator[tuple[_At, str]], what: str) -> None:
    first: dict[str, str] = {}
    for at, name in names:
        if name in first:
            at.error(f"duplicate {what} {_show(name)} (also {first[name]})")
        else:
            first[name] = at.path


# --- scalars ------------------------------------------------------------------------------

_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_HOST = re.compile(r"[A-Za-z0-9._-]+")
_PORT = re.compile(r"[0-9]{1,5}")
_GRPC_SERVICE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_GRPC_METHOD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HEADER = re.compile(r"[0-9a-z_.-]+")  # the characters gRPC allows in metadata keys


def _str(node: object, at: _At) -> str:
    if not isinstance(node, str):
        hint = f' (quote it: "{node}")' if isinstance(node, int | float) else ""
        raise _Invalid(f"must be a string, got {_show(node)}{hint}")
    return node


def _nonempty(node: object, at: _At) -> str:
    text = _str(node, at)
    if not text.strip():
        raise _Invalid("must not be empty")
    return text


def _label(node: object, at: _At) -> str:
    text = _str(node, at)
    if not _LABEL.fullmatch(text):
        raise _Invalid(
            f"{_show(text)} is not a DNS-1123 label (lowercase letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters)"
        )
    return text


def _bool(node: object, at: _At) -> bool:
    if not isinstance(node, bool):
        raise _Invalid(f"must be true or false, got {_show(node)}")
    return node


def _int(least: int) -> Parse:
    def parse(node: object, at: _At) -> int:
        if isinstance(node, bool) or not isinstance(node, int) or node < least:
            raise _Invalid(f"must be an integer >= {least}, got {_show(node)}")
        return node

    return parse


def _duration(*, positive: bool = True) -> Parse:
    def parse(node: object, at: _At) -> float:
        if not isinstance(node, str | int | float):
            raise _Invalid(f"{_show(node)} is not a duration; write it like 10s or 250ms")
        try:
            seconds = parse_duration(node)
        except ValueError as exc:
            raise _Invalid(_requote(exc, node)) from None
        if not math.isfinite(seconds):
            raise _Invalid(f"{_show(node)} is not a finite duration")
        if positive and seconds == 0:
            raise _Invalid(f"{_show(node)} must be more than 0")
        return seconds

    return parse


def _percent(node: object, at: _At) -> float:
    if not isinstance(node, str | int | float):
        raise _Invalid(f"{_show(node)} is not a percentage; write it like 50%")
    try:
        return parse_percent(node)
    except ValueError as exc:
        # A bare number is a fraction (0.5), so `50` is out of range; say how to write it.
        hint = "; write percentages like 50%" if isinstance(node, int | float) else ""
        raise _Invalid(_requote(exc, node) + hint) from None


def _one_of(choices: Sequence[str]) -> Parse:
    def parse(node: object, at: _At) -> str:
        if node not in choices:
            raise _Invalid(f"must be one of {', '.join(choices)}; got {_show(node)}")
        return str(node)

    return parse


def _exactly(expected: str) -> Parse:
    def parse(node: object, at: _At) -> str:
        if node != expected:
            raise _Invalid(f"must be {_show(expected)}, got {_show(node)}")
        return expected

    return parse


# --- metadata -----------------------------------------------------------------------------


def _labels(node: object, at: _At) -> dict[str, str]:
    if not isinstance(node, dict):
        raise _Invalid(f"must be a mapping of string to string, got {_show(node)}")
    out: dict[str, str] = {}
    for key, value in node.items():
        k = _parse(_nonempty, key, at)
        v = _parse(_str, value, at.key(str(key)))
        if k is not None and v is not None:
            out[k] = v
    return out


_metadata = _section(
    Metadata,
    [
        _Field("name", "name", _label, required=True),
        _Field("namespace", "namespace", _label),
        _Field("labels", "labels", _labels),
    ],
)


# --- services -----------------------------------------------------------------------------


def _host_port(text: str) -> tuple[str, int]:
    """'10.0.0.3:9000' / 'gpu-1.local:9000' / '[::1]:9000' -> (host, port)."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise _Invalid(f"{_show(text)} is not [IPV6]:PORT, e.g. [::1]:9000")
        try:
            host = str(ipaddress.IPv6Address(host))  # normalized, so duplicates are caught
        except ValueError:
            raise _Invalid(f"{_show(host)} in {_show(text)} is not an IPv6 address") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise _Invalid(f"{_show(text)} is not HOST:PORT; the port is missing")
        if ":" in host:
            raise _Invalid(f"{_show(text)}: write IPv6 addresses in brackets, e.g. [::1]:9000")
        if not _HOST.fullmatch(host):
            raise _Invalid(f"{_show(text)} is not HOST:PORT; the host is empty or not a name")
        host = host.lower()
    if not _PORT.fullmatch(port) or not 1 <= int(port) <= 65535:
        raise _Invalid(f"{_show(text)}: the port must be a number from 1 to 65535")
    return host, int(port)


def _address(node: object, at: _At) -> tuple[str, str, int]:
    text = _str(node, at)
    return (text, *_host_port(text))


def _endpoint(node: object, at: _At) -> Endpoint | None:
    kwargs = _fields(
        node,
        at,
        [
            _Field("address", "address", _address, required=True),
            _Field("weight", "weight", _int(1)),
            _Field("zone", "zone", _str),
        ],
    )
    if kwargs is None:
        return None
    kwargs["address"], kwargs["host"], kwargs["port"] = kwargs["address"]
    return Endpoint(**kwargs)


def _normalized(e: Endpoint) -> str:
    return f"[{e.host}]:{e.port}" if ":" in e.host else f"{e.host}:{e.port}"


def _endpoints(node: object, at: _At) -> tuple[Endpoint, ...]:
    items = _items(node, at, _endpoint)
    _duplicates(((at.index(i).key("address"), _normalized(e)) for i, e in items), "address")
    return tuple(e for _, e in items)


def _models(node: object, at: _At) -> tuple[str, ...]:
    items = _items(node, at, _nonempty)
    _duplicates(((at.index(i), m) for i, m in items), "model")
    return tuple(m for _, m in items)


_health_check = _section(
    HealthCheckSpec,
    [
        _Field("enabled", "enabled", _bool),
        _Field("interval", "interval", _duration()),
        _Field("timeout", "timeout", _duration()),
        _Field("threshold", "threshold", _int(1)),
        _Field("healthyThreshold", "healthy_threshold", _int(1)),
        _Field("service", "service", _str),
    ],
)

_outlier = _section(
    OutlierSpec,
    [
        _Field("consecutiveErrors", "consecutive_errors", _int(1)),
        _Field("baseEjectionTime", "base_ejection_time", _duration()),
        _Field("maxEjectionPercent", "max_ejection_percent", _percent),
    ],
)

_load_balancer = _section(
    LoadBalancerSpec,
    [
        _Field("algorithm", "algorithm", _one_of(ALGORITHMS)),
        _Field("healthCheck", "health_check", _health_check),
        _Field("outlierDetection", "outlier_detection", _outlier),
    ],
)


def _circuit_breaker(node: object, at: _At) -> CircuitBreakerSpec | None:
    kwargs = _fields(
        node,
        at,
        [
            _Field("enabled", "enabled", _bool),
            _Field("errorThreshold", "error_threshold", _percent),
            _Field("minRequests", "min_requests", _int(1)),
            _Field("window", "window", _duration()),
            _Field("consecutiveErrors", "consecutive_errors", _int(1)),
            _Field("openDuration", "open_duration", _duration()),
            _Field("maxOpenDuration", "max_open_duration", _duration()),
            _Field("maxRequests", "max_requests", _int(1)),
            _Field("maxPending", "max_pending", _int(0)),
            _Field("maxRetries", "max_retries", _int(0)),
        ],
    )
    if kwargs is None:
        return None
    spec = CircuitBreakerSpec(**kwargs)
    if spec.max_open_duration < spec.open_duration:
        at.key("maxOpenDuration").error(
            f"must be at least openDuration ({format_duration(spec.open_duration)}), "
            f"got {format_duration(spec.max_open_duration)}"
        )
    return spec


_SERVICE_FIELDS = [
    _Field("name", "name", _label, required=True),
    _Field("models", "models", _models),
    _Field("endpoints", "endpoints", _endpoints),
    _Field("loadBalancer", "load_balancer", _load_balancer),
    _Field("circuitBreaker", "circuit_breaker", _circuit_breaker),
    _Field("timeout", "timeout", _duration()),
    _Field("maxMessageBytes", "max_message_bytes", _int(1)),
]
_service = _section(ServiceSpec, _SERVICE_FIELDS)


def _services(node: object, at: _At) -> tuple[ServiceSpec, ...]:
    items: list[tuple[int, ServiceSpec]] = _items(node, at, _service)
    _duplicates(((at.index(i).key("name"), s.name) for i, s in items), "service name")
    _check_models_unique(items, at)
    return tuple(s for _, s in items)


def _check_models_unique(items: list[tuple[int, ServiceSpec]], at: _At) -> None:
    # The router picks the service from the request's model, so it must be unambiguous.
    owner: dict[str, tuple[int, ServiceSpec]] = {}
    for i, service in items:
        for j, model in enumerate(service.models):
            first_i, first = owner.setdefault(model, (i, service))
            if first is not service:
                at.index(i).key("models").index(j).error(
                    f"model {_show(model)} is served by both {_show(first.name)} "
                    f"({at.index(first_i).path}) and {_show(service.name)}; "
                    "a model may be served by one service only"
                )


# --- traffic policies ---------------------------------------------------------------------

_HEADER_KINDS = ("exact", "prefix", "regex", "present")


def _grpc_name(pattern: re.Pattern[str], example: str) -> Parse:
    def parse(node: object, at: _At) -> str:
        text = _str(node, at)
        if not pattern.fullmatch(text):
            raise _Invalid(f"{_show(text)} is not a gRPC name like {example}")
        return text

    return parse


def _regex(node: object, at: _At) -> re.Pattern[str]:
    text = _str(node, at)
    try:
        return re.compile(text)
    except re.error as exc:
        raise _Invalid(f"invalid regular expression {_show(text)}: {exc}") from None


_HEADER_PARSERS: dict[str, Parse] = {
    "exact": _str,
    "prefix": _str,
    "regex": _regex,
    "present": _bool,
}


def _header_match(name: str, node: object, at: _At) -> HeaderMatch | None:
    if isinstance(node, str):
        return HeaderMatch(name, "exact", node)
    if not isinstance(node, dict):
        hint = f' (quote it: "{node}")' if isinstance(node, int | float) else ""
        raise _Invalid(
            "must be a string (exact match) or a mapping with one of "
            f"{', '.join(_HEADER_KINDS)}; got {_show(node)}{hint}"
        )
    _mapping(node, at, _HEADER_KINDS)
    given = [k for k in _HEADER_KINDS if k in node]
    if len(given) > 1 or not node:
        raise _Invalid(f"must have exactly one of {', '.join(_HEADER_KINDS)}")
    if not given:
        return None  # only unknown keys, reported by _mapping
    kind = given[0]
    value = _parse(_HEADER_PARSERS[kind], node[kind], at.key(kind))
    if value is None:
        return None
    if kind == "present":
        return HeaderMatch(name, "present", present=value)
    if kind == "regex":
        return HeaderMatch(name, "regex", value.pattern, pattern=value)
    return HeaderMatch(name, "prefix" if kind == "prefix" else "exact", value)


def _header_matches(node: object, at: _At) -> tuple[HeaderMatch, ...]:
    if not isinstance(node, dict):
        raise _Invalid(f"must be a mapping of header name to match, got {_show(node)}")
    out: list[HeaderMatch] = []
    for raw, spec in node.items():
        name = _parse(_header_name, raw, at.key(str(raw)))
        if name is None:
            continue
        match = _parse(partial(_header_match, name), spec, at.key(raw))
        if match is not None:
            out.append(match)
    _duplicates(((at.key(h.name), h.name) for h in out), "header")
    return tuple(out)


def _header_name(node: object, at: _At) -> str:
    name = _nonempty(node, at).lower()  # gRPC metadata keys are lowercase on the wire
    if not _HEADER.fullmatch(name):
        raise _Invalid(f"{_show(node)} is not a header name (letters, digits, '-', '_', '.')")
    if name.endswith("-bin"):
        raise _Invalid(f"{_show(node)} is binary metadata (-bin) and cannot be matched as text")
    return name


def _match_models(node: object, at: _At) -> tuple[str, ...]:
    models: tuple[str, ...] = _models(node, at)
    if not isinstance(node, list) or not node:
        raise _Invalid("must list at least one model; leave models out to match any model")
    return models


def _match(node: object, at: _At) -> RouteMatch | None:
    kwargs = _fields(
        node,
        at,
        [
            _Field(
                "service", "service", _grpc_name(_GRPC_SERVICE, "aimesh.inference.v1.Inference")
            ),
            _Field("method", "method", _grpc_name(_GRPC_METHOD, "GenerateStream")),
            _Field("headers", "headers", _header_matches),
            _Field("models", "models", _match_models),
        ],
    )
    if kwargs is None:
        return None
    # Checked on the raw node: a service that was given but invalid is reported already.
    if "method" in kwargs and isinstance(node, dict) and node.get("service") is None:
        at.key("method").error("requires match.service; a method name alone is ambiguous")
    return RouteMatch(**kwargs)


_route = _section(
    Route,
    [
        _Field("destination", "destination", _label, required=True),
        _Field("weight", "weight", _int(0)),
        _Field("model", "model", _nonempty),
        _Field("arm", "arm", _nonempty),
    ],
)


def _routes(node: object, at: _At) -> tuple[Route, ...]:
    if not isinstance(node, list) or not node:
        raise _Invalid(f"must list at least one route, got {_show(node)}")
    items: list[tuple[int, Route]] = _items(node, at, _route)
    if len(node) > 1:
        for i, raw in enumerate(node):
            if isinstance(raw, dict) and raw.get("weight") is None:
                at.index(i).key("weight").error("required when a policy has more than one route")
    _duplicates(((at.index(i).key("destination"), r.destination) for i, r in items), "destination")
    if len(items) == len(node) and sum(r.weight for _, r in items) == 0:
        at.error("weights sum to 0; at least one route needs a weight above 0")
    return tuple(r for _, r in items)


def _backups(node: object, at: _At) -> tuple[str, ...]:
    items = _items(node, at, _label)
    _duplicates(((at.index(i), b) for i, b in items), "backup")
    return tuple(b for _, b in items)


def _attempts(node: object, at: _At) -> int:
    attempts: int = _int(1)(node, at)
    if attempts > MAX_ATTEMPTS:
        raise _Invalid(
            f"{attempts} is above the cap of {MAX_ATTEMPTS} attempts (the first try included)"
        )
    return attempts


def _status(node: object, at: _At) -> grpc.StatusCode:
    if isinstance(node, bool) or not isinstance(node, str | int):
        raise _Invalid(f"must be a gRPC status name like UNAVAILABLE, got {_show(node)}")
    try:
        code = status_code_from_name(str(node))
    except ValueError as exc:
        raise _Invalid(_requote(exc, str(node))) from None
    if code is grpc.StatusCode.OK:
        raise _Invalid("OK is success, not something to retry")
    return code


def _retry_on(node: object, at: _At) -> tuple[grpc.StatusCode, ...]:
    codes: tuple[grpc.StatusCode, ...] = _list_of(_status)(node, at)
    if not node:
        raise _Invalid("must list at least one status; set attempts: 1 to turn retries off")
    return tuple(dict.fromkeys(codes))


def _backoff(node: object, at: _At) -> BackoffSpec | None:
    kwargs = _fields(
        node,
        at,
        [
            _Field("base", "base", _duration(positive=False)),
            _Field("max", "max", _duration(positive=False)),
        ],
    )
    if kwargs is None:
        return None
    spec = BackoffSpec(**kwargs)
    if spec.max < spec.base:
        at.key("max").error(
            f"must be at least base ({format_duration(spec.base)}), got {format_duration(spec.max)}"
        )
    return spec


_retry = _section(
    RetrySpec,
    [
        _Field("attempts", "attempts", _attempts),
        _Field("perTryTimeout", "per_try_timeout", _duration()),
        _Field("retryOn", "retry_on", _retry_on),
        _Field("backoff", "backoff", _backoff),
    ],
)


def _hedge_attempts(node: object, at: _At) -> int:
    attempts: int = _int(2)(node, at)
    if attempts > MAX_ATTEMPTS:
        raise _Invalid(f"{attempts} is above the cap of {MAX_ATTEMPTS} attempts")
    return attempts


_hedge = _section(
    HedgeSpec,
    [
        _Field("delay", "delay", _duration()),
        _Field("attempts", "attempts", _hedge_attempts),
    ],
)

_POLICY_FIELDS = [
    _Field("name", "name", _nonempty, required=True),
    _Field("match", "match", _match),
    _Field("routes", "routes", _routes, required=True),
    _Field("backups", "backups", _backups),
    _Field("timeout", "timeout", _duration()),
    _Field("retry", "retry", _retry),
    _Field("resume", "resume", _bool),
    _Field("hedge", "hedge", _hedge),
    _Field("balance", "balance", _one_of(BALANCES)),
    _Field("latencyObjective", "latency_objective", _duration()),
    _Field("experiment", "experiment", _nonempty),
]
_policy = _section(TrafficPolicy, _POLICY_FIELDS)


def _policies(node: object, at: _At) -> tuple[TrafficPolicy, ...]:
    items: list[tuple[int, TrafficPolicy]] = _items(node, at, _policy)
    _duplicates(((at.index(i).key("name"), p.name) for i, p in items), "policy name")
    for i, p in items:
        if p.hedge is not None and p.retry is not None and p.retry.attempts > 1:
            # gRFC A6: a call is either retried or hedged, never both.
            at.index(i).key("hedge").error("a policy may retry or hedge, not both; remove one")
    return tuple(p for _, p in items)


# --- the model catalog ----------------------------------------------------------------------


def _price(node: object, at: _At) -> float:
    """USD per 1M tokens: a number, or a string like "$30" / "30"."""
    text = node.strip().lstrip("$") if isinstance(node, str) else node
    try:
        value = float(text) if isinstance(text, str | int | float) else math.nan
    except ValueError:
        value = math.nan
    if isinstance(node, bool) or not math.isfinite(value) or value < 0:
        raise _Invalid(f"{_show(node)} is not a price: USD per 1M tokens, 0 or more, e.g. 2.5")
    return value


def _prices(node: object, at: _At) -> dict[str, Any] | None:
    return _fields(
        node,
        at,
        [
            _Field("inputPerMillion", "input_price", _price),
            _Field("outputPerMillion", "output_price", _price),
        ],
    )


def _model_entry(node: object, at: _At) -> ModelSpec | None:
    kwargs = _fields(
        node,
        at,
        [
            _Field("name", "name", _nonempty, required=True),
            _Field("provider", "provider", _nonempty),
            _Field("price", "price", _prices),
        ],
    )
    if kwargs is None:
        return None
    prices = kwargs.pop("price", None) or {}
    return ModelSpec(**kwargs, **prices)


def _model_catalog(node: object, at: _At) -> tuple[ModelSpec, ...]:
    items: list[tuple[int, ModelSpec]] = _items(node, at, _model_entry)
    _duplicates(((at.index(i).key("name"), m.name) for i, m in items), "model name")
    return tuple(m for _, m in items)


# --- security and the document ------------------------------------------------------------


def _rules(node: object, at: _At) -> tuple[Rule, ...]:
    """Authorization rules, parsed and checked here so a bad rule rejects the whole config
    (the format: mesh/security/authz.py, docs/config.md)."""
    if not isinstance(node, list):
        raise _Invalid(f"must be a list, got {_show(node)}")
    mappings = True
    for i, item in enumerate(node):
        if not isinstance(item, dict):
            at.index(i).error(f"must be a mapping, got {_show(item)}")
            mappings = False
    if not mappings:
        return ()
    try:
        return parse_rules(node, at=at.path)
    except ConfigError as exc:
        at.report.errors.extend(exc.errors)
        return ()


_security = _section(
    SecuritySpec,
    [
        _Field("mtls", "mtls", _section(MtlsSpec, [_Field("mode", "mode", _one_of(MTLS_MODES))])),
        _Field(
            "authorization",
            "authorization",
            _section(
                AuthorizationSpec,
                [_Field("enabled", "enabled", _bool), _Field("rules", "rules", _rules)],
            ),
        ),
    ],
)


# --- observability --------------------------------------------------------------------


def _otlp_endpoint(node: object, at: _At) -> str:
    """HOST:PORT of an OTLP/gRPC collector, or http(s)://HOST:PORT as OTEL_* variables
    write it (http: plaintext, as HOST:PORT; https: TLS)."""
    text = _str(node, at)
    scheme, sep, rest = text.partition("://")
    if sep and scheme not in ("http", "https"):
        raise _Invalid(f"{_show(text)}: the scheme must be http or https, or none (HOST:PORT)")
    _host_port(rest.rstrip("/") if sep else text)
    return text


_tracing = _section(
    TracingSpec,
    [
        _Field("enabled", "enabled", _bool),
        _Field("endpoint", "endpoint", _otlp_endpoint),
        _Field("samplingRatio", "sampling_ratio", _percent),
        _Field("serviceName", "service_name", _nonempty),
    ],
)

_observability = _section(ObservabilitySpec, [_Field("tracing", "tracing", _tracing)])


def _spec(node: object, at: _At) -> dict[str, Any] | None:
    return _fields(
        node,
        at,
        [
            _Field("services", "services", _services),
            _Field("trafficPolicies", "traffic_policies", _policies),
            _Field("models", "models", _model_catalog),
            _Field("security", "security", _security),
            _Field("observability", "observability", _observability),
        ],
    )


def _document(node: object, at: _At) -> MeshConfig | None:
    if node is None:
        at.error(f"the document is empty; expected apiVersion: {API_VERSION}, kind: {KIND}")
        return None
    if not isinstance(node, dict):
        at.error(
            "the document must be a mapping with apiVersion, kind, metadata and spec; "
            f"got {_show(node)}"
        )
        return None
    kwargs = _fields(
        node,
        at,
        [
            _Field("apiVersion", "api_version", _exactly(API_VERSION), True, _expect(API_VERSION)),
            _Field("kind", "kind", _exactly(KIND), True, _expect(KIND)),
            _Field("metadata", "metadata", _metadata, required=True),
            _Field("spec", "spec", _spec, required=True),
        ],
    )
    if kwargs is None:
        return None
    return MeshConfig(**kwargs.pop("spec"), **kwargs)


def _expect(value: str) -> str:
    return f"required; must be {_show(value)}"


# --- warnings: true of a valid config, worth knowing, never fatal -------------------------

_UNDECLARED = (
    "service {} is not declared in spec.services; "
    "it will only get endpoints from the control plane or --endpoint flags"
)


def _warnings(cfg: MeshConfig) -> Iterator[str]:
    yield from _undeclared(cfg)
    yield from _unpriced(cfg)
    yield from _shadowed(cfg)
    yield from _inert_breakers(cfg)
    yield from _not_re2(cfg)
    yield from _security_warnings(cfg.security)
    yield from _inert_tracing(cfg.observability.tracing)


def _unpriced(cfg: MeshConfig) -> Iterator[str]:
    """`balance: cost` needs prices: a destination whose model has none sorts last."""
    priced = {m.name for m in cfg.models if m.input_price or m.output_price}
    for i, p in enumerate(cfg.traffic_policies):
        if p.balance != "cost":
            continue
        for j, r in enumerate(p.routes):
            models = (r.model,) if r.model else p.match.models
            if not models or not all(m in priced for m in models):
                yield (
                    f"spec.trafficPolicies[{i}].routes[{j}]: balance is cost, but the "
                    f"model(s) {r.destination} is asked for have no price in spec.models "
                    "(give the route a model:, or the policy a match on models, and price it)"
                )


def _undeclared(cfg: MeshConfig) -> Iterator[str]:
    declared = {s.name for s in cfg.services}
    for i, policy in enumerate(cfg.traffic_policies):
        at = f"spec.trafficPolicies[{i}]"
        for j, route in enumerate(policy.routes):
            if route.destination not in declared:
                yield f"{at}.routes[{j}].destination: " + _UNDECLARED.format(
                    _show(route.destination)
                )
        for j, backup in enumerate(policy.backups):
            if backup not in declared:
                yield f"{at}.backups[{j}]: " + _UNDECLARED.format(_show(backup))


def _shadowed(cfg: MeshConfig) -> Iterator[str]:
    # Policies apply in order, first match wins; one that matches everything ends the list.
    policies = cfg.traffic_policies
    for i, policy in enumerate(policies[:-1]):
        if policy.match == RouteMatch():
            later = ", ".join(p.name for p in policies[i + 1 :])
            yield (
                f"spec.trafficPolicies[{i}].match: policy {_show(policy.name)} matches every "
                f"call, so the policies after it ({later}) never apply"
            )
            return


# Python regex syntax RE2 lacks: lookaround, backreferences, atomic groups, possessive
# quantifiers. Envoy and gRPC clients on xDS compile header regexes with RE2.
_NOT_RE2 = re.compile(r"\(\?<?[=!]|\(\?P=|\(\?>|\\[1-9]|[*+?}]\+")


def _not_re2(cfg: MeshConfig) -> Iterator[str]:
    for i, policy in enumerate(cfg.traffic_policies):
        for h in policy.match.headers:
            if h.kind == "regex" and _NOT_RE2.search(h.value):
                yield (
                    f"spec.trafficPolicies[{i}].match.headers.{h.name}: regex {_show(h.value)} "
                    "uses syntax RE2 lacks (lookaround, backreferences, atomic or possessive "
                    "groups): the aimesh proxy applies it, but Envoy and gRPC clients on xDS "
                    "reject the route table and keep their last good one"
                )


def _inert_breakers(cfg: MeshConfig) -> Iterator[str]:
    # The concurrency limits (maxRequests, maxPending, maxRetries) apply whether or not the
    # breaker is enabled, as Envoy's thresholds do; the breaker's own settings do not.
    limits = ("max_requests", "max_pending", "max_retries")
    default = CircuitBreakerSpec()
    for i, service in enumerate(cfg.services):
        cb = service.circuit_breaker
        changed = [
            f
            for f in cb.__dataclass_fields__
            if f not in (*limits, "enabled") and getattr(cb, f) != getattr(default, f)
        ]
        if not cb.enabled and changed:
            yield (
                f"spec.services[{i}].circuitBreaker.enabled: false (the default), "
                "so the breaker settings given have no effect (the concurrency limits "
                "maxRequests, maxPending and maxRetries apply regardless)"
            )


def _security_warnings(security: SecuritySpec) -> Iterator[str]:
    if security.mtls.mode != "DISABLE":
        yield (
            f"spec.security.mtls.mode: {security.mtls.mode} applies to the proxies and backends "
            "that have a mesh identity (--identity, with a certificate from the control "
            "plane's CA); one started without an identity serves plaintext"
        )
    if security.authorization.enabled and not security.authorization.rules:
        yield (
            "spec.security.authorization.enabled: true with no rules, so every call is "
            "denied (default deny); add ALLOW rules under spec.security.authorization.rules"
        )


def _inert_tracing(tracing: TracingSpec) -> Iterator[str]:
    if not tracing.enabled and tracing != TracingSpec():
        yield (
            "spec.observability.tracing.enabled: false (the default), so the tracing settings "
            "given have no effect (--otlp-endpoint and the OTEL_* environment still apply)"
        )


# --- public API ---------------------------------------------------------------------------


# libyaml's parser when PyYAML has it (it nearly always does): the pure-Python one took
# ~19 ms for a 5 KB document, most of a config change's trip to the proxies
# (bench/control_plane.py).
_SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_SafeLoader):  # type: ignore[valid-type,misc]
    """SafeLoader that refuses a repeated key, which PyYAML would silently resolve to the
    last value: two `services:` keys would drop a whole list without a word."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: dict[object, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if isinstance(key, str | int | float | bool) and key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {_show(key)} (first on line {seen[key] + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    mapping: dict[Any, Any] = loader.construct_mapping(node)
    return mapping


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_dict(data: object, source: str = "<data>") -> MeshConfig:
    """Validate parsed YAML/JSON data; raises ConfigError listing every problem."""
    report = _Report()
    cfg = _document(data, _At("", report))
    if report.errors or cfg is None:
        raise ConfigError(report.errors or ["the document could not be read"], source=source)
    return replace(cfg, warnings=tuple(_warnings(cfg)))


def load_text(text: str, source: str = "<text>") -> MeshConfig:
    try:
        data = yaml.load(text, Loader=_Loader)  # safe: _Loader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        raise ConfigError([_yaml_problem(exc)], source=source) from exc
    except yaml.YAMLError as exc:
        raise ConfigError([f"invalid YAML: {exc}"], source=source) from exc
    return load_dict(data, source)


def _yaml_problem(exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    context = f" ({exc.context})" if exc.context and exc.problem else ""
    return f"{where}invalid YAML: {exc.problem or exc.context}{context}"


def load_file(path: str | Path) -> MeshConfig:
    """Read and validate a ServiceMesh file; OSError if it cannot be read."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"not UTF-8 text: {exc}"], source=str(path)) from exc
    return load_text(text, str(path))


def parse_host_port(text: str) -> tuple[str, int]:
    """'10.0.0.3:9000' -> ('10.0.0.3', 9000); ValueError says what is wrong, as the YAML's
    endpoint addresses are checked (the registry checks instance addresses the same way)."""
    try:
        return _host_port(text)
    except _Invalid as exc:
        raise ValueError(str(exc)) from None


def is_dns_label(text: str) -> bool:
    """Service names are DNS-1123 labels, in the YAML and in the registry alike."""
    return _LABEL.fullmatch(text) is not None
