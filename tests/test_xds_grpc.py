"""grpcio's built-in xDS client, proxyless, on aimesh's ADS, end to end on 127.0.0.1: a real
control plane, sims that register themselves, and grpcio clients dialing
`xds:///gpt4-gateway` with a bootstrap from `grpc_bootstrap()`.

grpcio's xDS client is process-global and reads GRPC_XDS_BOOTSTRAP once, so every client
runs in its own process (tests/xds_grpc_client.py) and reports each call as a JSON line
(end time, the `aimesh-instance` trailer, status). The client routes unary calls and
token streams, lands the 90/10 canary split, follows weight changes and endpoint health
live, keeps routing while the control plane is down and resyncs when it is back.
(ORCA-driven weighted round robin, for grpcio and Envoy: tests/test_xds_orca.py.)
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from . import xds_support
from .node_client import CallRecord
from .xds_grpc_client import GrpcClient, run_calls
from .xds_support import (
    STABLE,
    XdsMesh,
    canary,
    canary_mesh,
    served,
    share,
    wait_for,
    within_points,
)

pytestmark = pytest.mark.slow

xds_mesh = xds_support.xds_mesh  # the fixture: a control plane and its sims

TARGET = "xds:///gpt4-gateway"


# -- helpers ----------------------------------------------------------------------------


def now_ms() -> float:
    return time.time() * 1000


def failed(records: Iterable[CallRecord]) -> list[CallRecord]:
    return [r for r in records if not r.ok]


def last(client: GrpcClient, n: int, since_ms: float = 0.0) -> list[CallRecord]:
    """The last `n` calls that ended at or after `since_ms` (fewer if there are not yet)."""
    return client.records_since(since_ms)[-n:]


def proxyless(mesh: XdsMesh, node: str = "proxyless", **options: Any) -> GrpcClient:
    """A grpcio client on xds:///gpt4-gateway, calling until stopped (4 at a time)."""
    options.setdefault("concurrency", 4)
    client = GrpcClient.start(
        TARGET, env={"GRPC_XDS_BOOTSTRAP": str(mesh.grpc_bootstrap(node))}, **options
    )
    try:
        client.wait_ready(20)
    except BaseException:
        client.kill()
        raise
    return client


# -- tests ------------------------------------------------------------------------------


def test_unary_and_streaming_calls_land_on_the_90_10_split(xds_mesh: XdsMesh) -> None:
    canary_mesh(xds_mesh)
    env = {"GRPC_XDS_BOOTSTRAP": str(xds_mesh.grpc_bootstrap())}

    # Token streams: every one completes, with its tokens, on one of the two services.
    streams = run_calls(TARGET, 40, env, method="GenerateStream", concurrency=4)
    assert streams.errors == {}, streams.stderr
    assert streams.ok_calls == 40 and set(streams.counts) <= {"stable-1", "canary-1"}
    for r in streams.records:
        assert r.tokens == 4 and r.chunks is not None and 1 <= r.chunks <= 4, r

    # Unary calls: 2,000 land 90/10 within 2 points.
    unary = run_calls(TARGET, 2000, env, concurrency=8)
    assert unary.errors == {}, unary.stderr
    assert unary.ok_calls == 2000 and set(unary.counts) == {"stable-1", "canary-1"}
    canary_share = share(unary.counts, ["canary-1"])
    print(f"\ngrpcio proxyless, 2000 unary calls: {unary.counts} (canary {canary_share:.1f}%)")
    assert within_points(unary.counts, {"stable-1": 90, "canary-1": 10}), unary.counts


def test_follows_weight_changes_live(xds_mesh: XdsMesh) -> None:
    canary_mesh(xds_mesh)
    client = proxyless(xds_mesh)
    try:
        wait_for(
            lambda: {"stable-1", "canary-1"} <= set(served(client.records)), 10, "both services"
        )

        t, t0 = now_ms(), time.monotonic()
        xds_mesh.apply(canary(50, 50))
        wait_for(
            lambda: (
                len(window := last(client, 200, t)) == 200
                and 40 <= share(served(window), ["canary-1"]) <= 60
            ),
            15,
            "the 50/50 split",
        )
        half = time.monotonic() - t0

        t, t0 = now_ms(), time.monotonic()
        xds_mesh.apply(canary(0, 100))
        wait_for(
            lambda: (
                len(window := last(client, 100, t)) == 100
                and served(window) == Counter({"canary-1": 100})
            ),
            15,
            "every call on the canary",
        )
        switch = time.monotonic() - t0
        # And it stays there.
        t_all = now_ms()
        wait_for(lambda: len(client.records_since(t_all)) >= 300, 15, "300 more calls")
        after = served(client.records_since(t_all))
    finally:
        summary = client.stop()
    print(f"\n90/10 -> 50/50 in {half:.2f}s, -> 0/100 in {switch:.2f}s (CLI apply included)")
    assert set(after) == {"canary-1"}, after
    assert summary.errors == {}, summary.stderr


