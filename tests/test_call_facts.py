"""What the proxy records about each call for its sinks (metrics, traces, audit): route,
model, every upstream try, tokens in and out, time to first token, resumes."""

from __future__ import annotations

import grpc
import grpc.aio

from aimesh.inference.v1 import inference_pb2 as pb
from aimesh.inference.v1 import inference_pb2_grpc as pb_grpc
from aimesh.interceptors.events import CallEnded
from aimesh.mesh.config import load_dict
from aimesh.mesh.proxy.cluster import EndpointAddr
from aimesh.mesh.proxy.server import Proxy, ProxySettings
from aimesh.mesh.sim.faults import Faults

from .support import SimFactory, endpoint, llm_mesh, prompt


async def proxied(
    doc: dict[str, object], extra: dict[str, list[EndpointAddr]], events: list[CallEnded]
) -> Proxy:
    proxy = Proxy(ProxySettings(listen="127.0.0.1:0", seed=3, extra_endpoints=extra))
    proxy.sinks.append(events.append)
    await proxy.start(load_dict(doc, source="test"))
    return proxy


async def test_unary_call_facts(make_sim: SimFactory) -> None:
    sim = await make_sim(instance_id="a")
    events: list[CallEnded] = []
    doc, extra = llm_mesh([sim])
    proxy = await proxied(doc, extra, events)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.ports['listen']}") as ch:
            response = await pb_grpc.InferenceStub(ch).Generate(prompt(), timeout=10)
        [event] = events
        facts = event.facts
        assert event.code == grpc.StatusCode.OK
        assert (facts.route, facts.model) == ("model:gpt-4", "gpt-4")
        [attempt] = facts.attempts
        assert (attempt.service, attempt.endpoint, attempt.kind, attempt.code) == (
            "llm",
            endpoint(sim).address,
            "first",
            grpc.StatusCode.OK,
        )
        assert event.started_ns <= attempt.started_ns < attempt.ended_ns
        assert (facts.tokens_in, facts.tokens_out) == (
            response.usage.prompt_tokens,
            response.usage.completion_tokens,
        )
        assert facts.tokens_in > 0 and facts.tokens_out > 0
    finally:
        await proxy.stop(0.5)


async def test_stream_facts_with_first_token_and_a_resume(make_sim: SimFactory) -> None:
    breaking = await make_sim(instance_id="breaking", faults=Faults(die_after_tokens=5))
    healthy = await make_sim(instance_id="healthy")
    events: list[CallEnded] = []
    doc, extra = llm_mesh([breaking, healthy])
    proxy = await proxied(doc, extra, events)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.ports['listen']}") as ch:
            chunks = [
                c async for c in pb_grpc.InferenceStub(ch).GenerateStream(prompt(), timeout=10)
            ]
        [event] = events
        facts = event.facts
        assert [(a.endpoint, a.kind, a.code) for a in facts.attempts] == [
            (endpoint(breaking).address, "first", grpc.StatusCode.UNAVAILABLE),
            (endpoint(healthy).address, "resume", grpc.StatusCode.OK),
        ]
        assert facts.resumed == 1
        assert facts.tokens_out == sum(c.token_count for c in chunks)
        assert facts.tokens_in == chunks[-1].usage.prompt_tokens > 0
        # The first token left the proxy after the call came in, before the first try ended.
        assert event.started_ns < facts.first_token_ns < facts.attempts[0].ended_ns
    finally:
        await proxy.stop(0.5)


async def test_retried_unary_call_records_both_tries(make_sim: SimFactory) -> None:
    bad = await make_sim(instance_id="bad", faults=Faults(error_rate=1.0))
    good = await make_sim(instance_id="good")
    events: list[CallEnded] = []
    doc, extra = llm_mesh([bad, good], retry={"attempts": 2, "backoff": {"base": "1ms"}})
    proxy = await proxied(doc, extra, events)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.ports['listen']}") as ch:
            await pb_grpc.InferenceStub(ch).Generate(prompt(), timeout=10)
        [event] = events
        assert event.facts.route == "all"
        assert [(a.endpoint, a.kind, a.code) for a in event.facts.attempts] == [
            (endpoint(bad).address, "first", grpc.StatusCode.UNAVAILABLE),
            (endpoint(good).address, "retry", grpc.StatusCode.OK),
        ]
    finally:
        await proxy.stop(0.5)


async def test_failed_call_keeps_its_status_message(make_sim: SimFactory) -> None:
    sim = await make_sim(instance_id="a")
    events: list[CallEnded] = []
    doc, extra = llm_mesh([sim])
    proxy = await proxied(doc, extra, events)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.ports['listen']}") as ch:
            try:
                await pb_grpc.InferenceStub(ch).Generate(
                    pb.GenerateRequest(model="nope"), timeout=10
                )
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNIMPLEMENTED
        [event] = events
        assert event.code == grpc.StatusCode.UNIMPLEMENTED
        assert "no route for model 'nope'" in event.details
        assert event.facts.attempts == [] and event.facts.model == "nope"
    finally:
        await proxy.stop(0.5)
