"""The OpenAI Chat Completions API as an Inference backend (`aimesh backend openai`).

Speaks `POST {base}/chat/completions` (unary, and streamed as server-sent events
`data: {chunk}` ending with `data: [DONE]`), `POST {base}/embeddings` and `GET
{base}/models`, so it fronts OpenAI and the servers that speak its API: vLLM, Ollama,
llama.cpp's server, TGI. The translations are pure functions; `OpenAIProvider` binds them
for `base.ProviderBackend`, which does the I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import grpc

from aimesh.inference.v1 import inference_pb2 as pb

from ..errors import MeshError, invalid_argument
from .base import ApiKey, Provider
from .common import (
    Delta,
    Plan,
    ProviderUsage,
    continuation_plan,
    extensions_json,
    merge_extensions,
    prompt_estimate,
)
from .errors import redact, stream_error
from .sse import Event

NAME = "openai"
DONE = "[DONE]"
RESERVED = ("model", "messages", "stream", "stream_options")

FINISH: dict[str, pb.FinishReason.ValueType] = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "content_filter": pb.FINISH_REASON_CONTENT_FILTER,
    "tool_calls": pb.FINISH_REASON_TOOL_CALLS,
    "function_call": pb.FINISH_REASON_TOOL_CALLS,  # the deprecated name of tool_calls
}


@dataclass(frozen=True, slots=True)
class OpenAIOptions:
    # OpenAI's newer models take `max_completion_tokens` (and refuse `max_tokens`); most
    # OpenAI-compatible servers know only `max_tokens`.
    max_tokens_field: str = "max_tokens"
    # With a continuation, also send {"continue_final_message": true,
    # "add_generation_prompt": false}: vLLM (and servers copying it) then continue the
    # trailing assistant message instead of starting a new turn. OpenAI refuses the fields.
    continue_final_message: bool = False
    # stream_options.include_usage: a last chunk with the usage (servers too old to
    # know the option refuse it).
    stream_usage: bool = True


def sampling_number(value: float) -> float:
    """A proto float (single precision: 0.7 is 0.699999988...) as the decimal meant."""
    return float(f"{value:.6g}")


def chat_messages(r: pb.GenerateRequest) -> list[dict[str, Any]]:
    """The conversation, with the continuation as a trailing assistant message (or
    appended to the caller's own trailing assistant message)."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(r.messages):
        msg: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.role == "tool":
            # The contract has no tool-call id field; a tool result carries it in `name`.
            if not m.name:
                raise invalid_argument(
                    f"messages[{i}].name", "a tool result needs the tool call's id in name"
                )
            msg["tool_call_id"] = m.name
        elif m.name:
            msg["name"] = m.name
        out.append(msg)
    if r.continuation:
        if out and out[-1]["role"] == "assistant":
            out[-1]["content"] = out[-1]["content"] + r.continuation
        else:
            out.append({"role": "assistant", "content": r.continuation})
    return out


def chat_plan(
    r: pb.GenerateRequest, provider_model: str, *, stream: bool, options: OpenAIOptions
) -> Plan:
    """The Chat Completions request for a GenerateRequest."""
    start, left = continuation_plan(r, r.max_tokens)
    prompt = prompt_estimate(r)
    if left is not None and left <= 0:
        return Plan(
            path="/chat/completions",
            body={},
            start_index=start,
            prompt_estimate=prompt,
            exhausted=True,
        )
    body: dict[str, Any] = {"model": provider_model, "messages": chat_messages(r)}
    if left is not None:
        body[options.max_tokens_field] = left
    body["temperature"] = sampling_number(r.temperature)
    if r.top_p:
        body["top_p"] = sampling_number(r.top_p)
    if r.stop:
        body["stop"] = list(r.stop)
    if r.HasField("seed"):
        body["seed"] = r.seed
    if r.user:
        body["user"] = r.user
    if r.continuation and options.continue_final_message:
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
    body["stream"] = stream
    if stream and options.stream_usage:
        body["stream_options"] = {"include_usage": True}
    body = merge_extensions(body, extensions_json(r), RESERVED)
    return Plan(path="/chat/completions", body=body, start_index=start, prompt_estimate=prompt)


def finish_reason(value: object) -> pb.FinishReason.ValueType | None:
    if not value:
        return None
    return FINISH.get(str(value), pb.FINISH_REASON_UNSPECIFIED)


def usage_from(value: object) -> ProviderUsage | None:
    if not isinstance(value, dict):
        return None
    details = value.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return ProviderUsage(
        prompt=_int(value.get("prompt_tokens")),
        completion=_int(value.get("completion_tokens")),
        cached=_int(cached),
    )


def _int(value: object) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def chunk_delta(doc: Any, secrets: tuple[str, ...] = ()) -> Delta:
    """One `chat.completion.chunk` (or the usage-only last chunk, whose choices are [])."""
    if not isinstance(doc, dict):
        raise MeshError(grpc.StatusCode.UNAVAILABLE, f"{NAME}: a stream chunk is not an object")
    error = doc.get("error")
    if isinstance(error, dict):
        raise stream_error(NAME, error, secrets)
    if isinstance(error, str):
        raise stream_error(NAME, {"message": error}, secrets)
    text = ""
    finish = None
    choices = doc.get("choices") or []
    if choices and isinstance(choices[0], dict):
        choice = choices[0]
        delta = choice.get("delta") or {}
        content = delta.get("content") if isinstance(delta, dict) else None
        text = content if isinstance(content, str) else ""
        finish = finish_reason(choice.get("finish_reason"))
    return Delta(
        text=text,
        finish=finish,
        usage=usage_from(doc.get("usage")),
        model=str(doc.get("model") or ""),
        response_id=str(doc.get("id") or ""),
    )


def event_deltas(event: Event, secrets: tuple[str, ...] = ()) -> list[Delta]:
    data = event.data.strip()
    if data == DONE:
        return [Delta(done=True)]
    if event.event == "error":
        raise stream_error(NAME, {"message": data}, secrets)
    try:
        doc = json.loads(data)
    except ValueError:
        raise MeshError(
            grpc.StatusCode.UNAVAILABLE,
            redact(f"{NAME}: a stream event is not JSON: {data[:200]!r}", secrets),
        ) from None
    return [chunk_delta(doc, secrets)]


def response_delta(doc: Any) -> Delta:
    """A whole `chat.completion` object."""
    if not isinstance(doc, dict):
        raise MeshError(grpc.StatusCode.UNAVAILABLE, f"{NAME}: the response is not an object")
    text = ""
    finish = None
    choices = doc.get("choices") or []
    if choices and isinstance(choices[0], dict):
        message = choices[0].get("message") or {}
        content = message.get("content") if isinstance(message, dict) else None
        text = content if isinstance(content, str) else ""
        finish = finish_reason(choices[0].get("finish_reason"))
    return Delta(
        text=text,
        finish=finish,
        usage=usage_from(doc.get("usage")),
        model=str(doc.get("model") or ""),
        response_id=str(doc.get("id") or ""),
        done=True,
    )


def embeddings_body(r: pb.EmbedRequest, provider_model: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": provider_model, "input": list(r.inputs)}
    if r.dimensions:
        body["dimensions"] = r.dimensions
    if r.user:
        body["user"] = r.user
    return body


def embeddings_response(doc: Any, r: pb.EmbedRequest, provider_model: str) -> pb.EmbedResponse:
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise MeshError(grpc.StatusCode.UNAVAILABLE, f"{NAME}: the embeddings response has no data")
    items = sorted(
        (d for d in doc["data"] if isinstance(d, dict)), key=lambda d: int(d.get("index", 0))
    )
    if len(items) != len(r.inputs):
        raise MeshError(
            grpc.StatusCode.UNAVAILABLE,
            f"{NAME}: {len(items)} embeddings for {len(r.inputs)} inputs",
        )
    usage = usage_from(doc.get("usage")) or ProviderUsage()
    prompt = usage.prompt or 0
    return pb.EmbedResponse(
        embeddings=[
            pb.Embedding(index=int(d.get("index", i)), values=[float(v) for v in d["embedding"]])
            for i, d in enumerate(items)
        ],
        model=str(doc.get("model") or provider_model),
        usage=pb.Usage(prompt_tokens=prompt, total_tokens=prompt),
    )


def models_response(doc: Any) -> list[pb.ModelInfo]:
    data = doc.get("data") if isinstance(doc, dict) else None
    return [
        pb.ModelInfo(
            id=str(m["id"]),
            owned_by=str(m.get("owned_by") or NAME),
            supports_generate=True,
            supports_embed=True,
        )
        for m in (data or [])
        if isinstance(m, dict) and m.get("id")
    ]


class OpenAIProvider(Provider):
    name = NAME
    supports_embed = True
    reserved = RESERVED
    models_path = "/models"

    def __init__(self, api_key: ApiKey, options: OpenAIOptions = OpenAIOptions()) -> None:
        super().__init__(api_key)
        self.options = options

    def headers(self) -> dict[str, str]:
        key = self.api_key.reveal()
        return {"authorization": f"Bearer {key}"} if key else {}

    def plan_generate(self, r: pb.GenerateRequest, provider_model: str, stream: bool) -> Plan:
        return chat_plan(r, provider_model, stream=stream, options=self.options)

    def stream_deltas(self, event: Event) -> list[Delta]:
        return event_deltas(event, self.secrets())

    def response_delta(self, doc: Any) -> Delta:
        return response_delta(doc)

    def plan_embed(self, r: pb.EmbedRequest, provider_model: str) -> tuple[str, dict[str, Any]]:
        return "/embeddings", embeddings_body(r, provider_model)

    def embed_response(self, doc: Any, r: pb.EmbedRequest, provider_model: str) -> pb.EmbedResponse:
        return embeddings_response(doc, r, provider_model)

    def models_response(self, doc: Any) -> list[pb.ModelInfo]:
        return models_response(doc)
