"""Talking to the control plane from workloads and proxies.

- `Registrar`: an instance registers itself, keeps its lease alive, reports health
  changes, and deregisters on shutdown. It never stops the instance from serving: when
  the control plane is away it keeps trying in the background.
- `MeshWatcher`: a proxy follows the catalog and the config, resuming from the last
  version after a reconnect, failing over between control-plane replicas, and caching
  the last good state on disk so a restart during an outage starts from it (static
  stability: the data plane never depends on the control plane being up).
- `Reporter`: a proxy's periodic report of what it sees, for the topology view.

Each is a loop around a real gRPC stream; the decisions (backoff, what to apply) are
plain functions and data.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from google.protobuf import json_format

from aimesh.control.v1 import control_plane_pb2 as pb
from aimesh.control.v1 import control_plane_pb2_grpc as pb_grpc
from aimesh.interceptors.backoff import Backoff

from . import DEFAULT_PORT
from .catalog import Instance, Key

log = logging.getLogger("aimesh.control.client")

ENV = "AIMESH_CONTROL_PLANE"
EOF = grpc.aio.EOF  # type: ignore[attr-defined]  # (grpc-stubs predates it)
RECONNECT = Backoff(base=0.05, maximum=2.0)
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    # Notice a control plane that vanished without closing its connections (a network
    # partition, a frozen host) within seconds, not minutes.
    ("grpc.keepalive_time_ms", 5_000),
    ("grpc.keepalive_timeout_ms", 3_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Reconnect quickly when it comes back. (Not min_reconnect_backoff_ms: grpc also uses
    # it as the connect timeout, and 100 ms there made slow handshakes fail and retry in
    # storms, each retry a full resync.)
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    # The full catalog of a large mesh is one message.
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


def add_registration_flags(
    parser: argparse.ArgumentParser, duration: Callable[[str], float]
) -> None:
    """The flags of every backend that registers itself (sim, provider adapters)."""
    reg = parser.add_argument_group("registration with the control plane")
    reg.add_argument(
        "--control-plane",
        default=None,
        metavar="ADDR",
        help="register there (HOST:PORT[,HOST:PORT]) and deregister on SIGTERM",
    )
    reg.add_argument(
        "--service", default="", help="mesh service to register as (default: the first model)"
    )
    reg.add_argument("--zone", default="", help="zone or region label")
    reg.add_argument("--version", dest="build_version", default="", help="version label, e.g. v2")
    reg.add_argument("--weight", type=int, default=1, help="relative share of traffic (default 1)")
    reg.add_argument("--ttl", type=duration, default=5.0, help="lease ttl (default 5s)")
    reg.add_argument(
        "--deregister-delay",
        type=duration,
        default=0.25,
        help="on SIGTERM, keep taking new calls this long after deregistering, while the "
        "mesh learns the instance is gone (default 250ms)",
    )


def resolve_target(explicit: str | None, env: Mapping[str, str] = os.environ) -> str:
    """--control-plane, else $AIMESH_CONTROL_PLANE, else 127.0.0.1 on the default port.
    Several replicas may be given, comma-separated."""
    return explicit or env.get(ENV) or f"127.0.0.1:{DEFAULT_PORT}"


def targets(spec: str) -> list[str]:
    out = [t.strip() for t in spec.split(",") if t.strip()]
    if not out:
        raise ValueError(f"no control-plane address in {spec!r}; expected HOST:PORT[,HOST:PORT]")
    return out


def control_plane_channel(address: str, identity: Any = None) -> grpc.aio.Channel:
    """A channel to one control plane: plaintext, or, with a mesh `identity`
    (WorkloadIdentity), mTLS with its current certificate, the handshake proving the
    control plane's SPIFFE ID (`identity.control_plane_id`)."""
    if identity is not None:
        channel: grpc.aio.Channel = identity.secure_channel(
            address, identity.control_plane_id, CHANNEL_OPTIONS
        )
        return channel
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


