"""The Aggregated Discovery Service (xDS v3, state of the world) over the live mesh.

    ControlPlane.state_signal ──▶ Xds.refresh(): one resource set per flavor, checked,
                                  versioned by content ──▶ every stream of that flavor

Per stream and resource type the protocol is (envoyproxy.io "xDS REST and gRPC protocol"):
a request carrying the nonce of our last response ACKs it (version_info = that version) or
NACKs it (error_detail set; version_info = the last good one, which the client keeps
using); a request with an older nonce is stale and ignored; a request that changes the
subscribed names is answered. Besides, a stream's first request of each type is always
answered, and so is Envoy's EDS request after every CDS response: Envoy re-creates the
clusters that changed and keeps them warming until it gets their endpoints, even when
those did not change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

from .resources import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    SHORT,
    TYPES,
    Builder,
    Flavor,
    Resources,
    check,
    listen_address,
    version_of,
)

if TYPE_CHECKING:
    from ..server import ControlPlane

log = logging.getLogger("aimesh.xds")

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
LISTEN_METADATA = "aimesh.listen"  # node metadata: where Envoy's gateway listener binds
DEFAULT_ENVOY_LISTEN = "127.0.0.1:15001"
# Make before break: clusters and their endpoints before the routes that use them; and
# when clusters only go away, the routes that named them first.
PUSH_ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE)
REMOVAL_ORDER = (LISTENER, ROUTE, CLUSTER, ENDPOINT)
_CHANGED = None  # queued to a stream when its flavor's resources were republished
# Requests read ahead of the ones being answered, per stream: a client that sends without
# reading the responses waits (flow control) instead of growing the control plane's memory.
READ_AHEAD = 64


def flavor_of(node: base_pb2.Node) -> Flavor:
    """ValueError when an Envoy node's listen address is not HOST:PORT."""
    if node.user_agent_name == "envoy":
        field_ = node.metadata.fields.get(LISTEN_METADATA)
        listen = field_.string_value if field_ is not None else ""
        if listen:
            listen_address(listen)  # checked here: a bad one would fail every build
        return Flavor("envoy", listen or DEFAULT_ENVOY_LISTEN)
    return Flavor("grpc")


@dataclass(slots=True)
class Published:
    resources: Resources
    versions: dict[str, str]


@dataclass(slots=True)
class Subscription:
    """One resource type on one stream."""

    names: frozenset[str] = frozenset()
    wildcard: bool = False
    sent_version: str = ""
    sent_names: frozenset[str] | None = None
    nonce: str = ""
    acked: str = ""  # the version the client last ACKed
    nack: str = ""  # the client's message on its last NACK ("" after an ACK)
    sent: dict[str, any_pb2.Any] = field(default_factory=dict)  # as last sent, by name
    answer_next: bool = True  # the first request, and Envoy's EDS after a CDS push


@dataclass(slots=True, eq=False)  # kept in a set, by identity
class Stream:
    node_id: str
    flavor: Flavor
    peer: str
    queue: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = field(
        default_factory=asyncio.Queue
    )
    subs: dict[str, Subscription] = field(default_factory=dict)
    room: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(READ_AHEAD))
    nonces: int = 0
    pending_change: bool = False


