"""The control plane with real processes: self-registering sims, proxies that follow the
catalog and config, an outage under load, the kubectl-style CLI, and DNS discovery."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dns.asyncresolver
import dns.resolver
import grpc
import grpc.aio
import pytest

from aimesh.control.v1 import control_plane_pb2 as cp_pb
from aimesh.control.v1 import control_plane_pb2_grpc as cp_grpc
from aimesh.inference.v1 import inference_pb2 as pb
from aimesh.inference.v1 import inference_pb2_grpc as pb_grpc
from aimesh.mesh import procs
from aimesh.sim.v1 import sim_pb2, sim_pb2_grpc

from .support import eventually

pytestmark = pytest.mark.slow


class Mesh:
    """Processes of one test, stopped (SIGKILL) at the end whatever happened."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[procs.Proc] = []
        self.cp: procs.Proc | None = None

    def control_plane(self, *extra: str, port: int = 0) -> procs.Proc:
        self.cp = procs.start_control_plane(
            "--listen",
            f"127.0.0.1:{port}",
            *extra,
            store=f"sqlite:{self.tmp / 'cp.db'}",
            admin=False,
        )
        self.procs.append(self.cp)
        return self.cp

    def sim(self, name: str, model: str, service: str, *extra: str) -> procs.Proc:
        assert self.cp is not None
        p = procs.start_sim(
            name,
            [model],
            *("--ttft", "0", "--tps", "2000", "--length", "8-8", *extra),
            control_plane=self.cp.address,
            service=service,
        )
        self.procs.append(p)
        return p

    def proxy(self, *extra: str, cache: str = "cache.json") -> procs.Proc:
        assert self.cp is not None
        p = procs.start(
            "proxy",
            procs.aimesh_command(
                "proxy",
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
                "--control-plane",
                self.cp.address,
                "--cache",
                str(self.tmp / cache),
                *extra,
            ),
        )
        self.procs.append(p)
        return p

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        assert self.cp is not None
        return subprocess.run(
            procs.aimesh_command(*args, "--control-plane", self.cp.address),
            capture_output=True,
            text=True,
            input=stdin,
            timeout=30,
        )


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(tmp_path)
    try:
        yield m
    finally:
        for p in m.procs:
            p.kill()


def admin(proxy: procs.Proc, path: str) -> dict[str, object]:
    url = procs.admin_url(proxy)
    with urllib.request.urlopen(url + path, timeout=5) as r:
        data: dict[str, object] = json.load(r)
        return data


async def instances(cp: procs.Proc) -> list[cp_pb.Instance]:
    async with grpc.aio.insecure_channel(cp.address) as ch:
        snap = await cp_grpc.RegistryStub(ch).List(cp_pb.ListRequest(), timeout=5)
    return list(snap.instances)


async def served_by(target: str, model: str, calls: int) -> dict[str, int]:
    """Which instances answered `calls` unary calls (the aimesh-instance trailer)."""
    counts: dict[str, int] = {}
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.InferenceStub(ch)
        for i in range(calls):
            call = stub.Generate(
                pb.GenerateRequest(model=model, messages=[pb.Message(role="user", content=f"{i}")]),
                timeout=10,
            )
            await call
            trailers = dict(await call.trailing_metadata() or ())
            who = str(trailers.get("aimesh-instance", "?"))
            counts[who] = counts.get(who, 0) + 1
    return counts


MESH = """\
apiVersion: mesh.ai/v1
kind: ServiceMesh
metadata: {name: NAME}
spec:
  services:
    - name: gpt4-gateway
      loadBalancer:
        algorithm: round_robin
        healthCheck: {interval: 1s}
"""


async def test_sims_register_and_deregister_on_sigterm(mesh: Mesh) -> None:
    cp = mesh.control_plane()
    a = mesh.sim("gpt4-a", "gpt-4", "gpt4-gateway", "--zone", "z1", "--version", "v1")
    b = mesh.sim("claude-a", "claude-3-5-sonnet", "claude-gateway", "--weight", "3")

    async def count() -> int:
        return len(await instances(cp))

    for _ in range(200):
        if await count() == 2:
            break
        await asyncio.sleep(0.02)
    listed = {i.instance_id: i for i in await instances(cp)}
    assert (listed["gpt4-a"].address, listed["gpt4-a"].zone, listed["gpt4-a"].version) == (
        a.address,
        "z1",
        "v1",
    )
    assert list(listed["gpt4-a"].models) == ["gpt-4"]
    assert (listed["claude-a"].service, listed["claude-a"].weight) == ("claude-gateway", 3)
    # A health change reaches the catalog through the keep-alive stream, at once.
    async with grpc.aio.insecure_channel(a.address) as ch:
        await sim_pb2_grpc.SimControlStub(ch).SetServing(sim_pb2.SetServingRequest(serving=False))
    for _ in range(200):
        if not {i.instance_id: i for i in await instances(cp)}["gpt4-a"].serving:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the health change did not reach the catalog")
    b.popen.send_signal(signal.SIGTERM)
    assert b.popen.wait(15) == 0
    # Deregistered before it exited, not left to expire with its lease.
    assert [i.instance_id for i in await instances(cp)] == ["gpt4-a"]


