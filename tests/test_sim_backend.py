"""The sim backend over real gRPC: contract, determinism, resume, load reports, errors."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aimesh.inference.v1 import inference_pb2 as pb
from aimesh.inference.v1 import inference_pb2_grpc as pb_grpc
from aimesh.mesh.orca import AIMESH_LOAD_TRAILER as ORCA_TRAILER
from aimesh.mesh.orca import LoadReport
from aimesh.mesh.sim.faults import Faults
from aimesh.mesh.sim.server import RunningSim
from aimesh.sim.v1 import sim_pb2, sim_pb2_grpc

from .support import SimFactory, prompt


def _trailer(md: object, key: str) -> object:
    return dict(md)[key]  # type: ignore[call-overload]


async def _stream(channel: grpc.aio.Channel, req: pb.GenerateRequest) -> list[pb.GenerateChunk]:
    return [c async for c in pb_grpc.InferenceStub(channel).GenerateStream(req)]


async def _stats(channel: grpc.aio.Channel) -> sim_pb2.Stats:
    return await sim_pb2_grpc.SimControlStub(channel).GetStats(sim_pb2.GetStatsRequest())


async def test_unary_and_stream_agree_and_stream_indexes_are_contiguous(
    channel: grpc.aio.Channel,
) -> None:
    req = prompt(seed=42)
    unary = await pb_grpc.InferenceStub(channel).Generate(req)
    chunks = await _stream(channel, req)
    assert "".join(c.text for c in chunks) == unary.text
    assert unary.text and unary.finish_reason == pb.FINISH_REASON_STOP
    expected = 0
    for c in chunks:
        assert c.index == expected
        expected += c.token_count
    last = chunks[-1]
    assert last.finish_reason == pb.FINISH_REASON_STOP
    assert last.usage.completion_tokens == expected == unary.usage.completion_tokens
    assert last.usage.prompt_tokens == 5
    assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    assert chunks[0].model == "gpt-4"


async def test_max_tokens_ends_with_length(channel: grpc.aio.Channel) -> None:
    resp = await pb_grpc.InferenceStub(channel).Generate(prompt(max_tokens=5))
    assert resp.finish_reason == pb.FINISH_REASON_LENGTH
    assert resp.usage.completion_tokens == 5


async def test_stop_sequence_cuts_the_text(channel: grpc.aio.Channel) -> None:
    stub = pb_grpc.InferenceStub(channel)
    full = (await stub.Generate(prompt(seed=3))).text
    stop = full.split()[4]
    cut = await stub.Generate(prompt(seed=3, stop=[stop]))
    assert cut.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    assert cut.text == full[: full.index(stop)]
    streamed = "".join(c.text for c in await _stream(channel, prompt(seed=3, stop=[stop])))
    assert streamed == cut.text


async def test_two_instances_give_identical_text(make_sim: SimFactory) -> None:
    a, b = await make_sim(), await make_sim()
    texts = []
    for s in (a, b):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{s.port}") as ch:
            texts.append((await pb_grpc.InferenceStub(ch).Generate(prompt(seed=9))).text)
    assert texts[0] == texts[1]


@pytest.mark.parametrize("cut_chunks", [1, 7, 20])
async def test_stream_resumed_on_another_instance_completes_identically(
    make_sim: SimFactory, cut_chunks: int
) -> None:
    a, b = await make_sim(), await make_sim()
    req = prompt("resume me", seed=5, max_tokens=40)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{a.port}") as ch:
        whole = await _stream(ch, req)
        call = pb_grpc.InferenceStub(ch).GenerateStream(req)
        delivered = []
        async for chunk in call:
            delivered.append(chunk)
            if len(delivered) == cut_chunks:
                call.cancel()
                break
    continuation = "".join(c.text for c in delivered)
    resumed_req = pb.GenerateRequest()
    resumed_req.CopyFrom(req)
    resumed_req.continuation = continuation
    async with grpc.aio.insecure_channel(f"127.0.0.1:{b.port}") as ch:
        rest = await _stream(ch, resumed_req)
    assert continuation + "".join(c.text for c in rest) == "".join(c.text for c in whole)
    assert rest[0].index == delivered[-1].index + delivered[-1].token_count
    assert rest[-1].usage == whole[-1].usage
    assert rest[-1].finish_reason == whole[-1].finish_reason


async def test_every_response_names_its_instance_and_reports_load(
    sim: RunningSim, channel: grpc.aio.Channel
) -> None:
    stub = pb_grpc.InferenceStub(channel)
    call = stub.Generate(prompt())
    await call
    md = await call.trailing_metadata()
    assert _trailer(md, "aimesh-instance") == f"127.0.0.1:{sim.port}"
    report = LoadReport.decode(_trailer(md, ORCA_TRAILER))  # type: ignore[arg-type]
    assert report.named["slots"] == 4.0
    assert report.queue_depth == 0.0
    stream = stub.GenerateStream(prompt())
    _ = [c async for c in stream]
    assert _trailer(await stream.trailing_metadata(), "aimesh-instance") == f"127.0.0.1:{sim.port}"
    bad = stub.Generate(prompt(model="nope"))
    with pytest.raises(grpc.aio.AioRpcError):
        await bad
    assert _trailer(await bad.trailing_metadata(), "aimesh-instance") == f"127.0.0.1:{sim.port}"


async def test_load_report_sees_the_queue(make_sim: SimFactory) -> None:
    sim = await make_sim(slots=1, max_queue=8, ttft=0.0, tokens_per_second=200.0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sim.port}") as ch:
        stub = pb_grpc.InferenceStub(ch)
        long = [stub.Generate(prompt(f"q{i}", max_tokens=20)) for i in range(3)]
        await asyncio.wait_for(sim.backend.pool.wait_until(lambda p: p.queued >= 2), 5)
        probe = stub.ListModels(pb.ListModelsRequest())
        await probe
        report = LoadReport.decode(_trailer(await probe.trailing_metadata(), ORCA_TRAILER))  # type: ignore[arg-type]
        assert report.queue_depth == 2.0
        assert report.application_utilization == 1.0
        await asyncio.gather(*long)


@pytest.mark.parametrize(
    ("fields", "code", "message"),
    [
        ({"model": "gpt-5"}, grpc.StatusCode.NOT_FOUND, "model 'gpt-5' is not served"),
        ({"model": ""}, grpc.StatusCode.INVALID_ARGUMENT, "model: must not be empty"),
        ({"max_tokens": -1}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens: must not be negative"),
        ({"temperature": 3.0}, grpc.StatusCode.INVALID_ARGUMENT, "temperature: must be between"),
        ({"stop": list("abcde")}, grpc.StatusCode.INVALID_ARGUMENT, "stop: at most 4"),
    ],
)
async def test_bad_requests_name_the_field(
    channel: grpc.aio.Channel, fields: dict[str, object], code: grpc.StatusCode, message: str
) -> None:
    stub = pb_grpc.InferenceStub(channel)
    for rpc in (stub.Generate, stub.GenerateStream):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            call = rpc(prompt(**fields))
            if rpc is stub.GenerateStream:
                _ = [c async for c in call]
            else:
                await call
        assert info.value.code() == code
        assert message in (info.value.details() or "")


async def test_empty_messages_and_bad_role(channel: grpc.aio.Channel) -> None:
    stub = pb_grpc.InferenceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Generate(pb.GenerateRequest(model="gpt-4"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages: must not be empty" in (info.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Generate(
            pb.GenerateRequest(model="gpt-4", messages=[pb.Message(role="robot", content="x")])
        )
    assert "messages[0].role" in (info.value.details() or "")


async def test_malformed_bytes_get_internal_or_invalid_and_server_survives(
    channel: grpc.aio.Channel,
) -> None:
    for method, kind in (
        ("Generate", channel.unary_unary),
        ("GenerateStream", channel.unary_stream),
    ):
        call = kind(f"/aimesh.inference.v1.Inference/{method}")(b"\xff\xff\xff\xff")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            if method == "GenerateStream":
                _ = [c async for c in call]  # type: ignore[union-attr]
            else:
                await call
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert "cannot parse the request as aimesh.inference.v1.GenerateRequest" in (
            info.value.details() or ""
        )
    ok = await pb_grpc.InferenceStub(channel).Generate(prompt())
    assert ok.text


async def test_cancellation_stops_generation_at_once(make_sim: SimFactory) -> None:
    sim = await make_sim(ttft=0.0, tokens_per_second=100.0, length_range=(400, 400))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sim.port}") as ch:
        call = pb_grpc.InferenceStub(ch).GenerateStream(prompt())
        got = 0
        async for _ in call:
            got += 1
            if got == 3:
                call.cancel()
                break
        # Once the instance is idle its only token producer has ended: the count is final.
        await asyncio.wait_for(sim.backend.wait_idle(), 5)
        after = await _stats(ch)
        assert after.cancelled_total == 1
        assert after.tokens_generated_total <= got + 2  # 400 had it kept going
        assert after.active == 0


async def test_deadline_stops_generation(make_sim: SimFactory) -> None:
    sim = await make_sim(ttft=0.0, tokens_per_second=100.0, length_range=(400, 400))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sim.port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.InferenceStub(ch).Generate(prompt(), timeout=0.2)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.wait_for(sim.backend.wait_idle(), 5)
        stats = await _stats(ch)
        assert stats.cancelled_total == 1
        assert 1 <= stats.tokens_generated_total <= 30  # ~20 tokens in 200 ms, then nothing


async def test_full_queue_refuses_with_resource_exhausted_and_pushback(
    make_sim: SimFactory,
) -> None:
    sim = await make_sim(slots=1, max_queue=1, ttft=0.0, tokens_per_second=100.0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sim.port}") as ch:
        stub = pb_grpc.InferenceStub(ch)
        busy = [stub.Generate(prompt(f"p{i}", max_tokens=10)) for i in range(2)]
        await asyncio.wait_for(sim.backend.pool.wait_until(lambda p: p.queued >= 1), 5)
        refused = stub.Generate(prompt("third"))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await refused
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "overloaded" in (info.value.details() or "")
        assert int(_trailer(await refused.trailing_metadata(), "grpc-retry-pushback-ms")) > 0  # type: ignore[call-overload]
        await asyncio.gather(*busy)
        assert (await _stats(ch)).rejected_total == 1


async def test_overload_makes_time_to_first_token_grow(make_sim: SimFactory) -> None:
    sim = await make_sim(slots=1, max_queue=10, ttft=0.0, tokens_per_second=400.0)
    loop = asyncio.get_running_loop()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sim.port}") as ch:
        stub = pb_grpc.InferenceStub(ch)

        async def ttft(i: int) -> float:
            t0 = loop.time()
            async for _ in stub.GenerateStream(prompt(f"x{i}", max_tokens=10)):
                return loop.time() - t0
            raise AssertionError("no chunk")

        firsts = await asyncio.gather(*(ttft(i) for i in range(4)))
    # Each queued call waits for the previous generation (~10 tokens at 400/s = 25 ms).
    assert sorted(firsts)[-1] > sorted(firsts)[0] + 0.05


async def test_runtime_fault_injection_and_seeded_error_rate(
    sim: RunningSim, channel: grpc.aio.Channel
) -> None:
    ctl = sim_pb2_grpc.SimControlStub(channel)
    await ctl.SetFaults(
        sim_pb2.Faults(error_rate=1.0, error_code=grpc.StatusCode.INTERNAL.value[0])
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await pb_grpc.InferenceStub(channel).Generate(prompt())
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "injected fault" in (info.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await ctl.SetFaults(sim_pb2.Faults(error_rate=2.0))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (await ctl.GetFaults(sim_pb2.GetFaultsRequest())).error_rate == 1.0  # kept
    await ctl.SetFaults(sim_pb2.Faults(error_rate=0.5))
    outcomes = []
    for i in range(200):
        try:
            await pb_grpc.InferenceStub(channel).Generate(prompt(f"{i}", max_tokens=1))
            outcomes.append(True)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
            outcomes.append(False)
    assert 70 <= outcomes.count(False) <= 130


async def test_die_after_tokens_breaks_the_stream(make_sim: SimFactory) -> None:
    sim = await make_sim(faults=Faults(die_after_tokens=5), length_range=(30, 30))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sim.port}") as ch:
        got = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for c in pb_grpc.InferenceStub(ch).GenerateStream(prompt()):
                got.append(c)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "after 5 tokens" in (info.value.details() or "")
        assert sum(c.token_count for c in got) == 5


async def test_extra_latency_delays_the_first_token(make_sim: SimFactory) -> None:
    sim = await make_sim(faults=Faults(extra_latency=0.15))
    loop = asyncio.get_running_loop()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sim.port}") as ch:
        t0 = loop.time()
        await pb_grpc.InferenceStub(ch).Generate(prompt(max_tokens=1))
        assert loop.time() - t0 >= 0.15


async def test_health_switches_and_reports(sim: RunningSim, channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    names = ["", "aimesh.inference.v1.Inference"]
    for name in names:
        r = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert r.status == health_pb2.HealthCheckResponse.SERVING
    await sim_pb2_grpc.SimControlStub(channel).SetServing(sim_pb2.SetServingRequest(serving=False))
    for name in names:
        r = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert r.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_embed_and_list_models(channel: grpc.aio.Channel) -> None:
    stub = pb_grpc.InferenceStub(channel)
    resp = await stub.Embed(pb.EmbedRequest(model="gpt-4", inputs=["a b", "c"], dimensions=8))
    assert [e.index for e in resp.embeddings] == [0, 1]
    assert all(len(e.values) == 8 for e in resp.embeddings)
    assert resp.usage.prompt_tokens == 3
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Embed(pb.EmbedRequest(model="gpt-4"))
    assert "inputs: must not be empty" in (info.value.details() or "")
    models = await stub.ListModels(pb.ListModelsRequest())
    assert [m.id for m in models.models] == ["claude-3-5-sonnet", "gpt-4"]


async def test_oversized_message_is_refused(channel: grpc.aio.Channel) -> None:
    big = prompt("x" * (17 * 1024 * 1024))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await pb_grpc.InferenceStub(channel).Generate(big)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_request_can_pace_its_own_tokens(make_sim: SimFactory) -> None:
    sim = await make_sim(ttft=0.0, tokens_per_second=0.0)
    loop = asyncio.get_running_loop()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sim.port}") as ch:
        req = prompt(max_tokens=6)
        req.extensions.update({"sim_tokens_per_second": 50})
        t0 = loop.time()
        await pb_grpc.InferenceStub(ch).Generate(req)
        assert loop.time() - t0 >= 5 / 50  # 5 gaps of 20 ms between 6 tokens