class Xds(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self.builder = Builder()
        self.published: dict[str, Published] = {}  # flavor key -> what streams are sent
        self.flavors: dict[str, Flavor] = {}
        self.streams: set[Stream] = set()
        self.pushes = 0  # responses sent
        self.nacks = 0
        self.rejected = 0  # resource sets that failed the consistency check
        self._task: asyncio.Task[None] | None = None

    # -- publishing ---------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._follow())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _follow(self) -> None:
        # Refresh, then wait for the next change: changes that land while a refresh runs
        # are taken together by the next one, so a burst costs few rebuilds.
        while True:
            event = self.cp.state_signal.current
            try:
                self.refresh()
            except Exception:  # a bug in building must not end xDS for good
                log.exception("xDS refresh failed; the last published resources stay")
            await event.wait()

    def refresh(self) -> None:
        """Rebuilds every flavor in use and wakes the streams whose resources changed."""
        if not self.flavors:
            return
        built = self.builder.build(
            self.flavors.values(), self.cp.catalog.snapshot, self.cp.mesh, self.cp.topology.healthy
        )
        changed = set()
        for key, resources in built.items():
            problems = check(resources)
            old = self.published.get(key)
            if problems:
                # A consumer handed a route to a missing cluster fails those calls:
                # keep serving the last consistent set (with none yet, this one: a
                # consumer that gets nothing cannot route at all).
                self.rejected += 1
                log.error(
                    "xDS %s resources failed the consistency check (%s): %s",
                    key,
                    "the last good ones stay" if old is not None else "published, none before",
                    "; ".join(problems),
                )
                if old is not None:
                    continue
            versions = {t: version_of(resources[t]) for t in TYPES}
            if old is not None and old.versions == versions:
                continue
            self.published[key] = Published(resources, versions)
            changed.add(key)
        for stream in self.streams:
            if stream.flavor.key in changed and not stream.pending_change:
                stream.pending_change = True
                stream.queue.put_nowait(_CHANGED)

    def _use(self, flavor: Flavor) -> Published:
        if flavor.key not in self.flavors:
            self.flavors[flavor.key] = flavor
            self.refresh()
        return self.published[flavor.key]

    def _release(self, flavor: Flavor) -> None:
        if not any(s.flavor.key == flavor.key for s in self.streams):
            self.flavors.pop(flavor.key, None)
            self.published.pop(flavor.key, None)

    # -- the stream ---------------------------------------------------------------------

    async def StreamAggregatedResources(  # noqa: N802 (gRPC method name)
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        if not first.node.id:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "the first DiscoveryRequest must carry node.id: set node.id in the bootstrap "
                "(aimesh xds bootstrap --node ID writes one)",
            )
        try:
            flavor = flavor_of(first.node)
        except ValueError as exc:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"node.metadata {LISTEN_METADATA}: {exc} (aimesh xds bootstrap --listen "
                "HOST:PORT writes it)",
            )
        stream = Stream(first.node.id, flavor, context.peer())
        stream.queue.put_nowait(first)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await stream.room.acquire()  # released once the request is handled
                    stream.queue.put_nowait(request)
            finally:
                stream.queue.put_nowait(_CHANGED)  # wakes the loop; it sees the reader done

        reader: asyncio.Task[None] | None = None
        try:
            self.streams.add(stream)
            self._use(stream.flavor)
            log.info("xDS stream from %s (%s, %s)", stream.node_id, flavor.key, stream.peer)
            reader = asyncio.get_running_loop().create_task(read())
            while True:
                item = await stream.queue.get()
                if item is _CHANGED:
                    if reader.done():
                        return
                    stream.pending_change = False
                    for response in self._on_change(stream):
                        yield response
                    continue
                assert item is not None
                if item is not first:
                    stream.room.release()
                response = self._on_request(stream, item)
                if response is not None:
                    yield response
        finally:
            if reader is not None:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
            self.streams.discard(stream)
            self._release(stream.flavor)
            log.info("xDS stream from %s closed", stream.node_id)

    def _on_request(
        self, stream: Stream, request: discovery_pb2.DiscoveryRequest
    ) -> discovery_pb2.DiscoveryResponse | None:
        type_url = request.type_url
        if type_url not in TYPES:
            log.debug("xDS %s asked for unserved type %s", stream.node_id, type_url)
            return None
        sub = stream.subs.get(type_url)
        if sub is None:
            sub = stream.subs[type_url] = Subscription()
        elif request.response_nonce and request.response_nonce != sub.nonce:
            return None  # an answer to a response that has since been superseded
        names = frozenset(request.resource_names)
        # Legacy wildcard: Listener and Cluster requests that name nothing want all.
        sub.wildcard = "*" in names or (
            type_url in (LISTENER, CLUSTER) and not names and (sub.wildcard or sub.answer_next)
        )
        sub.names = names - {"*"}
        if request.response_nonce:
            if request.HasField("error_detail"):
                self.nacks += 1
                sub.nack = request.error_detail.message
                sub.sent = {}  # what it rejected goes again in full with the next change
                log.warning(
                    "xDS %s rejected %s version %s (keeps %s): %s",
                    stream.node_id,
                    SHORT[type_url],
                    sub.sent_version,
                    request.version_info or "nothing",
                    sub.nack,
                )
            else:
                sub.acked, sub.nack = request.version_info, ""
        published = self.published[stream.flavor.key]
        if not (
            sub.answer_next
            or sub.sent_names != self._names(sub, published.resources[type_url])
            or (not sub.nack and request.version_info != published.versions[type_url])
        ):
            return None
        return self._respond(stream, type_url, sub, published)

    def _on_change(self, stream: Stream) -> list[discovery_pb2.DiscoveryResponse]:
        published = self.published.get(stream.flavor.key)
        if published is None:
            return []
        out = []
        clusters = stream.subs.get(CLUSTER)
        removing = (
            clusters is not None
            and clusters.sent_names is not None
            and self._names(clusters, published.resources[CLUSTER]) < clusters.sent_names
        )
        for type_url in REMOVAL_ORDER if removing else PUSH_ORDER:
            sub = stream.subs.get(type_url)
            if sub is None or sub.sent_version == published.versions[type_url]:
                continue
            if not sub.wildcard and not sub.names:
                continue
            # Endpoints: only the services that changed. State of the world allows it for
            # EDS (a missing one is unchanged, not deleted, unlike listeners and
            # clusters), and Envoy then applies one service's endpoints, not the mesh's.
            out.append(self._respond(stream, type_url, sub, published, type_url == ENDPOINT))
        return out

    @staticmethod
    def _names(sub: Subscription, have: dict[str, Any]) -> frozenset[str]:
        """What a response to `sub` holds: all of `have` for a wildcard, else the names."""
        return frozenset(have) if sub.wildcard else sub.names

    def _respond(
        self,
        stream: Stream,
        type_url: str,
        sub: Subscription,
        published: Published,
        changed_only: bool = False,
    ) -> discovery_pb2.DiscoveryResponse:
        have = published.resources[type_url]
        names = self._names(sub, have)
        if not changed_only or sub.answer_next:
            sub.sent = {}
        # The builder reuses a packed resource until its inputs change: identity is enough.
        fresh = {n: have[n] for n in sorted(names) if n in have and sub.sent.get(n) is not have[n]}
        sub.sent.update(fresh)
        resources: list[any_pb2.Any] = list(fresh.values())
        stream.nonces += 1
        sub.nonce = str(stream.nonces)
        sub.sent_version = published.versions[type_url]
        sub.sent_names = names
        sub.answer_next = False
        if type_url == CLUSTER and stream.flavor.kind == "envoy":
            eds = stream.subs.get(ENDPOINT)
            if eds is not None:
                eds.answer_next = True
        self.pushes += 1
        return discovery_pb2.DiscoveryResponse(
            version_info=sub.sent_version,
            resources=resources,
            type_url=type_url,
            nonce=sub.nonce,
            control_plane=base_pb2.ControlPlane(identifier="aimesh"),
        )

    # -- for /xds on the admin port -----------------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {
            "flavors": {
                key: {
                    SHORT[t]: {"version": p.versions[t], "resources": len(p.resources[t])}
                    for t in TYPES
                }
                for key, p in self.published.items()
            },
            "streams": [
                {
                    "node": s.node_id,
                    "flavor": s.flavor.key,
                    "peer": s.peer,
                    "types": {
                        SHORT[t]: {
                            "subscribed": "*" if sub.wildcard else sorted(sub.names),
                            "sent": sub.sent_version,
                            "acked": sub.acked,
                            **({"nack": sub.nack} if sub.nack else {}),
                        }
                        for t, sub in s.subs.items()
                    },
                }
                for s in sorted(self.streams, key=lambda s: s.node_id)
            ],
            "pushes": self.pushes,
            "nacks": self.nacks,
            "rejected": self.rejected,
        }
