"""Retries, budgets, circuit breaking, limits and deadlines in the proxy (in-process)."""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
import grpc.aio
import pytest

from aimesh.inference.v1 import inference_pb2_grpc as pb_grpc
from aimesh.interceptors.breaker import State
from aimesh.mesh.proxy.cluster import UU, EndpointAddr
from aimesh.mesh.sim.faults import Faults
from aimesh.sim.v1 import sim_pb2, sim_pb2_grpc

from . import echo
from .support import SimFactory, eventually, llm_mesh, mesh_doc, prompt

RETRY = {"attempts": 3, "retryOn": ["UNAVAILABLE"], "backoff": {"base": "1ms", "max": "5ms"}}


async def _proxy_knowing_echo(make_proxy, doc: dict[str, object], port: int, **kw: object):  # type: ignore[no-untyped-def]
    proxy = await make_proxy(doc, extra={"echo": [EndpointAddr(f"127.0.0.1:{port}")]}, **kw)
    # The proxy learns call types from descriptors (aimesh's own, or the backends'
    # reflection); echo serves no reflection, so tell it what reflection would have.
    proxy.catalog.kinds[f"/{echo.SERVICE}/Unary"] = UU
    return proxy


def _echo_doc(retry: dict[str, object] | None = None, **service: object) -> dict[str, object]:
    policy: dict[str, object] = {
        "name": "echo",
        "match": {"service": echo.SERVICE},
        "routes": [{"destination": "echo"}],
    }
    if retry:
        policy["retry"] = retry
    return mesh_doc(
        [{"name": "echo", "loadBalancer": {"algorithm": "round_robin"}, **service}], [policy]
    )


async def test_a_failed_call_is_retried_on_another_endpoint_with_attempt_count(make_proxy) -> None:  # type: ignore[no-untyped-def]
    bad_calls: list[bytes] = []
    good_calls: list[bytes] = []
    bad, bad_port = await echo.start("bad", bad_calls)
    good, good_port = await echo.start("good", good_calls)
    proxy = await make_proxy(
        _echo_doc(RETRY),
        extra={
            "echo": [EndpointAddr(f"127.0.0.1:{bad_port}"), EndpointAddr(f"127.0.0.1:{good_port}")]
        },
    )
    proxy.catalog.kinds[f"/{echo.SERVICE}/Unary"] = UU  # what reflection would have taught it
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.ports['listen']}") as ch:
        call = ch.unary_unary(f"/{echo.SERVICE}/Unary")(echo.UNAVAILABLE)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
    # Every endpoint fails this body: 3 attempts in all, alternating endpoints.
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(bad_calls) + len(good_calls) == 3
    assert bad_calls and good_calls
    await bad.stop(None)
    await good.stop(None)


async def test_retries_reach_a_healthy_endpoint(make_proxy, make_sim: SimFactory) -> None:  # type: ignore[no-untyped-def]
    good = await make_sim(instance_id="good")
    bad = await make_sim(instance_id="bad", faults=Faults(error_rate=1.0))
    doc, extra = llm_mesh([good, bad], eject_after=1000, retry=RETRY)
    proxy = await make_proxy(doc, extra=extra)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.ports['listen']}") as ch:
        stub = pb_grpc.InferenceStub(ch)
        served: Counter[str] = Counter()
        for i in range(40):
            call = stub.Generate(prompt(str(i), max_tokens=1))
            await call
            served[dict(await call.trailing_metadata())["aimesh-instance"]] += 1
    assert served == {"good": 40}
    # Every call that went to `bad` first was retried, and only those.
    assert proxy.clusters["llm"].retries == bad.backend.stats.calls > 0


async def test_pushback_stop_is_not_retried(make_proxy) -> None:  # type: ignore[no-untyped-def]
    calls: list[bytes] = []
    server, port = await echo.start("e", calls)
    proxy = await _proxy_knowing_echo(make_proxy, _echo_doc(RETRY), port)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.ports['listen']}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ch.unary_unary(f"/{echo.SERVICE}/Unary")(echo.STOP_RETRYING)
    assert info.value.details() == "overloaded, do not retry"
    assert calls == [echo.STOP_RETRYING]
    await server.stop(None)


