"""The proxy is transparent: any service, all four call types, headers, trailers, statuses."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aimesh.inference.v1 import inference_pb2 as pb
from aimesh.inference.v1 import inference_pb2_grpc as pb_grpc
from aimesh.mesh.proxy.cluster import EndpointAddr

from . import echo
from .support import SimFactory, eventually, mesh_doc, prompt

ECHO_DOC = mesh_doc(
    [{"name": "echo"}],
    [{"name": "echo-all", "match": {"service": echo.SERVICE}, "routes": [{"destination": "echo"}]}],
)


@pytest.fixture
async def echo_via_proxy(make_proxy) -> AsyncIterator[grpc.aio.Channel]:  # type: ignore[no-untyped-def]
    server, port = await echo.start()
    proxy = await make_proxy(ECHO_DOC, extra={"echo": [EndpointAddr(f"127.0.0.1:{port}")]})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.ports['listen']}") as ch:
        yield ch
    await server.stop(None)


MD = (("x-user", "alice"), ("x-blob-bin", b"\x00\x01\xff"))


def _path(method: str) -> str:
    return f"/{echo.SERVICE}/{method}"


async def test_unary_passes_messages_headers_and_trailers(echo_via_proxy: grpc.aio.Channel) -> None:
    call = echo_via_proxy.unary_unary(_path("Unary"))(b"hello", metadata=MD)
    assert await call == b"u:hello"
    initial = dict(await call.initial_metadata())
    assert initial["echo-x-user"] == "alice"
    assert initial["echo-x-blob-bin"] == b"\x00\x01\xff"
    trailers = dict(await call.trailing_metadata())
    assert trailers["x-trailer"] == "bye"
    assert trailers["x-deadline-ms"] == "none"


async def test_server_stream(echo_via_proxy: grpc.aio.Channel) -> None:
    call = echo_via_proxy.unary_stream(_path("ServerStream"))(b"x", metadata=MD)
    assert [m async for m in call] == [b"s0:x", b"s1:x", b"s2:x"]
    assert dict(await call.initial_metadata())["echo-x-user"] == "alice"
    assert dict(await call.trailing_metadata())["x-trailer"] == "bye"


async def test_client_stream(echo_via_proxy: grpc.aio.Channel) -> None:
    async def gen() -> AsyncIterator[bytes]:
        for part in (b"a", b"b", b"c"):
            yield part

    call = echo_via_proxy.stream_unary(_path("ClientStream"))(gen(), metadata=MD)
    assert await call == b"c:a|b|c"
    assert dict(await call.trailing_metadata())["x-trailer"] == "bye"


async def test_bidi_stream_interleaves(echo_via_proxy: grpc.aio.Channel) -> None:
    call = echo_via_proxy.stream_stream(_path("Bidi"))(metadata=MD)
    for part in (b"1", b"2", b"3"):
        await call.write(part)
        assert await call.read() == b"b:" + part  # each reply before the next request
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert dict(await call.trailing_metadata())["x-trailer"] == "bye"


@pytest.mark.parametrize("kind", ["Unary", "ServerStream", "ClientStream", "Bidi"])
async def test_errors_keep_status_message_and_details(
    echo_via_proxy: grpc.aio.Channel, kind: str
) -> None:
    ch = echo_via_proxy
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if kind == "Unary":
            await ch.unary_unary(_path(kind))(echo.FAIL)
        elif kind == "ServerStream":
            _ = [m async for m in ch.unary_stream(_path(kind))(echo.FAIL)]
        elif kind == "ClientStream":
            await ch.stream_unary(_path(kind))(iter([echo.FAIL]))
        else:
            _ = [m async for m in ch.stream_stream(_path(kind))(iter([echo.FAIL]))]
    err = info.value
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details() == "asked to fail"
    trailers = dict(err.trailing_metadata() or ())
    assert trailers["grpc-status-details-bin"] == echo.DETAILS_BIN
    assert trailers["x-why"] == "asked"


async def test_deadline_reaches_the_backend_reduced(echo_via_proxy: grpc.aio.Channel) -> None:
    # grpc rounds a timeout up when it encodes grpc-timeout (coarser the longer it is: a
    # 2 s deadline arrived once as 2,008 ms), so use one short enough to travel in ms.
    call = echo_via_proxy.unary_unary(_path("Unary"))(b"x", timeout=0.3)
    await call
    seen = int(dict(await call.trailing_metadata())["x-deadline-ms"])
    # Never more than the caller gave: the hop's time is taken off, though grpc rounds the
    # encoded timeout up to the next millisecond (so "300" can still arrive).
    assert 0 < seen <= 300


async def test_proxy_answers_health_for_itself(echo_via_proxy: grpc.aio.Channel) -> None:
    r = await health_pb2_grpc.HealthStub(echo_via_proxy).Check(health_pb2.HealthCheckRequest())
    assert r.status == health_pb2.HealthCheckResponse.SERVING


async def test_oversized_message_is_refused(make_proxy, sim) -> None:  # type: ignore[no-untyped-def]
    proxy = await make_proxy(
        mesh_doc([{"name": "llm", "models": ["gpt-4"]}]),
        extra={"llm": [EndpointAddr(f"127.0.0.1:{sim.port}")]},
        max_message_bytes=1024,
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.ports['listen']}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.InferenceStub(ch).Generate(prompt("x" * 4096))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (await pb_grpc.InferenceStub(ch).Generate(prompt("small"))).text


async def test_inference_through_proxy_equals_direct(make_proxy, make_sim: SimFactory) -> None:  # type: ignore[no-untyped-def]
    sim = await make_sim()
    proxy = await make_proxy(
        mesh_doc([{"name": "llm", "models": ["gpt-4"]}]),
        extra={"llm": [EndpointAddr(f"127.0.0.1:{sim.port}")]},
    )
    req = prompt(seed=5, max_tokens=30)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sim.port}") as direct:
        expected = [c async for c in pb_grpc.InferenceStub(direct).GenerateStream(req)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.ports['listen']}") as ch:
        stub = pb_grpc.InferenceStub(ch)
        call = stub.GenerateStream(req)
        got = [c async for c in call]
        # Same text, tokens, finish and usage; chunks may arrive merged if the reader lags.
        assert "".join(c.text for c in got) == "".join(c.text for c in expected)
        assert sum(c.token_count for c in got) == sum(c.token_count for c in expected)
        assert (got[-1].finish_reason, got[-1].usage) == (
            expected[-1].finish_reason,
            expected[-1].usage,
        )
        assert dict(await call.trailing_metadata())["aimesh-instance"] == f"127.0.0.1:{sim.port}"
        unary = await stub.Generate(req)
        assert unary.text == "".join(c.text for c in expected)


async def test_client_cancellation_reaches_the_backend(make_proxy, make_sim: SimFactory) -> None:  # type: ignore[no-untyped-def]
    sim = await make_sim(ttft=0.0, tokens_per_second=100.0, length_range=(400, 400))
    proxy = await make_proxy(
        mesh_doc([{"name": "llm", "models": ["gpt-4"]}]),
        extra={"llm": [EndpointAddr(f"127.0.0.1:{sim.port}")]},
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.ports['listen']}") as ch:
        call = pb_grpc.InferenceStub(ch).GenerateStream(prompt())
        got = 0
        async for _ in call:
            got += 1
            if got == 3:
                call.cancel()
                break
        await asyncio.wait_for(sim.backend.wait_idle(), 5)
    assert sim.backend.stats.cancelled == 1
    assert sim.backend.stats.tokens < 20  # 400 had the backend kept going


def test_merge_chunks_keeps_every_token_in_order() -> None:
    from aimesh.mesh.proxy.tokenstream import merge_chunks

    parts = [
        pb.GenerateChunk(text="Hello", index=0, token_count=1, model="gpt-4"),
        pb.GenerateChunk(text=" big", index=1, token_count=1),
        pb.GenerateChunk(
            text=" world",
            index=2,
            token_count=1,
            finish_reason=pb.FINISH_REASON_STOP,
            usage=pb.Usage(prompt_tokens=2, completion_tokens=3, total_tokens=5),
        ),
    ]
    merged = merge_chunks([p.SerializeToString() for p in parts])
    assert merged.text == "Hello big world"
    assert (merged.index, merged.token_count, merged.model) == (0, 3, "gpt-4")
    assert merged.finish_reason == pb.FINISH_REASON_STOP
    assert merged.usage.completion_tokens == 3


async def test_a_caller_that_falls_behind_gets_merged_chunks(
    make_proxy, make_sim: SimFactory
) -> None:  # type: ignore[no-untyped-def]
    # The caller's HTTP/2 window (64 KiB, BDP growth off) must fill before writes block.
    n = 6000
    sim = await make_sim(length_range=(n, n), default_max_tokens=n)
    proxy = await make_proxy(
        mesh_doc([{"name": "llm", "models": ["gpt-4"]}]),
        extra={"llm": [EndpointAddr(f"127.0.0.1:{sim.port}")]},
    )
    req = prompt(seed=2)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sim.port}") as direct:
        expected = "".join(
            [c.text async for c in pb_grpc.InferenceStub(direct).GenerateStream(req)]
        )
    options = [("grpc.http2.bdp_probe", 0)]
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{proxy.ports['listen']}", options=options
    ) as ch:
        call = pb_grpc.InferenceStub(ch).GenerateStream(req)
        first = await call.read()  # then stop reading until the backend has finished
        await asyncio.wait_for(sim.backend.wait_idle(), 5)
        rest = []
        while (c := await call.read()) is not grpc.aio.EOF:
            rest.append(c)
    chunks = [first, *rest]
    assert "".join(c.text for c in chunks) == expected
    assert sum(c.token_count for c in chunks) == n
    assert len(chunks) < n  # the backlog arrived merged
    index = 0
    for c in chunks:
        assert c.index == index
        index += c.token_count
    assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP


async def test_pump_ends_when_the_last_chunk_and_eof_arrive_during_one_write() -> None:
    from aimesh.mesh.proxy import tokenstream as ts

    class Upstream:
        def __init__(self, msgs: list[bytes]) -> None:
            self.queue: asyncio.Queue[object] = asyncio.Queue()
            for m in [*msgs, ts.EOF_]:
                self.queue.put_nowait(m)

            self.drained = asyncio.Event()

        async def read(self) -> object:
            item = await self.queue.get()
            if self.queue.empty():
                self.drained.set()
            return item

    first_write = asyncio.Event()
    release = asyncio.Event()
    written: list[bytes] = []

    async def write(raw: bytes) -> None:  # the first write blocks until the rest has arrived
        written.append(raw)
        if not first_write.is_set():
            first_write.set()
            await release.wait()

    msgs = [
        pb.GenerateChunk(text=f"t{i}", index=i, token_count=1).SerializeToString() for i in range(3)
    ]
    upstream = Upstream(msgs)
    delivered = ts.Delivered()
    task = asyncio.create_task(ts.pump(upstream, write, delivered, merge=True))
    await first_write.wait()
    await upstream.drained.wait()  # the reader took chunks 2, 3 and EOF meanwhile
    release.set()
    await asyncio.wait_for(task, 2)
    assert delivered.text == "t0t1t2" and delivered.tokens == 3


async def test_request_id_is_kept_or_made_and_sent_upstream(
    echo_via_proxy: grpc.aio.Channel,
) -> None:
    call = echo_via_proxy.unary_unary(_path("Unary"))(b"x", metadata=(("x-request-id", "r-1"),))
    await call
    assert dict(await call.initial_metadata())["echo-x-request-id"] == "r-1"
    call = echo_via_proxy.unary_unary(_path("Unary"))(b"x")
    await call
    made = dict(await call.initial_metadata())["echo-x-request-id"]
    assert isinstance(made, str) and len(made) == 32


async def test_inbound_stack_counts_every_outcome(make_proxy) -> None:  # type: ignore[no-untyped-def]
    server, port = await echo.start()
    proxy = await make_proxy(ECHO_DOC, extra={"echo": [EndpointAddr(f"127.0.0.1:{port}")]})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.ports['listen']}") as ch:
        for body in (b"ok", b"ok", echo.FAIL):
            with contextlib.suppress(grpc.aio.AioRpcError):
                await ch.unary_unary(_path("Unary"))(body)

    # grpc sends an aborted call's status before the handler's stack unwinds, so the
    # caller can see the error a moment before the counter does.
    def counted() -> int:
        return sum(proxy.counters.snapshot().get(_path("Unary"), {}).get("calls", {}).values())

    await eventually(lambda: counted() == 3, what="three calls counted")
    stats = proxy.counters.snapshot()[_path("Unary")]
    assert stats["calls"] == {"OK": 2, "FAILED_PRECONDITION": 1}
    await server.stop(None)


async def test_a_service_can_have_a_smaller_message_limit(make_proxy, make_sim: SimFactory) -> None:  # type: ignore[no-untyped-def]
    sim = await make_sim()
    proxy = await make_proxy(
        mesh_doc([{"name": "llm", "models": ["gpt-4"], "maxMessageBytes": 2048}]),
        extra={"llm": [EndpointAddr(f"127.0.0.1:{sim.port}")]},
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.ports['listen']}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.InferenceStub(ch).Generate(prompt("x" * 4096))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (await pb_grpc.InferenceStub(ch).Generate(prompt("small"))).text
    assert sim.backend.stats.calls == 1  # the large one never left the proxy