def test_unhealthy_endpoint_gets_no_new_calls_within_a_second(xds_mesh: XdsMesh) -> None:
    xds_mesh.sim("stable-1", STABLE)
    xds_mesh.sim("stable-2", STABLE)
    xds_mesh.apply(canary(100, 0))
    xds_mesh.wait_healthy("stable-1", "stable-2")
    client = proxyless(xds_mesh)
    try:
        wait_for(
            lambda: {"stable-1", "stable-2"} <= set(served(client.records)), 10, "both endpoints"
        )

        switch = now_ms()
        asyncio.run(xds_mesh.set_serving("stable-2", False))
        # Continuous load for 1.5 s past the switch (and enough calls to tell).
        wait_for(lambda: len(client.records_since(switch + 1500)) >= 100, 15, "1.5 s of load after")
        gap = max(r.t for r in client.records if r.ok and r.instance == "stable-2") - switch
        after = served(client.records_since(switch + 1000))

        # Serving again: it is back in rotation.
        back = now_ms()
        asyncio.run(xds_mesh.set_serving("stable-2", True))
        wait_for(lambda: "stable-2" in served(client.records_since(back)), 10, "stable-2 back")
        rejoin = (
            min(r.t for r in client.records_since(back) if r.instance == "stable-2") - back
        ) / 1000
    finally:
        summary = client.stop()
    print(
        f"\nstable-2 SetServing(false) -> its last call ended {gap:.0f} ms later; "
        f"its first call again {rejoin:.2f}s after SetServing(true)"
    )
    assert gap < 1000, f"stable-2 still served calls {gap:.0f} ms after it went unhealthy"
    assert set(after) == {"stable-1"} and after["stable-1"] >= 50, after
    assert summary.errors == {}, summary.stderr


@pytest.fixture
def persistent_mesh(tmp_path: Path) -> Iterator[XdsMesh]:
    """A control plane on a sqlite store: catalog, leases and config survive a restart.
    (With the memory store a restart starts empty, and lease ids start again at 1: a sim
    renewing its old lease may renew another's and never register again.)"""
    mesh = XdsMesh(tmp_path, store=f"sqlite:{tmp_path / 'cp.db'}")
    try:
        yield mesh
    finally:
        mesh.kill()


def test_keeps_routing_without_the_control_plane_and_resyncs(persistent_mesh: XdsMesh) -> None:
    xds_mesh = persistent_mesh
    canary_mesh(xds_mesh)
    client = proxyless(xds_mesh)
    try:
        wait_for(
            lambda: {"stable-1", "canary-1"} <= set(served(client.records)), 10, "both services"
        )

        # The control plane dies: the client routes on what it has, split and all.
        killed = now_ms()
        xds_mesh.cp.kill()
        wait_for(lambda: len(client.records_since(killed)) >= 500, 20, "500 calls after")
        outage = client.records_since(killed)
        assert failed(outage) == [], failed(outage)[:5]
        print(f"\ncontrol plane down: {served(outage)} over {len(outage)} calls")
        assert abs(share(served(outage), ["canary-1"]) - 10) <= 5, served(outage)

        # Back on the same port, with what it had (the sqlite store); a new split and a
        # new sim then reach the client.
        restarted = now_ms()
        xds_mesh.restart_control_plane()
        # The client's ADS stream comes back on its own (gRPC's reconnect backoff).
        wait_for(
            lambda: any(st["node"] == "proxyless" for st in xds_mesh.xds_state()["streams"]),
            30,
            "the client's ADS stream on the new control plane",
        )
        reconnected = now_ms()
        xds_mesh.apply(canary(50, 50))
        xds_mesh.sim("stable-2", STABLE)
        xds_mesh.wait_healthy("stable-1", "canary-1", "stable-2")
        synced = now_ms()
        wait_for(
            lambda: (
                len(window := last(client, 300, synced)) == 300
                and set(served(window)) == {"stable-1", "stable-2", "canary-1"}
                and abs(share(served(window), ["canary-1"]) - 50) <= 10
            ),
            15,
            "the 50/50 split over three instances",
        )
        converged = now_ms()
        split = served(last(client, 300, synced))
    finally:
        summary = client.stop()
    print(
        f"resync: ADS stream back {(reconnected - restarted) / 1000:.2f}s after the restart; "
        f"50/50 over three sims {(converged - synced) / 1000:.2f}s after stable-2 registered: "
        f"{dict(split)}"
    )
    assert summary.errors == {}, (summary.errors, summary.stderr)
