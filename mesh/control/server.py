"""The control plane: its state (built only from store events) and its gRPC services.

    store ──events──▶ ControlPlane (catalog, config, topology) ──▶ Watch streams, List, DNS
      ▲                                                         ◀── Register / Apply / Report
      └──────────────── writes (register, renew, put config) ──┘

Writes go to the store and return once the store's own event has come back and been
published here, so a caller that registers and then lists sees its instance, on every
store (with etcd, the event may come from another replica's write just the same).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import replace
from typing import Any

import grpc
import grpc.aio
from envoy.service.discovery.v3 import ads_pb2_grpc

from aimesh.control.v1 import control_plane_pb2 as pb
from aimesh.control.v1 import control_plane_pb2_grpc as pb_grpc
from aimesh.interceptors import DecodeErrorInterceptor
from aimesh.interceptors.base import Stack

from ..config import MeshConfig, load_text, summary
from ..errors import ConfigError
from ..serving import Health, bind, enable_reflection, host_of, server_options
from . import access, consistency
from .catalog import Catalog, Instance, Key, Snapshot, merge
from .leases import check_ttl
from .store import ConfigRecord, Conflict, Store, StoreUnavailable
from .topology import REPORT_INTERVAL, Topology
from .xds.ads import SERVICE as XDS_SERVICE
from .xds.ads import Xds

log = logging.getLogger("aimesh.control")

SERVICES = [
    pb.DESCRIPTOR.services_by_name[name].full_name for name in ("Registry", "Config", "Status")
]

# How long a write waits for its own change to come back from the store.
PUBLISH_WAIT = 5.0


class _Signal:
    """Wakes every waiter once per change: waiters take `current` first, then read state."""

    def __init__(self) -> None:
        self.current = asyncio.Event()

    def fire(self) -> None:
        old, self.current = self.current, asyncio.Event()
        old.set()


class ControlPlane:
    """Implements StoreEvents; holds what watchers are served."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.catalog = Catalog()
        self.config: ConfigRecord | None = None
        self.mesh: MeshConfig | None = None
        self.catalog_signal = _Signal()
        self.config_signal = _Signal()
        # Fires on anything a view of the mesh depends on: catalog, config, and health as
        # proxies report it (the xDS server follows this one).
        self.state_signal = _Signal()
        self.topology = Topology(clock, on_vote=self.state_signal.fire)
        self.started = time.time()
        self.parsed: tuple[str, MeshConfig] | None = None  # the document Apply last parsed
        # The full catalog as a watch update, built once per version for every watcher
        # that needs one (a new watcher, or one too far behind for increments).
        self._full: tuple[int, pb.CatalogUpdate] | None = None
        # Counters for metrics, read when /metrics is scraped (mesh/observability/metrics.py).
        self.registrations = 0  # through this replica
        self.deregistrations = 0  # Deregister calls to this replica that removed an instance
        self.applies: dict[str, int] = dict.fromkeys(
            ("applied", "unchanged", "rejected", "conflict", "dry_run"), 0
        )
        self.watchers: dict[str, int] = {"catalog": 0, "config": 0}  # open Watch streams

    def full_update(self, snap: Snapshot) -> pb.CatalogUpdate:
        if self._full is None or self._full[0] != snap.version:
            full = snap.to_proto()
            self._full = (
                snap.version,
                pb.CatalogUpdate(version=snap.version, full=True, upserted=full.instances),
            )
        return self._full[1]

    # -- StoreEvents --------------------------------------------------------------------

    def catalog_reset(self, version: int, instances: Iterable[Instance]) -> None:
        self.catalog.reset(version, instances)
        self._catalog_published()

    def catalog_changed(
        self, version: int, upserted: Iterable[Instance], removed: Iterable[Key]
    ) -> None:
        if self.catalog.apply(version, upserted, removed) is not None:
            self._catalog_published()

    def _catalog_published(self) -> None:
        # Watchers first: the topology's uptime bookkeeping walks every reported
        # endpoint, so it runs on its own clock (`observe_every`), not on this path.
        self.catalog_signal.fire()
        self.state_signal.fire()

    async def observe_every(self, seconds: float = 1.0) -> None:
        """Integrates service uptime against the live catalog, forever."""
        while True:
            self.topology.observe(self.catalog.snapshot)
            await asyncio.sleep(seconds)

    def config_changed(self, record: ConfigRecord) -> None:
        if self.config is not None and record.version <= self.config.version:
            return
        try:
            # Apply has just parsed this very document: reuse that, not parse it twice.
            parsed = self.parsed
            if parsed is not None and parsed[0] == record.document:
                mesh = parsed[1]
            else:
                mesh = load_text(record.document, source=record.source or "<store>")
        except ConfigError as exc:
            # Only a document that passed Apply is stored, so this is someone writing to
            # the store by hand: keep serving the last good config.
            log.error("stored config v%d is invalid, keeping the live one: %s", record.version, exc)
            return
        self.config, self.mesh = record, mesh
        self.config_signal.fire()
        self.state_signal.fire()

    # -- waiting for publication --------------------------------------------------------

    async def wait_catalog(self, version: int) -> None:
        deadline = time.monotonic() + PUBLISH_WAIT
        while self.catalog.version < version:
            event = self.catalog_signal.current
            left = deadline - time.monotonic()
            if left <= 0:
                return  # published later; the write itself succeeded
            try:
                await asyncio.wait_for(event.wait(), left)
            except TimeoutError:
                return

    async def wait_config(self, version: int) -> None:
        deadline = time.monotonic() + PUBLISH_WAIT
        while self.config is None or self.config.version < version:
            event = self.config_signal.current
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(event.wait(), left)
            except TimeoutError:
                return


