"""What the provider adapters share, all pure (no I/O): request validation, token
estimates, extensions as JSON, and `ChunkAssembler`, which turns a provider's deltas into
GenerateChunks with the index continuity and usage the Inference contract requires.

Token positions. The contract counts `index`, `token_count` and `usage` in tokens, and a
provider streams text, not tokens. So chunk positions are estimates (`estimate_tokens`,
a GPT-style pre-tokenizer count, which tends to undercount real BPE tokens slightly), and
the last chunk, which carries the provider's exact usage, takes up the difference in its
`token_count`: consecutive chunks stay contiguous and the final `index + token_count`
equals `usage.completion_tokens` whenever the estimate did not overshoot.

Continuation. The text already delivered counts as `estimate_tokens(continuation)`
tokens: the first chunk's index, the tokens `max_tokens` has already spent, and what
`usage.completion_tokens` adds to the provider's count (and `usage.prompt_tokens` takes
off, since the provider counted the prefix as prompt), so a resumed stream reports what an
unbroken one would.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format

from aimesh.inference.v1 import inference_pb2 as pb

from ..errors import invalid_argument

ROLES = ("system", "user", "assistant", "tool")
MAX_STOP_SEQUENCES = 4

# GPT-2's pre-tokenizer (contractions, letter runs, digit runs, punctuation runs, spaces);
# a word is usually one BPE token, a long or rare one several.
_PRETOKEN = re.compile(
    r"'(?:s|t|re|ve|m|ll|d)| ?[^\W\d_]+| ?\d{1,3}| ?[^\s\w]+|\s+(?!\S)|\s+|_+",
    re.UNICODE,
)

# Extension keys that belong to the mesh or the simulated backend, never to a provider.
MESH_EXTENSION_PREFIXES = ("sim_", "aimesh_")


def estimate_tokens(text: str) -> int:
    """About how many tokens `text` is (at least 1 for any non-empty text)."""
    if not text:
        return 0
    return max(1, len(_PRETOKEN.findall(text)))


def validate_generate(r: pb.GenerateRequest) -> None:
    """The contract's checks, each failure INVALID_ARGUMENT naming the field."""
    if not r.model:
        raise invalid_argument("model", "must not be empty")
    if not r.messages:
        raise invalid_argument("messages", "must not be empty; send at least one message")
    for i, m in enumerate(r.messages):
        if m.role not in ROLES:
            raise invalid_argument(
                f"messages[{i}].role", f"{m.role!r} is not one of system, user, assistant, tool"
            )
    if r.max_tokens < 0:
        raise invalid_argument("max_tokens", f"must not be negative, got {r.max_tokens}")
    if not 0.0 <= r.temperature <= 2.0:
        raise invalid_argument("temperature", f"must be between 0 and 2, got {r.temperature}")
    if not 0.0 <= r.top_p <= 1.0:
        raise invalid_argument("top_p", f"must be between 0 and 1, got {r.top_p}")
    if len(r.stop) > MAX_STOP_SEQUENCES:
        raise invalid_argument("stop", f"at most {MAX_STOP_SEQUENCES} sequences, got {len(r.stop)}")


def validate_embed(r: pb.EmbedRequest) -> None:
    if not r.model:
        raise invalid_argument("model", "must not be empty")
    if not r.inputs:
        raise invalid_argument("inputs", "must not be empty; send at least one text")
    if r.dimensions < 0:
        raise invalid_argument("dimensions", f"must not be negative, got {r.dimensions}")


def _json_numbers(value: Any) -> Any:
    # google.protobuf.Struct holds every number as a double; 40.0 goes out as 40, since
    # providers validate integer parameters (top_k, n, logprobs) strictly.
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _json_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_numbers(v) for v in value]
    return value


def extensions_json(r: pb.GenerateRequest) -> dict[str, Any]:
    """`extensions` as plain JSON, without the mesh's own keys (sim_*, aimesh_*)."""
    if not r.HasField("extensions"):
        return {}
    raw = json_format.MessageToDict(r.extensions)
    return {
        k: _json_numbers(v) for k, v in raw.items() if not k.startswith(MESH_EXTENSION_PREFIXES)
    }


def merge_extensions(
    body: dict[str, Any], extensions: Mapping[str, Any], reserved: tuple[str, ...]
) -> dict[str, Any]:
    """`body` with `extensions` laid over it: a value replaces the mapped one, a null
    removes it (e.g. {"temperature": null} for models that refuse the parameter); keys
    the adapter owns are refused."""
    for key in extensions:
        if key in reserved:
            raise invalid_argument(
                f"extensions.{key}", "is set by the provider adapter from the request's fields"
            )
    merged = {**body, **extensions}
    return {k: v for k, v in merged.items() if v is not None}


@dataclass(frozen=True, slots=True)
class ProviderUsage:
    """Token counts as the provider reported them (None: not reported)."""

    prompt: int | None = None
    completion: int | None = None
    cached: int | None = None

    def merged(self, later: ProviderUsage | None) -> ProviderUsage:
        if later is None:
            return self
        return ProviderUsage(
            prompt=later.prompt if later.prompt is not None else self.prompt,
            completion=later.completion if later.completion is not None else self.completion,
            cached=later.cached if later.cached is not None else self.cached,
        )


