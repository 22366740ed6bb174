"""`aimesh config validate -f FILE`: check a ServiceMesh file and say what it configures."""

from __future__ import annotations

from typing import TextIO

from ..errors import ConfigError
from ..units import format_duration
from .load import load_file
from .schema import HeaderMatch, MeshConfig, RouteMatch, ServiceSpec, TrafficPolicy

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_UNREADABLE = 2


def run_validate(path: str, out: TextIO, err: TextIO) -> int:
    """Print the summary to `out` and return 0, or the problems to `err` and return 1
    (invalid) or 2 (the file cannot be read)."""
    try:
        cfg = load_file(path)
    except FileNotFoundError:
        print(f"{path}: no such file", file=err)
        return EXIT_UNREADABLE
    except OSError as exc:
        print(f"{path}: cannot read: {exc.strerror or exc}", file=err)
        return EXIT_UNREADABLE
    except ConfigError as exc:
        print(f"{path}: {len(exc.errors)} error(s)", file=err)
        for problem in exc.errors:
            print(f"  {problem}", file=err)
        return EXIT_INVALID
    print(summary(cfg), file=out)
    return EXIT_OK


def summary(cfg: MeshConfig) -> str:
    """What the config sets up, for people: services, policies in order, warnings."""
    meta = cfg.metadata
    lines = [f"ServiceMesh {meta.name} (namespace {meta.namespace})"]
    lines.append(f"services ({len(cfg.services)}):")
    lines += [f"  {_service(s)}" for s in cfg.services]
    lines.append(f"traffic policies ({len(cfg.traffic_policies)}), first match wins:")
    lines += [f"  {_policy(p)}" for p in cfg.traffic_policies]
    if cfg.models:
        lines.append(f"models ({len(cfg.models)}), USD per 1M tokens in/out:")
        lines += [
            f"  {m.name}: {m.provider or 'no provider'}; {m.input_price:g} / {m.output_price:g}"
            for m in cfg.models
        ]
    sec = cfg.security
    n = len(sec.authorization.rules)
    authz = f"on ({n} rule{'s' if n != 1 else ''})" if sec.authorization.enabled else "off"
    lines.append(f"security: mTLS {sec.mtls.mode}, authorization {authz}")
    tracing = cfg.observability.tracing
    if tracing.enabled:
        where = tracing.endpoint or "the OTEL_* collector"
        share = _percent(tracing.sampling_ratio) if tracing.sampling_ratio is not None else None
        lines.append(f"tracing: to {where}" + (f", {share} of new traces" if share else ""))
    if cfg.warnings:
        lines.append(f"warnings ({len(cfg.warnings)}):")
        lines += [f"  - {w}" for w in cfg.warnings]
    return "\n".join(lines)


def _service(s: ServiceSpec) -> str:
    models = ", ".join(s.models) or "no models"
    n = len(s.endpoints)
    endpoints = f"{n} endpoint{'' if n == 1 else 's'}" if n else "endpoints from the control plane"
    parts = [f"{s.name}: {models}; {endpoints}; {s.load_balancer.algorithm}"]
    hc = s.load_balancer.health_check
    if hc.enabled:
        parts.append(f"health check every {format_duration(hc.interval)}")
    cb = s.circuit_breaker
    if cb.enabled:
        parts.append(f"circuit breaker at {_percent(cb.error_threshold)} errors")
    if s.timeout is not None:
        parts.append(f"timeout {format_duration(s.timeout)}")
    return "; ".join(parts)


def _policy(p: TrafficPolicy) -> str:
    if p.balance == "cost":
        names = ", ".join(r.destination + (f" (as {r.model})" if r.model else "") for r in p.routes)
        split = f"the cheapest of {names}"
        if p.latency_objective is not None:
            split += f" meeting {format_duration(p.latency_objective)}"
    else:
        split = ", ".join(
            f"{r.destination}{f' (as {r.model})' if r.model else ''} {_percent(share)}"
            for r, (_, share) in zip(p.routes, p.shares(), strict=True)
        )
    parts = [f"{p.name}: {_match(p.match)} -> {split}"]
    if p.experiment:
        parts.append(f"experiment {p.experiment} (arms {', '.join(r.arm_name for r in p.routes)})")
    if p.backups:
        parts.append(f"backups {', '.join(p.backups)}")
    if p.timeout is not None:
        parts.append(f"timeout {format_duration(p.timeout)}")
    if p.retry is not None and p.retry.attempts > 1:
        codes = ", ".join(c.name for c in p.retry.retry_on)
        parts.append(f"{p.retry.attempts} attempts on {codes}")
    return "; ".join(parts)


def _match(m: RouteMatch) -> str:
    conditions: list[str] = []
    if m.service is not None:
        conditions.append(f"service {m.service}" + (f"/{m.method}" if m.method else ""))
    conditions += [_header(h) for h in m.headers]
    if m.models:
        conditions.append(f"model in [{', '.join(m.models)}]")
    return " and ".join(conditions) if conditions else "every call"


def _header(h: HeaderMatch) -> str:
    if h.kind == "present":
        return f"header {h.name} {'present' if h.present else 'absent'}"
    op = {"exact": "=", "prefix": "starts with", "regex": "~"}[h.kind]
    return f'header {h.name} {op} "{h.value}"'


def _percent(fraction: float) -> str:
    return f"{fraction * 100:.1f}".rstrip("0").rstrip(".") + "%"
