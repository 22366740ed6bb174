"""The mesh as xDS v3 resources (pure: catalog + config in, protobuf messages out).

One builder serves every consumer; where consumers differ, the node's `Flavor` picks:

- Envoy (a data plane with a socket): one listener on the address its bootstrap names,
  whose HTTP connection manager takes the route table `aimesh` over RDS.
- gRPC proxyless clients (grpcio C-core, grpc-js, grpc-go, ...): an API listener per
  name a client may dial (`xds:///gpt4-gateway`, `xds:///aimesh`), all taking `aimesh`.

The route table `aimesh` has a virtual host per service (domains: the service's name, so
`xds:///gpt4-gateway` lands there) whose routes are the traffic policies attached to that
service (a policy is attached to its first destination, the way an Istio VirtualService is
attached to its host) and then the service itself; and a `*` virtual host with every
policy in YAML order, then model routes: the table the aimesh gateway uses.

Every service is one EDS cluster of the same name. docs/xds.md has the whole mapping and
what each consumer honours.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import grpc
from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    extension_pb2,
    health_check_pb2,
    protocol_pb2,
)
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.load_balancing_policies.client_side_weighted_round_robin.v3 import (
    client_side_weighted_round_robin_pb2 as cswrr_pb2,
)
from envoy.extensions.load_balancing_policies.round_robin.v3 import round_robin_pb2
from envoy.extensions.load_balancing_policies.wrr_locality.v3 import wrr_locality_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from google.protobuf import any_pb2, duration_pb2, message, wrappers_pb2

from aimesh.clients.inference import MODEL_HEADER  # what model routes match

from ...config import (
    Endpoint,
    HeaderMatch,
    MeshConfig,
    RetrySpec,
    ServiceSpec,
    TrafficPolicy,
    parse_host_port,
)
from ..catalog import Instance, Snapshot

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
TYPES = (LISTENER, ROUTE, CLUSTER, ENDPOINT)
SHORT = {LISTENER: "LDS", ROUTE: "RDS", CLUSTER: "CDS", ENDPOINT: "EDS"}

ROUTE_TABLE = "aimesh"  # the one RouteConfiguration
GATEWAY_LISTENER = "aimesh-gateway"  # Envoy's socket listener
DEFAULT_NAME = "aimesh"  # xds:///aimesh: the gateway's table, as the aimesh proxy routes

# CSWRR timings for AI backends: weights from a second of ORCA reports count, rather than
# the default 10 s blackout, because a model server's load moves in seconds.
WRR_BLACKOUT = 1.0
WRR_UPDATE = 0.5

Kind = Literal["envoy", "grpc"]


@dataclass(frozen=True, slots=True)
class Flavor:
    """What a node group receives: consumers of one flavor get identical resources."""

    kind: Kind
    listen: str = ""  # Envoy only: HOST:PORT of its gateway listener

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.listen}" if self.listen else self.kind


Resources = dict[str, dict[str, any_pb2.Any]]  # type url -> name -> resource


def _any(msg: message.Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(msg)
    return packed


def _seconds(value: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(value * 1e9))
    return d


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def listen_address(host_port: str) -> tuple[str, int]:
    """Like parse_host_port, but port 0 (the kernel picks) is allowed: it is a place to
    bind, not to dial."""
    if host_port.endswith(":0"):
        host, _ = parse_host_port(host_port[:-1] + "1")
        return host, 0
    return parse_host_port(host_port)


def _socket(host_port: str) -> address_pb2.Address:
    host, port = listen_address(host_port)
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=host, port_value=port)
    )


# -- listeners --------------------------------------------------------------------------


def _hcm(envoy: bool) -> hcm_pb2.HttpConnectionManager:
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix="aimesh",
        rds=hcm_pb2.Rds(config_source=_ads(), route_config_name=ROUTE_TABLE),
        # gRPC clients refuse an HCM without the router filter last.
        http_filters=[
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.router", typed_config=_any(router_pb2.Router())
            )
        ],
    )
    if envoy:
        hcm.codec_type = hcm_pb2.HttpConnectionManager.AUTO
        hcm.stream_idle_timeout.CopyFrom(_seconds(0))  # token streams may pause: no idle cut
        hcm.generate_request_id.value = False
    return hcm


def api_listener(name: str) -> listener_pb2.Listener:
    return listener_pb2.Listener(
        name=name,
        api_listener=api_listener_pb2.ApiListener(api_listener=_any(_hcm(envoy=False))),
    )


def gateway_listener(listen: str) -> listener_pb2.Listener:
    return listener_pb2.Listener(
        name=GATEWAY_LISTENER,
        address=_socket(listen),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=_any(_hcm(envoy=True)),
                    )
                ]
            )
        ],
    )


# -- routes -----------------------------------------------------------------------------

# gRPC status codes that retry_on can name (Envoy's x-envoy-retry-grpc-on names; gRPC
# clients honour these five and ignore the rest).
_RETRY_ON = {
    grpc.StatusCode.CANCELLED: "cancelled",
    grpc.StatusCode.DEADLINE_EXCEEDED: "deadline-exceeded",
    grpc.StatusCode.INTERNAL: "internal",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "resource-exhausted",
    grpc.StatusCode.UNAVAILABLE: "unavailable",
}


def _header(h: HeaderMatch) -> route_components_pb2.HeaderMatcher:
    m = route_components_pb2.HeaderMatcher(name=h.name)
    if h.kind == "present":
        m.present_match = h.present
    elif h.kind == "exact":
        m.string_match.CopyFrom(string_pb2.StringMatcher(exact=h.value))
    elif h.kind == "prefix":
        m.string_match.CopyFrom(string_pb2.StringMatcher(prefix=h.value))
    else:
        m.string_match.CopyFrom(
            string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=h.value))
        )
    return m


def _match(policy: TrafficPolicy) -> route_components_pb2.RouteMatch:
    m = policy.match
    rm = route_components_pb2.RouteMatch()
    if m.service and m.method:
        rm.path = f"/{m.service}/{m.method}"
    elif m.service:
        rm.prefix = f"/{m.service}/"
    elif m.method:
        rm.safe_regex.CopyFrom(regex_pb2.RegexMatcher(regex=f"/[^/]+/{re.escape(m.method)}"))
    else:
        rm.prefix = "/"
    rm.headers.extend(_header(h) for h in m.headers)
    if m.models:
        rm.headers.append(_models_header(m.models))
    return rm


def _models_header(models: Iterable[str]) -> route_components_pb2.HeaderMatcher:
    alternatives = "|".join(re.escape(m) for m in models)
    return route_components_pb2.HeaderMatcher(
        name=MODEL_HEADER,
        string_match=string_pb2.StringMatcher(
            safe_regex=regex_pb2.RegexMatcher(regex=f"(?:{alternatives})")
        ),
    )


def _retry(spec: RetrySpec) -> route_components_pb2.RetryPolicy | None:
    if spec.attempts <= 1:
        return None
    codes = [_RETRY_ON[c] for c in spec.retry_on if c in _RETRY_ON]
    if not codes:
        return None
    policy = route_components_pb2.RetryPolicy(
        retry_on=",".join(codes),
        num_retries=wrappers_pb2.UInt32Value(value=spec.attempts - 1),
        retry_back_off=route_components_pb2.RetryPolicy.RetryBackOff(
            base_interval=_seconds(spec.backoff.base), max_interval=_seconds(spec.backoff.max)
        ),
    )
    if spec.per_try_timeout:
        policy.per_try_timeout.CopyFrom(_seconds(spec.per_try_timeout))
    return policy


def _action(policy: TrafficPolicy, kind: Kind) -> route_components_pb2.RouteAction:
    action = route_components_pb2.RouteAction()
    routes = [r for r in policy.routes if r.weight > 0]
    if len(routes) == 1:
        action.cluster = routes[0].destination
    else:
        action.weighted_clusters.clusters.extend(
            route_components_pb2.WeightedCluster.ClusterWeight(
                name=r.destination, weight=wrappers_pb2.UInt32Value(value=r.weight)
            )
            for r in routes
        )
    if kind == "envoy":
        # The whole call, streams included; 0s = none (Envoy's default would be 15 s).
        # gRPC clients get no max_stream_duration: C-core fires it early (grpc#34547),
        # and they carry the caller's own deadline anyway.
        action.timeout.CopyFrom(_seconds(policy.timeout or 0))
    if policy.retry is not None:
        retry = _retry(policy.retry)
        if retry is not None:
            action.retry_policy.CopyFrom(retry)
    return action


def _service_route(service: str, kind: Kind) -> route_components_pb2.Route:
    action = route_components_pb2.RouteAction(cluster=service)
    if kind == "envoy":
        action.timeout.CopyFrom(_seconds(0))
    return route_components_pb2.Route(
        name=f"service:{service}",
        match=route_components_pb2.RouteMatch(prefix="/"),
        route=action,
    )


def route_table(
    config: MeshConfig | None, services: Iterable[str], models: Mapping[str, str], kind: Kind
) -> route_pb2.RouteConfiguration:
    """`services`: every cluster; `models`: model -> the service that serves it."""
    policies = config.traffic_policies if config is not None else ()
    routes = {
        p.name: route_components_pb2.Route(name=p.name, match=_match(p), route=_action(p, kind))
        for p in policies
        if any(r.weight > 0 for r in p.routes)
    }
    attached: dict[str, list[str]] = {}
    for p in policies:
        if p.name in routes:
            attached.setdefault(p.routes[0].destination, []).append(p.name)
    hosts = []
    for service in sorted(services):
        vh = route_components_pb2.VirtualHost(name=service, domains=[service, f"{service}:*"])
        vh.routes.extend(routes[name] for name in attached.get(service, ()))
        vh.routes.append(_service_route(service, kind))
        hosts.append(vh)
    default = route_components_pb2.VirtualHost(name="default", domains=["*"])
    default.routes.extend(routes.values())
    for model, service in sorted(models.items()):
        action = route_components_pb2.RouteAction(cluster=service)
        if kind == "envoy":
            action.timeout.CopyFrom(_seconds(0))
        default.routes.append(
            route_components_pb2.Route(
                name=f"model:{model}",
                match=route_components_pb2.RouteMatch(
                    prefix="/", headers=[_models_header([model])]
                ),
                route=action,
            )
        )
    hosts.append(default)
    return route_pb2.RouteConfiguration(name=ROUTE_TABLE, virtual_hosts=hosts)


# -- clusters ---------------------------------------------------------------------------

_HTTP2 = _any(
    http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
        )
    )
)


def _policy(name: str, msg: message.Message) -> cluster_pb2.LoadBalancingPolicy.Policy:
    return cluster_pb2.LoadBalancingPolicy.Policy(
        typed_extension_config=extension_pb2.TypedExtensionConfig(name=name, typed_config=_any(msg))
    )


def _cswrr() -> cswrr_pb2.ClientSideWeightedRoundRobin:
    return cswrr_pb2.ClientSideWeightedRoundRobin(
        blackout_period=_seconds(WRR_BLACKOUT), weight_update_period=_seconds(WRR_UPDATE)
    )


def _balance(cluster: cluster_pb2.Cluster, spec: ServiceSpec, kind: Kind) -> None:
    algorithm = spec.load_balancer.algorithm
    if algorithm == "load_aware":
        # By the load each backend reports (ORCA), the xDS analogue of load_aware.
        if kind == "envoy":
            cluster.load_balancing_policy.policies.append(
                _policy("envoy.load_balancing_policies.client_side_weighted_round_robin", _cswrr())
            )
        else:
            # gRPC: inside wrr_locality (localities weighted, endpoints by their reports),
            # with round_robin as the fallback for clients without weighted_round_robin.
            # The fallback goes inside the endpoint picking list too: grpc-js-xds NACKs
            # the cluster when a wrr_locality's child list has nothing it knows, rather
            # than falling through to the next wrr_locality.
            rr = round_robin_pb2.RoundRobin()
            for children in ((_cswrr(), rr), (rr,)):
                picking = cluster_pb2.LoadBalancingPolicy(
                    policies=[_policy("endpoint_picking", child) for child in children]
                )
                cluster.load_balancing_policy.policies.append(
                    _policy(
                        "envoy.load_balancing_policies.wrr_locality",
                        wrr_locality_pb2.WrrLocality(endpoint_picking_policy=picking),
                    )
                )
        return
    if kind == "envoy":
        cluster.lb_policy = {
            "least_connections": cluster_pb2.Cluster.LEAST_REQUEST,
            "latency": cluster_pb2.Cluster.LEAST_REQUEST,
            "random": cluster_pb2.Cluster.RANDOM,
        }.get(algorithm, cluster_pb2.Cluster.ROUND_ROBIN)
    else:
        # gRPC C-core rejects LEAST_REQUEST and has no RANDOM: round robin is the one
        # policy every gRPC client honours.
        cluster.lb_policy = cluster_pb2.Cluster.ROUND_ROBIN


def cluster(spec: ServiceSpec, kind: Kind) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(
        name=spec.name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads()),
        connect_timeout=_seconds(1.0),
    )
    _balance(c, spec, kind)
    cb = spec.circuit_breaker
    limits = circuit_breaker_pb2.CircuitBreakers.Thresholds(
        max_requests=wrappers_pb2.UInt32Value(value=cb.max_requests),
        max_pending_requests=wrappers_pb2.UInt32Value(value=cb.max_pending),
        max_retries=wrappers_pb2.UInt32Value(value=cb.max_retries),
    )
    c.circuit_breakers.thresholds.append(limits)
    od = spec.load_balancer.outlier_detection
    outlier = outlier_detection_pb2.OutlierDetection(
        base_ejection_time=_seconds(od.base_ejection_time),
        max_ejection_percent=wrappers_pb2.UInt32Value(value=round(od.max_ejection_percent * 100)),
        # No success-rate ejection (the config has none; xDS turns it on when this is
        # unset). grpc-js 1.14.7 with it on and its fields unset crashes the client
        # process at the first interval (10 s): `successRates.reduce` on an empty list.
        enforcing_success_rate=wrappers_pb2.UInt32Value(value=0),
    )
    if kind == "envoy":
        # Envoy maps grpc-status to HTTP (UNAVAILABLE -> 503): consecutive_5xx counts them.
        outlier.consecutive_5xx.value = od.consecutive_errors
    if cb.enabled:
        # The breaker's error rate per endpoint: failure-percentage ejection (the one
        # outlier signal gRPC clients implement besides success rate, gRFC A50).
        outlier.failure_percentage_threshold.value = round(cb.error_threshold * 100)
        outlier.failure_percentage_request_volume.value = cb.min_requests
        outlier.failure_percentage_minimum_hosts.value = 1
        outlier.enforcing_failure_percentage.value = 100
        outlier.interval.CopyFrom(_seconds(cb.window))
    c.outlier_detection.CopyFrom(outlier)
    if kind == "envoy":
        # No panic mode: Envoy's default (under 50% healthy: spread calls over every
        # endpoint, unhealthy ones included) would send calls to endpoints the registry
        # marks unhealthy; aimesh proxies and gRPC clients never do.
        c.common_lb_config.healthy_panic_threshold.value = 0
        # Health changes count at once: Envoy's default 1 s merge window held a new
        # endpoint out for ~1 s after its first active check passed.
        c.common_lb_config.update_merge_window.CopyFrom(_seconds(0))
        c.typed_extension_protocol_options[
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        ].CopyFrom(_HTTP2)
        hc = spec.load_balancer.health_check
        if hc.enabled:
            c.health_checks.append(
                health_check_pb2.HealthCheck(
                    timeout=_seconds(hc.timeout),
                    interval=_seconds(hc.interval),
                    unhealthy_threshold=wrappers_pb2.UInt32Value(value=hc.threshold),
                    healthy_threshold=wrappers_pb2.UInt32Value(value=hc.healthy_threshold),
                    grpc_health_check=health_check_pb2.HealthCheck.GrpcHealthCheck(
                        service_name=hc.service
                    ),
                )
            )
            # The registry is authoritative: an endpoint gone from EDS is gone at once.
            # (False would keep it, pending_dynamic_removal, until Envoy's own checks fail
            # it: threshold x interval, 30 s by default, calls to a stopped backend.)
            c.ignore_health_on_host_removal = True
    return c


# -- endpoints --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EndpointState:
    """One endpoint as EDS shows it."""

    address: str
    zone: str
    weight: int
    healthy: bool


# gRPC clients skip UNHEALTHY (and DRAINING) endpoints; Envoy too, whatever its own checks say.
_HEALTH = {True: health_check_pb2.HEALTHY, False: health_check_pb2.UNHEALTHY}


def load_assignment(
    service: str, endpoints: Iterable[EndpointState]
) -> endpoint_pb2.ClusterLoadAssignment:
    by_zone: dict[str, list[EndpointState]] = {}
    for ep in endpoints:
        by_zone.setdefault(ep.zone, []).append(ep)
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=service)
    for zone in sorted(by_zone):
        eps = sorted(by_zone[zone], key=lambda e: e.address)
        # gRPC drops a locality of weight 0, and weighs localities against each other:
        # a zone counts by the weight of its endpoints that can take calls.
        weight = sum(e.weight for e in eps if e.healthy) or 1
        locality = endpoint_components_pb2.LocalityLbEndpoints(
            locality=base_pb2.Locality(zone=zone),
            load_balancing_weight=wrappers_pb2.UInt32Value(value=weight),
        )
        for ep in eps:
            locality.lb_endpoints.append(
                endpoint_components_pb2.LbEndpoint(
                    endpoint=endpoint_components_pb2.Endpoint(address=_socket(ep.address)),
                    health_status=_HEALTH[ep.healthy],
                    load_balancing_weight=wrappers_pb2.UInt32Value(value=max(ep.weight, 1)),
                )
            )
        cla.endpoints.append(locality)
    return cla


# -- the whole set ----------------------------------------------------------------------


@dataclass(slots=True)
class _Cla:
    instances: tuple[Instance, ...]
    health: tuple[bool, ...]
    static: tuple[Endpoint, ...]
    packed: any_pb2.Any


@dataclass(slots=True)
class Builder:
    """Builds the resources of every flavor, reusing each packed resource until what it
    is built from changes: a registry change repacks one service's endpoints, a config
    change the clusters and the route table. Instances and config values are immutable,
    so "unchanged" is identity, which costs nothing to check."""

    _cla: dict[str, _Cla] = field(default_factory=dict)
    _clusters: dict[tuple[Kind, str], tuple[ServiceSpec | None, any_pb2.Any]] = field(
        default_factory=dict
    )
    _listeners: dict[tuple[Kind, str], any_pb2.Any] = field(default_factory=dict)
    _routes: dict[Kind, tuple[MeshConfig | None, tuple[str, ...], dict[str, str], any_pb2.Any]] = (
        field(default_factory=dict)
    )

    def build(
        self,
        flavors: Iterable[Flavor],
        snapshot: Snapshot,
        config: MeshConfig | None,
        healthy: Callable[[Instance], bool],
    ) -> dict[str, Resources]:
        """Flavor key -> its resources."""
        grouped: dict[str, list[Instance]] = {}
        for inst in snapshot.instances.values():
            grouped.setdefault(inst.service, []).append(inst)
        services = services_of(grouped, config)
        models = models_of(snapshot, config)
        specs = {s.name: s for s in config.services} if config is not None else {}
        endpoints = {
            s: self._endpoints(s, grouped.get(s, ()), specs.get(s), healthy) for s in services
        }
        for gone in set(self._cla) - set(endpoints):
            del self._cla[gone]
        flavors = list(flavors)
        self._forget(services, flavors)
        return {
            flavor.key: {
                LISTENER: self._listeners_of(flavor, services),
                ROUTE: {ROUTE_TABLE: self._route_table(flavor.kind, config, services, models)},
                CLUSTER: {s: self._cluster(flavor.kind, s, specs.get(s)) for s in services},
                ENDPOINT: endpoints,
            }
            for flavor in flavors
        }

    def _forget(self, services: Sequence[str], flavors: Sequence[Flavor]) -> None:
        """Drops what no service or flavor in use needs any more."""
        names = {*services, DEFAULT_NAME, *(f.listen for f in flavors if f.kind == "envoy")}
        for key in [k for k in self._clusters if k[1] not in names]:
            del self._clusters[key]
        for key in [k for k in self._listeners if k[1] not in names]:
            del self._listeners[key]

    def _endpoints(
        self,
        service: str,
        instances: Sequence[Instance],
        spec: ServiceSpec | None,
        healthy: Callable[[Instance], bool],
    ) -> any_pb2.Any:
        health = tuple(healthy(i) for i in instances)
        static = spec.endpoints if spec is not None else ()
        cached = self._cla.get(service)
        if (
            cached is not None
            and cached.static is static
            and cached.health == health
            and len(cached.instances) == len(instances)
            and all(a is b for a, b in zip(cached.instances, instances, strict=True))
        ):
            return cached.packed
        states = [
            EndpointState(i.address, i.zone, i.weight, ok)
            for i, ok in zip(instances, health, strict=True)
        ]
        # Static endpoints from the YAML: always in.
        states += [EndpointState(ep.address, ep.zone, ep.weight, True) for ep in static]
        packed = _any(load_assignment(service, states))
        self._cla[service] = _Cla(tuple(instances), health, static, packed)
        return packed

    def _cluster(self, kind: Kind, service: str, spec: ServiceSpec | None) -> any_pb2.Any:
        cached = self._clusters.get((kind, service))
        if cached is None or cached[0] is not spec:
            cached = (spec, _any(cluster(spec or ServiceSpec(name=service), kind)))
            self._clusters[(kind, service)] = cached
        return cached[1]

    def _listeners_of(self, flavor: Flavor, services: Sequence[str]) -> dict[str, any_pb2.Any]:
        if flavor.kind == "envoy":
            names = {GATEWAY_LISTENER: flavor.listen}
        else:
            names = {name: name for name in (DEFAULT_NAME, *services)}
        out = {}
        for name, arg in names.items():
            packed = self._listeners.get((flavor.kind, arg))
            if packed is None:
                msg = gateway_listener(arg) if flavor.kind == "envoy" else api_listener(arg)
                packed = self._listeners[(flavor.kind, arg)] = _any(msg)
            out[name] = packed
        return out

    def _route_table(
        self,
        kind: Kind,
        config: MeshConfig | None,
        services: Sequence[str],
        models: Mapping[str, str],
    ) -> any_pb2.Any:
        cached = self._routes.get(kind)
        if (
            cached is None
            or cached[0] is not config
            or cached[1] != tuple(services)
            or cached[2] != models
        ):
            packed = _any(route_table(config, services, models, kind))
            cached = (config, tuple(services), dict(models), packed)
            self._routes[kind] = cached
        return cached[3]


def services_of(grouped: Mapping[str, Sequence[Instance]], config: MeshConfig | None) -> list[str]:
    """Every service a route may name: registered, configured, or a destination."""
    names = set(grouped)
    if config is not None:
        names.update(s.name for s in config.services)
        for p in config.traffic_policies:
            names.update(r.destination for r in p.routes)
            names.update(p.backups)
    return sorted(names)


def models_of(snapshot: Snapshot, config: MeshConfig | None) -> dict[str, str]:
    models = dict(snapshot.models())
    for spec in config.services if config is not None else ():
        for m in spec.models:
            models.setdefault(m, spec.name)
    return models


def check(resources: Resources) -> list[str]:
    """Why a set is not self-consistent (empty: it is). A consumer given a route to a
    cluster it does not have fails the calls on it, so such a set is never published."""
    problems = []
    clusters = resources[CLUSTER]
    routes = resources[ROUTE]
    for name, packed in resources[LISTENER].items():
        listener = listener_pb2.Listener()
        packed.Unpack(listener)
        hcm = hcm_pb2.HttpConnectionManager()
        holder = (
            listener.api_listener.api_listener
            if listener.HasField("api_listener")
            else (listener.filter_chains[0].filters[0].typed_config)
        )
        holder.Unpack(hcm)
        if hcm.rds.route_config_name not in routes:
            problems.append(f"listener {name}: route table {hcm.rds.route_config_name} missing")
    for name, packed in routes.items():
        table = route_pb2.RouteConfiguration()
        packed.Unpack(table)
        for vh in table.virtual_hosts:
            for r in vh.routes:
                targets = (
                    [r.route.cluster]
                    if r.route.cluster
                    else [w.name for w in r.route.weighted_clusters.clusters]
                )
                for t in targets:
                    if t not in clusters:
                        problems.append(f"route {name}/{vh.name}/{r.name}: no cluster {t}")
    for name in clusters:
        if name not in resources[ENDPOINT]:
            problems.append(f"cluster {name}: no endpoints resource")
    return problems


def version_of(resources: Mapping[str, any_pb2.Any]) -> str:
    """A content hash: the same resources give the same version on every replica, so a
    client that fails over to another control plane is not sent what it already has."""
    h = hashlib.blake2b(digest_size=8)
    for name in sorted(resources):
        h.update(name.encode())
        h.update(resources[name].value)
    return h.hexdigest()