async def test_proxy_reroutes_on_catalog_and_config_changes(mesh: Mesh) -> None:
    mesh.control_plane()
    a = mesh.sim("gpt4-a", "gpt-4", "gpt4-gateway")
    proxy = mesh.proxy()
    await eventually(lambda: admin(proxy, "/mesh")["catalog_version"] != 0, 10, "catalog")
    assert await served_by(proxy.address, "gpt-4", 4) == {"gpt4-a": 4}  # model from the catalog
    # A new instance gets traffic, without a restart.
    b = mesh.sim("gpt4-b", "gpt-4", "gpt4-gateway")
    await eventually(
        lambda: any(
            e["address"] == b.address
            for c in admin(proxy, "/clusters")["clusters"]  # type: ignore[union-attr]
            for e in c["endpoints"]  # type: ignore[index]
        ),
        10,
        "the new instance in the proxy",
    )
    counts = await served_by(proxy.address, "gpt-4", 20)
    assert counts.get("gpt4-b", 0) >= 5, counts
    # A removed one gets none: SIGTERM makes it deregister before it drains. (A running
    # instance deregistered by hand registers again at its next renewal, as a Consul
    # agent's anti-entropy does: running means in the catalog, unless it says it is
    # not serving.)
    a.popen.send_signal(signal.SIGTERM)
    await eventually(
        lambda: all(
            e["address"] != a.address
            for c in admin(proxy, "/clusters")["clusters"]  # type: ignore[union-attr]
            for e in c["endpoints"]  # type: ignore[index]
        ),
        10,
        "the removed instance gone",
    )
    assert await served_by(proxy.address, "gpt-4", 10) == {"gpt4-b": 10}
    # A config change applies: claude's model is routed to the gpt-4 service by a policy.
    doc = MESH.replace("NAME", "reroute") + (
        "  trafficPolicies:\n    - name: everything-to-gpt4\n"
        "      match: {models: [claude-3-5-sonnet]}\n"
        "      routes: [{destination: gpt4-gateway}]\n"
    )
    applied = mesh.cli("apply", "-f", "-", stdin=doc)
    assert applied.returncode == 0, applied.stderr
    await eventually(lambda: admin(proxy, "/clusters")["config"] == "reroute", 10, "config")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await served_by(proxy.address, "claude-3-5-sonnet", 1)
    # Routed to the gpt-4 sim, which says it does not serve that model.
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "gpt4-b" in (info.value.details() or "") or b.address in (info.value.details() or "")


async def test_control_plane_outage_under_load_fails_no_calls(mesh: Mesh) -> None:
    cp = mesh.control_plane()
    sims = [mesh.sim(f"gpt4-{i}", "gpt-4", "gpt4-gateway") for i in range(2)]
    proxy = mesh.proxy()
    applied = mesh.cli("apply", "-f", "-", stdin=MESH.replace("NAME", "steady"))
    assert applied.returncode == 0, applied.stderr
    await eventually(lambda: admin(proxy, "/clusters")["config"] == "steady", 10, "config")
    await eventually(
        lambda: (
            sum(
                len(c["endpoints"])  # type: ignore[index,arg-type]
                for c in admin(proxy, "/clusters")["clusters"]  # type: ignore[union-attr]
            )
            == 2
        ),
        10,
        "both instances",
    )
    failures: list[str] = []
    done = {"calls": 0}
    stop = asyncio.Event()

    async def load(target: str) -> None:
        async with grpc.aio.insecure_channel(target) as ch:
            stub = pb_grpc.InferenceStub(ch)
            i = 0
            while not stop.is_set():
                i += 1
                req = pb.GenerateRequest(
                    model="gpt-4", messages=[pb.Message(role="user", content=str(i))]
                )
                try:
                    if i % 2:
                        await stub.Generate(req, timeout=10)
                    else:
                        async for _ in stub.GenerateStream(req, timeout=10):
                            pass
                    done["calls"] += 1
                except grpc.aio.AioRpcError as exc:
                    failures.append(f"{exc.code().name}: {exc.details()}")

    workers = [asyncio.create_task(load(proxy.address)) for _ in range(4)]
    await eventually(lambda: done["calls"] >= 50, 20, "calls before the outage")
    cp.kill()  # SIGKILL: no goodbye to anyone
    mark = done["calls"]
    await eventually(lambda: done["calls"] >= mark + 100, 20, "calls during the outage")
    # A proxy restarted during the outage starts from its cache and serves at once.
    second = mesh.proxy(cache="cache.json")
    counts = await served_by(second.address, "gpt-4", 6)
    assert set(counts) == {"gpt4-0", "gpt4-1"}, counts  # both cached instances in rotation
    extra = [asyncio.create_task(load(second.address)) for _ in range(2)]
    mark = done["calls"]
    await eventually(lambda: done["calls"] >= mark + 100, 20, "calls on the restarted proxy")
    # The control plane comes back (same store, same port): proxies resync.
    port = cp.address.rpartition(":")[2]
    mesh.control_plane(port=int(port))
    for p in (proxy, second):
        await eventually(lambda p=p: admin(p, "/mesh")["connected"] is True, 15, "resync")  # type: ignore[misc]
    stop.set()
    await asyncio.gather(*workers, *extra)
    assert failures == []
    assert done["calls"] >= 250
    assert len(await instances(mesh.cp)) == 2  # type: ignore[arg-type]
    for s in sims:
        assert s.alive()


