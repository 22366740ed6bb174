"""Route selection: which services a call may go to (pure; no I/O).

A call is described by its gRPC service and method, its request headers and, for
Inference calls, the `model` it asks for. Traffic policies are tried in the order the
YAML lists them; the first whose match holds decides. A call no policy matches goes to
the service that serves its model, if any.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aimesh.interceptors.retry_policy import RetryPolicy

from ..config import HedgeSpec, MeshConfig

INFERENCE_SERVICE = "aimesh.inference.v1.Inference"
# Inference methods whose request carries `model` as field 1.
MODEL_METHODS = frozenset({"Generate", "GenerateStream", "Embed"})


@dataclass(frozen=True, slots=True)
class RouteDecision:
    policy: str  # the traffic policy's name, or "model:<name>" for model routing
    destinations: tuple[tuple[str, int], ...]  # (service, weight), the split
    backups: tuple[str, ...] = ()
    timeout: float | None = None
    resume: bool = True
    retry: RetryPolicy | None = None  # None: no retries
    hedge: HedgeSpec | None = None  # unary calls: send again elsewhere if no answer soon
    balance: str = "weighted"  # or "cost"
    latency_objective: float | None = None
    experiment: str | None = None
    # Per destination, parallel to `destinations`: the model to ask it for (None: the
    # caller's) and the experiment arm's name.
    models: tuple[str | None, ...] = ()
    arms: tuple[str, ...] = ()

    def model_for(self, service: str) -> str | None:
        for (s, _), m in zip(self.destinations, self.models, strict=False):
            if s == service:
                return m
        return None

    def arm_for(self, service: str) -> str:
        for (s, _), a in zip(self.destinations, self.arms, strict=False):
            if s == service:
                return a
        return service  # a backup

    def order_by_cost(
        self,
        available: Callable[[str], bool],
        price: Callable[[str], float],
        latency: Callable[[str], float],
    ) -> list[str]:
        """Services to try, best first, for `balance: cost`: the destinations that are
        available and meet the latency objective, cheapest first; then the available
        ones that miss it, fastest first; then the backups. `price` is the expected USD
        of a call there (inf when unknown), `latency` its observed seconds (0: no data,
        taken to meet the objective)."""
        live = [s for s, w in self.destinations if w > 0 and available(s)]
        goal = self.latency_objective
        meets = [s for s in live if goal is None or latency(s) <= goal]
        misses = [s for s in live if s not in meets]
        chosen = sorted(meets, key=price) + sorted(misses, key=latency)
        chosen.extend(b for b in self.backups if b not in chosen and available(b))
        return chosen

    def order(self, available: Callable[[str], bool], rng: random.Random) -> list[str]:
        """Services to try, best first: one weighted pick among the split's destinations that
        have a usable endpoint (a destination with none gives its share to the others),
        then the backups in their order."""
        live = [(s, w) for s, w in self.destinations if w > 0 and available(s)]
        chosen: list[str] = []
        if live:
            total = sum(w for _, w in live)
            x = rng.random() * total
            for service, weight in live:
                x -= weight
                if x < 0:
                    chosen.append(service)
                    break
            else:
                chosen.append(live[-1][0])
        chosen.extend(b for b in self.backups if b not in chosen and available(b))
        return chosen

    def services(self) -> list[str]:
        """Every service this decision could name, for error messages."""
        return [s for s, _ in self.destinations] + list(self.backups)


class Router:
    def __init__(self, config: MeshConfig, discovered_models: Mapping[str, str] = {}) -> None:
        """`discovered_models`: model -> service, from the instances registered with the
        control plane; a model the config names itself keeps the config's service."""
        self.config = config
        self.prices = {m.name: m for m in config.models}  # the model catalog
        self._policies: list[tuple[Any, RouteDecision]] = [
            (
                p.match,
                RouteDecision(
                    policy=p.name,
                    destinations=tuple((r.destination, r.weight) for r in p.routes),
                    backups=tuple(p.backups),
                    timeout=p.timeout,
                    resume=p.resume,
                    retry=RetryPolicy.from_spec(p.retry)
                    if p.retry is not None and p.retry.attempts > 1
                    else None,
                    hedge=p.hedge if p.hedge is not None and p.hedge.attempts > 1 else None,
                    balance=p.balance,
                    latency_objective=p.latency_objective,
                    experiment=p.experiment,
                    models=tuple(r.model for r in p.routes),
                    arms=tuple(r.arm_name for r in p.routes),
                ),
            )
            for p in config.traffic_policies
        ]
        self._by_model: dict[str, RouteDecision] = {}
        self._fallback: RouteDecision | None = None
        for s in config.services:
            for m in s.models:
                self._by_model[m] = RouteDecision(policy=f"model:{m}", destinations=((s.name, 1),))
        for m, service in discovered_models.items():
            if m not in self._by_model:
                self._by_model[m] = RouteDecision(policy=f"model:{m}", destinations=((service, 1),))
        # Reading headers and the model costs per call; do it only if some rule looks at them.
        self.uses_headers = any(m is not None and m.headers for m, _ in self._policies)
        self.uses_model = bool(self._by_model) or any(
            m is not None and m.models for m, _ in self._policies
        )

    def route(
        self,
        service: str,
        method: str,
        headers: Mapping[str, str],
        model: str | None,
    ) -> RouteDecision | None:
        for match, decision in self._policies:
            if match is None or match.matches(service, method, headers, model):
                return decision
        if model is not None and model in self._by_model:
            return self._by_model[model]
        return self._fallback

    @classmethod
    def catch_all(cls, service: str) -> Router:
        """Every call to one service: a sidecar's inbound side, towards its local app."""
        from ..config import load_dict

        router = cls(
            load_dict(
                {
                    "apiVersion": "mesh.ai/v1",
                    "kind": "ServiceMesh",
                    "metadata": {"name": "sidecar-inbound"},
                    "spec": {},
                },
                source="<sidecar>",
            )
        )
        router._fallback = RouteDecision(policy="inbound", destinations=((service, 1),))
        return router


def split_path(path: str) -> tuple[str, str]:
    """'/pkg.Service/Method' -> ('pkg.Service', 'Method')."""
    _, service, method = path.split("/", 2) if path.count("/") >= 2 else ("", path, "")
    return service, method


def headers_of(metadata: Sequence[tuple[str, str | bytes]]) -> dict[str, str]:
    return {k: v for k, v in metadata if isinstance(v, str)}
