"""The control plane in process: registry, leases, watches, config, status, SQLite restart.

Real grpc.aio servers on 127.0.0.1 (port 0) and real channels; the decision logic
(catalog history, leases, topology) is also tested on its own with a fake clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import MappingProxyType

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aimesh.control.v1 import control_plane_pb2 as pb
from aimesh.control.v1 import control_plane_pb2_grpc as pb_grpc
from aimesh.mesh.config import load_text
from aimesh.mesh.control import consistency
from aimesh.mesh.control.catalog import Catalog, Instance, Snapshot, merge
from aimesh.mesh.control.leases import LeaseTable, check_ttl
from aimesh.mesh.control.server import ControlPlane, ControlPlaneServer
from aimesh.mesh.control.store import EmbeddedStore
from aimesh.mesh.control.topology import Topology

MESH = """\
apiVersion: mesh.ai/v1
kind: ServiceMesh
metadata: {name: NAME}
spec:
  services:
    - name: gpt4-gateway
      loadBalancer: {algorithm: least_connections}
"""


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def inst(service: str = "gpt4-gateway", n: int = 1, **kw: object) -> Instance:
    return Instance(service=service, instance_id=f"i{n}", address=f"10.0.0.{n}:9000", **kw)  # type: ignore[arg-type]


# -- pure: catalog, leases, topology, consistency -----------------------------------------


def test_catalog_versions_history_and_merge() -> None:
    cat = Catalog(history=3)
    cat.reset(10, [inst(n=1)])
    assert cat.since(10) == []
    c1 = cat.apply(11, [inst(n=2)])
    assert c1 is not None
    assert cat.apply(11, [inst(n=3)]) is None  # not newer: a replayed event
    assert cat.apply(12, [inst(n=2)]) is None  # identical data: nothing changed
    cat.apply(13, removed=[("gpt4-gateway", "i1")])
    cat.apply(15, [inst(n=4)])  # versions may skip (etcd revisions count other keys)
    assert [c.version for c in cat.since(10) or []] == [11, 13, 15]
    assert [c.version for c in cat.since(13) or []] == [15]
    assert cat.since(16) is None  # from the future: another store
    cat.apply(16, [inst(n=5)])  # the history holds 3: 11 is evicted
    assert cat.since(10) is None  # too far behind: a full snapshot instead
    assert cat.since(11) is not None
    merged = merge(cat.since(11) or [])
    assert merged.version == 16
    assert {i.instance_id for i in merged.upserted} == {"i4", "i5"}
    assert merged.removed == (("gpt4-gateway", "i1"),)
    assert sorted(k[1] for k in cat.snapshot.instances) == ["i2", "i4", "i5"]


def test_merge_removal_then_readd_is_an_upsert() -> None:
    cat = Catalog()
    cat.reset(1, [inst(n=1)])
    cat.apply(2, removed=[("gpt4-gateway", "i1")])
    cat.apply(3, [inst(n=1, version="v2")])
    merged = merge(cat.since(1) or [])
    assert merged.removed == ()
    assert [i.version for i in merged.upserted] == ["v2"]


def test_snapshot_models_ignores_models_served_by_two_services() -> None:
    snap = Snapshot(
        1,
        MappingProxyType(
            {
                ("a", "1"): inst("a", 1, models=("gpt-4", "shared")),
                ("b", "2"): inst("b", 2, models=("claude", "shared")),
            }
        ),
    )
    assert snap.models() == {"gpt-4": "a", "claude": "b"}


def test_leases_expire_unless_renewed() -> None:
    clock = FakeClock()
    table = LeaseTable(clock)
    a, b = table.grant(5.0), table.grant(5.0)
    clock.now += 4
    assert table.renew(a.lease_id) is not None
    assert table.next_expiry() == 1005.0  # b's
    clock.now += 1.5
    assert table.expired() == [b.lease_id]
    assert table.renew(b.lease_id) is None
    clock.now += 3.5
    assert table.expired() == [a.lease_id]
    assert table.next_expiry() is None
    assert check_ttl(0) == 5.0
    with pytest.raises(ValueError, match=r"ttl: 0\.5s is outside"):
        check_ttl(0.5)


def test_topology_tells_when_health_votes_change() -> None:
    clock, votes = FakeClock(), []
    topo = Topology(clock, on_vote=lambda: votes.append(clock.now))
    a = inst(n=1)
    snap = Snapshot(1, MappingProxyType({a.key: a}))

    def report(healthy: bool) -> None:
        topo.report(
            pb.ProxyReport(
                proxy_id="p1",
                endpoints=[
                    pb.EndpointReport(service=a.service, address=a.address, healthy=healthy)
                ],
            )
        )

    report(True)  # a new voter
    report(True)  # the same vote again: nothing to tell
    report(False)  # flipped: out of rotation at the one proxy that reports it
    assert votes == [1000.0, 1000.0] and not topo.healthy(a)
    clock.now += 60  # the proxy went silent: its vote expires with it
    topo.observe(snap)
    assert votes == [1000.0, 1000.0, 1060.0] and topo.healthy(a)


def test_topology_rates_health_and_uptime() -> None:
    clock = FakeClock()
    topo = Topology(clock, wall=lambda: 2000.0)
    a, b = inst(n=1, registered_at=1990.0), inst(n=2)
    snap = Snapshot(1, MappingProxyType({a.key: a, b.key: b}))
    topo.observe(snap)

    def report(requests: int, healthy_b: bool) -> None:
        topo.report(
            pb.ProxyReport(
                proxy_id="p1",
                endpoints=[
                    pb.EndpointReport(
                        service="gpt4-gateway",
                        address=a.address,
                        requests=requests,
                        errors=requests // 10,
                        latency_seconds_total=requests * 0.002,
                        healthy=True,
                    ),
                    pb.EndpointReport(service="gpt4-gateway", address=b.address, healthy=healthy_b),
                ],
            )
        )

    report(0, True)
    clock.now += 30
    report(600, False)  # 600 calls in 30 s = 1,200/min; b marked unhealthy by the proxy
    view = topo.view(snap, config_version=7)
    svc = view.services[0]
    assert (svc.healthy, svc.total) == (1, 2)
    assert svc.requests_per_minute == pytest.approx(1200)
    assert svc.avg_latency_ms == pytest.approx(2.0)
    assert svc.error_rate == pytest.approx(0.1)
    assert svc.instances[0].age_seconds == 10.0
    assert (view.healthy, view.total, view.config_version, view.proxies) == (1, 2, 7, 1)
    # Down (no healthy instance) for 10 s of the 40 observed: 75% uptime.
    down = Snapshot(2, MappingProxyType({b.key: b}))
    topo.observe(down)
    clock.now += 10
    topo.observe(snap)
    clock.now += 0.0
    assert topo.view(snap).services[0].uptime == pytest.approx(30 / 40)


def test_consistency_names_routes_to_nowhere() -> None:
    cfg = load_text(
        MESH.replace("NAME", "x") + "  trafficPolicies:\n    - name: canary\n      routes:\n"
        "        - {destination: gpt4-gateway, weight: 90}\n"
        "        - {destination: gpt4-gateway-v2, weight: 10}\n"
        "      backups: [claude-gateway]\n"
    )
    empty = Snapshot(0, MappingProxyType({}))
    assert consistency.problems(cfg, empty) == [
        "spec.trafficPolicies[0].routes[1].destination: service 'gpt4-gateway-v2' does not "
        "exist: it is not declared under spec.services and no instance of it is registered; "
        "declare it, or register its instances first",
        "spec.trafficPolicies[0].backups[0]: service 'claude-gateway' does not exist: it is "
        "not declared under spec.services and no instance of it is registered; declare it, "
        "or register its instances first",
    ]
    v2, claude = inst("gpt4-gateway-v2", 1), inst("claude-gateway", 2)
    live = Snapshot(2, MappingProxyType({v2.key: v2, claude.key: claude}))
    assert consistency.problems(cfg, live) == []


# -- the server ---------------------------------------------------------------------------

Factory = Callable[..., Awaitable[tuple[ControlPlaneServer, str]]]


@pytest.fixture
async def control_plane() -> AsyncIterator[Factory]:
    servers: list[ControlPlaneServer] = []

    async def make(path: Path | None = None) -> tuple[ControlPlaneServer, str]:
        server = ControlPlaneServer(ControlPlane(EmbeddedStore(path)))
        port = await server.start("127.0.0.1:0")
        servers.append(server)
        return server, f"127.0.0.1:{port}"

    yield make
    for s in servers:
        await s.stop(0)


@pytest.fixture
async def cp(control_plane: Factory) -> AsyncIterator[grpc.aio.Channel]:
    _, address = await control_plane()
    async with grpc.aio.insecure_channel(address) as ch:
        yield ch


def register_request(
    service: str = "gpt4-gateway", n: int = 1, ttl: float = 0, **kw: object
) -> pb.RegisterRequest:
    r = pb.RegisterRequest(
        instance=pb.Instance(service=service, address=f"10.0.0.{n}:9000", **kw)  # type: ignore[arg-type]
    )
    if ttl:
        r.ttl.FromMilliseconds(int(ttl * 1000))
    return r


async def test_register_list_deregister(cp: grpc.aio.Channel) -> None:
    reg = pb_grpc.RegistryStub(cp)
    r1 = await reg.Register(register_request(n=1, models=["gpt-4"], zone="z1", weight=3))
    r2 = await reg.Register(register_request("claude-gateway", n=2))
    assert r2.version > r1.version and r1.lease_id != r2.lease_id
    assert r1.ttl.ToMilliseconds() == 5000  # the default
    listed = await reg.List(pb.ListRequest())
    assert listed.version == r2.version
    [gpt] = [i for i in listed.instances if i.service == "gpt4-gateway"]
    assert (gpt.address, list(gpt.models), gpt.zone, gpt.weight, gpt.serving) == (
        "10.0.0.1:9000",
        ["gpt-4"],
        "z1",
        3,
        True,
    )
    assert gpt.registered_at.seconds > 0
    only = await reg.List(pb.ListRequest(service="claude-gateway"))
    assert [i.service for i in only.instances] == ["claude-gateway"]
    # By address (the default instance id) and by lease.
    await reg.Deregister(
        pb.DeregisterRequest(
            instance=pb.InstanceRef(service="gpt4-gateway", instance_id="10.0.0.1:9000")
        )
    )
    await reg.Deregister(pb.DeregisterRequest(lease_id=r2.lease_id))
    assert not (await reg.List(pb.ListRequest())).instances
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await reg.Deregister(pb.DeregisterRequest(lease_id=r2.lease_id))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "aimesh get instances" in (info.value.details() or "")


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (pb.RegisterRequest(), "instance.service: required"),
        (
            pb.RegisterRequest(instance=pb.Instance(service="GPT_4", address="10.0.0.1:1")),
            "instance.service: 'GPT_4' is not a DNS label",
        ),
        (
            pb.RegisterRequest(instance=pb.Instance(service="a", address="10.0.0.1")),
            'instance.address: "10.0.0.1" is not HOST:PORT; the port is missing',
        ),
        (register_request(ttl=7200), "ttl: 7200s is outside 1s..3600s"),
    ],
)
async def test_register_rejects_bad_input_by_field(
    cp: grpc.aio.Channel, request_: pb.RegisterRequest, message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await pb_grpc.RegistryStub(cp).Register(request_)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith(message)


async def test_lease_expires_without_keepalive_and_lives_with_it(cp: grpc.aio.Channel) -> None:
    reg = pb_grpc.RegistryStub(cp)
    watch = reg.Watch(pb.WatchCatalogRequest())
    assert (await watch.read()).version == 0  # in sync at once: an empty catalog
    kept = await reg.Register(register_request(n=1, ttl=1))
    dropped = await reg.Register(register_request(n=2, ttl=1))
    assert len((await watch.read()).upserted) == 1
    assert len((await watch.read()).upserted) == 1

    # Keep lease 1 alive for three of its ttl-thirds.
    async def renewals() -> AsyncIterator[pb.KeepAliveRequest]:
        for _ in range(40):
            yield pb.KeepAliveRequest(lease_id=kept.lease_id)
            await asyncio.sleep(0.1)

    keepalive = reg.KeepAlive(renewals())
    update = await asyncio.wait_for(watch.read(), 5)  # the next change: lease 2 expires
    assert [r.instance_id for r in update.removed] == ["10.0.0.2:9000"]
    assert not update.upserted
    answers = [a async for a in keepalive]
    assert all(a.found for a in answers) and len(answers) == 40
    listed = await reg.List(pb.ListRequest())
    assert [i.address for i in listed.instances] == ["10.0.0.1:9000"]
    # A renewal for the expired lease says so: the holder registers again.
    late = reg.KeepAlive(iter([pb.KeepAliveRequest(lease_id=dropped.lease_id)]))
    assert [a.found async for a in late] == [False]
    watch.cancel()


async def test_keepalive_carries_health_changes(cp: grpc.aio.Channel) -> None:
    reg = pb_grpc.RegistryStub(cp)
    r = await reg.Register(register_request(n=1))
    watch = reg.Watch(pb.WatchCatalogRequest(since_version=r.version))
    assert (await watch.read()).version == r.version
    answers = reg.KeepAlive(iter([pb.KeepAliveRequest(lease_id=r.lease_id, serving=False)]))
    assert [a.found async for a in answers] == [True]
    update = await asyncio.wait_for(watch.read(), 5)
    assert [i.serving for i in update.upserted] == [False]
    watch.cancel()


async def test_watch_resumes_from_version_with_only_what_was_missed(cp: grpc.aio.Channel) -> None:
    reg = pb_grpc.RegistryStub(cp)
    for n in (1, 2):
        await reg.Register(register_request(n=n))
    watch = reg.Watch(pb.WatchCatalogRequest())
    first = await watch.read()
    assert first.full and len(first.upserted) == 2
    seen = first.version
    watch.cancel()  # the watcher goes away ...
    await reg.Register(register_request(n=3))
    await reg.Deregister(
        pb.DeregisterRequest(
            instance=pb.InstanceRef(service="gpt4-gateway", instance_id="10.0.0.1:9000")
        )
    )
    await reg.Register(register_request("claude-gateway", n=4))
    # ... and comes back with the version it had: increments only, merged, in order.
    watch = reg.Watch(pb.WatchCatalogRequest(since_version=seen))
    update = await watch.read()
    assert not update.full
    assert update.version == (await reg.List(pb.ListRequest())).version
    assert sorted(i.address for i in update.upserted) == ["10.0.0.3:9000", "10.0.0.4:9000"]
    assert [r.instance_id for r in update.removed] == ["10.0.0.1:9000"]
    # Later changes arrive one by one, versions strictly increasing.
    versions = [update.version]
    for n in (5, 6, 7):
        await reg.Register(register_request(n=n))
        versions.append((await asyncio.wait_for(watch.read(), 5)).version)
    assert versions == sorted(set(versions))
    watch.cancel()
    # A filtered watcher sees only its services.
    only = reg.Watch(pb.WatchCatalogRequest(services=["claude-gateway"]))
    assert [i.service for i in (await only.read()).upserted] == ["claude-gateway"]
    only.cancel()


async def test_apply_validates_whole_and_keeps_the_live_config(cp: grpc.aio.Channel) -> None:
    config = pb_grpc.ConfigStub(cp)
    with pytest.raises(grpc.aio.AioRpcError) as none:
        await config.Get(pb.GetConfigRequest())
    assert none.value.code() == grpc.StatusCode.NOT_FOUND
    good = await config.Apply(
        pb.ApplyConfigRequest(document=MESH.replace("NAME", "one"), source="one.yaml")
    )
    assert good.changed and good.version > 0 and "gpt4-gateway" in good.summary
    bad = (
        MESH.replace("NAME", "two").replace("least_connections", "fastest")
        + "  trafficPolicies:\n    - name: p\n      routes: [{destination: Nope, weight: 1}]\n"
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await config.Apply(pb.ApplyConfigRequest(document=bad, source="two.yaml"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details() or ""
    assert "two.yaml: 2 error(s)" in details
    assert "spec.services[0].loadBalancer.algorithm" in details
    assert "spec.trafficPolicies[0].routes[0].destination" in details
    live = await config.Get(pb.GetConfigRequest())
    assert (live.version, live.name, live.source) == (good.version, "one", "one.yaml")
    # Consistency: a route to a service nobody declared or registered is refused ...
    canary = MESH.replace("NAME", "canary") + (
        "  trafficPolicies:\n    - name: canary\n      routes:\n"
        "        - {destination: gpt4-gateway, weight: 90}\n"
        "        - {destination: gpt4-gateway-v2, weight: 10}\n"
    )
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await config.Apply(pb.ApplyConfigRequest(document=canary))
    assert "'gpt4-gateway-v2' does not exist" in (missing.value.details() or "")
    # ... until an instance of it registers.
    await pb_grpc.RegistryStub(cp).Register(register_request("gpt4-gateway-v2", n=9))
    applied = await config.Apply(pb.ApplyConfigRequest(document=canary))
    assert applied.changed
    again = await config.Apply(pb.ApplyConfigRequest(document=canary))
    assert (again.changed, again.version) == (False, applied.version)
    dry = await config.Apply(
        pb.ApplyConfigRequest(document=MESH.replace("NAME", "dry"), dry_run=True)
    )
    assert (dry.changed, dry.version) == (False, applied.version)
    with pytest.raises(grpc.aio.AioRpcError) as conflict:
        await config.Apply(
            pb.ApplyConfigRequest(
                document=MESH.replace("NAME", "late"), expected_version=good.version
            )
        )
    assert conflict.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"the live config is version {applied.version}" in (conflict.value.details() or "")


async def test_config_watch_sends_current_then_each_new_version(cp: grpc.aio.Channel) -> None:
    config = pb_grpc.ConfigStub(cp)
    v1 = await config.Apply(pb.ApplyConfigRequest(document=MESH.replace("NAME", "a")))
    watch = config.Watch(pb.WatchConfigRequest())
    assert (await watch.read()).version == v1.version
    v2 = await config.Apply(pb.ApplyConfigRequest(document=MESH.replace("NAME", "b")))
    got = await asyncio.wait_for(watch.read(), 5)
    assert (got.version, got.name) == (v2.version, "b")
    watch.cancel()
    resumed = config.Watch(pb.WatchConfigRequest(since_version=v2.version))
    with pytest.raises(TimeoutError):  # nothing new: nothing sent
        await asyncio.wait_for(resumed.read(), 0.2)
    resumed.cancel()


async def test_sqlite_store_survives_a_restart(control_plane: Factory, tmp_path: Path) -> None:
    db = tmp_path / "cp.db"
    server, address = await control_plane(db)
    async with grpc.aio.insecure_channel(address) as ch:
        reg = pb_grpc.RegistryStub(ch)
        r = await reg.Register(register_request(n=1, ttl=30, models=["gpt-4"]))
        applied = await pb_grpc.ConfigStub(ch).Apply(
            pb.ApplyConfigRequest(document=MESH.replace("NAME", "kept"))
        )
        before = await reg.List(pb.ListRequest())
    await server.stop(0)
    _, address = await control_plane(db)
    async with grpc.aio.insecure_channel(address) as ch:
        reg = pb_grpc.RegistryStub(ch)
        after = await reg.List(pb.ListRequest())
        assert after == before  # same instances, same version
        live = await pb_grpc.ConfigStub(ch).Get(pb.GetConfigRequest())
        assert (live.version, live.name) == (applied.version, "kept")
        # The restored lease is alive: its holder renews it, no re-registration needed.
        answers = reg.KeepAlive(iter([pb.KeepAliveRequest(lease_id=r.lease_id)]))
        assert [a.found async for a in answers] == [True]
        later = await reg.Register(register_request(n=2))
        assert later.version > after.version and later.lease_id > r.lease_id


async def test_topology_from_reports(cp: grpc.aio.Channel) -> None:
    await pb_grpc.RegistryStub(cp).Register(register_request(n=1, models=["gpt-4"]))
    status = pb_grpc.StatusStub(cp)
    ack = await status.Report(
        pb.ProxyReport(
            proxy_id="gw",
            endpoints=[
                pb.EndpointReport(service="gpt4-gateway", address="10.0.0.1:9000", healthy=True)
            ],
        )
    )
    assert ack.interval.ToMilliseconds() == 2000
    view = await status.GetTopology(pb.TopologyRequest())
    assert (view.healthy, view.total, view.proxies) == (1, 1, 1)
    assert view.services[0].name == "gpt4-gateway"
    assert list(view.services[0].models) == ["gpt-4"]


async def test_control_plane_serves_health_and_reflection(cp: grpc.aio.Channel) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    health = await health_pb2_grpc.HealthStub(cp).Check(
        health_pb2.HealthCheckRequest(service="aimesh.mesh.v1.Registry")
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    call = reflection_pb2_grpc.ServerReflectionStub(cp).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name async for r in call for s in r.list_services_response.service}
    assert {"aimesh.mesh.v1.Registry", "aimesh.mesh.v1.Config", "aimesh.mesh.v1.Status"} <= names