@dataclass(frozen=True, slots=True)
class Delta:
    """What one provider event means: text to add, and/or how and when it ended."""

    text: str = ""
    finish: pb.FinishReason.ValueType | None = None
    usage: ProviderUsage | None = None
    model: str = ""
    response_id: str = ""
    done: bool = False  # the provider's end-of-stream marker ([DONE], message_stop)


@dataclass(frozen=True, slots=True)
class Plan:
    """A request translated for a provider: where to send what, and what the assembler
    needs to know to answer in the contract's terms."""

    path: str
    body: dict[str, Any]
    start_index: int = 0  # tokens already delivered (the continuation's estimate)
    strip_prefix: str = ""  # whitespace cut off the prefill, to drop from the output
    prompt_estimate: int = 0
    # max_tokens is already used up by the continuation: answer LENGTH, call nothing.
    exhausted: bool = False


def continuation_plan(r: pb.GenerateRequest, limit: int) -> tuple[int, int | None]:
    """(tokens already delivered, tokens left for the provider or None for its default).
    `limit` is max_tokens or the adapter's default (0: no limit sent). The contract
    counts the continuation against max_tokens."""
    start = estimate_tokens(r.continuation)
    if not limit:
        return start, None
    return start, limit - start


def prompt_estimate(r: pb.GenerateRequest) -> int:
    return sum(estimate_tokens(m.content) for m in r.messages)


def make_usage(
    reported: ProviderUsage, *, start_index: int, generated_estimate: int, prompt_guess: int
) -> pb.Usage:
    """The contract's Usage: completion counts the continuation, prompt does not."""
    if reported.completion is not None:
        completion = reported.completion + start_index
    else:
        completion = start_index + generated_estimate
    if reported.prompt is not None:
        prompt = max(0, reported.prompt - start_index)
    else:
        prompt = prompt_guess
    return pb.Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        cached_prompt_tokens=reported.cached or 0,
    )


@dataclass(slots=True)
class ChunkAssembler:
    """Deltas in, GenerateChunks out: contiguous indices from `start_index`, the served
    model on the first chunk, and a last chunk with finish_reason and usage."""

    plan: Plan
    fallback_model: str
    position: int = field(init=False)
    model: str = field(init=False, default="")
    response_id: str = field(init=False, default="")
    finish: pb.FinishReason.ValueType | None = field(init=False, default=None)
    usage: ProviderUsage = field(init=False, default_factory=ProviderUsage)
    done: bool = field(init=False, default=False)
    text_chunks: int = field(init=False, default=0)
    _to_strip: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self.position = self.plan.start_index
        self._to_strip = self.plan.strip_prefix

    @property
    def generated(self) -> int:
        """Estimated tokens this call has produced so far."""
        return self.position - self.plan.start_index

    def _reconcile(self, text: str) -> str:
        # The prefill lost its trailing whitespace (a provider refused it); the model
        # then usually starts with that whitespace, which the caller already has.
        i = 0
        while self._to_strip and i < len(text) and text[i] == self._to_strip[0]:
            self._to_strip = self._to_strip[1:]
            i += 1
        if i < len(text):
            self._to_strip = ""
        return text[i:]

    def feed(self, delta: Delta) -> pb.GenerateChunk | None:
        """The chunk this delta adds, if it adds text."""
        if delta.model and not self.model:
            self.model = delta.model
        if delta.response_id and not self.response_id:
            self.response_id = delta.response_id
        if delta.finish is not None:
            self.finish = delta.finish
        self.usage = self.usage.merged(delta.usage)
        if delta.done:
            self.done = True
        text = self._reconcile(delta.text) if delta.text else ""
        if not text:
            return None
        tokens = estimate_tokens(text)
        chunk = pb.GenerateChunk(text=text, index=self.position, token_count=tokens)
        if self.text_chunks == 0:
            chunk.model = self.model or self.fallback_model
        self.text_chunks += 1
        self.position += tokens
        return chunk

    def final(self) -> pb.GenerateChunk:
        """The last chunk: no text, the finish reason and the usage; its token_count
        makes index + token_count reach usage.completion_tokens when it can."""
        usage = make_usage(
            self.usage,
            start_index=self.plan.start_index,
            generated_estimate=self.generated,
            prompt_guess=self.plan.prompt_estimate,
        )
        chunk = pb.GenerateChunk(
            index=self.position,
            token_count=max(0, usage.completion_tokens - self.position),
            finish_reason=self.finish if self.finish is not None else pb.FINISH_REASON_STOP,
            usage=usage,
        )
        if self.text_chunks == 0:
            chunk.model = self.model or self.fallback_model
        return chunk


def exhausted_chunk(plan: Plan, model: str) -> pb.GenerateChunk:
    """The whole answer when the continuation already used max_tokens up."""
    usage = pb.Usage(
        prompt_tokens=plan.prompt_estimate,
        completion_tokens=plan.start_index,
        total_tokens=plan.prompt_estimate + plan.start_index,
    )
    return pb.GenerateChunk(
        index=plan.start_index,
        finish_reason=pb.FINISH_REASON_LENGTH,
        usage=usage,
        model=model,
    )
