"""Real processes for the xDS tests: a control plane, self-registering sims, and the
bootstrap files that put Envoy, grpcio and grpc-js on it."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from aimesh.mesh import procs
from aimesh.mesh.control.xds.bootstrap import envoy_bootstrap, grpc_bootstrap
from aimesh.sim.v1 import sim_pb2, sim_pb2_grpc

INSTANCE_TRAILER = "aimesh-instance"

CANARY_YAML = """apiVersion: mesh.ai/v1
kind: ServiceMesh
metadata: {{name: xds-test}}
spec:
  services:
    - name: gpt4-gateway
      models: [gpt-4]
      loadBalancer: {{algorithm: {algorithm}}}
    - name: gpt4-gateway-v2
  trafficPolicies:
    - name: canary
      routes:
        - {{destination: gpt4-gateway, weight: {stable}}}
        - {{destination: gpt4-gateway-v2, weight: {canary}}}
"""


STABLE, CANARY = "gpt4-gateway", "gpt4-gateway-v2"


def canary_mesh(mesh: XdsMesh, stable: int = 90, canary_weight: int = 10) -> None:
    """Sims stable-1 (gpt4-gateway) and canary-1 (gpt4-gateway-v2), the split applied,
    both healthy in the catalog."""
    mesh.sim("stable-1", STABLE)
    mesh.sim("canary-1", CANARY)
    mesh.apply(canary(stable, canary_weight))
    mesh.wait_healthy("stable-1", "canary-1")


def canary(stable: int = 90, canary: int = 10, algorithm: str = "round_robin") -> str:
    """The reference canary split: xds:///gpt4-gateway (and Envoy's gateway) send
    `stable`% to gpt4-gateway and `canary`% to gpt4-gateway-v2."""
    return CANARY_YAML.format(stable=stable, canary=canary, algorithm=algorithm)


class XdsMesh:
    """A control plane (memory store) and sims registered to it; every process is killed
    at the end of the test whatever happened."""

    def __init__(self, tmp: Path, store: str = "memory") -> None:
        self.tmp = tmp
        self.store = store  # sqlite:PATH: catalog and config survive restart_control_plane
        self.procs: list[procs.Proc] = []
        self.sims: dict[str, procs.Proc] = {}
        self.cp = self._control_plane()

    def _control_plane(self, port: int = 0) -> procs.Proc:
        cp = procs.start_control_plane("--listen", f"127.0.0.1:{port}", store=self.store)
        self.procs.append(cp)
        return cp

    def restart_control_plane(self) -> None:
        """The same port again (clients reconnect to it), an empty catalog until the sims
        renew (they re-register on NOT_FOUND)."""
        port = int(self.cp.address.rpartition(":")[2])
        self.cp = self._control_plane(port)

    @property
    def admin_url(self) -> str:
        return procs.admin_url(self.cp)

    def xds_state(self) -> dict[str, Any]:
        """The control plane's /xds page: flavors, streams, what each node ACKed."""
        with urllib.request.urlopen(self.admin_url + "/xds", timeout=5) as r:
            state: dict[str, Any] = json.load(r)
            return state

    def topology(self) -> dict[str, Any]:
        """The control plane's /topology page: services and their instances."""
        with urllib.request.urlopen(self.admin_url + "/topology", timeout=5) as r:
            state: dict[str, Any] = json.load(r)
            return state

    def healthy_instances(self) -> set[str]:
        """The instance ids the control plane has registered and healthy."""
        return {
            inst["instanceId"]
            for svc in self.topology()["services"]
            for inst in svc["instances"]
            if inst["healthy"]
        }

    def wait_healthy(self, *names: str, timeout: float = 15.0) -> None:
        """Waits until every instance in `names` is registered and healthy."""

        def healthy() -> bool:
            try:
                return set(names) <= self.healthy_instances()
            except OSError:  # the control plane is (re)starting
                return False

        wait_for(healthy, timeout, f"instances {sorted(names)} registered and healthy")

    def sim(self, name: str, service: str, *extra: str, model: str = "gpt-4") -> procs.Proc:
        p = procs.start_sim(
            name,
            [model],
            *("--ttft", "0", "--tps", "0", "--length", "4-4", *extra),
            control_plane=self.cp.address,
            service=service,
        )
        self.procs.append(p)
        self.sims[name] = p
        return p

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            procs.aimesh_command(*args, "--control-plane", self.cp.address),
            capture_output=True,
            text=True,
            input=stdin,
            timeout=30,
        )
        return r

    def apply(self, document: str) -> None:
        r = self.cli("apply", "-f", "-", stdin=document)
        assert r.returncode == 0, r.stderr

    async def set_serving(self, name: str, serving: bool) -> None:
        """The sim's own health switch: it tells the control plane over its keep-alive,
        and EDS marks the endpoint UNHEALTHY."""
        async with grpc.aio.insecure_channel(self.sims[name].address) as ch:
            await sim_pb2_grpc.SimControlStub(ch).SetServing(
                sim_pb2.SetServingRequest(serving=serving), timeout=5
            )

    def grpc_bootstrap(self, node: str = "proxyless") -> Path:
        path = self.tmp / f"{node}.bootstrap.json"
        path.write_text(json.dumps(grpc_bootstrap(node, [self.cp.address])))
        return path

    def envoy_bootstrap(self, node: str = "envoy") -> dict[str, Any]:
        return envoy_bootstrap(node, [self.cp.address], listen="127.0.0.1:0", admin="127.0.0.1:0")

    def kill(self) -> None:
        for p in self.procs:
            p.kill()


@pytest.fixture
def xds_mesh(tmp_path: Path) -> Iterator[XdsMesh]:
    m = XdsMesh(tmp_path)
    try:
        yield m
    finally:
        m.kill()


def within_points(counts: Counter[str] | dict[str, int], expected: dict[str, float]) -> bool:
    """Whether each instance's share is within 2 percentage points of `expected`."""
    total = sum(counts.values())
    return all(abs(100 * counts.get(k, 0) / total - v) <= 2.0 for k, v in expected.items())


def share(counts: Counter[str] | dict[str, int], names: Sequence[str]) -> float:
    total = sum(counts.values())
    return 100 * sum(counts.get(n, 0) for n in names) / total if total else 0.0


def wait_for(check: Callable[[], object], timeout: float, what: str) -> float:
    """Polls `check()` until it is truthy; the seconds it took. Fails after `timeout`."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - t0


def served(records: Iterable[Any]) -> Counter[str]:
    """Successful calls per instance, from client call records (tests/node_client.py's
    CallRecord: `.ok`, `.instance`)."""
    return Counter(r.instance or "?" for r in records if r.ok)