async def _store_call(context: grpc.aio.ServicerContext[Any, Any], coro: Any) -> Any:
    try:
        return await coro
    except StoreUnavailable as exc:
        await context.abort(
            grpc.StatusCode.UNAVAILABLE, f"the control plane's store is unavailable: {exc}"
        )


class RegistryService(pb_grpc.RegistryServicer):
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    async def Register(  # noqa: N802 (gRPC method name)
        self, request: pb.RegisterRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RegisterResponse:
        try:
            inst = Instance.from_proto(request.instance)
            ttl = check_ttl(request.ttl.ToNanoseconds() / 1e9)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        await access.authorize_registration(context, inst.service)
        inst = replace(inst, registered_at=time.time(), lease_id=0)
        lease_id, version = await _store_call(context, self.cp.store.register(inst, ttl))
        await self.cp.wait_catalog(version)
        self.cp.registrations += 1
        log.info(
            "registered %s/%s at %s (lease %d)",
            inst.service,
            inst.instance_id,
            inst.address,
            lease_id,
        )
        response = pb.RegisterResponse(
            lease_id=lease_id, version=version, instance_id=inst.instance_id
        )
        response.ttl.FromNanoseconds(int(ttl * 1e9))
        return response

    async def KeepAlive(  # noqa: N802 (gRPC method name)
        self,
        request_iterator: AsyncIterator[pb.KeepAliveRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.KeepAliveResponse]:
        allowed: set[int] = set()  # leases this stream's caller may renew (checked once)
        async for request in request_iterator:
            if request.lease_id not in allowed:
                if not await self._authorize_lease(context, request.lease_id):
                    # Unknown here, so its owner cannot be checked: not renewed. (A lease
                    # that is only about to exist must not be cached as allowed, or the
                    # caller could renew it, and flip its serving flag, once another
                    # service holds it.)
                    yield pb.KeepAliveResponse(lease_id=request.lease_id, found=False)
                    continue
                allowed.add(request.lease_id)
            serving = request.serving if request.HasField("serving") else None
            ttl = await _store_call(context, self.cp.store.keepalive(request.lease_id, serving))
            response = pb.KeepAliveResponse(lease_id=request.lease_id, found=ttl is not None)
            if ttl is not None:
                response.ttl.FromNanoseconds(int(ttl * 1e9))
            yield response

    async def Deregister(  # noqa: N802 (gRPC method name)
        self, request: pb.DeregisterRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DeregisterResponse:
        which = request.WhichOneof("target")
        if which == "lease_id":
            known = await self._authorize_lease(context, request.lease_id)
            version = (
                await _store_call(context, self.cp.store.deregister(lease_id=request.lease_id))
                if known
                else None
            )
            what = f"lease {request.lease_id}"
        elif which == "instance":
            ref = request.instance
            key = self._find(ref.service, ref.instance_id)
            what = f"{ref.service}/{ref.instance_id}"
            if key:
                await access.authorize_registration(context, key[0])
            version = await _store_call(context, self.cp.store.deregister(key=key)) if key else None
        else:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "set lease_id or instance (service, instance_id)"
            )
        if version is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no registered instance {what}; `aimesh get instances` lists them",
            )
        await self.cp.wait_catalog(version)
        self.cp.deregistrations += 1
        log.info("deregistered %s", what)
        return pb.DeregisterResponse(version=version)

    async def _authorize_lease(
        self, context: grpc.aio.ServicerContext[Any, Any], lease_id: int
    ) -> bool:
        """Over mTLS: whether the lease's instance is in the catalog, aborting with
        PERMISSION_DENIED when it belongs to a service the caller may not manage. A lease
        not there (expired, unknown, not yet seen by this replica) has no owner to check:
        False, and callers leave the store alone. Plaintext (PERMISSIVE): always True."""
        if not access.has_client_certificate(context):
            return True
        for inst in self.cp.catalog.snapshot.instances.values():
            if inst.lease_id == lease_id:
                await access.authorize_registration(context, inst.service)
                return True
        return False

    def _find(self, service: str, instance_id: str) -> Key | None:
        """By instance id, or by address (the default id, but an id may be set)."""
        instances = self.cp.catalog.snapshot.instances
        if (service, instance_id) in instances:
            return (service, instance_id)
        for key, inst in instances.items():
            if inst.address == instance_id and (not service or key[0] == service):
                return key
        return None

    async def List(  # noqa: N802 (gRPC method name)
        self, request: pb.ListRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CatalogSnapshot:
        return self.cp.catalog.snapshot.to_proto([request.service] if request.service else ())

    async def Watch(  # noqa: N802 (gRPC method name)
        self, request: pb.WatchCatalogRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.CatalogUpdate]:
        services = set(request.services)
        last = request.since_version
        first = True
        self.cp.watchers["catalog"] += 1
        try:
            while True:
                event = self.cp.catalog_signal.current  # before reading: no change is missed
                snap = self.cp.catalog.snapshot
                if first or snap.version != last:
                    update = self._update(snap, last, services, first)
                    if update is not None:
                        yield update
                    first = False
                    last = snap.version
                await event.wait()
        finally:
            self.cp.watchers["catalog"] -= 1

    def _update(
        self, snap: Snapshot, since: int, services: set[str], first: bool
    ) -> pb.CatalogUpdate | None:
        changes = self.cp.catalog.since(since) if since else None
        if changes is None:
            if not services:
                return self.cp.full_update(snap)
            full = snap.to_proto(services)
            return pb.CatalogUpdate(version=snap.version, full=True, upserted=full.instances)
        if not changes:
            # A watcher that is already current learns so at once.
            return pb.CatalogUpdate(version=snap.version) if first else None
        change = merge(changes)
        ups = [i.to_proto() for i in change.upserted if not services or i.service in services]
        gone = [
            pb.InstanceRef(service=s, instance_id=i)
            for s, i in change.removed
            if not services or s in services
        ]
        if not ups and not gone and not first:
            return None  # nothing this watcher asked about; it catches up with the next one
        return pb.CatalogUpdate(version=snap.version, upserted=ups, removed=gone)


class ConfigService(pb_grpc.ConfigServicer):
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    async def Apply(  # noqa: N802 (gRPC method name)
        self, request: pb.ApplyConfigRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ApplyConfigResponse:
        await access.authorize_operator(context, "apply config")
        source = request.source or "<apply>"
        try:
            mesh = load_text(request.document, source=source)
        except ConfigError as exc:
            self.cp.applies["rejected"] += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        errors = consistency.problems(mesh, self.cp.catalog.snapshot)
        if errors:
            self.cp.applies["rejected"] += 1
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, str(ConfigError(errors, source=source))
            )
        self.cp.parsed = (request.document, mesh)
        warnings = [*mesh.warnings, *consistency.warnings(mesh, self.cp.catalog.snapshot)]
        live = self.cp.config
        response = pb.ApplyConfigResponse(warnings=warnings, summary=summary(mesh))
        if request.dry_run:
            self.cp.applies["dry_run"] += 1
            response.version = live.version if live else 0
            return response
        if live is not None and live.document == request.document:
            self.cp.applies["unchanged"] += 1
            response.version = live.version
            return response
        try:
            record = await _store_call(
                context,
                self.cp.store.put_config(
                    request.document, source, mesh.metadata.name, request.expected_version
                ),
            )
        except Conflict as exc:
            self.cp.applies["conflict"] += 1
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        await self.cp.wait_config(record.version)
        self.cp.applies["applied"] += 1
        log.info("config v%d applied from %s (%s)", record.version, source, mesh.metadata.name)
        response.version = record.version
        response.changed = True
        return response

    async def Get(  # noqa: N802 (gRPC method name)
        self, request: pb.GetConfigRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ConfigVersion:
        if self.cp.config is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, "no config applied yet; `aimesh apply -f mesh.yaml`"
            )
        return self.cp.config.to_proto()

    async def Watch(  # noqa: N802 (gRPC method name)
        self, request: pb.WatchConfigRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.ConfigVersion]:
        last = request.since_version
        self.cp.watchers["config"] += 1
        try:
            while True:
                event = self.cp.config_signal.current
                record = self.cp.config
                if record is not None and record.version != last:
                    yield record.to_proto()
                    last = record.version
                await event.wait()
        finally:
            self.cp.watchers["config"] -= 1


class StatusService(pb_grpc.StatusServicer):
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    async def Report(  # noqa: N802 (gRPC method name)
        self, request: pb.ProxyReport, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ReportAck:
        self.cp.topology.report(request)  # a changed health vote fires state_signal
        ack = pb.ReportAck()
        ack.interval.FromNanoseconds(int(REPORT_INTERVAL * 1e9))
        return ack

    async def GetTopology(  # noqa: N802 (gRPC method name)
        self, request: pb.TopologyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Topology:
        return self.topology()

    def topology(self) -> pb.Topology:
        cfg = self.cp.config
        return self.cp.topology.view(self.cp.catalog.snapshot, cfg.version if cfg else 0)


# Long-lived streams (a span would last as long as the watcher): not traced.
STREAMS = frozenset(
    {
        "/aimesh.mesh.v1.Registry/KeepAlive",
        "/aimesh.mesh.v1.Registry/Watch",
        "/aimesh.mesh.v1.Config/Watch",
    }
)


class ControlPlaneServer:
    """The gRPC server with the three services, health and reflection."""

    def __init__(
        self,
        cp: ControlPlane,
        tracer_provider: Any = None,
        identity: Any = None,
        mtls_mode: str = "PERMISSIVE",
    ) -> None:
        self.cp = cp
        interceptors: list[Any] = [DecodeErrorInterceptor()]
        # STRICT: the plaintext port serves only Identity, health and reflection (access.py).
        self.mtls_mode = mtls_mode
        self.guard: access.PlaintextGuard | None = None
        if mtls_mode == "STRICT":
            if identity is None:
                raise ValueError("--mtls-mode STRICT needs the mesh CA (--ca-dir DIR)")
            self.guard = access.PlaintextGuard()
            interceptors.insert(0, Stack([self.guard]))
        if tracer_provider is not None:  # a server span per unary call, not per stream
            from ..observability.tracing import server_interceptor

            interceptors.insert(0, server_interceptor(tracer_provider, skip=STREAMS))
        self.server = grpc.aio.server(options=server_options(), interceptors=interceptors)
        pb_grpc.add_RegistryServicer_to_server(RegistryService(cp), self.server)
        pb_grpc.add_ConfigServicer_to_server(ConfigService(cp), self.server)
        self.status = StatusService(cp)
        pb_grpc.add_StatusServicer_to_server(self.status, self.server)
        services = list(SERVICES)
        # xDS v3 (ADS) over the same catalog and config, for Envoy and proxyless gRPC.
        self.xds = Xds(cp)
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self.xds, self.server)
        services.append(XDS_SERVICE)
        self.identity = identity  # the mesh CA's Identity service (mesh/control/identity.py)
        if identity is not None:
            pb_grpc.add_IdentityServicer_to_server(identity, self.server)
            services.append(pb.DESCRIPTOR.services_by_name["Identity"].full_name)
        self.health = Health(self.server, services)
        enable_reflection(self.server, services)
        self.port = 0
        self._observer: asyncio.Task[None] | None = None

    async def start(self, listen: str, secure_listen: str | None = None) -> int:
        self.port = bind(self.server, listen)
        self.secure_port = 0  # mTLS, with the mesh CA (mesh/control/identity.py)
        if secure_listen and self.identity is not None:
            self.secure_port = self.identity.bind_secure(self.server, secure_listen)
        if self.guard is not None:
            if not self.secure_port:
                raise ValueError("--mtls-mode STRICT needs an mTLS port: --secure-listen HOST:PORT")
            host = host_of(secure_listen or "")
            host = "<the control plane's host>" if host in ("0.0.0.0", "::") else host
            self.guard.secure_address = f"{host}:{self.secure_port}"
        await self.cp.store.open(self.cp)
        await self.server.start()
        await self.health.set_serving(True)
        if self.secure_port:
            host = listen.rpartition(":")[0]
            host = "127.0.0.1" if host in ("", "0.0.0.0", "[::]") else host
            await self.identity.start_own(f"{host}:{self.port}")
        self._observer = asyncio.get_running_loop().create_task(self.cp.observe_every())
        self.xds.start()
        return self.port

    async def stop(self, grace: float = 1.0) -> None:
        if self._observer is not None:
            self._observer.cancel()
        await self.xds.stop()
        if self.identity is not None:
            await self.identity.stop_own()
        await self.health.shutdown()
        # Watch streams never end on their own; stopping cancels them, and watchers
        # reconnect to another replica (or to this one when it is back).
        await self.server.stop(grace)
        await self.cp.store.close()