def test_cli_apply_get_status_and_errors(mesh: Mesh, tmp_path: Path) -> None:
    mesh.control_plane()
    mesh.sim("gpt4-a", "gpt-4", "gpt4-gateway")
    good = tmp_path / "mesh.yaml"
    good.write_text(MESH.replace("NAME", "cli"))
    r = mesh.cli("apply", "-f", str(good))
    assert (r.returncode, r.stdout.strip()) == (0, "mesh.yaml: applied as config v2")
    r = mesh.cli("apply", "-f", str(good))
    assert "unchanged (identical to live config v2)" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(MESH.replace("NAME", "Bad Name").replace("round_robin", "fastest"))
    r = mesh.cli("apply", "-f", str(bad))
    assert r.returncode == 1
    assert "rejected, the live config is unchanged" in r.stderr
    assert "bad.yaml: 2 error(s)" in r.stderr
    assert "metadata.name" in r.stderr and "loadBalancer.algorithm" in r.stderr
    r = mesh.cli("get", "config")
    assert r.returncode == 0 and "# config v2 (cli) from mesh.yaml" in r.stdout
    r = mesh.cli("get", "services")
    assert r.stdout.split("\n")[1].split() == ["gpt4-gateway", "1", "1", "gpt-4", "-"]
    r = mesh.cli("get", "instances", "-o", "json")
    assert json.loads(r.stdout)["instances"][0]["instanceId"] == "gpt4-a"
    r = mesh.cli("status")
    assert r.returncode == 0
    assert r.stdout.startswith("1 Healthy · 1 Services · ")
    assert "gpt4-gateway  1/1" in r.stdout
    static = mesh.cli("deregister", "gpt4-gateway", "gpt4-a")
    assert static.returncode == 0 and "deregistered gpt4-gateway/gpt4-a" in static.stdout
    r = mesh.cli("deregister", "gpt4-gateway", "nope")
    assert r.returncode == 1 and "NOT_FOUND: no registered instance gpt4-gateway/nope" in r.stderr
    r = mesh.cli("deregister")
    assert r.returncode == 2
    r = subprocess.run(
        procs.aimesh_command("status", "--control-plane", "127.0.0.1:1", "--timeout", "1"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 3
    assert "cannot reach the control plane at 127.0.0.1:1" in r.stderr
    assert "aimesh control-plane" in r.stderr  # what to do about it


async def test_dns_answers_from_the_live_catalog(mesh: Mesh) -> None:
    cp = mesh.control_plane("--dns", "127.0.0.1:0", "--mesh-domain", "mesh.test")
    line = procs.wait_for_output(cp, "dns on")
    dns_port = int(line.split("dns on ", 1)[1].split(" ")[0].rpartition(":")[2])
    sims = [mesh.sim(f"llama-{i}", "llama-3-8b", "custom-llm") for i in range(2)]
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = dns_port
    for _ in range(200):
        if len(await instances(cp)) == 2:
            break
        await asyncio.sleep(0.02)
    srv = await resolver.resolve("_grpc._tcp.custom-llm.mesh.test", "SRV")
    ports = sorted(r.port for r in srv)  # type: ignore[attr-defined]
    assert ports == sorted(int(s.address.rpartition(":")[2]) for s in sims)
    a = await resolver.resolve("custom-llm.mesh.test", "A")
    assert {r.address for r in a} == {"127.0.0.1"}  # type: ignore[attr-defined]
    sims[0].popen.send_signal(signal.SIGTERM)
    sims[0].popen.wait(15)
    srv = await resolver.resolve("custom-llm.mesh.test", "SRV")
    assert [r.port for r in srv] == [int(sims[1].address.rpartition(":")[2])]  # type: ignore[attr-defined]
    with pytest.raises(dns.resolver.NXDOMAIN):
        await resolver.resolve("nope.mesh.test", "A")


def test_proxy_needs_a_config_or_a_control_plane() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "aimesh.mesh.cli", "proxy", "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2
    assert "give --config FILE, --control-plane ADDR, or both" in r.stderr