async def test_retried_calls_carry_previous_attempts(make_proxy) -> None:  # type: ignore[no-untyped-def]
    server, port = await echo.start("e")
    proxy = await _proxy_knowing_echo(make_proxy, _echo_doc(RETRY), port)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.ports['listen']}") as ch:
        call = ch.unary_unary(f"/{echo.SERVICE}/Unary")(echo.UNAVAILABLE)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        # The last attempt's headers reach the caller: two attempts came before it.
        assert dict(info.value.initial_metadata() or ())["echo-grpc-previous-rpc-attempts"] == "2"
    await server.stop(None)


async def test_retry_budget_stops_a_retry_storm(make_proxy, make_sim: SimFactory) -> None:  # type: ignore[no-untyped-def]
    sims = [await make_sim(instance_id=f"s{i}", faults=Faults(error_rate=1.0)) for i in range(2)]
    doc, extra = llm_mesh(
        sims, eject_after=100000, breaker={"maxRetries": 1000}, retry={**RETRY, "attempts": 5}
    )
    proxy = await make_proxy(doc, extra=extra)
    n = 300
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.ports['listen']}") as ch:
        stub = pb_grpc.InferenceStub(ch)

        async def one(i: int) -> None:
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Generate(prompt(str(i), max_tokens=1))

        for start in range(0, n, 30):
            await asyncio.gather(*(one(i) for i in range(start, start + 30)))
    cluster = proxy.clusters["llm"]
    # Without a budget: 4 retries per call = 1,200. With it: 20% of calls + 10/s x 10 s.
    bound = int(0.2 * n + 10 * 10)
    assert cluster.retries == cluster.budget.retries_allowed <= bound
    assert cluster.budget.retries_denied > 0
    served = sum(s.backend.stats.calls for s in sims)
    assert served == n + cluster.retries


async def test_breaker_opens_on_errors_moves_traffic_and_closes_after_recovery(
    make_proxy,
    make_sim: SimFactory,  # type: ignore[no-untyped-def]
) -> None:
    good = await make_sim(instance_id="good")
    flaky = await make_sim(instance_id="flaky", faults=Faults(error_rate=0.6), seed=3)
    breaker = {
        "enabled": True,
        "errorThreshold": "50%",
        "minRequests": 10,
        "window": "5s",
        "consecutiveErrors": 100,
        "openDuration": "300ms",
        "maxOpenDuration": "1s",
    }
    doc, extra = llm_mesh([good, flaky], eject_after=100000, breaker=breaker, retry=RETRY)
    proxy = await make_proxy(doc, extra=extra)
    up = proxy.clusters["llm"].upstreams[f"127.0.0.1:{flaky.port}"]
    assert up.breaker is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.ports['listen']}") as ch:
        stub = pb_grpc.InferenceStub(ch)
        for i in range(60):
            await stub.Generate(prompt(str(i), max_tokens=1))  # retries hide every failure
        assert up.breaker.trips >= 1
        calls_while_open = flaky.backend.stats.calls
        assert calls_while_open < 40  # round robin alone would have sent it 30 + retries
        await sim_pb2_grpc.SimControlStub(
            grpc.aio.insecure_channel(f"127.0.0.1:{flaky.port}")
        ).SetFaults(sim_pb2.Faults(error_rate=0.0))

        async def traffic_until_closed() -> None:
            i = 0
            while up.breaker.state is not State.CLOSED:  # type: ignore[union-attr]
                await stub.Generate(prompt(f"r{i}", max_tokens=1))
                i += 1

        await asyncio.wait_for(traffic_until_closed(), 10)
        before = flaky.backend.stats.calls
        for i in range(20):
            await stub.Generate(prompt(f"after{i}", max_tokens=1))
        assert flaky.backend.stats.calls - before == 10  # back in the rotation


async def test_concurrency_limit_fails_fast_naming_the_limit(
    make_proxy, make_sim: SimFactory
) -> None:  # type: ignore[no-untyped-def]
    sim = await make_sim(ttft=0.0, tokens_per_second=50.0)
    proxy = await make_proxy(
        mesh_doc([{"name": "llm", "models": ["gpt-4"], "circuitBreaker": {"maxRequests": 1}}]),
        extra={"llm": [EndpointAddr(f"127.0.0.1:{sim.port}")]},
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.ports['listen']}") as ch:
        stub = pb_grpc.InferenceStub(ch)
        slow = stub.Generate(prompt(max_tokens=20))
        await eventually(lambda: proxy.clusters["llm"].limits.requests == 1)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Generate(prompt("second", max_tokens=1))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "max_requests (1) reached" in (info.value.details() or "")
        await slow


