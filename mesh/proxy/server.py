"""Assembles the proxy: listener(s), forwarding, clusters, health checks, reflection, admin.

    gateway:  clients -> [listen] -> route + balance -> services' endpoints
    sidecar:  outbound: local app -> [listen] -> route + balance -> mesh services
              inbound:  mesh -> [inbound] -> the local app (one endpoint)

Both modes use the same Forwarder; a sidecar simply runs two of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer

from aimesh.inference.v1 import inference_pb2
from aimesh.interceptors.base import Policy
from aimesh.interceptors.events import Counters, Sink

from ..config import MeshConfig, ServiceSpec
from ..observability.audit import AuditLog, AuditSettings
from ..observability.tracing import TracingFlags
from ..security.authz import Authorizer
from ..serving import HEALTH, REFLECTION_V1, REFLECTION_V1ALPHA, Health, bind, server_options
from ..serving import _register_reflection_v1_descriptor as register_v1_descriptor
from . import descriptors
from .cluster import (
    Cluster,
    EndpointAddr,
    OutlierPolicy,
    insecure_channel_factory,
    mtls_channel_factory,
)
from .forward import AttemptObserver, Forwarder, GenericHandler
from .health import HealthChecker, HealthPolicy
from .router import Router
from .stack import inbound_stack

log = logging.getLogger("aimesh.proxy")

# Keep upstream connections warm and notice dead peers quickly.
UPSTREAM_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 0),  # retries are the mesh's decision, not the channel's
]


@dataclass
class ProxySettings:
    listen: str = "127.0.0.1:0"
    mode: str = "gateway"  # or "sidecar"
    inbound_listen: str | None = None  # sidecar: where the mesh reaches the local app
    local_app: str | None = None  # sidecar: HOST:PORT of the app beside this proxy
    max_message_bytes: int = 16 * 1024 * 1024
    # Endpoints from the command line, added to (or replacing) those in the YAML.
    extra_endpoints: Mapping[str, Sequence[EndpointAddr]] = field(default_factory=dict)
    seed: int | None = None
    min_deadline: float = 0.001  # calls with less time left fail at once (DEADLINE_EXCEEDED)
    audit: AuditSettings | None = None  # the audit trail: one JSON line per call, when set
    # --otlp-endpoint and --trace-sampling (mesh/observability/tracing.py: proxy_tracing).
    tracing: TracingFlags | None = None
    # mTLS (mesh/security/cli.py MtlsFlags): the proxy gets its identity at start...
    mtls: Any = None
    # ...or is handed a started WorkloadIdentity (tests); either turns mTLS on.
    identity: Any = None
    rotation_drain: float = 30.0  # old upstream channels' grace after a rotation
    # Callers' credentials at the gateway (--api-keys, --jwt-*: security/callers.py).
    callers: Policy | None = None
    # Sidecar: the local app's service name (--service), what its inbound side authorizes.
    service: str | None = None


def _health_policy(spec: ServiceSpec | None) -> HealthPolicy:
    if spec is None:
        return HealthPolicy()
    hc = spec.load_balancer.health_check
    return HealthPolicy(
        interval=hc.interval,
        timeout=hc.timeout,
        threshold=hc.threshold,
        healthy_threshold=hc.healthy_threshold,
        service=hc.service,
        enabled=hc.enabled,
    )


def _outlier(spec: ServiceSpec | None) -> OutlierPolicy:
    if spec is None:
        return OutlierPolicy()
    o = spec.load_balancer.outlier_detection
    return OutlierPolicy(
        consecutive_errors=o.consecutive_errors,
        base_ejection=o.base_ejection_time,
        max_ejection_fraction=o.max_ejection_percent,
    )


class ReflectionRelay:
    """Serves reflection v1 and v1alpha from the catalog of services behind the proxy."""

    def __init__(self, catalog: descriptors.Catalog) -> None:
        self.catalog = catalog
        self._servicer: ReflectionServicer | None = None
        self._known = -1

    def servicer(self) -> ReflectionServicer:
        if self._servicer is None or self._known != len(self.catalog.services):
            names = sorted({*self.catalog.services, HEALTH, REFLECTION_V1, REFLECTION_V1ALPHA})
            self._servicer = ReflectionServicer(names, pool=self.catalog.pool)
            self._known = len(self.catalog.services)
        return self._servicer

    def register(self, server: grpc.aio.Server) -> None:
        async def info(requests: Any, context: Any) -> Any:
            async for response in self.servicer().ServerReflectionInfo(requests, context):
                yield response

        handler = grpc.stream_stream_rpc_method_handler(
            info,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
        for service in (REFLECTION_V1ALPHA, REFLECTION_V1):
            server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(service, {"ServerReflectionInfo": handler}),)
            )


class Proxy:
    def __init__(self, settings: ProxySettings) -> None:
        self.settings = settings
        self.rng = random.Random(settings.seed)
        self.config: MeshConfig | None = None
        self.clusters: dict[str, Cluster] = {}
        self.health_checker = HealthChecker()
        # Inference is aimesh's own contract: known from the start, so its calls get the
        # right handler type and model routing before any backend has been asked.
        self.catalog = descriptors.Catalog(
            seed_files=[health_pb2.DESCRIPTOR.name, inference_pb2.DESCRIPTOR.name]
        )
        register_v1_descriptor(self.catalog.pool)
        self.catalog.services.add(REFLECTION_V1)
        self._channel_factory = insecure_channel_factory(
            [
                *UPSTREAM_OPTIONS,
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
            ]
        )
        self.counters = Counters()  # calls by method and status, from the inbound stack
        # Everything that hears of each call's end (metrics, audit: add before start()).
        self.sinks: list[Sink] = [self.counters]
        self.outer_policies: list[Policy] = []  # around everything (tracing's server span)
        self.observer: AttemptObserver | None = None  # each upstream try (tracing)
        self.audit: AuditLog | None = None  # from settings.audit, between start() and stop()
        self.forwarder: Forwarder | None = None
        self.inbound: Forwarder | None = None
        self.authorizer: Authorizer | None = None  # spec.security.authorization, when enabled
        self._authz_spec: object = None
        self.servers: list[grpc.aio.Server] = []
        self.healths: list[Health] = []
        self.ports: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing: list[grpc.aio.Channel] = []
        # From the control plane's catalog: endpoints by service, and model -> service.
        self.discovered: dict[str, list[EndpointAddr]] = {}
        self.discovered_models: dict[str, str] = {}
        self.catalog_version = 0  # of the control plane's catalog and config now live
        self.config_version = 0
        self.identity: Any = settings.identity  # WorkloadIdentity when mTLS is on
        self.mtls_mode = "DISABLE"  # mesh/security/mtls.py decides at start
        self.plaintext_calls = 0  # PERMISSIVE: calls through the plaintext listener
        self.rotations = 0

    # -- configuration ------------------------------------------------------------------

    def _endpoints_for(self, name: str, spec: ServiceSpec | None) -> list[EndpointAddr]:
        eps = [EndpointAddr(e.address, e.weight, e.zone) for e in (spec.endpoints if spec else ())]
        eps += list(self.settings.extra_endpoints.get(name, ()))
        eps += self.discovered.get(name, ())
        return eps

    def apply(self, config: MeshConfig) -> None:
        """Makes `config` live: clusters are created, updated or removed; calls in flight
        keep their upstream. `config` is already validated (load_* raised otherwise)."""
        names = {s.name for s in config.services} | set(config.destinations())
        names |= set(self.settings.extra_endpoints) | set(self.discovered)
        new: dict[str, Cluster] = {}
        for name in sorted(names):
            spec = config.service(name)
            algorithm = spec.load_balancer.algorithm if spec else "least_connections"
            # What a live cluster cannot change in place: its picker, its channels' message
            # limit, its health checks. A change there builds the cluster anew.
            shape = (algorithm, spec.max_message_bytes if spec else None, _health_policy(spec))
            cluster = self.clusters.get(name)
            if cluster is None or cluster.shape != shape:
                if cluster is not None:
                    self._retire(cluster)
                cluster = Cluster(
                    name,
                    algorithm=algorithm,
                    channel_factory=self._channel_factory_for(spec, name),
                    outlier=_outlier(spec),
                    rng=random.Random(self.rng.random()),
                )
                cluster.shape = shape
                self.health_checker.attach(cluster, _health_policy(spec))
                cluster.on_added.append(self._learn)
            else:
                cluster.outlier = _outlier(spec)
            cluster.timeout = spec.timeout if spec else None
            cluster.configure_breakers(spec.circuit_breaker if spec else None)
            self._closing += cluster.set_endpoints(self._endpoints_for(name, spec))
            new[name] = cluster
        for name, cluster in self.clusters.items():
            if name not in new:
                self._retire(cluster)
        self.clusters = new
        self.config = config
        router = Router(config, self.discovered_models)
        if self.forwarder is None:
            self.forwarder = Forwarder(router, new, rng=self.rng)
            self.forwarder.min_deadline = self.settings.min_deadline
            self.forwarder.observer = self.observer
        else:
            self.forwarder.update(router, new)
        self._authorize(config)
        for cluster in new.values():
            for up in cluster.upstreams.values():
                self._learn(cluster, up)

    def _authorize(self, config: MeshConfig) -> None:
        """Makes the config's authorization live (built anew only when it changed): on a
        gateway's listener, and on a sidecar's inbound side (its outbound side serves the
        local app; the callee's inbound side authorizes those calls)."""
        spec = config.security.authorization
        if spec is not self._authz_spec:
            self._authz_spec = spec
            self.authorizer = Authorizer.from_config(spec) if spec.enabled else None
        if self.forwarder is not None and self.settings.mode == "gateway":
            self.forwarder.authorizer = self.authorizer
        if self.inbound is not None:
            self.inbound.authorizer = self.authorizer

    def set_discovered(
        self, endpoints: Mapping[str, Sequence[EndpointAddr]], models: Mapping[str, str]
    ) -> None:
        """Makes the control plane's catalog live. Only the clusters whose endpoints
        changed are touched, unless a service appeared or went, or models moved: then the
        routes are rebuilt too. Calls in flight keep their upstream either way."""
        old_names = set(self.discovered)
        old_models = self.discovered_models
        old = self.discovered
        self.discovered = {k: list(v) for k, v in endpoints.items()}
        self.discovered_models = dict(models)
        if self.config is None:
            return
        if set(self.discovered) - set(self.clusters) or old_models != self.discovered_models:
            self.apply(self.config)
            return
        for name in old_names | set(self.discovered):
            if old.get(name) != self.discovered.get(name) and name in self.clusters:
                self._closing += self.clusters[name].set_endpoints(
                    self._endpoints_for(name, self.config.service(name))
                )

    def _channel_factory_for(self, spec: ServiceSpec | None, name: str | None = None) -> Any:
        if self.identity is not None and name is not None:
            size = (spec.max_message_bytes if spec else None) or self.settings.max_message_bytes
            options = [
                *UPSTREAM_OPTIONS,
                ("grpc.max_receive_message_length", size),
                ("grpc.max_send_message_length", size),
            ]
            return mtls_channel_factory(self.identity, options, self.identity.expected_id(name))
        if spec is None or spec.max_message_bytes is None:
            return self._channel_factory
        limit = spec.max_message_bytes
        return insecure_channel_factory(
            [
                *UPSTREAM_OPTIONS,
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
            ]
        )

    def _retire(self, cluster: Cluster) -> None:
        self._closing += cluster.set_endpoints(())

    def _learn(self, cluster: Cluster, up: Any) -> None:
        """Fetches the endpoint's service descriptors once per cluster, in the background."""
        key = f"learn:{cluster.name}"
        if any(t.get_name() == key for t in self._tasks) or getattr(cluster, "_learned", False):
            return
        cluster._learned = True  # type: ignore[attr-defined]
        task = asyncio.get_running_loop().create_task(
            descriptors.discover(self.catalog, up.channel, f"{cluster.name}/{up.address}"), name=key
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- serving ------------------------------------------------------------------------

    def _server(
        self, forwarder: Forwarder, inner: Sequence[Policy] = ()
    ) -> tuple[grpc.aio.Server, Health]:
        server = grpc.aio.server(
            options=server_options(self.settings.max_message_bytes),
            interceptors=[
                inbound_stack(self.settings.min_deadline, self.sinks, self.outer_policies, inner)
            ],
        )
        health = Health(server, [])
        ReflectionRelay(self.catalog).register(server)
        server.add_generic_rpc_handlers((GenericHandler(forwarder, self.catalog.kinds),))
        return server, health

    async def start(self, config: MeshConfig) -> None:
        from ..security.mtls import PlaintextCounter, listener_credentials, setup_identity

        await setup_identity(self, config)
        self.apply(config)
        assert self.forwarder is not None
        if self.settings.audit is not None and self.audit is None:
            self.audit = AuditLog(self.settings.audit)
            self.audit.start()
            self.sinks.append(self.audit)
            self.forwarder.capture |= self.settings.audit.include_content
        callers = self.settings.callers
        outbound, health = self._server(
            self.forwarder, [callers] if callers and self.settings.mode == "gateway" else []
        )
        creds = listener_credentials(self, client_facing=True)
        self.ports["listen"] = bind(outbound, self.settings.listen, creds)
        self.servers.append(outbound)
        self.healths.append(health)
        if self.settings.mode == "sidecar":
            if not self.settings.inbound_listen or not self.settings.local_app:
                raise ValueError("sidecar mode needs --inbound HOST:PORT and --local-app HOST:PORT")
            local = Cluster(
                "local-app", algorithm="round_robin", channel_factory=self._channel_factory
            )
            local.set_endpoints([EndpointAddr(self.settings.local_app)])
            self.health_checker.attach(local, HealthPolicy(interval=5.0))
            self.inbound = Forwarder(
                Router.catch_all("local-app"), {"local-app": local}, rng=self.rng
            )
            self.inbound.observer = self.observer
            self.inbound.capture = self.forwarder.capture
            self.inbound.authz_service = self.settings.service or "local-app"
            self.inbound.authorizer = self.authorizer
            inbound, in_health = self._server(self.inbound)
            creds = listener_credentials(self, client_facing=False)
            self.ports["inbound"] = bind(inbound, self.settings.inbound_listen, creds)
            self.servers.append(inbound)
            self.healths.append(in_health)
            self._learn(local, next(iter(local.upstreams.values())))
        plaintext_listen = getattr(self.settings.mtls, "plaintext_listen", None)
        if plaintext_listen and self.mtls_mode == "PERMISSIVE":
            # PERMISSIVE: the mesh-facing side also takes plaintext, on its own port
            # (one gRPC port is TLS or not), and counts what comes in clear.
            side = self.inbound if self.inbound is not None else self.forwarder
            gate = [callers] if callers and self.inbound is None else []
            clear, clear_health = self._server(side, [PlaintextCounter(self), *gate])
            self.ports["plaintext"] = bind(clear, plaintext_listen)
            self.servers.append(clear)
            self.healths.append(clear_health)
        for server in self.servers:
            await server.start()
        for h in self.healths:
            await h.set_serving(True)

    async def stop(self, grace: float = 5.0) -> int:
        """Drains: NOT_SERVING, new calls refused with UNAVAILABLE, in-flight calls get
        `grace` seconds, then the rest end with UNAVAILABLE (callers retry elsewhere).
        Returns how many calls were cut short."""
        for h in self.healths:
            await h.shutdown()
        forwarders = [f for f in (self.forwarder, self.inbound) if f is not None]
        for f in forwarders:
            f.draining = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(f.wait_idle() for f in forwarders)), grace)
        cut = sum(len(f.calls) for f in forwarders)
        for f in forwarders:
            f.aborting = True
            for call in list(f.calls):
                call.cancel()
        await asyncio.gather(*(s.stop(1.0) for s in self.servers))
        await self.health_checker.close()
        if self.identity is not None and self.settings.identity is None:
            await self.identity.stop()  # the proxy started it
        if self.audit is not None:  # every call has ended: write the last records
            await self.audit.aclose()
        for t in list(self._tasks):
            t.cancel()
        channels = [u.channel for c in self.clusters.values() for u in c.upstreams.values()]
        if self.inbound is not None:
            channels += [
                u.channel for c in self.inbound.clusters.values() for u in c.upstreams.values()
            ]
        await asyncio.gather(
            *(ch.close(None) for ch in channels + self._closing), return_exceptions=True
        )
        return cut

    def endpoint_reports(self) -> list[Any]:
        """Cumulative counters per endpoint, for the control plane's topology view."""
        from aimesh.control.v1 import control_plane_pb2 as cp_pb

        return [
            cp_pb.EndpointReport(
                service=c.name,
                address=u.address,
                requests=u.calls,
                errors=u.failures,
                latency_seconds_total=u.latency_sum,
                healthy=u.active_healthy and u.ejected_until <= c.clock(),
            )
            for c in self.clusters.values()
            for u in c.upstreams.values()
        ]

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mode": self.settings.mode,
            "ports": self.ports,
            "config": self.config.metadata.name if self.config else None,
            "clusters": [c.snapshot() for c in self.clusters.values()],
            "services_learned": sorted(self.catalog.services),
            "streams_resumed": self.forwarder.resumed if self.forwarder else 0,
        }
        if self.inbound is not None:
            out["inbound"] = [c.snapshot() for c in self.inbound.clusters.values()]
        return out