class _Replicas:
    """Channels to the control plane's replicas; `next()` fails over to the following one.

    With a mesh `identity` that knows the control plane's mTLS port
    (`--secure-control-plane`, the control plane's `--secure-listen`), the channels are
    mTLS: this workload's current certificate, and the handshake must prove the control
    plane's SPIFFE ID (`identity.control_plane_id`). grpc cannot change a channel's
    credentials, so a rotation retires the cached channels: the next call or stream gets a
    new channel with the new certificate, and a retired channel is closed once no call or
    stream uses it any more (a watch or keep-alive stream open at the rotation carries on
    over its connection, as TLS does, until it ends). Without an identity, or without a
    secure address, plaintext to `spec`, as before.
    """

    def __init__(self, spec: str, identity: Any = None) -> None:
        self.identity = identity if identity is not None and identity.secure_control_plane else None
        self.secure = self.identity is not None
        self.addresses = targets(self.identity.secure_control_plane if self.identity else spec)
        self._i = 0
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._users: dict[grpc.aio.Channel, int] = {}
        self._retired: list[grpc.aio.Channel] = []
        self.rotations = 0
        if self.identity is not None:
            self.identity.on_rotate.append(self._rotated)

    @property
    def address(self) -> str:
        return self.addresses[self._i]

    def channel(self) -> grpc.aio.Channel:
        ch = self._channels.get(self.address)
        if ch is None:
            ch = control_plane_channel(self.address, self.identity)
            self._channels[self.address] = ch
        return ch

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[grpc.aio.Channel]:
        """The current channel, held for the duration of a call or a stream (a retired
        channel is closed when its last user lets go)."""
        ch = self.channel()
        self._users[ch] = self._users.get(ch, 0) + 1
        try:
            yield ch
        finally:
            left = self._users.pop(ch) - 1
            if left:
                self._users[ch] = left
            elif ch in self._retired:
                self._retired.remove(ch)
                await ch.close(None)

    def _rotated(self, _svid: object) -> None:
        self.rotations += 1
        idle = [ch for ch in self._channels.values() if ch not in self._users]
        self._retired += [ch for ch in self._channels.values() if ch in self._users]
        self._channels.clear()
        if idle:
            # Nobody is on them: close now (no call to cancel).
            loop = asyncio.get_running_loop()
            for ch in idle:
                task = loop.create_task(ch.close(None), name="close rotated channel")
                _background.add(task)
                task.add_done_callback(_background.discard)

    def next(self) -> None:
        self._i = (self._i + 1) % len(self.addresses)

    async def close(self) -> None:
        if self.identity is not None and self._rotated in self.identity.on_rotate:
            self.identity.on_rotate.remove(self._rotated)
        channels = [*self._channels.values(), *self._retired]
        await asyncio.gather(*(ch.close(None) for ch in channels))
        self._channels.clear()
        self._retired.clear()


_background: set[asyncio.Task[None]] = set()


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleeps unless asked to stop; True when stopping."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


# -- registration -------------------------------------------------------------------------


