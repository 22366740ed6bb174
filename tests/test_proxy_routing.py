"""Routing by model, header, method and weight; backups; health and passive ejection."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import grpc
import grpc.aio
import pytest
import yaml

from aimesh.inference.v1 import inference_pb2 as pb
from aimesh.inference.v1 import inference_pb2_grpc as pb_grpc
from aimesh.mesh.proxy.cluster import EndpointAddr
from aimesh.mesh.proxy.server import Proxy
from aimesh.mesh.sim.faults import Faults
from aimesh.sim.v1 import sim_pb2, sim_pb2_grpc

from .support import SimFactory, eventually, llm_mesh, mesh_doc, prompt
from .support import endpoint as addr

ROOT = Path(__file__).resolve().parents[1]


async def served_by(
    proxy: Proxy,
    n: int,
    req: pb.GenerateRequest | None = None,
    metadata: tuple[tuple[str, str], ...] = (),
    concurrency: int = 25,
) -> Counter[str]:
    """Sends n unary calls through the proxy; counts the aimesh-instance of each answer."""
    counts: Counter[str] = Counter()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.ports['listen']}") as ch:
        stub = pb_grpc.InferenceStub(ch)

        async def one() -> None:
            call = stub.Generate(req or prompt(max_tokens=1), metadata=metadata)
            await call
            counts[dict(await call.trailing_metadata())["aimesh-instance"]] += 1

        for start in range(0, n, concurrency):
            await asyncio.gather(*(one() for _ in range(min(concurrency, n - start))))
    return counts


async def test_model_routes_to_the_service_that_serves_it(make_proxy, make_sim: SimFactory) -> None:  # type: ignore[no-untyped-def]
    gpt, claude = await make_sim(instance_id="gpt"), await make_sim(instance_id="claude")
    proxy = await make_proxy(
        mesh_doc(
            [
                {"name": "gpt4-gateway", "models": ["gpt-4"]},
                {"name": "claude-gateway", "models": ["claude-3-5-sonnet"]},
            ]
        ),
        extra={"gpt4-gateway": [addr(gpt)], "claude-gateway": [addr(claude)]},
    )
    assert await served_by(proxy, 10, prompt(model="gpt-4", max_tokens=1)) == {"gpt": 10}
    assert await served_by(proxy, 10, prompt(model="claude-3-5-sonnet", max_tokens=1)) == {
        "claude": 10
    }
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.ports['listen']}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.InferenceStub(ch).Generate(prompt(model="gpt-9"))
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "no route for model 'gpt-9'" in (info.value.details() or "")


async def test_header_cohort_and_method_matches(make_proxy, make_sim: SimFactory) -> None:  # type: ignore[no-untyped-def]
    a, b, s = [await make_sim(instance_id=i) for i in ("a", "b", "s")]
    proxy = await make_proxy(
        mesh_doc(
            [{"name": "arm-a", "models": ["gpt-4"]}, {"name": "arm-b"}, {"name": "streams"}],
            [
                {
                    "name": "cohort-b",
                    "match": {"headers": {"x-cohort": "b"}},
                    "routes": [{"destination": "arm-b"}],
                },
                {
                    "name": "streaming",
                    "match": {
                        "service": "aimesh.inference.v1.Inference",
                        "method": "GenerateStream",
                    },
                    "routes": [{"destination": "streams"}],
                },
            ],
        ),
        extra={"arm-a": [addr(a)], "arm-b": [addr(b)], "streams": [addr(s)]},
    )
    assert await served_by(proxy, 10) == {"a": 10}
    assert await served_by(proxy, 10, metadata=(("x-cohort", "b"),)) == {"b": 10}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.ports['listen']}") as ch:
        call = pb_grpc.InferenceStub(ch).GenerateStream(prompt(max_tokens=2))
        _ = [c async for c in call]
        assert dict(await call.trailing_metadata())["aimesh-instance"] == "s"


async def test_split_lands_within_two_points_over_2000_calls(
    make_proxy, make_sim: SimFactory
) -> None:  # type: ignore[no-untyped-def]
    stable, canary = await make_sim(instance_id="stable"), await make_sim(instance_id="canary")
    doc = yaml.safe_load((ROOT / "deploy/examples/reference.yaml").read_text())
    # The product's reference document, as is: endpoints come from the command line.
    proxy = await make_proxy(
        doc, extra={"gpt4-gateway": [addr(stable)], "gpt4-gateway-v2": [addr(canary)]}
    )
    counts = await served_by(proxy, 2000, concurrency=50)
    assert counts["stable"] + counts["canary"] == 2000
    assert abs(counts["canary"] / 2000 - 0.10) <= 0.02, counts


async def test_weight_moves_off_a_destination_without_endpoints_then_backup(
    make_proxy,
    make_sim: SimFactory,  # type: ignore[no-untyped-def]
) -> None:
    main, backup = await make_sim(instance_id="main"), await make_sim(instance_id="backup")
    proxy = await make_proxy(
        mesh_doc(
            [{"name": "primary"}, {"name": "empty"}, {"name": "fallback"}],
            [
                {
                    "name": "split",
                    "routes": [
                        {"destination": "primary", "weight": 50},
                        {"destination": "empty", "weight": 50},
                    ],
                    "backups": ["fallback"],
                }
            ],
        ),
        extra={"primary": [addr(main)], "fallback": [addr(backup)]},
    )
    assert await served_by(proxy, 20) == {"main": 20}
    await sim_pb2_grpc.SimControlStub(
        grpc.aio.insecure_channel(f"127.0.0.1:{main.port}")
    ).SetServing(sim_pb2.SetServingRequest(serving=False))
    cluster = proxy.clusters["primary"]
    await eventually(lambda: not cluster.has_eligible(), what="primary to leave rotation")
    assert await served_by(proxy, 20) == {"backup": 20}


async def test_all_unhealthy_fails_fast_naming_the_service(make_proxy) -> None:  # type: ignore[no-untyped-def]
    proxy = await make_proxy(
        mesh_doc(
            [
                {
                    "name": "dead",
                    "models": ["gpt-4"],
                    "loadBalancer": {"healthCheck": {"interval": "300ms", "timeout": "100ms"}},
                }
            ]
        ),
        extra={"dead": [EndpointAddr("127.0.0.1:1")]},
    )
    await eventually(
        lambda: not proxy.clusters["dead"].has_eligible(), what="dead endpoint ejected"
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.ports['listen']}") as ch:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.InferenceStub(ch).Generate(prompt(), timeout=5)
        assert loop.time() - t0 < 0.5
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no healthy endpoint for dead" in (info.value.details() or "")


async def test_unhealthy_endpoint_leaves_within_one_interval_and_returns(
    make_proxy,
    make_sim: SimFactory,  # type: ignore[no-untyped-def]
) -> None:
    a, b = await make_sim(instance_id="a"), await make_sim(instance_id="b")
    doc, extra = llm_mesh([a, b], health={"interval": "1s", "threshold": 3})
    proxy = await make_proxy(doc, extra=extra)
    assert await served_by(proxy, 20) == {"a": 10, "b": 10}
    ctl = sim_pb2_grpc.SimControlStub(grpc.aio.insecure_channel(f"127.0.0.1:{a.port}"))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await ctl.SetServing(sim_pb2.SetServingRequest(serving=False))
    up = proxy.clusters["llm"].upstreams[f"127.0.0.1:{a.port}"]
    await eventually(lambda: not up.active_healthy, timeout=1.0, what="a out of rotation")
    assert loop.time() - t0 < 1.0
    assert await served_by(proxy, 20) == {"b": 20}
    await ctl.SetServing(sim_pb2.SetServingRequest(serving=True))
    await eventually(lambda: up.active_healthy, timeout=2.0, what="a back in rotation")
    assert await served_by(proxy, 20) == {"a": 10, "b": 10}


async def test_passive_ejection_of_a_failing_endpoint(make_proxy, make_sim: SimFactory) -> None:  # type: ignore[no-untyped-def]
    good = await make_sim(instance_id="good")
    bad = await make_sim(instance_id="bad", faults=Faults(error_rate=1.0))
    doc, extra = llm_mesh([good, bad], eject_after=3)
    proxy = await make_proxy(doc, extra=extra)
    failures = 0
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.ports['listen']}") as ch:
        stub = pb_grpc.InferenceStub(ch)
        for _ in range(12):
            try:
                await stub.Generate(prompt(max_tokens=1))
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
                failures += 1
    assert failures == 3  # then `bad` is ejected and every call goes to `good`
    assert proxy.clusters["llm"].upstreams[f"127.0.0.1:{bad.port}"].ejected_until > 0
    assert await served_by(proxy, 10) == {"good": 10}


async def test_a_new_config_applies_to_the_next_calls(make_proxy, make_sim: SimFactory) -> None:  # type: ignore[no-untyped-def]
    from aimesh.mesh.config import load_dict

    a, b = await make_sim(instance_id="a"), await make_sim(instance_id="b")
    extra = {"one": [addr(a)], "two": [addr(b)]}
    proxy = await make_proxy(
        mesh_doc([{"name": "one", "models": ["gpt-4"]}, {"name": "two"}]), extra=extra
    )
    assert await served_by(proxy, 5) == {"a": 5}
    proxy.apply(
        load_dict(mesh_doc([{"name": "one"}, {"name": "two", "models": ["gpt-4"]}]), source="v2")
    )
    assert await served_by(proxy, 5) == {"b": 5}
