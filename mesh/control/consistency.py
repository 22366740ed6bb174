"""Consistency of a config against the live catalog, checked before a config is published
(pure). The loader has already checked the document on its own; this checks what only
the control plane knows: which services exist.

A route destination exists when the config declares it under spec.services or at least
one instance of it is registered. Publishing a route to nowhere would make proxies fail
that share of calls, so such a config is rejected, naming the route by its path.
"""

from __future__ import annotations

from ..config import MeshConfig
from .catalog import Snapshot


def problems(config: MeshConfig, snapshot: Snapshot) -> list[str]:
    declared = {s.name for s in config.services}
    registered = {key[0] for key in snapshot.instances}
    known = declared | registered
    out: list[str] = []

    def missing(path: str, service: str) -> None:
        out.append(
            f"{path}: service {service!r} does not exist: it is not declared under "
            "spec.services and no instance of it is registered; declare it, or register "
            "its instances first"
        )

    for i, policy in enumerate(config.traffic_policies):
        at = f"spec.trafficPolicies[{i}]"
        for j, route in enumerate(policy.routes):
            if route.destination not in known:
                missing(f"{at}.routes[{j}].destination", route.destination)
        for j, backup in enumerate(policy.backups):
            if backup not in known:
                missing(f"{at}.backups[{j}]", backup)
        if sum(r.weight for r in policy.routes) <= 0:
            out.append(f"{at}.routes: weights sum to 0; at least one route needs a weight")
    return out


def warnings(config: MeshConfig, snapshot: Snapshot) -> list[str]:
    """Things that work but probably are not what was meant."""
    out: list[str] = []
    registered = {key[0] for key in snapshot.instances}
    for i, svc in enumerate(config.services):
        if not svc.endpoints and svc.name not in registered:
            out.append(
                f"spec.services[{i}] ({svc.name}): no endpoints and no registered instances "
                "yet; calls to it fail until instances register"
            )
    return out