class Registrar:
    """Keeps one instance registered for as long as it runs."""

    def __init__(
        self,
        control_plane: str,
        instance: pb.Instance,
        ttl: float = 5.0,
        rng: random.Random | None = None,
        identity: Any = None,
        linger: float = 0.0,
    ) -> None:
        # identity: the workload's WorkloadIdentity; with its --secure-control-plane,
        # everything goes over the control plane's mTLS port.
        self.replicas = _Replicas(control_plane, identity)
        self.instance = instance
        self.ttl = ttl
        self.linger = linger  # --deregister-delay
        self.rng = rng or random.Random()
        self.lease_id = 0
        self.registered = asyncio.Event()  # set while registered (tests and logs wait on it)
        self._serving: bool | None = None
        self._changed = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="registrar")

    def set_serving(self, serving: bool) -> None:
        """Health changes reach the catalog at once, not at the next active check."""
        self.instance.serving = serving
        self._serving = serving
        self._changed.set()

    async def stop(self, deregister: bool = True) -> None:
        self._stop.set()
        self._changed.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if deregister and self.lease_id:
            try:
                async with self.replicas.use() as ch:
                    await pb_grpc.RegistryStub(ch).Deregister(
                        pb.DeregisterRequest(lease_id=self.lease_id), timeout=2
                    )
                # Proxies, Envoys and xDS clients learn of the removal some milliseconds
                # later; calls they send meanwhile must still be served, so the caller
                # starts refusing new calls (its drain) only after this.
                await asyncio.sleep(self.linger)
            except grpc.RpcError as exc:
                # The lease expires on its own within its ttl; say so rather than fail.
                log.warning(
                    "deregister failed (%s); the lease expires in %gs", exc.code(), self.ttl
                )
        await self.replicas.close()

    async def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                # After a broken stream the lease may well be alive (the control plane
                # restarted, or another replica answers): renew it rather than register
                # again, which would churn the catalog for every watcher.
                if not self.lease_id:
                    await self._register()
                attempt = 0
                await self._keep_alive()
            except grpc.RpcError as exc:
                self.registered.clear()
                attempt += 1
                if attempt == 1 or attempt % 20 == 0:
                    # With the details: a STRICT control plane's UNAUTHENTICATED names its
                    # mTLS port, a PERMISSION_DENIED the identity and service at fault.
                    details = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else ""
                    log.warning(
                        "control plane %s: %s%s; retrying",
                        self.replicas.address,
                        exc.code().name,
                        f": {details}" if details else "",
                    )
                self.replicas.next()
                if await _sleep_or_stop(self._stop, RECONNECT.delay(attempt, self.rng)):
                    return

    async def _register(self) -> None:
        request = pb.RegisterRequest(instance=self.instance)
        request.ttl.FromNanoseconds(int(self.ttl * 1e9))
        async with self.replicas.use() as ch:
            response = await pb_grpc.RegistryStub(ch).Register(request, timeout=5)
        self.lease_id = response.lease_id
        self.registered.set()
        log.info(
            "registered %s/%s with %s (lease %d)",
            self.instance.service,
            response.instance_id,
            self.replicas.address,
            self.lease_id,
        )

    async def _keep_alive(self) -> None:
        async with self.replicas.use() as ch:
            await self._keep_alive_on(pb_grpc.RegistryStub(ch))

    async def _keep_alive_on(self, stub: Any) -> None:
        interval = self.ttl / 3
        requests: asyncio.Queue[pb.KeepAliveRequest | None] = asyncio.Queue()

        async def outgoing() -> AsyncIterator[pb.KeepAliveRequest]:
            while (r := await requests.get()) is not None:
                yield r

        call = stub.KeepAlive(outgoing())
        try:
            while not self._stop.is_set():
                request = pb.KeepAliveRequest(lease_id=self.lease_id)
                if self._serving is not None:
                    request.serving = self._serving
                    self._serving = None
                await requests.put(request)
                response = await call.read()
                if response is EOF or not isinstance(response, pb.KeepAliveResponse):
                    raise _Broken(grpc.StatusCode.UNAVAILABLE)
                if not response.found:
                    log.warning("lease %d expired; registering again", self.lease_id)
                    self.registered.clear()
                    self.lease_id = 0
                    return  # _run registers again at once
                self.registered.set()
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), interval)
        finally:
            await requests.put(None)
            call.cancel()


