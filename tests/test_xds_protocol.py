"""The ADS server in process (a real grpc.aio control plane on 127.0.0.1, raw xDS streams
speaking as Envoy or a gRPC client would), and the config-to-xDS mapping on its own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.load_balancing_policies.wrr_locality.v3 import wrr_locality_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2, struct_pb2
from google.rpc import status_pb2
from prometheus_client import generate_latest

from aimesh.control.v1 import control_plane_pb2 as pb
from aimesh.control.v1 import control_plane_pb2_grpc as pb_grpc
from aimesh.mesh.config import load_text
from aimesh.mesh.control.catalog import Catalog, Instance
from aimesh.mesh.control.server import ControlPlane, ControlPlaneServer
from aimesh.mesh.control.store import EmbeddedStore
from aimesh.mesh.control.xds import resources as xr
from aimesh.mesh.control.xds.ads import LISTEN_METADATA
from aimesh.mesh.observability.metrics import control_plane_registry

from .support import eventually

LDS, RDS, CDS, EDS = xr.LISTENER, xr.ROUTE, xr.CLUSTER, xr.ENDPOINT

MESH = """\
apiVersion: mesh.ai/v1
kind: ServiceMesh
metadata: {name: xds}
spec:
  services:
    - name: gpt4-gateway
      models: [gpt-4]
      loadBalancer:
        algorithm: least_connections
        healthCheck: {interval: 5s, threshold: 2}
      circuitBreaker: {enabled: true, errorThreshold: 40%, maxRequests: 64}
    - name: claude-gateway
      models: [claude-3-5-sonnet]
      loadBalancer: {algorithm: load_aware}
      endpoints: [{address: "10.1.0.1:9000", weight: 3, zone: us-east-1b}]
  trafficPolicies:
    - name: premium
      match:
        service: aimesh.inference.v1.Inference
        method: GenerateStream
        headers: {x-tier: premium, x-debug: {present: false}}
      routes: [{destination: claude-gateway}]
    - name: canary
      match: {service: aimesh.inference.v1.Inference}
      routes:
        - {destination: gpt4-gateway, weight: 90}
        - {destination: gpt4-gateway-v2, weight: 10}
      retry: {attempts: 3, perTryTimeout: 2s, retryOn: [UNAVAILABLE, RESOURCE_EXHAUSTED]}
      timeout: 30s
