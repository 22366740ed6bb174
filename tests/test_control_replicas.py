"""Two control-plane replicas on one etcd: one is killed, proxies and instances go on
through the other, and nothing is lost."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import grpc
import grpc.aio
import pytest

from aimesh.control.v1 import control_plane_pb2 as cp_pb
from aimesh.control.v1 import control_plane_pb2_grpc as cp_grpc
from aimesh.inference.v1 import inference_pb2 as pb
from aimesh.inference.v1 import inference_pb2_grpc as pb_grpc
from aimesh.mesh import procs
from aimesh.mesh.control.etcd_server import EtcdServer

from .support import eventually
from .test_control_processes import MESH, Mesh, admin, mesh, served_by

__all__ = ["mesh"]  # the fixture, imported for use here

pytestmark = pytest.mark.slow

TTL = 1.5  # the sims' lease: the test outlives it twice after the kill


def replica(etcd: EtcdServer, prefix: str, name: str) -> procs.Proc:
    return procs.start(
        name,
        procs.aimesh_command(
            "control-plane", "--listen", "127.0.0.1:0", "--store", f"etcd://{etcd.endpoint}{prefix}"
        ),
    )


async def listed(address: str) -> cp_pb.CatalogSnapshot:
    async with grpc.aio.insecure_channel(address) as ch:
        return await cp_grpc.RegistryStub(ch).List(cp_pb.ListRequest(), timeout=5)


async def test_proxies_and_instances_continue_through_the_surviving_replica(
    etcd: EtcdServer, mesh: Mesh, tmp_path: Path
) -> None:
    prefix = f"/aimesh-replicas/{uuid.uuid4().hex[:8]}/"
    a = replica(etcd, prefix, "replica-a")
    b = replica(etcd, prefix, "replica-b")
    mesh.procs += [a, b]
    # Everyone knows both replicas; A comes first.
    mesh.cp = procs.Proc("replicas", a.popen, f"{a.address},{b.address}")
    sims = [mesh.sim(f"gpt4-{i}", "gpt-4", "gpt4-gateway", "--ttl", f"{TTL}s") for i in range(2)]
    proxy = mesh.proxy()
    applied = mesh.cli("apply", "-f", "-", stdin=MESH.replace("NAME", "replicated"))
    assert applied.returncode == 0, applied.stderr
    await eventually(lambda: admin(proxy, "/clusters")["config"] == "replicated", 10, "config")
    await eventually(
        lambda: sum(len(c["endpoints"]) for c in admin(proxy, "/clusters")["clusters"]) == 2,  # type: ignore[union-attr,index,arg-type,misc]
        10,
        "both instances",
    )
    # Both replicas serve the same catalog, at the same version (an etcd revision).
    assert await listed(a.address) == await listed(b.address)

    failures: list[str] = []
    done = {"calls": 0}
    stop = asyncio.Event()

    async def load() -> None:
        async with grpc.aio.insecure_channel(proxy.address) as ch:
            stub = pb_grpc.InferenceStub(ch)
            while not stop.is_set():
                req = pb.GenerateRequest(
                    model="gpt-4", messages=[pb.Message(role="user", content="x")]
                )
                try:
                    async for _ in stub.GenerateStream(req, timeout=10):
                        pass
                    done["calls"] += 1
                except grpc.aio.AioRpcError as exc:
                    failures.append(f"{exc.code().name}: {exc.details()}")

    workers = [asyncio.create_task(load()) for _ in range(3)]
    await eventually(lambda: done["calls"] >= 30, 20, "calls before the kill")
    a.kill()
    killed_at = asyncio.get_running_loop().time()
    # Leases (etcd's) are renewed through B: the instances stay, past their ttl.
    # A new instance registers through B and the proxy, now following B, sends it traffic.
    mesh.cp = procs.Proc("replicas", b.popen, f"{b.address},{a.address}")
    late = mesh.sim("gpt4-late", "gpt-4", "gpt4-gateway")
    await eventually(
        lambda: any(
            e["address"] == late.address
            for c in admin(proxy, "/clusters")["clusters"]  # type: ignore[union-attr]
            for e in c["endpoints"]  # type: ignore[index]
        ),
        15,
        "the late instance reaching the proxy through replica B",
    )
    counts = await served_by(proxy.address, "gpt-4", 30)
    assert counts.get("gpt4-late", 0) > 0, counts
    mark = done["calls"]
    loop = asyncio.get_running_loop()
    await eventually(
        lambda: done["calls"] >= mark + 30 and loop.time() - killed_at > 2 * TTL,
        20,
        "calls after the kill, for two lease ttls",
    )
    stop.set()
    await asyncio.gather(*workers)
    assert failures == []
    snap = await listed(b.address)
    assert sorted(i.instance_id for i in snap.instances) == ["gpt4-0", "gpt4-1", "gpt4-late"]
    async with grpc.aio.insecure_channel(b.address) as ch:
        live = await cp_grpc.ConfigStub(ch).Get(cp_pb.GetConfigRequest(), timeout=5)
    assert live.name == "replicated"
    assert all(s.alive() for s in sims)