async def test_deadline_shrinks_over_two_proxy_hops(make_proxy) -> None:  # type: ignore[no-untyped-def]
    server, port = await echo.start("e")
    inner = await make_proxy(_echo_doc(), extra={"echo": [EndpointAddr(f"127.0.0.1:{port}")]})
    outer = await make_proxy(
        _echo_doc(), extra={"echo": [EndpointAddr(f"127.0.0.1:{inner.ports['listen']}")]}
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{outer.ports['listen']}") as ch:
        call = ch.unary_unary(f"/{echo.SERVICE}/Unary")(b"x", timeout=0.2)
        await call
        seen = int(dict(await call.trailing_metadata())["x-deadline-ms"])
    assert 0 < seen <= 200  # grpc rounds grpc-timeout up to whole ms on each hop
    await server.stop(None)


async def test_too_little_deadline_is_not_sent_upstream(make_proxy) -> None:  # type: ignore[no-untyped-def]
    calls: list[bytes] = []
    server, port = await echo.start("e", calls)
    proxy = await make_proxy(
        _echo_doc(), extra={"echo": [EndpointAddr(f"127.0.0.1:{port}")]}, min_deadline=0.05
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.ports['listen']}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ch.unary_unary(f"/{echo.SERVICE}/Unary")(b"x", timeout=0.02)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "below the minimum of 50.0 ms; not started" in (info.value.details() or "")
    assert calls == []
    await server.stop(None)


async def test_hedged_call_answers_from_the_fast_endpoint(make_proxy, make_sim: SimFactory) -> None:  # type: ignore[no-untyped-def]
    slow = await make_sim(instance_id="slow", faults=Faults(extra_latency=2.0))
    fast = await make_sim(instance_id="fast")
    proxy = await make_proxy(
        mesh_doc(
            [{"name": "llm", "models": ["gpt-4"], "loadBalancer": {"algorithm": "round_robin"}}],
            [
                {
                    "name": "all",
                    "routes": [{"destination": "llm"}],
                    "hedge": {"delay": "50ms", "attempts": 2},
                }
            ],
        ),
        extra={
            "llm": [EndpointAddr(f"127.0.0.1:{slow.port}"), EndpointAddr(f"127.0.0.1:{fast.port}")]
        },
    )
    loop = asyncio.get_running_loop()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.ports['listen']}") as ch:
        stub = pb_grpc.InferenceStub(ch)
        for i in range(4):
            t0 = loop.time()
            call = stub.Generate(prompt(str(i), max_tokens=2), timeout=5)
            await call
            assert dict(await call.trailing_metadata())["aimesh-instance"] == "fast"
            assert loop.time() - t0 < 1.0  # never waited out the slow one
    # The slow endpoint's losing attempts were cancelled, not left generating.
    await asyncio.wait_for(slow.backend.wait_idle(), 5)
    assert slow.backend.stats.cancelled == slow.backend.stats.calls >= 2


async def test_a_stream_that_fails_before_its_first_chunk_is_retried(
    make_proxy,
    make_sim: SimFactory,  # type: ignore[no-untyped-def]
) -> None:
    good = await make_sim(instance_id="good")
    bad = await make_sim(instance_id="bad", faults=Faults(error_rate=1.0))
    doc, extra = llm_mesh([bad, good], eject_after=1000, retry=RETRY)
    proxy = await make_proxy(doc, extra=extra)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.ports['listen']}") as ch:
        stub = pb_grpc.InferenceStub(ch)
        for i in range(6):
            call = stub.GenerateStream(prompt(str(i), max_tokens=3))
            chunks = [c async for c in call]
            assert sum(c.token_count for c in chunks) == 3
            assert dict(await call.trailing_metadata())["aimesh-instance"] == "good"
    assert proxy.clusters["llm"].retries == bad.backend.stats.calls > 0
