"""A service's upstream endpoints: one channel each, health state, and the picker.

The eligible list (healthy and not ejected) is rebuilt only when something changes, so a
pick costs the picker's own work and nothing else.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from aimesh.interceptors.breaker import CircuitBreaker, State
from aimesh.interceptors.budget import RetryBudget
from aimesh.interceptors.limits import ConcurrencyLimits

from ..balance import Endpoint, Picker, make_picker
from ..config import CircuitBreakerSpec
from ..errors import MeshError
from ..orca import LoadReport

# Statuses that say the endpoint (not the request) is in trouble: they count toward
# passive ejection. Application errors (NOT_FOUND, INVALID_ARGUMENT, ...) do not.
ENDPOINT_FAILURES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DATA_LOSS,
    }
)

UU, US, SU, SS = "uu", "us", "su", "ss"

log = logging.getLogger("aimesh.proxy.breaker")


@dataclass(frozen=True, slots=True)
class EndpointAddr:
    address: str
    weight: int = 1
    zone: str = ""


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    consecutive_errors: int = 5
    base_ejection: float = 30.0
    max_ejection_fraction: float = 0.5


class Upstream:
    """One endpoint of a cluster: its balancer state, channel and health."""

    __slots__ = (
        "_mc",
        "active_healthy",
        "breaker",
        "calls",
        "channel",
        "consecutive_failures",
        "cooling_until",
        "ejected_until",
        "ejections",
        "endpoint",
        "failures",
        "latency_sum",
    )

    def __init__(self, endpoint: Endpoint, channel: grpc.aio.Channel) -> None:
        self.endpoint = endpoint
        self.channel = channel
        self.active_healthy = True  # verdict of active health checks
        self.consecutive_failures = 0  # passive: call failures in a row
        self.ejected_until = 0.0
        self.ejections = 0
        self.breaker: CircuitBreaker | None = None  # per endpoint, when the service has one
        # RESOURCE_EXHAUSTED with a pushback (a provider's 429, a full queue): new calls
        # go elsewhere until then, if there is anywhere else to go.
        self.cooling_until = 0.0
        # Cumulative, for the control plane's topology view (it takes differences).
        self.calls = 0
        self.failures = 0
        self.latency_sum = 0.0
        self._mc: dict[tuple[str, str], Any] = {}

    @property
    def address(self) -> str:
        return self.endpoint.address

    def multicallable(self, method: str, kind: str) -> Any:
        """One multicallable per (method, kind), cached: creating one costs more than a call."""
        key = (method, kind)
        mc = self._mc.get(key)
        if mc is None:
            ch = self.channel
            factory: Any = {
                UU: ch.unary_unary,
                US: ch.unary_stream,
                SU: ch.stream_unary,
                SS: ch.stream_stream,
            }[kind]
            mc = factory(method)
            self._mc[key] = mc
        return mc

    def __repr__(self) -> str:
        state = "healthy" if self.active_healthy else "unhealthy"
        if self.ejected_until:
            state += " ejected"
        return f"<Upstream {self.address} {state} inflight={self.endpoint.inflight}>"


ChannelFactory = Callable[[str], grpc.aio.Channel]


def insecure_channel_factory(options: list[tuple[str, Any]]) -> ChannelFactory:
    def make(address: str) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(address, options=options)

    return make


def mtls_channel_factory(
    identity: Any, options: list[tuple[str, Any]], expected_id: str
) -> ChannelFactory:
    """Channels with the workload's current client certificate that accept only a server
    proving `expected_id` (see mesh/security/workload.py). `identity` is a
    WorkloadIdentity; its credentials are read at each new channel, so channels made after
    a rotation carry the new certificate."""

    def make(address: str) -> grpc.aio.Channel:
        return identity.secure_channel(address, expected_id, options)  # type: ignore[no-any-return]

    return make


class Cluster:
    def __init__(
        self,
        name: str,
        *,
        algorithm: str,
        channel_factory: ChannelFactory,
        outlier: OutlierPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.algorithm = algorithm
        self.picker: Picker = make_picker(algorithm, clock=clock, rng=rng or random.Random())
        self.wants_load = algorithm == "load_aware"
        self.timeout: float | None = None  # the service's per-call cap, if its spec sets one
        self.shape: object = None  # what the proxy built this cluster from (see apply)
        self.rng = rng or random.Random()
        self.budget = RetryBudget(clock=clock)
        self.limits = ConcurrencyLimits(service=name)
        self.breaker_spec: CircuitBreakerSpec | None = None
        self.breaker: CircuitBreaker | None = None  # the service as a whole
        self.retries = 0
        self.outlier = outlier or OutlierPolicy()
        self.clock = clock
        self._cooling = False  # some endpoint may be cooling down after a pushback
        # Time to first token (streams) or to the answer (unary), seconds, as an EWMA over
        # the service: what a route's latency objective is held against (0: no data yet).
        self.latency = 0.0
        self._channel_factory = channel_factory
        self.upstreams: dict[str, Upstream] = {}
        self._eligible: list[Endpoint] = []
        self._by_endpoint: dict[int, Upstream] = {}
        self._next_expiry = float("inf")
        # Called with (cluster, upstream) when an endpoint appears or goes; health checks hook in.
        self.on_added: list[Callable[[Cluster, Upstream], None]] = []
        self.on_removed: list[Callable[[Cluster, Upstream], None]] = []

    def __repr__(self) -> str:
        eligible = f"{len(self._eligible)}/{len(self.upstreams)}"
        return f"<Cluster {self.name} {eligible} eligible {self.algorithm}>"

    def configure_breakers(self, spec: CircuitBreakerSpec | None) -> None:
        """Circuit breaking for the service and each endpoint, and concurrency limits
        (Envoy's thresholds: max requests, pending, retries), from the service's spec."""
        spec = spec or CircuitBreakerSpec()
        self.limits = ConcurrencyLimits.from_spec(self.name, spec)
        if not spec.enabled:
            self.breaker_spec = None
            self.breaker = None
            for up in self.upstreams.values():
                up.breaker = None
            return
        if spec != self.breaker_spec or self.breaker is None:
            self.breaker = CircuitBreaker.from_spec(self.name, spec, self.clock, self.rng)
            for up in self.upstreams.values():
                up.breaker = CircuitBreaker.from_spec(
                    f"{self.name}/{up.address}", spec, self.clock, self.rng
                )
        self.breaker_spec = spec

    def usable(self) -> bool:
        """Has an endpoint to send to, and the service's breaker is not holding calls back."""
        if not self.has_eligible():
            return False
        b = self.breaker
        return (
            b is None
            or b.state is not State.OPEN
            or (b.open_until is not None and self.clock() >= b.open_until)
        )

    # -- membership ---------------------------------------------------------------------

    def set_endpoints(self, endpoints: Iterable[EndpointAddr]) -> list[grpc.aio.Channel]:
        """Replaces the endpoint set; returns channels of removed endpoints for the caller
        to close once their in-flight calls are done."""
        wanted = {e.address: e for e in endpoints}
        closed: list[grpc.aio.Channel] = []
        for address in list(self.upstreams):
            if address not in wanted:
                up = self.upstreams.pop(address)
                closed.append(up.channel)
                for cb in self.on_removed:
                    cb(self, up)
        for address, spec in wanted.items():
            current = self.upstreams.get(address)
            if current is None:
                up = Upstream(
                    Endpoint(address, spec.weight, spec.zone), self._channel_factory(address)
                )
                if self.breaker_spec is not None:
                    up.breaker = CircuitBreaker.from_spec(
                        f"{self.name}/{address}", self.breaker_spec, self.clock, self.rng
                    )
                self.upstreams[address] = up
                for cb in self.on_added:
                    cb(self, up)
            else:
                current.endpoint.weight = spec.weight
                current.endpoint.zone = spec.zone
        self.rebuild()
        return closed

    def rechannel(self) -> list[grpc.aio.Channel]:
        """A new channel for every endpoint (after a client certificate rotation); new
        calls take it at once. Returns the old channels for the caller to close once their
        in-flight calls are done."""
        old: list[grpc.aio.Channel] = []
        for up in self.upstreams.values():
            old.append(up.channel)
            up.channel = self._channel_factory(up.address)
            up._mc = {}
        return old

    # -- health -------------------------------------------------------------------------

    def rebuild(self) -> None:
        now = self.clock()
        eligible: list[Endpoint] = []
        by_endpoint: dict[int, Upstream] = {}
        next_expiry = float("inf")
        for up in self.upstreams.values():
            if up.ejected_until and up.ejected_until <= now:
                up.ejected_until = 0.0
            if up.ejected_until:
                next_expiry = min(next_expiry, up.ejected_until)
            elif up.active_healthy:
                eligible.append(up.endpoint)
                by_endpoint[id(up.endpoint)] = up
        self._eligible = eligible
        self._by_endpoint = by_endpoint
        self._next_expiry = next_expiry

    def set_active_health(self, up: Upstream, healthy: bool) -> None:
        if up.active_healthy != healthy:
            up.active_healthy = healthy
            if healthy:
                up.consecutive_failures = 0
            self.rebuild()

    def has_eligible(self) -> bool:
        if self.clock() >= self._next_expiry:
            self.rebuild()
        return bool(self._eligible)

    def has_untried(self, exclude: Iterable[str]) -> bool:
        tried = set(exclude)
        return any(ep.address not in tried for ep in self._eligible)

    # -- pushback cooling and latency -----------------------------------------------------

    def _warm(self) -> list[Endpoint]:
        """The eligible endpoints not cooling down; all of them if every one is."""
        if not self._cooling:
            return self._eligible
        now = self.clock()
        by = self._by_endpoint
        warm = [ep for ep in self._eligible if by[id(ep)].cooling_until <= now]
        if len(warm) == len(self._eligible):
            self._cooling = False
        return warm or self._eligible

    def cooling(self) -> bool:
        """True while every eligible endpoint is cooling down after a pushback: failover
        takes the calls if another service can."""
        if not self._cooling or not self._eligible:
            return False
        now = self.clock()
        return all(self._by_endpoint[id(ep)].cooling_until > now for ep in self._eligible)

    def observe_latency(self, seconds: float) -> None:
        self.latency = seconds if not self.latency else 0.8 * self.latency + 0.2 * seconds

    # -- the hot path -------------------------------------------------------------------

    def pick(self, exclude: Iterable[str] = ()) -> Upstream:
        if self.clock() >= self._next_expiry:
            self.rebuild()
        if not self._eligible:
            total = len(self.upstreams)
            why = (
                "it has no endpoints"
                if not total
                else f"all {total} endpoints are unhealthy or ejected"
            )
            raise MeshError(grpc.StatusCode.UNAVAILABLE, f"service {self.name}: {why}")
        ep = self.picker.pick(self._warm() if self._cooling else self._eligible, tuple(exclude))
        self.picker.started(ep)
        return self._by_endpoint[id(ep)]

    def finished(
        self, up: Upstream, latency: float, code: grpc.StatusCode | None, trailers: Any = None
    ) -> None:
        """Reports a call's end: balancer state, and passive outlier detection."""
        failed = code in ENDPOINT_FAILURES
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED and trailers:
            self._cool(up, trailers)
        up.calls += 1
        up.failures += failed
        up.latency_sum += latency
        load = None
        if self.wants_load and trailers:
            for key, value in trailers:
                if key == "aimesh-load-bin":
                    load = LoadReport.decode(value)
                    break
        self.picker.finished(up.endpoint, latency=latency, ok=not failed, load=load)
        if code is not grpc.StatusCode.CANCELLED:  # the caller's choice says nothing of health
            if self.breaker is not None:
                _record(self.breaker, not failed)
            if up.breaker is not None:
                _record(up.breaker, not failed)
                if up.breaker.state is State.OPEN and up.breaker.open_until is not None:
                    if up.ejected_until < up.breaker.open_until:
                        up.ejected_until = up.breaker.open_until
                        self.rebuild()
        if not failed:
            up.consecutive_failures = 0
            return
        up.consecutive_failures += 1
        if up.consecutive_failures >= self.outlier.consecutive_errors and not up.ejected_until:
            self._eject(up)

    def _cool(self, up: Upstream, trailers: Any) -> None:
        for key, value in trailers:
            if key == "grpc-retry-pushback-ms":
                try:
                    ms = int(value)
                except (TypeError, ValueError):
                    return
                if ms > 0:
                    up.cooling_until = max(up.cooling_until, self.clock() + ms / 1000)
                    self._cooling = True
                return

    def _eject(self, up: Upstream) -> None:
        ejected = sum(1 for u in self.upstreams.values() if u.ejected_until)
        if ejected + 1 > max(1, int(self.outlier.max_ejection_fraction * len(self.upstreams))):
            return  # never eject so many that the rest drown (Envoy's max_ejection_percent)
        up.ejections += 1
        up.ejected_until = self.clock() + self.outlier.base_ejection * up.ejections
        up.consecutive_failures = 0
        self.rebuild()

    def snapshot(self) -> dict[str, Any]:
        now = self.clock()
        return {
            "name": self.name,
            "algorithm": self.algorithm,
            "eligible": len(self._eligible),
            "latency_ms": round(self.latency * 1000, 1),
            "breaker": _breaker_view(self.breaker),
            "retries": self.retries,
            "retry_budget": {
                "allowed": self.budget.retries_allowed,
                "denied": self.budget.retries_denied,
            },
            "limits": repr(self.limits),
            "endpoints": [
                {
                    "address": u.address,
                    "weight": u.endpoint.weight,
                    "zone": u.endpoint.zone,
                    "healthy": u.active_healthy,
                    "ejected_for_s": round(max(0.0, u.ejected_until - now), 3)
                    if u.ejected_until
                    else 0,
                    "cooling_for_s": round(max(0.0, u.cooling_until - now), 3),
                    "inflight": u.endpoint.inflight,
                    "consecutive_failures": u.consecutive_failures,
                    "breaker": _breaker_view(u.breaker),
                }
                for u in self.upstreams.values()
            ],
        }


def _record(breaker: CircuitBreaker, ok: bool) -> None:
    """Records an outcome; a state change is logged, since operators look for trips."""
    before = breaker.state
    breaker.record(ok)
    if breaker.state is not before:
        level = logging.WARNING if breaker.state is State.OPEN else logging.INFO
        log.log(level, "circuit breaker %s: %s -> %s", breaker, before.name, breaker.state.name)


def _breaker_view(b: CircuitBreaker | None) -> dict[str, Any] | None:
    if b is None:
        return None
    return {"state": b.state.name, "trips": b.trips, "repr": repr(b)}
