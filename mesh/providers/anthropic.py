"""The Anthropic Messages API as an Inference backend (`aimesh backend anthropic`).

Speaks `POST {base}/v1/messages` (unary, and streamed as named server-sent events:
message_start, content_block_start/delta/stop, message_delta, message_stop, ping, error)
and `GET {base}/v1/models`, with the `x-api-key` and `anthropic-version` headers. The
translations are pure functions; `AnthropicProvider` binds them for the backend.

Differences from the contract's OpenAI-shaped fields, handled here:
- "system" turns become the top-level `system` parameter (joined by blank lines);
- consecutive turns of one role are merged into one message (the API wants user and
  assistant to alternate); "tool" turns become user `tool_result` blocks (id in `name`);
- `max_tokens` is required: 0 sends the backend's default (--default-max-tokens);
- `temperature` above 1 (the API's maximum) is sent as 1; `seed` has no counterpart;
- `continuation` is an assistant prefill, which the API continues; as the API refuses
  a prefill ending in whitespace, that whitespace is cut and dropped again from the
  start of the answer (the caller already has it).
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
from .openai import sampling_number
from .sse import Event

NAME = "anthropic"
API_VERSION = "2023-06-01"
DEFAULT_BASE_URL = "https://api.anthropic.com"
RESERVED = ("model", "messages", "stream")

STOP_REASONS: dict[str, pb.FinishReason.ValueType] = {
    "end_turn": pb.FINISH_REASON_STOP,
    "stop_sequence": pb.FINISH_REASON_STOP_SEQUENCE,
    "max_tokens": pb.FINISH_REASON_LENGTH,
    "model_context_window_exceeded": pb.FINISH_REASON_LENGTH,
    "tool_use": pb.FINISH_REASON_TOOL_CALLS,
    "refusal": pb.FINISH_REASON_CONTENT_FILTER,
    "pause_turn": pb.FINISH_REASON_STOP,
}


@dataclass(frozen=True, slots=True)
class AnthropicOptions:
    version: str = API_VERSION
    default_max_tokens: int = 1024


def _render(blocks: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    if all(b["type"] == "text" for b in blocks):
        return "\n\n".join(b["text"] for b in blocks)
    return blocks


def messages_and_system(
    r: pb.GenerateRequest,
) -> tuple[list[dict[str, Any]], str, str]:
    """(messages, system prompt, whitespace cut off the prefill)."""
    system: list[str] = []
    turns: list[tuple[str, list[dict[str, Any]]]] = []
    for i, m in enumerate(r.messages):
        if m.role == "system":
            system.append(m.content)
            continue
        if m.role == "tool":
            if not m.name:
                raise invalid_argument(
                    f"messages[{i}].name", "a tool result needs the tool_use id in name"
                )
            role = "user"
            block: dict[str, Any] = {
                "type": "tool_result",
                "tool_use_id": m.name,
                "content": m.content,
            }
        else:
            role = m.role
            block = {"type": "text", "text": m.content}
        if turns and turns[-1][0] == role:
            turns[-1][1].append(block)
        else:
            turns.append((role, [block]))
    if r.continuation:
        if turns and turns[-1][0] == "assistant" and turns[-1][1][-1]["type"] == "text":
            turns[-1][1][-1]["text"] += r.continuation
        elif turns and turns[-1][0] == "assistant":
            turns[-1][1].append({"type": "text", "text": r.continuation})
        else:
            turns.append(("assistant", [{"type": "text", "text": r.continuation}]))
    cut = ""
    if turns and turns[-1][0] == "assistant" and turns[-1][1][-1]["type"] == "text":
        # "final assistant content cannot end with trailing whitespace"
        last = turns[-1][1][-1]
        kept = last["text"].rstrip()
        cut = last["text"][len(kept) :]
        last["text"] = kept
        if not kept:
            turns[-1][1].pop()
            if not turns[-1][1]:
                turns.pop()
    messages = [{"role": role, "content": _render(blocks)} for role, blocks in turns]
    return messages, "\n\n".join(system), cut


def messages_plan(
    r: pb.GenerateRequest, provider_model: str, *, stream: bool, options: AnthropicOptions
) -> Plan:
    """The Messages API request for a GenerateRequest."""
    start, left = continuation_plan(r, r.max_tokens or options.default_max_tokens)
    prompt = prompt_estimate(r)
    if left is not None and left <= 0:
        return Plan(
            path="/v1/messages", body={}, start_index=start, prompt_estimate=prompt, exhausted=True
        )
    messages, system, cut = messages_and_system(r)
    max_tokens = left if left is not None else max(1, options.default_max_tokens)
    body: dict[str, Any] = {"model": provider_model, "max_tokens": max_tokens, "messages": messages}
    if system:
        body["system"] = system
    body["temperature"] = min(1.0, sampling_number(r.temperature))
    if r.top_p:
        body["top_p"] = sampling_number(r.top_p)
    if r.stop:
        body["stop_sequences"] = list(r.stop)
    if r.user:
        body["metadata"] = {"user_id": r.user}
    if stream:
        body["stream"] = True
    body = merge_extensions(body, extensions_json(r), RESERVED)
    return Plan(
        path="/v1/messages",
        body=body,
        start_index=start,
        strip_prefix=cut,
        prompt_estimate=prompt,
    )


def stop_reason(value: object) -> pb.FinishReason.ValueType | None:
    if not value:
        return None
    return STOP_REASONS.get(str(value), pb.FINISH_REASON_UNSPECIFIED)


def _int(value: object) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def usage_from(value: object) -> ProviderUsage | None:
    """Anthropic's `input_tokens` leaves out the prompt cache's tokens: the prompt is
    input + cache reads + cache writes, of which the reads were served from cache."""
    if not isinstance(value, dict):
        return None
    inp = _int(value.get("input_tokens"))
    read = _int(value.get("cache_read_input_tokens"))
    created = _int(value.get("cache_creation_input_tokens"))
    prompt = None if inp is None else inp + (read or 0) + (created or 0)
    return ProviderUsage(prompt=prompt, completion=_int(value.get("output_tokens")), cached=read)


def event_deltas(event: Event, secrets: tuple[str, ...] = ()) -> list[Delta]:
    """What one streamed event means. Unknown event types are ignored, as the API's
    versioning policy asks of clients."""
    try:
        doc = json.loads(event.data)
    except ValueError:
        raise MeshError(
            grpc.StatusCode.UNAVAILABLE,
            redact(f"{NAME}: a stream event is not JSON: {event.data[:200]!r}", secrets),
        ) from None
    if not isinstance(doc, dict):
        return []
    kind = doc.get("type") or event.event
    if kind == "content_block_delta":
        delta = doc.get("delta") or {}
        if isinstance(delta, dict) and delta.get("type") == "text_delta":
            return [Delta(text=str(delta.get("text") or ""))]
        return []  # tool input JSON, thinking, signatures: not text of the answer
    if kind == "content_block_start":
        block = doc.get("content_block") or {}
        if isinstance(block, dict) and block.get("type") == "text" and block.get("text"):
            return [Delta(text=str(block["text"]))]
        return []
    if kind == "message_start":
        message = doc.get("message") or {}
        if not isinstance(message, dict):
            return []
        return [
            Delta(
                model=str(message.get("model") or ""),
                response_id=str(message.get("id") or ""),
                usage=usage_from(message.get("usage")),
            )
        ]
    if kind == "message_delta":
        delta = doc.get("delta") or {}
        reason = delta.get("stop_reason") if isinstance(delta, dict) else None
        return [Delta(finish=stop_reason(reason), usage=usage_from(doc.get("usage")))]
    if kind == "message_stop":
        return [Delta(done=True)]
    if kind == "error":
        error = doc.get("error")
        raise stream_error(NAME, error if isinstance(error, dict) else {}, secrets)
    return []  # ping, content_block_stop, and event types added later


def response_delta(doc: Any) -> Delta:
    """A whole `message` object."""
    if not isinstance(doc, dict):
        raise MeshError(grpc.StatusCode.UNAVAILABLE, f"{NAME}: the response is not an object")
    text = "".join(
        str(b.get("text") or "")
        for b in doc.get("content") or []
        if isinstance(b, dict) and b.get("type") == "text"
    )
    return Delta(
        text=text,
        finish=stop_reason(doc.get("stop_reason")),
        usage=usage_from(doc.get("usage")),
        model=str(doc.get("model") or ""),
        response_id=str(doc.get("id") or ""),
        done=True,
    )


def models_response(doc: Any) -> list[pb.ModelInfo]:
    data = doc.get("data") if isinstance(doc, dict) else None
    return [
        pb.ModelInfo(id=str(m["id"]), owned_by=NAME, supports_generate=True)
        for m in (data or [])
        if isinstance(m, dict) and m.get("id")
    ]


class AnthropicProvider(Provider):
    name = NAME
    supports_embed = False
    reserved = RESERVED
    models_path = "/v1/models"

    def __init__(self, api_key: ApiKey, options: AnthropicOptions = AnthropicOptions()) -> None:
        super().__init__(api_key)
        self.options = options

    def headers(self) -> dict[str, str]:
        headers = {"anthropic-version": self.options.version}
        key = self.api_key.reveal()
        if key:
            headers["x-api-key"] = key
        return headers

    def plan_generate(self, r: pb.GenerateRequest, provider_model: str, stream: bool) -> Plan:
        return messages_plan(r, provider_model, stream=stream, options=self.options)

    def stream_deltas(self, event: Event) -> list[Delta]:
        return event_deltas(event, self.secrets())

    def response_delta(self, doc: Any) -> Delta:
        return response_delta(doc)

    def plan_embed(self, r: pb.EmbedRequest, provider_model: str) -> tuple[str, dict[str, Any]]:
        raise MeshError(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{NAME}: the Anthropic API has no embeddings endpoint; serve Embed for "
            f"{r.model!r} from another backend (e.g. `aimesh backend openai`)",
        )

    def models_response(self, doc: Any) -> list[pb.ModelInfo]:
        return models_response(doc)
