"""ORCA load reports drive weighted round robin in both xDS consumers that balance on them:
grpcio proxyless (client_side_weighted_round_robin inside wrr_locality) and Envoy 1.40
(client_side_weighted_round_robin as the cluster's load_balancing_policy).

Two sims serve gpt4-gateway with the same latency; `busy` has one slot where `fast` has
four, so under the same load its per-call `endpoint-load-metrics-bin` trailer reports a
higher application_utilization (active / slots) for the same rps. CSWRR weighs an endpoint
by rps / utilization (gRFC A58), so once `loadBalancer.algorithm` turns `load_aware` the
busy sim gets clearly less than the half it gets under round_robin. One closed-loop client
(8 calls in flight, in its own process) runs through both phases of each test.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from bench.envoy import Envoy, EnvoyNotFound, envoy_binary

from . import xds_support
from .xds_grpc_client import GrpcClient
from .xds_support import XdsMesh, canary, served, share, wait_for

pytestmark = pytest.mark.slow

xds_mesh = xds_support.xds_mesh  # the fixture: a control plane and its sims

SERVICE = "gpt4-gateway"
MEASURE = 2.0  # seconds of load each share is measured over


def two_sims(mesh: XdsMesh) -> None:
    mesh.sim("fast", SERVICE, "--ttft", "20ms")
    mesh.sim("busy", SERVICE, "--ttft", "20ms", "--slots", "1")
    mesh.apply(canary(100, 0, algorithm="round_robin"))
    mesh.wait_healthy("fast", "busy")


def busy_share(client: GrpcClient, since_ms: float, until_ms: float | None = None) -> float:
    counts = served(r for r in client.records_since(since_ms) if until_ms is None or r.t < until_ms)
    return share(counts, ["busy"])


def measure(client: GrpcClient) -> Counter[str]:
    """Who served the calls that ended in the next MEASURE seconds."""
    t0 = time.time() * 1000
    end = t0 + MEASURE * 1000
    wait_for(lambda: bool(client.records_since(end)), MEASURE + 10, "the measuring window")
    return served(r for r in client.records_since(t0) if r.t < end)


def round_robin_then_load_aware(mesh: XdsMesh, client: GrpcClient, who: str) -> None:
    """Shares under round_robin, then (applied live) under load_aware; asserts the drop."""
    try:
        client.wait_ready(20)
        wait_for(lambda: {"fast", "busy"} <= set(served(client.records)), 10, "both sims")
        rr = measure(client)

        applied = time.time() * 1000
        mesh.apply(canary(100, 0, algorithm="load_aware"))
        # Weights count after a 1 s blackout of reports (resources.WRR_BLACKOUT): wait for
        # a second of calls in which the busy sim's share has clearly fallen.
        took = wait_for(
            lambda: (
                (now := time.time() * 1000) - applied > 1000 and busy_share(client, now - 1000) < 35
            ),
            20,
            "the busy sim's share to fall under load_aware",
        )
        wrr = measure(client)
    finally:
        summary = client.stop()
    rr_busy, wrr_busy = share(rr, ["busy"]), share(wrr, ["busy"])
    print(
        f"\n{who}: busy share {rr_busy:.1f}% under round_robin {dict(rr)}, "
        f"{wrr_busy:.1f}% under load_aware {dict(wrr)} ({took:.1f}s to settle)"
    )
    assert summary.errors == {}, summary.stderr
    assert sum(rr.values()) >= 50 and sum(wrr.values()) >= 50, (rr, wrr)
    assert 40 <= rr_busy <= 60, rr
    assert wrr_busy <= 35 and wrr_busy <= rr_busy - 15, (rr, wrr)


def test_orca_reports_drive_grpcio_weighted_round_robin(xds_mesh: XdsMesh) -> None:
    two_sims(xds_mesh)
    client = GrpcClient.start(
        f"xds:///{SERVICE}",
        env={"GRPC_XDS_BOOTSTRAP": str(xds_mesh.grpc_bootstrap("orca"))},
        concurrency=8,
    )
    round_robin_then_load_aware(xds_mesh, client, "grpcio proxyless")


@contextlib.contextmanager
def envoy_on(mesh: XdsMesh) -> Iterator[Envoy]:
    try:
        envoy_binary()
    except EnvoyNotFound as e:
        pytest.skip(f"no envoy binary: {e}")
    with Envoy(config=mesh.envoy_bootstrap("envoy-orca")) as proxy:
        yield proxy


def test_orca_reports_drive_envoy_client_side_weighted_round_robin(xds_mesh: XdsMesh) -> None:
    two_sims(xds_mesh)
    with envoy_on(xds_mesh) as proxy:
        client = GrpcClient.start(proxy.address, concurrency=8)
        round_robin_then_load_aware(xds_mesh, client, "envoy")
        stats = proxy.stats(f"cluster.{SERVICE}.")
    assert stats.get(f"cluster.{SERVICE}.upstream_rq_total", 0) > 0, stats
