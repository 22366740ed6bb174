"""Provider adapters (aimesh backend openai|anthropic), tested without the internet.

Pure mapping functions are tested directly; the rest runs the real gRPC adapter against
`provider_fake.FakeProvider`, a raw-socket HTTP server on 127.0.0.1 that replays the
transcripts in tests/providers/ byte for byte and records the requests it gets (see the
README there for where each transcript's shape comes from).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import given
from hypothesis import strategies as st

from aimesh.inference.v1 import inference_pb2 as pb
from aimesh.inference.v1 import inference_pb2_grpc as pb_grpc
from aimesh.mesh import procs
from aimesh.mesh.errors import MeshError
from aimesh.mesh.providers import anthropic, openai
from aimesh.mesh.providers.base import (
    ApiKey,
    BackendConfig,
    Provider,
    RunningProvider,
    Timeouts,
    parse_model_map,
    start_provider,
)
from aimesh.mesh.providers.common import (
    ChunkAssembler,
    Delta,
    Plan,
    ProviderUsage,
    estimate_tokens,
)
from aimesh.mesh.providers.errors import (
    http_error,
    parse_error_body,
    redact,
    retry_after_ms,
    status_for,
)
from aimesh.mesh.providers.sse import Event, SSEParser, parse_all
from aimesh.mesh.serving import REFLECTION_V1

from .provider_fake import FakeProvider, every_transcript, load, split_transcript
from .support import eventually

KEY = "sk-test-aimesh-0123456789abcdefSECRETcdef"
CODE = grpc.StatusCode


def request(text: str = "Hello", **fields: Any) -> pb.GenerateRequest:
    values: dict[str, Any] = {"model": "gpt-4", **fields}
    return pb.GenerateRequest(messages=[pb.Message(role="user", content=text)], **values)


# == the SSE parser ======================================================================


def test_sse_fields_comments_and_line_endings() -> None:
    stream = (
        b"\xef\xbb\xbf: keep-alive\r\n"
        b'event: message_start\ndata: {"a":1}\n\n'
        b"data: first\r\ndata:second\rdata\r\n\r\n"  # CRLF, no space after colon, CR, bare
        b"id: 7\nretry: 250\nevent: x\ndata: y\n\n"
        b"event: only-event-no-data\n\n"  # no data: not dispatched
        b"unknown: field\ndata: z\n\n"
        b"data: pending without blank line"  # discarded at the end of the stream
    )
    events = parse_all([stream])
    assert events == [
        Event(data='{"a":1}', event="message_start"),
        Event(data="first\nsecond\n"),
        Event(data="y", event="x", id="7", retry=250),
        Event(data="z", id="7", retry=250),
    ]


def test_sse_counts_keep_alive_comments() -> None:
    parser = SSEParser()
    assert parser.feed(b": keep-alive\n\n: ping - 2025\r\n") == []
    assert parser.comments == 2


_line_end = st.sampled_from(["\n", "\r\n", "\r"])
_text = st.text(
    alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=12
)


@st.composite
def _event_streams(draw: st.DrawFn) -> tuple[bytes, list[Event]]:
    """A stream of events with random line endings and comments, and the events in it."""
    out: list[str] = []
    expected: list[Event] = []
    for _ in range(draw(st.integers(0, 5))):
        if draw(st.booleans()):
            out.append(":" + draw(_text) + draw(_line_end))
        name = draw(st.one_of(st.just(""), st.from_regex(r"[a-z_]{1,10}", fullmatch=True)))
        lines = draw(st.lists(_text, min_size=1, max_size=3))
        if name:
            out.append(f"event: {name}{draw(_line_end)}")
        for line in lines:
            out.append(f"data: {line}{draw(_line_end)}")
        blank = draw(_line_end)
        if blank == "\n" and out[-1].endswith("\r"):
            blank = "\r\n"  # CR then LF would be one CRLF line end, not an empty line
        out.append(blank)
        expected.append(Event(data="\n".join(lines), event=name or "message"))
    return "".join(out).encode(), expected


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(max(c, 0), len(data)) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


@given(_event_streams(), st.lists(st.integers(0, 400), max_size=12))
def test_sse_any_split_gives_the_same_events(
    stream: tuple[bytes, list[Event]], cuts: list[int]
) -> None:
    data, expected = stream
    assert parse_all([data]) == expected
    assert parse_all(_split(data, cuts)) == expected
    assert parse_all([bytes([b]) for b in data]) == expected  # one byte at a time


@given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=10))
def test_sse_any_bytes_any_split_same_as_whole(data: bytes, cuts: list[int]) -> None:
    assert parse_all(_split(data, cuts)) == parse_all([data])


# == pure mappings =======================================================================


def test_estimate_tokens() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("Hello") == 1
    assert estimate_tokens(" How") == 1
    assert estimate_tokens("Hello! How are you?") == 6
    assert estimate_tokens("   ") == 1


def test_retry_after_forms() -> None:
    now = 1_750_000_000.0
    assert retry_after_ms({"Retry-After": "2"}, now) == 2000
    assert retry_after_ms({"retry-after": "1.5"}, now) == 1500
    assert retry_after_ms({"retry-after-ms": "250.2", "retry-after": "9"}, now) == 251
    when = datetime.fromtimestamp(now + 30, UTC)
    assert retry_after_ms({"Retry-After": format_datetime(when, usegmt=True)}, now) == 30000
    past = datetime.fromtimestamp(now - 30, UTC)
    assert retry_after_ms({"Retry-After": format_datetime(past, usegmt=True)}, now) == 0
    assert retry_after_ms({"Retry-After": "soon"}, now) is None
    assert retry_after_ms({"Retry-After": "-3"}, now) is None
    assert retry_after_ms({}, now) is None


@pytest.mark.parametrize(
    ("body", "kind", "message"),
    [
        (
            b'{"error":{"message":"Bad temp","type":"invalid_request_error","param":"t"}}',
            "invalid_request_error",
            "Bad temp",
        ),
        (
            b'{"error":{"message":"no","type":"invalid_request_error","code":"model_not_found"}}',
            "invalid_request_error/model_not_found",
            "no",
        ),
        (
            b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}',
            "overloaded_error",
            "Overloaded",
        ),
        (
            b'{"object":"error","message":"too big","type":"BadRequestError","code":400}',
            "BadRequestError",
            "too big",
        ),
        (
            b'{"error":{"message":"bad","type":"BadRequestError","param":null,"code":400}}',
            "BadRequestError",
            "bad",
        ),
        (b'{"error":"model \\"llama9\\" not found"}', "", 'model "llama9" not found'),
        (b'{"detail":"Not Found"}', "", "Not Found"),
        (b"<html><body>502 Bad Gateway</body></html>", "", ""),
        (b"upstream connect error", "", "upstream connect error"),
        (b"", "", ""),
    ],
)
def test_error_bodies_of_every_shape(body: bytes, kind: str, message: str) -> None:
    err = parse_error_body(body)
    assert (err.kind, err.message) == (kind, message)


@pytest.mark.parametrize(
    ("status", "message", "code"),
    [
        (400, "", CODE.INVALID_ARGUMENT),
        (401, "", CODE.UNAUTHENTICATED),
        (402, "", CODE.FAILED_PRECONDITION),
        (403, "", CODE.PERMISSION_DENIED),
        (404, "The model `x` does not exist", CODE.NOT_FOUND),
        (404, "Not Found", CODE.INVALID_ARGUMENT),
        (408, "", CODE.UNAVAILABLE),
        (409, "", CODE.ABORTED),
        (413, "", CODE.INVALID_ARGUMENT),
        (422, "", CODE.INVALID_ARGUMENT),
        (429, "", CODE.RESOURCE_EXHAUSTED),
        (500, "", CODE.UNAVAILABLE),
        (503, "", CODE.UNAVAILABLE),
        (529, "", CODE.UNAVAILABLE),
    ],
)
def test_http_status_mapping(status: int, message: str, code: grpc.StatusCode) -> None:
    from aimesh.mesh.providers.errors import ProviderError

    assert status_for(status, ProviderError("", message)) == code


def test_http_error_redacts_the_key_and_key_shaped_echoes() -> None:
    body = json.dumps(
        {"error": {"message": f"Key {KEY} and sk-proj-ab****cdef rejected", "type": "x"}}
    ).encode()
    err = http_error("openai", 401, {}, body, now=0, secrets=(KEY,))
    assert err.code == CODE.UNAUTHENTICATED
    assert KEY not in err.message and "sk-proj" not in err.message
    assert "[redacted]" in err.message
    assert redact(f"a {KEY} b", [KEY]) == "a [redacted] b"
    assert repr(ApiKey(KEY)) == "ApiKey(***)" and KEY not in str(ApiKey(KEY))


def test_pushback_only_on_retryable_statuses() -> None:
    headers = {"retry-after": "3"}
    assert http_error("x", 429, headers, b"", now=0).pushback_ms == 3000
    assert http_error("x", 503, headers, b"", now=0).pushback_ms == 3000
    assert http_error("x", 400, headers, b"", now=0).pushback_ms is None


def _struct(**fields: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(fields)
    return s


def test_openai_request_mapping() -> None:
    r = pb.GenerateRequest(
        model="gpt-4",
        messages=[
            pb.Message(role="system", content="Be brief."),
            pb.Message(role="user", content="Hi", name="alice"),
            pb.Message(role="assistant", content="Hello."),
            pb.Message(role="tool", content='{"ok":true}', name="call_1"),
            pb.Message(role="user", content="Go on"),
        ],
        max_tokens=100,
        temperature=0.7,
        top_p=0.9,
        stop=["\n\n"],
        seed=42,
        user="u-1",
        continuation="Once upon a",
        extensions=_struct(top_k=40, presence_penalty=0.5, sim_tokens_per_second=5),
    )
    plan = openai.chat_plan(r, "gpt-4o-mini", stream=True, options=openai.OpenAIOptions())
    assert plan.path == "/chat/completions"
    assert plan.start_index == 3
    assert plan.body == {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi", "name": "alice"},
            {"role": "assistant", "content": "Hello."},
            {"role": "tool", "content": '{"ok":true}', "tool_call_id": "call_1"},
            {"role": "user", "content": "Go on"},
            {"role": "assistant", "content": "Once upon a"},
        ],
        "max_tokens": 97,  # the continuation's 3 tokens count against max_tokens
        "temperature": 0.7,
        "top_p": 0.9,
        "stop": ["\n\n"],
        "seed": 42,
        "user": "u-1",
        "stream": True,
        "stream_options": {"include_usage": True},
        "top_k": 40,  # an integer, not 40.0
        "presence_penalty": 0.5,
    }
    vllm = openai.OpenAIOptions(
        max_tokens_field="max_completion_tokens", continue_final_message=True, stream_usage=False
    )
    r.extensions.update({"temperature": None})  # null: leave the parameter out
    body = openai.chat_plan(r, "m", stream=False, options=vllm).body
    assert "temperature" not in body
    assert body["max_completion_tokens"] == 97 and "max_tokens" not in body
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert body["stream"] is False and "stream_options" not in body


def test_openai_continuation_extends_a_trailing_assistant_message() -> None:
    r = pb.GenerateRequest(
        model="m",
        messages=[pb.Message(role="user", content="Q"), pb.Message(role="assistant", content="A:")],
        continuation=" forty",
    )
    msgs = openai.chat_plan(r, "m", stream=False, options=openai.OpenAIOptions()).body["messages"]
    assert msgs[-1] == {"role": "assistant", "content": "A: forty"}
    assert (
        "max_tokens"
        not in openai.chat_plan(r, "m", stream=False, options=openai.OpenAIOptions()).body
    )


def test_request_mapping_refusals() -> None:
    opts = openai.OpenAIOptions()
    with pytest.raises(MeshError) as info:
        openai.chat_plan(request(extensions=_struct(messages=[])), "m", stream=True, options=opts)
    assert info.value.code == CODE.INVALID_ARGUMENT
    assert info.value.message.startswith("extensions.messages:")
    tool = pb.GenerateRequest(model="m", messages=[pb.Message(role="tool", content="x")])
    with pytest.raises(MeshError, match=r"messages\[0\].name"):
        openai.chat_plan(tool, "m", stream=True, options=opts)
    with pytest.raises(MeshError, match=r"messages\[0\].name"):
        anthropic.messages_plan(tool, "m", stream=True, options=anthropic.AnthropicOptions())


def test_max_tokens_already_spent_by_the_continuation() -> None:
    r = request(max_tokens=2, continuation="one two three")
    plan = openai.chat_plan(r, "m", stream=True, options=openai.OpenAIOptions())
    assert plan.exhausted and plan.start_index == 3


def test_anthropic_request_mapping() -> None:
    r = pb.GenerateRequest(
        model="claude",
        messages=[
            pb.Message(role="system", content="Be brief."),
            pb.Message(role="user", content="Hi"),
            pb.Message(role="user", content="Still there?"),
            pb.Message(role="assistant", content="Yes."),
            pb.Message(role="system", content="Use English."),
            pb.Message(role="tool", content="42", name="toolu_01"),
            pb.Message(role="user", content="So?"),
        ],
        temperature=1.5,
        top_p=0.5,
        stop=["END"],
        seed=3,  # no counterpart: not sent
        user="u-1",
        continuation="The answer is ",
        extensions=_struct(top_k=5),
    )
    plan = anthropic.messages_plan(
        r, "claude-sonnet-4-20250514", stream=True, options=anthropic.AnthropicOptions()
    )
    assert plan.path == "/v1/messages"
    assert plan.strip_prefix == " "
    assert plan.start_index == 4  # "The", " answer", " is", " "
    assert plan.body == {
        "model": "claude-sonnet-4-20250514",
        "max_tokens": 1020,  # the default 1024, less the continuation's 4 tokens
        "messages": [
            {"role": "user", "content": "Hi\n\nStill there?"},
            {"role": "assistant", "content": "Yes."},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_01", "content": "42"},
                    {"type": "text", "text": "So?"},
                ],
            },
            {"role": "assistant", "content": "The answer is"},  # trailing whitespace cut
        ],
        "system": "Be brief.\n\nUse English.",
        "temperature": 1.0,  # the API's maximum
        "top_p": 0.5,
        "stop_sequences": ["END"],
        "metadata": {"user_id": "u-1"},
        "stream": True,
        "top_k": 5,
    }


def test_assembler_keeps_indices_contiguous_and_absorbs_the_estimate_gap() -> None:
    plan = Plan(path="/", body={}, start_index=3, strip_prefix=" ")
    asm = ChunkAssembler(plan, "fallback")
    chunks = [
        asm.feed(Delta(model="served-model", usage=ProviderUsage(prompt=30, completion=1))),
        asm.feed(Delta(text=" 42")),  # the prefill's cut whitespace is dropped
        asm.feed(Delta(text=".")),
        asm.feed(Delta(finish=pb.FINISH_REASON_STOP, usage=ProviderUsage(completion=4))),
    ]
    texts = [c for c in chunks if c is not None]
    assert [(c.text, c.index, c.token_count, c.model) for c in texts] == [
        ("42", 3, 1, "served-model"),
        (".", 4, 1, ""),
    ]
    last = asm.final()
    assert (last.index, last.token_count, last.finish_reason) == (5, 2, pb.FINISH_REASON_STOP)
    assert last.index + last.token_count == last.usage.completion_tokens == 3 + 4
    assert (last.usage.prompt_tokens, last.usage.total_tokens) == (27, 34)


def test_openai_chunk_and_error_events() -> None:
    usage_only = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}
    assert openai.chunk_delta(usage_only).usage == ProviderUsage(prompt=5, completion=2)
    assert openai.event_deltas(Event(data="[DONE]")) == [Delta(done=True)]
    with pytest.raises(MeshError) as info:
        openai.event_deltas(Event(data='{"error":{"message":"boom","type":"server_error"}}'))
    assert info.value.code == CODE.UNAVAILABLE and "boom" in info.value.message


def test_anthropic_events() -> None:
    def ev(o: dict[str, Any]) -> list[Delta]:
        return anthropic.event_deltas(Event(data=json.dumps(o), event=str(o["type"])))

    assert ev({"type": "ping"}) == []
    assert ev({"type": "some_future_event"}) == []
    assert (
        ev({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta"}}) == []
    )
    assert ev(
        {
            "type": "message_delta",
            "delta": {"stop_reason": "max_tokens"},
            "usage": {"output_tokens": 9},
        }
    ) == [Delta(finish=pb.FINISH_REASON_LENGTH, usage=ProviderUsage(completion=9))]
    with pytest.raises(MeshError) as info:
        ev({"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}})
    assert info.value.code == CODE.RESOURCE_EXHAUSTED


def test_model_map_flags() -> None:
    assert parse_model_map(["gpt-4=gpt-4o-mini", "emb = text-embedding-3-small"]) == {
        "gpt-4": "gpt-4o-mini",
        "emb": "text-embedding-3-small",
    }
    for bad in (["gpt-4"], ["=x"], ["a=b", "a=c"]):
        with pytest.raises(ValueError):
            parse_model_map(bad)


# == transcripts =========================================================================


@pytest.mark.parametrize("name", every_transcript())
def test_transcripts_are_well_formed(name: str) -> None:
    raw = load(name)
    t = split_transcript(raw)
    assert t.head.startswith(b"HTTP/1.1 ")
    assert t.complete == ("_cut" not in name), "only *_cut transcripts end early"
    body = b"".join(t.frames)
    if b"chunked" in t.head.lower():
        payload = b""
        for frame in t.frames:
            size_line, _, rest = frame.partition(b"\r\n")
            payload += rest[: int(size_line, 16)]
        if b"text/event-stream" in t.head:
            events = parse_all([payload])
            assert events
            for event in events:
                if event.data != "[DONE]":
                    json.loads(event.data)
    else:
        json.loads(body)


# == the adapter over HTTP ===============================================================


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    server = FakeProvider().start()
    yield server
    server.stop()


Make = Callable[..., Awaitable[tuple[RunningProvider, pb_grpc.InferenceStub]]]


@pytest.fixture
async def adapter(fake: FakeProvider) -> AsyncIterator[Make]:
    started: list[tuple[RunningProvider, grpc.aio.Channel]] = []

    async def make(
        kind: str = "openai",
        *,
        key: str = KEY,
        model_map: dict[str, str] | None = None,
        timeouts: Timeouts | None = None,
        base: str | None = None,
        options: Any = None,
        **config: Any,
    ) -> tuple[RunningProvider, pb_grpc.InferenceStub]:
        provider: Provider
        if kind == "openai":
            provider = openai.OpenAIProvider(ApiKey(key), options or openai.OpenAIOptions())
            url = base or fake.base + "/v1"
        else:
            provider = anthropic.AnthropicProvider(
                ApiKey(key), options or anthropic.AnthropicOptions()
            )
            url = base or fake.base
        running = await start_provider(
            provider,
            url,
            BackendConfig(
                instance_id=f"{kind}-adapter",
                model_map=model_map if model_map is not None else {"gpt-4": "gpt-4o-mini"},
                **config,
            ),
            timeouts=timeouts or Timeouts(),
        )
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        started.append((running, channel))
        return running, pb_grpc.InferenceStub(channel)

    yield make
    for running, channel in started:
        await channel.close()
        await running.server.stop(None)
        await running.backend.http.aclose()


async def _stream(
    stub: pb_grpc.InferenceStub, req: pb.GenerateRequest, timeout: float = 10
) -> list[pb.GenerateChunk]:
    return [c async for c in stub.GenerateStream(req, timeout=timeout)]


async def _stream_until_error(
    stub: pb_grpc.InferenceStub, req: pb.GenerateRequest
) -> tuple[list[pb.GenerateChunk], grpc.aio.AioRpcError]:
    chunks: list[pb.GenerateChunk] = []
    call = stub.GenerateStream(req, timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for c in call:
            chunks.append(c)
    return chunks, info.value


def _trailer(err: grpc.aio.AioRpcError, key: str) -> str | None:
    for k, v in err.trailing_metadata() or ():
        if k == key:
            return str(v)
    return None


async def test_openai_unary(fake: FakeProvider, adapter: Make) -> None:
    fake.reply("/v1/chat/completions", "openai_chat_unary.http")
    _, stub = await adapter()
    call = stub.Generate(request(max_tokens=50, temperature=0.2, seed=7, user="u9"), timeout=10)
    r = await call
    assert r.text == "Hello! How can I help you today?"
    assert r.finish_reason == pb.FINISH_REASON_STOP
    assert r.model == "gpt-4o-mini-2024-07-18"  # the snapshot that served it
    assert r.request_id == "chatcmpl-9aB3unary"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        2019,
        9,
        2028,
    )
    assert r.usage.cached_prompt_tokens == 1920
    assert dict(await call.trailing_metadata())["aimesh-instance"] == "openai-adapter"
    [sent] = fake.requests()
    assert (sent.method, sent.path) == ("POST", "/v1/chat/completions")
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.headers["content-type"] == "application/json"
    assert sent.json() == {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 50,
        "temperature": 0.2,
        "seed": 7,
        "user": "u9",
        "stream": False,
    }


async def test_openai_stream(fake: FakeProvider, adapter: Make) -> None:
    fake.reply("/v1/chat/completions", "openai_chat_stream.http")
    _, stub = await adapter()
    chunks = await _stream(stub, request())
    texts = [c.text for c in chunks[:-1]]
    assert texts == ["Hello", "!", " How", " can", " I", " help", " you", " today", "?"]
    assert [c.index for c in chunks] == list(range(10))
    assert all(c.token_count == 1 for c in chunks[:-1])
    assert chunks[0].model == "gpt-4o-mini-2024-07-18"
    assert all(not c.model for c in chunks[1:])
    last = chunks[-1]
    assert (last.text, last.token_count, last.finish_reason) == ("", 0, pb.FINISH_REASON_STOP)
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (19, 9)
    [sent] = fake.requests()
    assert sent.headers["accept"] == "text/event-stream"
    body = sent.json()
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == "gpt-4o-mini"


async def test_openai_stream_with_crlf_and_keep_alive_comments(
    fake: FakeProvider, adapter: Make
) -> None:
    fake.reply("/v1/chat/completions", "openai_chat_stream_crlf.http", pace=0.01)
    _, stub = await adapter(model_map={})
    chunks = await _stream(stub, request(model="meta-llama/Llama-3.1-8B-Instruct", max_tokens=4))
    assert "".join(c.text for c in chunks) == "The mesh routes every"
    assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert chunks[-1].usage.completion_tokens == 4
    assert (
        fake.requests()[0].json()["model"] == "meta-llama/Llama-3.1-8B-Instruct"
    )  # passed through


async def test_a_server_that_ignores_stream_true_still_streams(
    fake: FakeProvider, adapter: Make
) -> None:
    fake.reply("/v1/chat/completions", "openai_chat_unary.http")
    _, stub = await adapter()
    chunks = await _stream(stub, request())
    assert [c.text for c in chunks] == ["Hello! How can I help you today?", ""]
    assert chunks[0].token_count == 9 and chunks[0].model == "gpt-4o-mini-2024-07-18"
    assert (chunks[1].index, chunks[1].usage.completion_tokens) == (9, 9)


async def test_connections_are_kept_alive_and_reused(fake: FakeProvider, adapter: Make) -> None:
    fake.reply("/v1/chat/completions", "openai_chat_unary.http", always=True)
    _, stub = await adapter()
    for _ in range(3):
        await stub.Generate(request(), timeout=10)
    fake.reply("/v1/chat/completions", "openai_chat_stream.http")
    await _stream(stub, request())
    await stub.Generate(request(), timeout=10)
    assert len(fake.requests()) == 5
    assert fake.connections == 1


async def test_anthropic_unary(fake: FakeProvider, adapter: Make) -> None:
    fake.reply("/v1/messages", "anthropic_messages_unary.http")
    _, stub = await adapter("anthropic", model_map={"claude": "claude-sonnet-4-20250514"})
    req = pb.GenerateRequest(
        model="claude",
        messages=[
            pb.Message(role="system", content="Be brief."),
            pb.Message(role="user", content="Hello"),
        ],
    )
    r = await stub.Generate(req, timeout=10)
    assert r.text == "Hello! The mesh routes tokens."
    assert r.finish_reason == pb.FINISH_REASON_STOP
    assert r.model == "claude-sonnet-4-20250514"
    # Anthropic's input_tokens excludes cache reads: the prompt is both.
    assert (r.usage.prompt_tokens, r.usage.cached_prompt_tokens) == (21 + 2048, 2048)
    assert r.usage.completion_tokens == 9
    [sent] = fake.requests()
    assert sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == KEY
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in sent.headers
    assert sent.json() == {
        "model": "claude-sonnet-4-20250514",
        "max_tokens": 1024,
        "messages": [{"role": "user", "content": "Hello"}],
        "system": "Be brief.",
        "temperature": 0.0,
    }


async def test_anthropic_stream(fake: FakeProvider, adapter: Make) -> None:
    fake.reply("/v1/messages", "anthropic_messages_stream.http", pace=0.01)
    _, stub = await adapter("anthropic", model_map={"claude": "claude-sonnet-4-20250514"})
    chunks = await _stream(stub, request(model="claude", max_tokens=64))
    assert [c.text for c in chunks] == ["Hello", "! The mesh", " routes", " tokens.", ""]
    assert [(c.index, c.token_count) for c in chunks] == [(0, 1), (1, 3), (4, 1), (5, 2), (7, 1)]
    last = chunks[-1]
    assert last.finish_reason == pb.FINISH_REASON_STOP
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (25, 8)
    assert last.index + last.token_count == last.usage.completion_tokens
    assert chunks[0].model == "claude-sonnet-4-20250514"
    body = fake.requests()[0].json()
    assert body["stream"] is True and body["max_tokens"] == 64


async def test_anthropic_stop_sequence(fake: FakeProvider, adapter: Make) -> None:
    fake.reply("/v1/messages", "anthropic_messages_stream_stop_sequence.http")
    _, stub = await adapter("anthropic")
    chunks = await _stream(stub, request(model="claude", stop=[", four"]))
    assert "".join(c.text for c in chunks) == "one, two, three"
    assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    assert fake.requests()[0].json()["stop_sequences"] == [", four"]


@pytest.mark.parametrize(
    ("kind", "transcript", "pushback"),
    [
        ("openai", "openai_error_429.http", "1500"),
        ("anthropic", "anthropic_error_429.http", "12000"),
    ],
)
async def test_429_is_resource_exhausted_with_pushback(
    fake: FakeProvider, adapter: Make, kind: str, transcript: str, pushback: str
) -> None:
    path = "/v1/chat/completions" if kind == "openai" else "/v1/messages"
    fake.reply(path, transcript, always=True)
    _, stub = await adapter(kind)
    for unary in (True, False):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            if unary:
                await stub.Generate(request(), timeout=10)
            else:
                await _stream(stub, request())
        err = info.value
        assert err.code() == CODE.RESOURCE_EXHAUSTED
        assert "rate limit" in (err.details() or "").lower()
        assert _trailer(err, "grpc-retry-pushback-ms") == pushback


@pytest.mark.parametrize(
    ("kind", "transcript", "code", "says"),
    [
        ("openai", "openai_error_500.http", CODE.UNAVAILABLE, "The server had an error"),
        ("anthropic", "anthropic_error_529.http", CODE.UNAVAILABLE, "overloaded_error: Overloaded"),
        ("openai", "openai_error_401.http", CODE.UNAUTHENTICATED, "Incorrect API key provided"),
        ("anthropic", "anthropic_error_401.http", CODE.UNAUTHENTICATED, "invalid x-api-key"),
        ("openai", "openai_error_400.http", CODE.INVALID_ARGUMENT, "maximum context length"),
        ("anthropic", "anthropic_error_400.http", CODE.INVALID_ARGUMENT, "max_tokens: 100000"),
        ("openai", "vllm_error_400.http", CODE.INVALID_ARGUMENT, "max_tokens must be at least"),
        ("openai", "openai_error_404_model.http", CODE.NOT_FOUND, "gpt-9-imaginary"),
        ("openai", "ollama_error_404.http", CODE.NOT_FOUND, 'model "llama9" not found'),
    ],
)
async def test_provider_errors_map_to_statuses(
    fake: FakeProvider,
    adapter: Make,
    kind: str,
    transcript: str,
    code: grpc.StatusCode,
    says: str,
) -> None:
    path = "/v1/chat/completions" if kind == "openai" else "/v1/messages"
    fake.reply(path, transcript, always=True)
    _, stub = await adapter(kind)
    with pytest.raises(grpc.aio.AioRpcError) as unary:
        await stub.Generate(request(), timeout=10)
    chunks, streamed = await _stream_until_error(stub, request())
    assert chunks == []
    for err in (unary.value, streamed):
        assert err.code() == code
        details = err.details() or ""
        assert details.startswith(f"{kind}: HTTP ")
        assert says in details
        assert KEY not in details and "sk-test-" not in details
        assert _trailer(err, "aimesh-instance") == f"{kind}-adapter"


async def test_unreachable_provider_is_unavailable(adapter: Make) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    _, stub = await adapter(base=f"http://127.0.0.1:{port}/v1")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Generate(request(), timeout=10)
    assert info.value.code() == CODE.UNAVAILABLE
    assert f"cannot connect to http://127.0.0.1:{port}/v1" in (info.value.details() or "")


async def test_mid_stream_disconnect_is_unavailable_after_the_delivered_tokens(
    fake: FakeProvider, adapter: Make
) -> None:
    fake.reply("/v1/chat/completions", "openai_chat_stream_cut.http")
    _, stub = await adapter()
    chunks, err = await _stream_until_error(stub, request())
    assert [c.text for c in chunks] == ["Once", " upon", " a"]
    assert err.code() == CODE.UNAVAILABLE
    details = err.details() or ""
    assert "after 3 tokens delivered; resume elsewhere with continuation" in details
    assert "openai: connection to" in details


async def test_proxy_resumes_a_stream_the_provider_broke(
    fake: FakeProvider, adapter: Make, make_proxy: Callable[..., Awaitable[Any]]
) -> None:
    from aimesh.mesh.proxy.cluster import EndpointAddr

    from .support import mesh_doc

    fake.reply("/v1/chat/completions", "openai_chat_stream_cut.http")
    fake.reply("/v1/chat/completions", "openai_chat_stream_resume.http")
    a, _ = await adapter()
    b, _ = await adapter()
    doc = mesh_doc(
        [{"name": "llm", "models": ["gpt-4"], "loadBalancer": {"algorithm": "round_robin"}}]
    )
    extra = {"llm": [EndpointAddr(f"127.0.0.1:{a.port}"), EndpointAddr(f"127.0.0.1:{b.port}")]}
    proxy = await make_proxy(doc, extra=extra)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.ports['listen']}") as ch:
        chunks = await _stream(pb_grpc.InferenceStub(ch), request())
    assert "".join(c.text for c in chunks) == "Once upon a time, a mesh."
    assert [c.index for c in chunks] == list(range(len(chunks)))
    first, resumed = fake.requests()
    assert resumed.json()["messages"][-1] == {"role": "assistant", "content": "Once upon a"}
    assert chunks[-1].usage.completion_tokens == 3 + 5
    assert first.json()["messages"] == [{"role": "user", "content": "Hello"}]


async def test_anthropic_overloaded_error_event_mid_stream(
    fake: FakeProvider, adapter: Make
) -> None:
    fake.reply("/v1/messages", "anthropic_messages_stream_overloaded.http")
    _, stub = await adapter("anthropic")
    chunks, err = await _stream_until_error(stub, request(model="claude"))
    assert [c.text for c in chunks] == ["Partial", " answer"]
    assert err.code() == CODE.UNAVAILABLE
    assert "anthropic: overloaded_error mid-stream: Overloaded" in (err.details() or "")
    assert "after 2 tokens delivered" in (err.details() or "")


async def test_anthropic_continuation_is_a_prefill(fake: FakeProvider, adapter: Make) -> None:
    fake.reply("/v1/messages", "anthropic_messages_stream_prefill.http")
    _, stub = await adapter("anthropic")
    chunks = await _stream(
        stub, request("What is six times seven?", model="claude", continuation="The answer is ")
    )
    # The caller has "The answer is "; the model's " 42" loses the space it already has.
    assert [c.text for c in chunks] == ["42", ".", ""]
    assert [c.index for c in chunks] == [4, 5, 6]  # after "The", " answer", " is", " "
    assert chunks[-1].usage.completion_tokens == 4 + 3
    assert chunks[-1].usage.prompt_tokens == 30 - 4
    sent = fake.requests()[0].json()
    assert sent["messages"] == [
        {"role": "user", "content": "What is six times seven?"},
        {"role": "assistant", "content": "The answer is"},
    ]
    assert sent["max_tokens"] == 1024 - 4


async def test_openai_continuation_for_servers_that_continue_the_final_message(
    fake: FakeProvider, adapter: Make
) -> None:
    fake.reply("/v1/chat/completions", "openai_chat_stream_resume.http")
    _, stub = await adapter(options=openai.OpenAIOptions(continue_final_message=True))
    chunks = await _stream(stub, request(continuation="Once upon a", max_tokens=20))
    assert chunks[0].index == 3
    sent = fake.requests()[0].json()
    assert sent["messages"][-1] == {"role": "assistant", "content": "Once upon a"}
    assert sent["continue_final_message"] is True and sent["add_generation_prompt"] is False
    assert sent["max_tokens"] == 17


async def test_cancelling_the_call_closes_the_http_stream(
    fake: FakeProvider, adapter: Make
) -> None:
    # The server sends three tokens, then holds the response open (a model still thinking).
    fake.reply("/v1/chat/completions", "openai_chat_stream_cut.http", hold=True)
    running, stub = await adapter()
    call = stub.GenerateStream(request(), timeout=30)
    got = []
    async for c in call:
        got.append(c.text)
        if len(got) == 3:
            break
    assert fake.closed_early == 0
    call.cancel()
    await eventually(lambda: fake.closed_early == 1, timeout=5, what="the provider saw a close")
    await eventually(lambda: running.backend.inflight == 0, what="the call to end")
    assert running.backend.stats.cancelled == 1


async def test_deadline_bounds_the_http_request(fake: FakeProvider, adapter: Make) -> None:
    fake.reply("/v1/chat/completions", "openai_chat_unary.http", delay=30)
    _, stub = await adapter()
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Generate(request(), timeout=0.5)
    assert info.value.code() == CODE.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 3
    await eventually(lambda: fake.closed_early == 1, timeout=5, what="the provider saw a close")


async def test_read_timeout_without_a_deadline_is_unavailable(
    fake: FakeProvider, adapter: Make
) -> None:
    fake.reply("/v1/chat/completions", "openai_chat_unary.http", delay=30)
    _, stub = await adapter(timeouts=Timeouts(read=0.3))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Generate(request())
    assert info.value.code() == CODE.UNAVAILABLE
    assert "sent nothing for 0.3s" in (info.value.details() or "")


def test_http_timeouts_are_cut_to_the_deadline() -> None:
    t = Timeouts(connect=5, read=60, write=10, pool=5)
    assert t.bounded(None).read == 60
    bounded = t.bounded(2.5)
    assert (bounded.connect, bounded.read, bounded.write, bounded.pool) == (2.5, 2.5, 2.5, 2.5)
    assert t.bounded(30).connect == 5 and t.bounded(30).read == 30


async def test_openai_embeddings(fake: FakeProvider, adapter: Make) -> None:
    fake.reply("/v1/embeddings", "openai_embeddings.http")
    _, stub = await adapter(model_map={"embed": "text-embedding-3-small"})
    r = await stub.Embed(
        pb.EmbedRequest(model="embed", inputs=["hello", "mesh"], dimensions=4, user="u"),
        timeout=10,
    )
    assert [e.index for e in r.embeddings] == [0, 1]
    assert r.embeddings[0].values[:2] == pytest.approx([0.0023064255, -0.009327292])
    assert len(r.embeddings[1].values) == 4
    assert r.model == "text-embedding-3-small"
    assert (r.usage.prompt_tokens, r.usage.total_tokens) == (8, 8)
    assert fake.requests()[0].json() == {
        "model": "text-embedding-3-small",
        "input": ["hello", "mesh"],
        "dimensions": 4,
        "user": "u",
    }


async def test_anthropic_has_no_embeddings(fake: FakeProvider, adapter: Make) -> None:
    _, stub = await adapter("anthropic")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Embed(pb.EmbedRequest(model="claude", inputs=["x"]), timeout=10)
    assert info.value.code() == CODE.UNIMPLEMENTED
    assert "no embeddings endpoint" in (info.value.details() or "")
    assert fake.requests() == []


async def test_list_models(fake: FakeProvider, adapter: Make) -> None:
    _, stub = await adapter(model_map={"gpt-4": "gpt-4o-mini"}, models=("local-llama",))
    r = await stub.ListModels(pb.ListModelsRequest(), timeout=10)
    assert [(m.id, m.owned_by, m.supports_embed) for m in r.models] == [
        ("gpt-4", "openai", True),
        ("local-llama", "openai", True),
    ]
    assert fake.requests() == []
    fake.reply("/v1/models", "openai_models.http")
    _, stub = await adapter(list_provider_models=True)
    r = await stub.ListModels(pb.ListModelsRequest(), timeout=10)
    assert [m.id for m in r.models] == ["gpt-4", "gpt-4o-mini", "text-embedding-3-small"]
    fake.reply("/v1/models", "anthropic_models.http")
    _, stub = await adapter("anthropic", model_map={"claude": "x"}, list_provider_models=True)
    r = await stub.ListModels(pb.ListModelsRequest(), timeout=10)
    assert [(m.id, m.supports_embed) for m in r.models] == [
        ("claude", False),
        ("claude-3-5-haiku-20241022", False),
        ("claude-sonnet-4-20250514", False),
    ]


async def test_invalid_requests_never_reach_the_provider(fake: FakeProvider, adapter: Make) -> None:
    _, stub = await adapter()
    for bad, field in [
        (pb.GenerateRequest(model="gpt-4"), "messages"),
        (request(max_tokens=-1), "max_tokens"),
        (request(temperature=3), "temperature"),
        (request(stop=["a", "b", "c", "d", "e"]), "stop"),
        (request(model=""), "model"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Generate(bad, timeout=10)
        assert info.value.code() == CODE.INVALID_ARGUMENT
        assert (info.value.details() or "").startswith(field)
    assert fake.requests() == []


async def test_drain_cuts_held_streams_with_unavailable(fake: FakeProvider, adapter: Make) -> None:
    fake.reply("/v1/chat/completions", "openai_chat_stream_cut.http", hold=True)
    running, stub = await adapter()
    call = stub.GenerateStream(request(), timeout=30)
    got = [await call.read() for _ in range(3)]
    assert [c.text for c in got] == ["Once", " upon", " a"]
    stopping = asyncio.create_task(running.stop(grace=0.2))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        while True:
            c = await call.read()
            assert c is not grpc.aio.EOF  # type: ignore[attr-defined]
    assert info.value.code() == CODE.UNAVAILABLE
    assert "shut down before this stream finished (3 tokens delivered)" in (
        info.value.details() or ""
    )
    assert await stopping == 1
    await eventually(lambda: fake.closed_early == 1, what="the provider saw a close")


async def test_the_api_key_never_shows_in_statuses_or_logs(
    fake: FakeProvider, adapter: Make, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # httpx, httpcore, grpc and aimesh at their chattiest
    fake.reply("/v1/chat/completions", "openai_error_401.http")
    fake.reply("/v1/chat/completions", "openai_error_500.http")
    fake.reply("/v1/chat/completions", "openai_chat_stream_cut.http")
    fake.reply("/v1/chat/completions", "openai_chat_stream.http")
    _, stub = await adapter()
    details = []
    for _ in range(2):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Generate(request(), timeout=10)
        details.append(info.value.details() or "")
    _, err = await _stream_until_error(stub, request())
    details.append(err.details() or "")
    await _stream(stub, request())
    assert len(fake.requests()) == 4
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in fake.requests())
    everything = "\n".join(details) + caplog.text
    assert "HTTP Request: POST" in caplog.text  # httpx did log its requests
    assert KEY not in everything
    assert KEY[-12:] not in everything


# == a real process ======================================================================


def _registered(control_plane: str) -> list[Any]:
    from aimesh.control.v1 import control_plane_pb2 as cp_pb
    from aimesh.control.v1 import control_plane_pb2_grpc as cp_grpc

    with grpc.insecure_channel(control_plane) as ch:
        return list(cp_grpc.RegistryStub(ch).List(cp_pb.ListRequest(), timeout=5).instances)


@pytest.mark.slow
def test_backend_process_serves_inference_health_reflection_and_registers(
    tmp_path: Path,
) -> None:
    server = FakeProvider().start()
    cp = procs.start_control_plane(admin=False)
    try:
        server.reply("/v1/chat/completions", "openai_chat_unary.http")
        server.reply("/v1/chat/completions", "openai_chat_stream.http")
        key_file = tmp_path / "key"
        key_file.write_text(KEY + "\n")
        proc = procs.start(
            "openai-backend",
            procs.aimesh_command(
                "backend",
                "openai",
                "--listen",
                "127.0.0.1:0",
                "--base-url",
                f"{server.base}/v1",
                "--api-key-file",
                str(key_file),
                "--model-map",
                "gpt-4=gpt-4o-mini",
                "--instance-id",
                "openai-proc",
                "--control-plane",
                cp.address,
                "--zone",
                "z1",
            ),
        )
        try:
            with grpc.insecure_channel(proc.address) as ch:
                stub = pb_grpc.InferenceStub(ch)
                r = stub.Generate(request(), timeout=10)
                assert r.text == "Hello! How can I help you today?"
                chunks = list(stub.GenerateStream(request(), timeout=10))
                assert "".join(c.text for c in chunks) == "Hello! How can I help you today?"
                health = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service="aimesh.inference.v1.Inference"),
                    timeout=5,
                )
                assert health.status == health_pb2.HealthCheckResponse.SERVING
                reflect = ch.stream_stream(
                    f"/{REFLECTION_V1}/ServerReflectionInfo",
                    request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                    response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
                )
                listed = next(
                    iter(
                        reflect(
                            iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                            timeout=10,
                        )
                    )
                )
                names = {s.name for s in listed.list_services_response.service}
                assert {"aimesh.inference.v1.Inference", "grpc.health.v1.Health"} <= names
            assert [r.json()["model"] for r in server.requests()] == ["gpt-4o-mini"] * 2
            deadline = time.monotonic() + 10
            while not (registered := _registered(cp.address)) and time.monotonic() < deadline:
                time.sleep(0.05)
            [instance] = registered
            assert (instance.service, instance.address, instance.zone) == (
                "gpt-4",
                proc.address,
                "z1",
            )
            assert (instance.instance_id, list(instance.models)) == ("openai-proc", ["gpt-4"])
            assert proc.terminate() == 0
            assert _registered(cp.address) == []  # deregistered on SIGTERM
        finally:
            proc.kill()
        output = "".join(proc.output)
        assert "listening on 127.0.0.1:" in output and "gpt-4->gpt-4o-mini" in output
        assert "stopped" in output
        assert KEY not in output
    finally:
        cp.kill()
        server.stop()


def test_backend_refuses_an_unreadable_key_file(tmp_path: Path) -> None:
    import subprocess

    out = subprocess.run(
        procs.aimesh_command(
            "backend",
            "anthropic",
            "--api-key-file",
            str(tmp_path / "missing"),
            "--listen",
            "127.0.0.1:0",
        ),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "cannot read --api-key-file" in out.stderr
