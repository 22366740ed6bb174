"""Node.js `@grpc/grpc-js` with `@grpc/grpc-js-xds` proxyless on aimesh's ADS, end to end on
127.0.0.1: a real control plane, sims that register themselves, and tests/node/client.js
dialing `xds:///gpt4-gateway` with the bootstrap `aimesh xds bootstrap --for grpc` writes.

The client routes unary calls and token streams, lands the 90/10 canary split, stops
calling an endpoint the registry marks unhealthy within a second, keeps routing when the
control plane is killed and resyncs when it is back, and with `load_aware` (and
GRPC_EXPERIMENTAL_XDS_WRR_LB=true) lets ORCA reports steer calls away from a busy backend;
without that switch the cluster falls back to round_robin.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from . import xds_support
from .node_client import CallRecord, NodeClient, require_client, run_calls
from .xds_support import CANARY, STABLE, XdsMesh, canary, canary_mesh, share, within_points

pytestmark = pytest.mark.slow

xds_mesh = xds_support.xds_mesh  # the fixture: a control plane and its sims

TARGET = "xds:///gpt4-gateway"


@pytest.fixture(scope="module", autouse=True)
def node_client() -> str:
    return require_client()


# -- helpers ----------------------------------------------------------------------------


def now_ms() -> float:
    return time.time() * 1000  # the clock client.js stamps records with (Date.now())


def env_for(mesh: XdsMesh, node: str = "node-proxyless", **extra: str) -> dict[str, str]:
    return {"GRPC_XDS_BOOTSTRAP": str(mesh.grpc_bootstrap(node)), **extra}


def served(records: list[CallRecord]) -> Counter[str]:
    """Who served the calls: the instance for successes, `error:CODE` for failures."""
    return Counter((r.instance or "?") if r.ok else f"error:{r.code}" for r in records)


def errors(records: list[CallRecord]) -> list[tuple[int, str | None]]:
    return [(r.code, r.details) for r in records if not r.ok]


def wait_until(client: NodeClient, check: Callable[[], object], timeout: float, what: str) -> float:
    """Polls `check()` while the client runs; the seconds it took."""
    t0 = time.monotonic()
    while not check():
        if not client.alive():
            raise AssertionError(f"client.js exited waiting for {what}:\n{client.stderr}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError(
                f"timed out after {timeout:g}s waiting for {what}; last calls: "
                f"{dict(served(client.records[-50:]))}\n{client.stderr[-2000:]}"
            )
        time.sleep(0.02)
    return time.monotonic() - t0


def recent(client: NodeClient, seconds: float) -> Counter[str]:
    return served(client.records_since(now_ms() - seconds * 1000))


@pytest.fixture
def continuous() -> Iterator[list[NodeClient]]:
    """Clients started in a test are killed at its end, whatever happened."""
    started: list[NodeClient] = []
    try:
        yield started
    finally:
        for c in started:
            c.kill()


def start(
    started: list[NodeClient], mesh: XdsMesh, node: str = "node-proxyless", **options: object
) -> NodeClient:
    options.setdefault("concurrency", 4)
    options.setdefault("interval_ms", 2)
    client = NodeClient.start(TARGET, env=env_for(mesh, node), **options)  # type: ignore[arg-type]
    started.append(client)
    client.wait_ready(30)
    return client


# -- tests ------------------------------------------------------------------------------


def test_unary_and_streaming_calls_land_on_the_90_10_split(xds_mesh: XdsMesh) -> None:
    canary_mesh(xds_mesh)
    env = env_for(xds_mesh)

    # Token streams: each completes with its 4 tokens, on one of the split's services.
    streams = run_calls(
        TARGET, 20, env, method="GenerateStream", concurrency=4, wait_for_ready=True
    )
    assert streams.errors == {}, streams.stderr
    assert set(streams.counts) <= {"stable-1", "canary-1"}
    assert all(r.tokens == 4 and r.chunks == 4 for r in streams.records)

    # Unary: 2,000 calls, 8 at a time, land 90/10 within 2 points.
    t0 = time.monotonic()
    split = run_calls(TARGET, 2000, env, concurrency=8, wait_for_ready=True, timeout=80)
    took = time.monotonic() - t0
    print(f"\ngrpc-js 90/10 over 2,000 unary calls ({took:.1f}s): {split.counts}")
    assert split.errors == {}, split.stderr
    assert split.ok_calls == 2000 and set(split.counts) == {"stable-1", "canary-1"}
    assert within_points(split.counts, {"stable-1": 90, "canary-1": 10}), split.counts


async def test_an_unhealthy_endpoint_gets_no_new_calls_within_a_second(
    xds_mesh: XdsMesh,
    continuous: list[NodeClient],
) -> None:
    for name in ("s1", "s2"):
        xds_mesh.sim(name, STABLE)  # the service's own virtual host: no config needed
    xds_mesh.wait_healthy("s1", "s2")
    client = start(continuous, xds_mesh)
    wait_until(client, lambda: {"s1", "s2"} <= set(recent(client, 0.5)), 15, "both sims")

    # The sim's health switch: it tells the control plane, EDS marks it UNHEALTHY, and
    # grpc-js stops picking it. The time from the switch to the end of the last call s2
    # served (an end time: at most the call's few ms later than its start).
    switched = now_ms()
    await xds_mesh.set_serving("s2", False)

    def quiet() -> bool:  # s2 has served nothing for 1.5 s
        last_s2 = max((r.t for r in client.records if r.instance == "s2"), default=0.0)
        return now_ms() - max(switched, last_s2) > 1500

    await asyncio.to_thread(wait_until, client, quiet, 8, "s2 to stop getting calls")
    last_s2 = max(r.t for r in client.records if r.instance == "s2")
    gone_ms = last_s2 - switched
    after = served(client.records_since(switched))
    print(f"\ns2 unhealthy -> its last call ended {gone_ms:.0f} ms later; since: {dict(after)}")
    assert gone_ms < 1000
    assert after["s1"] > 100, after  # the rest of the traffic went on, to s1

    # Serving again: it comes back.
    back = now_ms()
    await xds_mesh.set_serving("s2", True)
    took = await asyncio.to_thread(
        wait_until,
        client,
        lambda: any(r.instance == "s2" for r in client.records_since(back)),
        8,
        "s2 to get calls again",
    )
    print(f"s2 serving again -> calls after {took * 1e3:.0f} ms")
    summary = client.stop()
    assert summary.errors == {}, errors(summary.records)[:5]


@pytest.fixture
def persistent_mesh(tmp_path: Path) -> Iterator[XdsMesh]:
    """A control plane on a sqlite store: catalog, leases and config survive a restart.
    (The memory store restarts empty and answers the client before the sims re-register:
    its route table then has no `gpt4-gateway` host, and calls fail for a moment.)"""
    mesh = XdsMesh(tmp_path, store=f"sqlite:{tmp_path / 'cp.db'}")
    try:
        yield mesh
    finally:
        mesh.kill()


def test_keeps_routing_without_the_control_plane_and_resyncs(
    persistent_mesh: XdsMesh, continuous: list[NodeClient]
) -> None:
    mesh = persistent_mesh
    canary_mesh(mesh)
    client = start(continuous, mesh)
    wait_until(
        client, lambda: {"stable-1", "canary-1"} <= set(recent(client, 1.0)), 15, "both services"
    )
    assert any(s["node"] == "node-proxyless" for s in mesh.xds_state()["streams"])

    # SIGKILL the control plane: the client keeps the resources it has and keeps routing
    # the split.
    killed = now_ms()
    mesh.cp.kill()
    wait_until(client, lambda: len(client.records_since(killed)) >= 500, 20, "500 calls")
    down = client.records_since(killed)
    print(f"\ncontrol plane down: {dict(served(down))} over {len(down)} calls")
    assert not errors(down), errors(down)[:5]
    assert abs(share(served(down), ["canary-1"]) - 10) <= 5, served(down)

    # Back on the same port, with what it had: the client's ADS stream comes back on its
    # own (reconnect backoff), then a new split and a newly registered sim reach it.
    restarted = now_ms()
    mesh.restart_control_plane()
    wait_until(
        client,
        lambda: any(s["node"] == "node-proxyless" for s in mesh.xds_state()["streams"]),
        30,
        "the client's ADS stream on the restarted control plane",
    )
    reconnected = now_ms()
    mesh.apply(canary(0, 100))
    applied = now_ms()
    wait_until(client, lambda: set(recent(client, 0.3)) == {"canary-1"}, 10, "the 0/100 split")
    moved = now_ms()
    mesh.sim("canary-2", CANARY)
    mesh.wait_healthy("canary-2")
    joined = now_ms()
    wait_until(
        client,
        lambda: "canary-2" in served(client.records_since(joined)),
        10,
        "calls on the new instance canary-2",
    )
    reached = now_ms()
    summary = client.stop()
    print(
        f"restart -> ADS stream back after {reconnected - restarted:.0f} ms; "
        f"0/100 applied -> all calls on canary-1 after {moved - applied:.0f} ms; "
        f"canary-2 healthy -> its first call after {reached - joined:.0f} ms; "
        f"calls since the restart: {dict(served(client.records_since(restarted)))}"
    )
    assert summary.errors == {}, errors(summary.records)[:5]


def test_orca_reports_steer_weighted_round_robin(xds_mesh: XdsMesh) -> None:
    """Two sims with the same speed; `busy` has 1 slot where `calm` has 16, so under the
    same load it reports a far higher application_utilization (active / slots). CSWRR
    weighs an endpoint by qps / utilization (gRFC A58): busy gets clearly less.

    The cluster is `load_aware`: wrr_locality with client_side_weighted_round_robin, then
    round_robin. grpc-js only knows CSWRR with GRPC_EXPERIMENTAL_XDS_WRR_LB=true; without
    it the same cluster falls back to round_robin, the comparison."""
    pace = ("--tps", "200")  # 4 tokens: 20 ms a call, so slots fill up
    xds_mesh.sim("calm", STABLE, "--slots", "16", *pace)
    xds_mesh.sim("busy", STABLE, "--slots", "1", *pace)
    xds_mesh.apply(canary(100, 0, algorithm="load_aware"))
    xds_mesh.wait_healthy("calm", "busy")

    plain = run_calls(TARGET, 400, env_for(xds_mesh), concurrency=8, wait_for_ready=True)
    assert plain.errors == {}, plain.stderr
    rr_busy = share(plain.counts, ["busy"])

    # AIMESH_CACHE_ORCA_PROTO: client.js parses grpc-js's orca.proto once, not at every
    # call's end (a grpc-js 1.14.7 bug that costs tens of ms of CPU a call; see client.js).
    wrr = run_calls(
        TARGET,
        800,
        env_for(xds_mesh, GRPC_EXPERIMENTAL_XDS_WRR_LB="true", AIMESH_CACHE_ORCA_PROTO="1"),
        concurrency=8,
        wait_for_ready=True,
    )
    assert wrr.errors == {}, wrr.stderr
    # Weights count after 1 s of reports (the blackout period aimesh sends): look at the
    # calls after the first second and a half.
    settled_from = wrr.records[0].t + 1500
    settled = served([r for r in wrr.records if r.t >= settled_from])
    wrr_busy = share(settled, ["busy"])
    print(
        f"\nround_robin fallback: busy {rr_busy:.1f}% of {plain.counts}; "
        f"CSWRR (ORCA): busy {share(wrr.counts, ['busy']):.1f}% overall {wrr.counts}, "
        f"{wrr_busy:.1f}% once weighted {dict(settled)}"
    )
    assert 40 <= rr_busy <= 60, plain.counts
    assert sum(settled.values()) > 200, settled
    assert wrr_busy < 25 and wrr_busy < rr_busy / 2, settled