"""


def unpack(packed: any_pb2.Any, cls: type[Any]) -> Any:
    msg = cls()
    assert packed.Unpack(msg)
    return msg


def instance(service: str, n: int, zone: str = "", serving: bool = True) -> Instance:
    return Instance(
        service=service,
        instance_id=f"{service}-{n}",
        address=f"127.0.0.{n}:9000",
        models=("gpt-4",),
        zone=zone,
        serving=serving,
    )


def built(kind: xr.Kind, healthy: bool = True) -> xr.Resources:
    cat = Catalog()
    cat.reset(
        1,
        [
            instance("gpt4-gateway", 1, "us-east-1a"),
            instance("gpt4-gateway", 2, "us-east-1b", serving=healthy),
            instance("gpt4-gateway-v2", 3, "us-east-1a"),
        ],
    )
    flavor = xr.Flavor(kind, "127.0.0.1:0")
    return xr.Builder().build([flavor], cat.snapshot, load_text(MESH), lambda i: i.serving)[
        flavor.key
    ]


# -- the mapping, pure -----------------------------------------------------------------


def test_routes_map_matches_splits_retries_and_timeouts() -> None:
    table = unpack(built("envoy")[RDS][xr.ROUTE_TABLE], route_pb2.RouteConfiguration)
    hosts = {vh.name: vh for vh in table.virtual_hosts}
    # A policy is attached to its first destination's virtual host, then the service.
    gw = hosts["gpt4-gateway"]
    assert list(gw.domains) == ["gpt4-gateway", "gpt4-gateway:*"]
    assert [r.name for r in gw.routes] == ["canary", "service:gpt4-gateway"]
    assert [r.name for r in hosts["gpt4-gateway-v2"].routes] == ["service:gpt4-gateway-v2"]
    default = hosts["default"]
    assert list(default.domains) == ["*"]
    assert [r.name for r in default.routes][:2] == ["premium", "canary"]  # YAML order
    assert "model:claude-3-5-sonnet" in [r.name for r in default.routes]

    premium, canary = default.routes[0], default.routes[1]
    assert premium.match.path == "/aimesh.inference.v1.Inference/GenerateStream"
    headers = {h.name: h for h in premium.match.headers}
    assert headers["x-tier"].string_match.exact == "premium"
    assert headers["x-debug"].present_match is False  # must be absent
    assert premium.route.cluster == "claude-gateway"

    assert canary.match.prefix == "/aimesh.inference.v1.Inference/"
    split = {w.name: w.weight.value for w in canary.route.weighted_clusters.clusters}
    assert split == {"gpt4-gateway": 90, "gpt4-gateway-v2": 10}
    retry = canary.route.retry_policy
    assert retry.retry_on == "resource-exhausted,unavailable" or retry.retry_on == (
        "unavailable,resource-exhausted"
    )
    assert retry.num_retries.value == 2
    assert retry.per_try_timeout.seconds == 2
    assert canary.route.timeout.seconds == 30

    # gRPC clients: no timeout from the table (C-core fires max_stream_duration early).
    grpc_table = unpack(built("grpc")[RDS][xr.ROUTE_TABLE], route_pb2.RouteConfiguration)
    grpc_canary = next(
        r for vh in grpc_table.virtual_hosts for r in vh.routes if r.name == "canary"
    )
    assert not grpc_canary.route.HasField("timeout")
    assert grpc_canary.route.retry_policy.num_retries.value == 2


def test_clusters_map_balancing_breakers_and_health_checks_per_consumer() -> None:
    envoy = {n: unpack(a, cluster_pb2.Cluster) for n, a in built("envoy")[CDS].items()}
    grpc_ = {n: unpack(a, cluster_pb2.Cluster) for n, a in built("grpc")[CDS].items()}
    assert set(envoy) == set(grpc_) == {"gpt4-gateway", "gpt4-gateway-v2", "claude-gateway"}

    gw = envoy["gpt4-gateway"]
    assert gw.type == cluster_pb2.Cluster.EDS and gw.eds_cluster_config.eds_config.HasField("ads")
    assert gw.lb_policy == cluster_pb2.Cluster.LEAST_REQUEST
    assert grpc_["gpt4-gateway"].lb_policy == cluster_pb2.Cluster.ROUND_ROBIN  # C-core has no LR
    assert gw.circuit_breakers.thresholds[0].max_requests.value == 64
    assert gw.outlier_detection.failure_percentage_threshold.value == 40
    assert gw.outlier_detection.consecutive_5xx.value == 5
    assert gw.health_checks[0].interval.seconds == 5
    assert gw.health_checks[0].unhealthy_threshold.value == 2
    assert gw.health_checks[0].HasField("grpc_health_check")
    assert "envoy.extensions.upstreams.http.v3.HttpProtocolOptions" in (
        gw.typed_extension_protocol_options
    )
    assert not grpc_["gpt4-gateway"].health_checks  # gRPC clients do not check actively

    # load_aware: ORCA-weighted round robin; gRPC gets it inside wrr_locality, with
    # round_robin next for clients that lack it.
    claude_envoy = envoy["claude-gateway"].load_balancing_policy.policies
    assert [p.typed_extension_config.name for p in claude_envoy] == [
        "envoy.load_balancing_policies.client_side_weighted_round_robin"
    ]
    claude_grpc = grpc_["claude-gateway"].load_balancing_policy.policies
    inner = [
        unpack(p.typed_extension_config.typed_config, wrr_locality_pb2.WrrLocality)
        .endpoint_picking_policy.policies[0]
        .typed_extension_config.typed_config.type_url
        for p in claude_grpc
    ]
    assert inner[0].endswith("ClientSideWeightedRoundRobin")
    assert inner[1].endswith("RoundRobin")


def test_endpoints_map_zones_weights_health_and_static_endpoints() -> None:
    res = built("grpc", healthy=False)
    cla = unpack(res[EDS]["gpt4-gateway"], endpoint_pb2.ClusterLoadAssignment)
    zones = {loc.locality.zone: loc for loc in cla.endpoints}
    assert set(zones) == {"us-east-1a", "us-east-1b"}
    b = zones["us-east-1b"]
    assert b.lb_endpoints[0].health_status == health_check_pb2.UNHEALTHY
    assert b.load_balancing_weight.value == 1  # never 0: gRPC would drop the locality
    a = zones["us-east-1a"].lb_endpoints[0]
    assert a.health_status == health_check_pb2.HEALTHY
    assert a.endpoint.address.socket_address.address == "127.0.0.1"
    static = unpack(res[EDS]["claude-gateway"], endpoint_pb2.ClusterLoadAssignment)
    ep = static.endpoints[0].lb_endpoints[0]
    assert ep.load_balancing_weight.value == 3
    assert static.endpoints[0].locality.zone == "us-east-1b"


def test_listeners_per_consumer_and_consistency_check() -> None:
    envoy = built("envoy")
    assert list(envoy[LDS]) == [xr.GATEWAY_LISTENER]
    listener = unpack(envoy[LDS][xr.GATEWAY_LISTENER], listener_pb2.Listener)
    assert listener.address.socket_address.port_value == 0
    grpc_ = built("grpc")
    assert set(grpc_[LDS]) == {"aimesh", "gpt4-gateway", "gpt4-gateway-v2", "claude-gateway"}
    api = unpack(grpc_[LDS]["gpt4-gateway"], listener_pb2.Listener)
    hcm = unpack(api.api_listener.api_listener, hcm_pb2.HttpConnectionManager)
    assert hcm.rds.route_config_name == xr.ROUTE_TABLE
    assert hcm.http_filters[-1].name == "envoy.filters.http.router"  # gRPC requires it last

    assert xr.check(grpc_) == []
    broken = {t: dict(r) for t, r in grpc_.items()}
    del broken[CDS]["gpt4-gateway-v2"]
    assert any("no cluster gpt4-gateway-v2" in p for p in xr.check(broken))
    del broken[EDS]["claude-gateway"]
    assert "cluster claude-gateway: no endpoints resource" in xr.check(broken)


def test_versions_are_content_hashes_and_change_only_with_their_type() -> None:
    a, b = built("grpc"), built("grpc")
    assert {t: xr.version_of(a[t]) for t in xr.TYPES} == {t: xr.version_of(b[t]) for t in xr.TYPES}
    c = built("grpc", healthy=False)  # one endpoint's health: EDS only
    changed = {t for t in xr.TYPES if xr.version_of(a[t]) != xr.version_of(c[t])}
    assert changed == {EDS}


def test_the_builder_repacks_only_what_changed() -> None:
    builder, cat, mesh = xr.Builder(), Catalog(), load_text(MESH)
    cat.reset(1, [instance("gpt4-gateway", 1), instance("gpt4-gateway-v2", 3)])
    flavors = [xr.Flavor("envoy", "127.0.0.1:0"), xr.Flavor("grpc")]
    first = builder.build(flavors, cat.snapshot, mesh, lambda i: i.serving)
    cat.apply(2, [instance("gpt4-gateway", 2)])  # one more gpt4-gateway instance
    second = builder.build(flavors, cat.snapshot, mesh, lambda i: i.serving)
    for f in flavors:
        a, b = first[f.key], second[f.key]
        assert b[EDS]["gpt4-gateway"] is not a[EDS]["gpt4-gateway"]
        assert b[EDS]["gpt4-gateway-v2"] is a[EDS]["gpt4-gateway-v2"]  # reused as is
        assert all(b[CDS][n] is a[CDS][n] for n in a[CDS])
        assert b[RDS][xr.ROUTE_TABLE] is a[RDS][xr.ROUTE_TABLE]
        assert all(b[LDS][n] is a[LDS][n] for n in a[LDS])
    # The endpoints of both flavors are the same objects: packed once per change.
    assert second[flavors[0].key][EDS] == second[flavors[1].key][EDS]
    third = builder.build(flavors, cat.snapshot, load_text(MESH), lambda i: i.serving)
    assert third["grpc"][CDS]["gpt4-gateway"] is not second["grpc"][CDS]["gpt4-gateway"]


# -- the stream protocol, in process ----------------------------------------------------


class AdsStream:
    """One ADS stream as a client: requests go in, responses come out."""

    def __init__(self, channel: grpc.aio.Channel, node: base_pb2.Node) -> None:
        self.node = node
        self.requests: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()
        self.call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(
            self._iter()
        )
        self.last: dict[str, discovery_pb2.DiscoveryResponse] = {}

    async def _iter(self) -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        while (r := await self.requests.get()) is not None:
            yield r

    def send(
        self,
        type_url: str,
        names: list[str] | None = None,
        *,
        version: str = "",
        nonce: str = "",
        error: str = "",
    ) -> None:
        req = discovery_pb2.DiscoveryRequest(
            node=self.node,
            type_url=type_url,
            resource_names=names or [],
            version_info=version,
            response_nonce=nonce,
        )
        if error:
            req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        self.requests.put_nowait(req)

    def ack(self, type_url: str, names: list[str] | None = None) -> None:
        last = self.last[type_url]
        self.send(type_url, names, version=last.version_info, nonce=last.nonce)

    async def recv(self) -> discovery_pb2.DiscoveryResponse:
        response: discovery_pb2.DiscoveryResponse = await asyncio.wait_for(self.call.read(), 10)
        self.last[response.type_url] = response
        return response

    def names(self, response: discovery_pb2.DiscoveryResponse) -> set[str]:
        cls = {
            LDS: listener_pb2.Listener,
            RDS: route_pb2.RouteConfiguration,
            CDS: cluster_pb2.Cluster,
        }.get(response.type_url)
        if cls is None:
            return {
                unpack(r, endpoint_pb2.ClusterLoadAssignment).cluster_name
                for r in response.resources
            }
        return {unpack(r, cls).name for r in response.resources}

    def close(self) -> None:
        self.requests.put_nowait(None)
        self.call.cancel()


@pytest.fixture
async def cp() -> AsyncIterator[tuple[ControlPlaneServer, grpc.aio.Channel]]:
    server = ControlPlaneServer(ControlPlane(EmbeddedStore(None)))
    port = await server.start("127.0.0.1:0")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield server, ch
    await server.stop(0)


async def register(ch: grpc.aio.Channel, service: str, n: int, serving: bool = True) -> int:
    r = await pb_grpc.RegistryStub(ch).Register(
        pb.RegisterRequest(
            instance=pb.Instance(
                service=service, address=f"127.0.0.{n}:9000", models=["gpt-4"], serving=serving
            )
        )
    )
    return int(r.lease_id)


async def apply(ch: grpc.aio.Channel, document: str) -> None:
    r = await pb_grpc.ConfigStub(ch).Apply(pb.ApplyConfigRequest(document=document))
    assert r.version > 0


async def test_grpc_client_subscribes_by_name_acks_and_gets_pushed_changes(
    cp: tuple[ControlPlaneServer, grpc.aio.Channel],
) -> None:
    server, ch = cp
    await register(ch, "gpt4-gateway", 1)
    s = AdsStream(ch, base_pb2.Node(id="app-1", user_agent_name="gRPC Python"))
    try:
        s.send(LDS, ["gpt4-gateway"])
        lds = await s.recv()
        assert s.names(lds) == {"gpt4-gateway"} and lds.nonce
        s.ack(LDS, ["gpt4-gateway"])
        s.send(RDS, [xr.ROUTE_TABLE])
        assert (await s.recv()).type_url == RDS  # not a second LDS: the ACK got no answer
        s.ack(RDS, [xr.ROUTE_TABLE])
        s.send(CDS, ["gpt4-gateway"])
        assert s.names(await s.recv()) == {"gpt4-gateway"}
        s.ack(CDS, ["gpt4-gateway"])
        s.send(EDS, ["gpt4-gateway"])
        eds = await s.recv()
        cla = unpack(eds.resources[0], endpoint_pb2.ClusterLoadAssignment)
        assert [
            e.endpoint.address.socket_address.address
            for loc in cla.endpoints
            for e in loc.lb_endpoints
        ] == ["127.0.0.1"]
        s.ack(EDS, ["gpt4-gateway"])

        await register(ch, "gpt4-gateway", 2)  # a new instance: pushed, EDS only
        pushed = await s.recv()
        assert s.names(pushed) == {"gpt4-gateway"}
        assert pushed.type_url == EDS and pushed.version_info != eds.version_info
        cla = unpack(pushed.resources[0], endpoint_pb2.ClusterLoadAssignment)
        assert len(cla.endpoints[0].lb_endpoints) == 2
        s.ack(EDS, ["gpt4-gateway"])

        def acked() -> bool:
            (stream,) = server.xds.describe()["streams"]
            assert stream["node"] == "app-1" and stream["flavor"] == "grpc"
            return bool(stream["types"]["EDS"]["acked"] == pushed.version_info)

        await eventually(acked, what="the ACK to reach the control plane")
    finally:
        s.close()


async def test_nack_keeps_the_last_good_version_and_stale_nonces_are_ignored(
    cp: tuple[ControlPlaneServer, grpc.aio.Channel],
) -> None:
    server, ch = cp
    await register(ch, "gpt4-gateway", 1)
    await register(ch, "gpt4-gateway-v2", 3)
    s = AdsStream(ch, base_pb2.Node(id="app-2"))
    try:
        s.send(CDS, ["gpt4-gateway"])
        first = await s.recv()
        s.ack(CDS, ["gpt4-gateway"])
        await apply(ch, MESH)  # the cluster changes (least_request -> round_robin for gRPC...)
        second = await s.recv()
        assert second.type_url == CDS and second.version_info != first.version_info
        # The client rejects it: it keeps `first`, and the server does not resend.
        s.send(
            CDS,
            ["gpt4-gateway"],
            version=first.version_info,
            nonce=second.nonce,
            error="cluster gpt4-gateway: unsupported policy",
        )
        # An answer to the first response, arriving late: stale, ignored even though it
        # names another resource.
        s.send(CDS, ["claude-gateway"], version=first.version_info, nonce=first.nonce)
        s.send(EDS, ["gpt4-gateway"])  # the next response must be this one
        assert (await s.recv()).type_url == EDS
        await eventually(lambda: server.xds.nacks == 1, what="the NACK")
        types = server.xds.describe()["streams"][0]["types"]
        assert types["CDS"]["nack"] == "cluster gpt4-gateway: unsupported policy"
        assert types["CDS"]["subscribed"] == ["gpt4-gateway"]
        assert server.xds.nacks == 1
        scraped = generate_latest(control_plane_registry(server.cp, server.xds)).decode()
        assert "aimesh_xds_nacks_total 1.0" in scraped
        assert 'aimesh_xds_streams{flavor="grpc"} 1.0' in scraped
        # A later change is still pushed after a NACK.
        await apply(ch, MESH.replace("maxRequests: 64", "maxRequests: 32"))
        third = await s.recv()
        assert third.type_url == CDS and third.version_info not in (
            first.version_info,
            second.version_info,
        )
    finally:
        s.close()


async def test_envoy_gets_wildcards_its_listener_and_eds_again_after_cds(
    cp: tuple[ControlPlaneServer, grpc.aio.Channel],
) -> None:
    _, ch = cp
    await register(ch, "gpt4-gateway", 1)
    node = base_pb2.Node(id="edge-1", user_agent_name="envoy")
    node.metadata.fields[LISTEN_METADATA].CopyFrom(struct_pb2.Value(string_value="127.0.0.1:10000"))
    s = AdsStream(ch, node)
    try:
        s.send(CDS)  # no names: all clusters
        cds = await s.recv()
        assert s.names(cds) == {"gpt4-gateway"}
        s.send(EDS, ["gpt4-gateway"])
        eds = await s.recv()
        s.ack(CDS)
        s.ack(EDS, ["gpt4-gateway"])
        s.send(LDS)
        lds = await s.recv()
        listener = unpack(lds.resources[0], listener_pb2.Listener)
        assert listener.name == xr.GATEWAY_LISTENER
        assert listener.address.socket_address.port_value == 10000

        await register(ch, "claude-gateway", 2)  # a new cluster: CDS pushed with both
        cds2 = await s.recv()
        assert cds2.type_url == CDS and s.names(cds2) == {"gpt4-gateway", "claude-gateway"}
        s.ack(CDS)
        # Envoy re-creates clusters and asks for EDS again; even with nothing new for
        # gpt4-gateway it must be answered, or the cluster stays warming.
        s.send(EDS, ["gpt4-gateway"], version=eds.version_info, nonce=eds.nonce)
        again = await s.recv()
        assert again.type_url == EDS and s.names(again) == {"gpt4-gateway"}
    finally:
        s.close()


async def test_endpoint_pushes_carry_only_the_services_that_changed(
    cp: tuple[ControlPlaneServer, grpc.aio.Channel],
) -> None:
    _, ch = cp
    await register(ch, "gpt4-gateway", 1)
    await register(ch, "claude-gateway", 2)
    s = AdsStream(ch, base_pb2.Node(id="app-4"))
    try:
        both = ["claude-gateway", "gpt4-gateway"]
        s.send(EDS, both)
        assert s.names(await s.recv()) == set(both)  # the first answer: everything asked
        s.ack(EDS, both)
        await register(ch, "gpt4-gateway", 3)
        pushed = await s.recv()
        assert s.names(pushed) == {"gpt4-gateway"}  # claude-gateway is unchanged: not resent
        s.ack(EDS, both)
        s.send(EDS, ["gpt4-gateway"], version=pushed.version_info, nonce=pushed.nonce)
        # Not a change of any endpoints, but of the subscription: answered in full.
        assert s.names(await s.recv()) == {"gpt4-gateway"}
    finally:
        s.close()


async def test_a_stream_without_a_node_id_is_refused(
    cp: tuple[ControlPlaneServer, grpc.aio.Channel],
) -> None:
    _, ch = cp
    s = AdsStream(ch, base_pb2.Node())
    s.send(LDS, ["x"])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.recv()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "node.id" in (err.value.details() or "")
    s.close()


async def test_unhealthy_by_registry_is_pushed_as_eds_health(
    cp: tuple[ControlPlaneServer, grpc.aio.Channel],
) -> None:
    _, ch = cp
    lease = await register(ch, "gpt4-gateway", 1)
    s = AdsStream(ch, base_pb2.Node(id="app-3"))
    try:
        s.send(EDS, ["gpt4-gateway"])
        await s.recv()
        s.ack(EDS, ["gpt4-gateway"])
        keepalive = pb_grpc.RegistryStub(ch).KeepAlive(
            iter([pb.KeepAliveRequest(lease_id=lease, serving=False)])
        )
        async for _ in keepalive:
            break
        pushed = await s.recv()
        cla = unpack(pushed.resources[0], endpoint_pb2.ClusterLoadAssignment)
        assert cla.endpoints[0].lb_endpoints[0].health_status == health_check_pb2.UNHEALTHY
    finally:
        s.close()


async def test_unhealthy_by_proxies_active_checks_is_pushed_as_eds_health(
    cp: tuple[ControlPlaneServer, grpc.aio.Channel],
) -> None:
    _, ch = cp
    await register(ch, "gpt4-gateway", 1)
    s = AdsStream(ch, base_pb2.Node(id="app-5"))
    try:
        s.send(EDS, ["gpt4-gateway"])
        await s.recv()
        s.ack(EDS, ["gpt4-gateway"])
        # The one aimesh proxy that reports this endpoint has it out of rotation.
        endpoint = pb.EndpointReport(service="gpt4-gateway", address="127.0.0.1:9000")
        await pb_grpc.StatusStub(ch).Report(
            pb.ProxyReport(proxy_id="edge-1", endpoints=[endpoint])  # healthy unset: false
        )
        pushed = await s.recv()
        cla = unpack(pushed.resources[0], endpoint_pb2.ClusterLoadAssignment)
        assert cla.endpoints[0].lb_endpoints[0].health_status == health_check_pb2.UNHEALTHY
    finally:
        s.close()


async def test_a_bad_envoy_listen_address_is_refused_and_harms_no_one(
    cp: tuple[ControlPlaneServer, grpc.aio.Channel],
) -> None:
    server, ch = cp
    await register(ch, "gpt4-gateway", 1)
    good = AdsStream(ch, base_pb2.Node(id="good"))
    node = base_pb2.Node(id="bad", user_agent_name="envoy")
    node.metadata.fields[LISTEN_METADATA].CopyFrom(struct_pb2.Value(string_value="nowhere"))
    bad = AdsStream(ch, node)
    try:
        good.send(EDS, ["gpt4-gateway"])
        await good.recv()
        good.ack(EDS, ["gpt4-gateway"])
        bad.send(LDS)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await bad.recv()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "aimesh.listen" in (err.value.details() or "")
        assert [s["node"] for s in server.xds.describe()["streams"]] == ["good"]
        await register(ch, "gpt4-gateway", 2)  # pushes still flow to the others
        assert len((await good.recv()).resources) == 1
    finally:
        good.close()
        bad.close()


async def test_a_service_that_goes_away_leaves_the_routes_before_its_cluster(
    cp: tuple[ControlPlaneServer, grpc.aio.Channel],
) -> None:
    _, ch = cp
    await register(ch, "gpt4-gateway", 1)
    lease = await register(ch, "claude-gateway", 2)
    node = base_pb2.Node(id="edge-2", user_agent_name="envoy")
    s = AdsStream(ch, node)
    try:
        for type_url in (CDS, LDS):
            s.send(type_url)  # wildcards
            await s.recv()
            s.ack(type_url)
        s.send(RDS, [xr.ROUTE_TABLE])
        await s.recv()
        s.ack(RDS, [xr.ROUTE_TABLE])
        await pb_grpc.RegistryStub(ch).Deregister(pb.DeregisterRequest(lease_id=lease))
        # The route table stops naming claude-gateway before the cluster is withdrawn.
        first, second = await s.recv(), await s.recv()
        assert (first.type_url, second.type_url) == (RDS, CDS)
        assert s.names(second) == {"gpt4-gateway"}
    finally:
        s.close()