class _Broken(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


# -- watching -----------------------------------------------------------------------------


@dataclass
class MeshState:
    """What a proxy knows of the mesh: the catalog and the config, each with its version."""

    catalog_version: int = 0
    instances: dict[Key, Instance] = field(default_factory=dict)
    config_version: int = 0
    config_document: str = ""
    config_source: str = ""

    def to_json(self) -> str:
        return json.dumps(
            {
                "catalog_version": self.catalog_version,
                "instances": [
                    json_format.MessageToDict(i.to_proto()) for i in self.instances.values()
                ],
                "config_version": self.config_version,
                "config_document": self.config_document,
                "config_source": self.config_source,
                "saved_at": time.time(),
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> MeshState:
        data = json.loads(text)
        state = cls(
            catalog_version=int(data["catalog_version"]),
            config_version=int(data["config_version"]),
            config_document=str(data["config_document"]),
            config_source=str(data["config_source"]),
        )
        for item in data["instances"]:
            inst = Instance.from_proto(json_format.ParseDict(item, pb.Instance()))
            state.instances[inst.key] = inst
        return state

    def apply(self, update: pb.CatalogUpdate) -> None:
        if update.full:
            self.instances.clear()
        for msg in update.upserted:
            inst = Instance.from_proto(msg)
            self.instances[inst.key] = inst
        for ref in update.removed:
            self.instances.pop((ref.service, ref.instance_id), None)
        self.catalog_version = update.version


CatalogCallback = Callable[[MeshState], None]
ConfigCallback = Callable[[MeshState], None]


class MeshWatcher:
    """Follows catalog and config; calls `on_catalog` / `on_config` after each change.

    A callback that raises (a config the proxy cannot use) is logged and the state is
    kept: the proxy decides what stays live. The cache is written after each change.
    """

    def __init__(
        self,
        control_plane: str,
        *,
        on_catalog: CatalogCallback,
        on_config: ConfigCallback,
        cache: Path | None = None,
        services: Sequence[str] = (),
        rng: random.Random | None = None,
        identity: Any = None,
    ) -> None:
        self.replicas = _Replicas(control_plane, identity)
        self.on_catalog = on_catalog
        self.on_config = on_config
        self.cache = cache
        self.services = list(services)
        self.rng = rng or random.Random()
        self.state = MeshState()
        self.connected = asyncio.Event()  # set while both streams are up
        self.synced = asyncio.Event()  # set once the first catalog update has been applied
        self.reconnects = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._streams_up = 0

    def load_cache(self) -> bool:
        """Starts from the cached state, if any (before the control plane answers)."""
        if self.cache is None or not self.cache.exists():
            return False
        try:
            self.state = MeshState.from_json(self.cache.read_text())
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring unreadable cache %s: %s", self.cache, exc)
            return False
        age = time.time() - self.cache.stat().st_mtime
        log.info(
            "starting from cache %s (catalog v%d, %d instances, config v%d, %.0fs old)",
            self.cache,
            self.state.catalog_version,
            len(self.state.instances),
            self.state.config_version,
            age,
        )
        if self.state.config_document:
            self._call(self.on_config)
        self._call(self.on_catalog)
        return True

    def _save(self) -> None:
        if self.cache is None:
            return
        tmp = self.cache.with_suffix(".tmp")
        try:
            self.cache.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(self.state.to_json())
            tmp.replace(self.cache)  # atomic: a crash mid-write leaves the old cache
        except OSError as exc:
            log.warning("cannot write cache %s: %s", self.cache, exc)

    def _call(self, callback: Callable[[MeshState], None]) -> None:
        try:
            callback(self.state)
        except Exception:
            log.exception("applying the control plane's update failed; keeping what is live")

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._follow(self._catalog_stream), name="watch-catalog"),
            loop.create_task(self._follow(self._config_stream), name="watch-config"),
        ]

    async def stop(self) -> None:
        self._stop.set()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.replicas.close()

    async def _follow(self, stream: Callable[[grpc.aio.Channel], Any]) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                async with self.replicas.use() as ch:
                    async for _ in stream(ch):
                        if attempt:
                            log.info(
                                "control plane %s reachable again; resynced to catalog v%d, "
                                "config v%d",
                                self.replicas.address,
                                self.state.catalog_version,
                                self.state.config_version,
                            )
                        attempt = 0
                raise _Broken(grpc.StatusCode.UNAVAILABLE)  # the server ended the stream
            except grpc.RpcError as exc:
                self.connected.clear()
                attempt += 1
                self.reconnects += 1
                if attempt == 1:
                    log.warning(
                        "control plane %s unreachable (%s); serving the last known mesh "
                        "(catalog v%d, config v%d)",
                        self.replicas.address,
                        exc.code().name,
                        self.state.catalog_version,
                        self.state.config_version,
                    )
                self.replicas.next()
                if await _sleep_or_stop(self._stop, RECONNECT.delay(attempt, self.rng)):
                    return

    async def _catalog_stream(self, channel: grpc.aio.Channel) -> AsyncIterator[None]:
        stub = pb_grpc.RegistryStub(channel)
        request = pb.WatchCatalogRequest(
            since_version=self.state.catalog_version, services=self.services
        )
        async for update in stub.Watch(request, wait_for_ready=False):
            self.connected.set()
            if update.full or update.upserted or update.removed:
                self.state.apply(update)
                self._call(self.on_catalog)
                self._save()
            else:
                self.state.catalog_version = update.version
            self.synced.set()
            yield None

    async def _config_stream(self, channel: grpc.aio.Channel) -> AsyncIterator[None]:
        stub = pb_grpc.ConfigStub(channel)
        request = pb.WatchConfigRequest(since_version=self.state.config_version)
        async for record in stub.Watch(request):
            if record.version != self.state.config_version:
                self.state.config_version = record.version
                self.state.config_document = record.document
                self.state.config_source = record.source
                self._call(self.on_config)
                self._save()
            yield None


# -- reporting ----------------------------------------------------------------------------

FULL_EVERY = 30.0  # seconds between reports of every endpoint, changed or not


class Reporter:
    """Sends `collect()` to the control plane every interval the control plane asks for."""

    def __init__(
        self,
        control_plane: str,
        proxy_id: str,
        collect: Callable[[], list[pb.EndpointReport]],
        interval: float = 2.0,
        identity: Any = None,
    ) -> None:
        self.replicas = _Replicas(control_plane, identity)
        self.proxy_id = proxy_id
        self.collect = collect
        self.interval = interval
        self.started = time.monotonic()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._sent: dict[tuple[str, str], tuple[int, int, bool]] = {}
        self._last_full = float("-inf")

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="reporter")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
        await self.replicas.close()

    def _changed(self, endpoints: list[pb.EndpointReport]) -> list[pb.EndpointReport]:
        """Only endpoints whose counters or health moved since the last report, and all
        of them every FULL_EVERY seconds (a restarted control plane relearns them): a
        gateway in front of 1,000 mostly idle endpoints sends a few lines, not 1,000."""
        now = time.monotonic()
        full = now - self._last_full >= FULL_EVERY
        out = []
        for ep in endpoints:
            key = (ep.service, ep.address)
            state = (ep.requests, ep.errors, ep.healthy)
            if full or self._sent.get(key) != state:
                out.append(ep)
                self._sent[key] = state
        if full:
            self._last_full = now
        return out

    async def report_once(self) -> None:
        endpoints = self._changed(self.collect())
        try:
            async with self.replicas.use() as ch:
                ack = await pb_grpc.StatusStub(ch).Report(
                    pb.ProxyReport(
                        proxy_id=self.proxy_id,
                        endpoints=endpoints,
                        uptime_seconds=time.monotonic() - self.started,
                    ),
                    timeout=2,
                )
        except grpc.RpcError:
            self._sent.clear()  # not delivered: send everything next time
            raise
        if ack.HasField("interval") and ack.interval.ToNanoseconds() > 0:
            self.interval = ack.interval.ToNanoseconds() / 1e9

    async def _run(self) -> None:
        while not await _sleep_or_stop(self._stop, self.interval):
            try:
                await self.report_once()
            except grpc.RpcError:
                self.replicas.next()  # reports are best effort; the next one catches up
