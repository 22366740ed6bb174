"""Deterministic text generation for the simulated backend (pure: no I/O, no clocks).

A completion is a function of (model, prompt, seed) and the token position only, so any
instance produces the same token at the same position. That is what lets the mesh resume
a broken stream on another instance with `continuation` and get exactly the same text.

Tokens are words: the first has no leading space, every later one starts with one
(as GPT-style BPE tokens do), so `count_tokens` can split any text back into tokens.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

_WORDS = (
    "the mesh routes every request to a healthy backend and streams tokens back as they "
    "arrive while the control plane keeps the catalog fresh model latency throughput "
    "queue depth balance retry budget circuit breaker deadline trace metric audit policy "
    "identity certificate rotation canary rollout weight split failover region zone "
    "instance service gateway sidecar proxy cluster endpoint health check interval "
    "threshold error rate jitter backoff hedging resume continuation stream chunk index "
    "usage prompt completion context window temperature sampling seed deterministic "
    "answer question system user assistant provider adapter embedding vector cache "
    "token per second first time load report utilization slot scheduler pending active "
    "graceful drain shutdown signal grace period cancel propagate budget window ratio "
    "quickly safely reliably calmly together always often never sometimes usually "
    "because therefore however meanwhile finally first then next also still only "
    "small large fast slow new old good clear simple careful useful steady bright "
    "is are was can will should must may does keeps makes takes gives finds sends"
).split()

_TOKEN_RE = re.compile(r"\s*\S+")


def split_tokens(text: str) -> list[str]:
    """Splits text into tokens the way the sim backend produces them (trailing spaces drop)."""
    return _TOKEN_RE.findall(text)


def count_tokens(text: str) -> int:
    return len(_TOKEN_RE.findall(text))


def _h64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


@dataclass(frozen=True, slots=True)
class Completion:
    """The text one (model, prompt, seed) produces: `token(i)` and its natural length."""

    key: bytes
    natural_length: int

    @classmethod
    def for_prompt(
        cls,
        model: str,
        turns: Sequence[tuple[str, str]],
        seed: int | None,
        length_range: tuple[int, int],
    ) -> Completion:
        h = hashlib.blake2b(digest_size=16)
        h.update(model.encode())
        for role, content in turns:
            h.update(b"\x00" + role.encode() + b"\x01" + content.encode())
        h.update(b"\x02" + str(seed if seed is not None else "").encode())
        key = h.digest()
        lo, hi = length_range
        natural = lo + _h64(key + b"len") % (hi - lo + 1)
        return cls(key=key, natural_length=natural)

    def _hash(self, position: int) -> int:
        return _h64(self.key + position.to_bytes(4, "big"))

    def token(self, position: int) -> str:
        h = self._hash(position)
        word = _WORDS[h % len(_WORDS)]
        punct = (h >> 32) % 16
        if punct == 0:
            word += "."
        elif punct == 1:
            word += ","
        if position == 0:
            return word.capitalize()
        # A sentence starts after a full stop; still a function of the position alone.
        if (self._hash(position - 1) >> 32) % 16 == 0:
            word = word.capitalize()
        return " " + word

    def tokens(self, start: int = 0) -> Iterator[str]:
        pos = start
        while True:
            yield self.token(pos)
            pos += 1

    def text(self, count: int) -> str:
        return "".join(self.token(i) for i in range(count))

    def resume_point(self, continuation: str) -> tuple[int, str]:
        """Where to continue after `continuation`: (next position, text still owed).

        When the continuation is a prefix of this completion (the normal resume), the
        next position follows it exactly, and any part of a token that was cut off (a
        stop-sequence hold-back can split a token) is owed first. For foreign text, fall
        back to counting its tokens.
        """
        if not continuation:
            return 0, ""
        produced = ""
        pos = 0
        # Bounded by the continuation's length: every token adds at least one char.
        while len(produced) < len(continuation):
            produced += self.token(pos)
            pos += 1
        if produced.startswith(continuation):
            return pos, produced[len(continuation) :]
        return count_tokens(continuation), ""


class StopMatcher:
    """Cuts generated text at the first stop sequence, across token boundaries.

    Text that could still turn into a stop sequence is held back until it is clear, so
    the caller never sees part of a stop sequence.
    """

    __slots__ = ("_pending", "_stops")

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._pending = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop sequence was reached)."""
        if not self._stops:
            return delta, False
        text = self._pending + delta
        cut = min((i for s in self._stops if (i := text.find(s)) >= 0), default=-1)
        if cut >= 0:
            self._pending = ""
            return text[:cut], True
        hold = 0
        for s in self._stops:
            for n in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:n]):
                    hold = n
                    break
        self._pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


def embedding(text: str, model: str, dimensions: int) -> list[float]:
    """A deterministic unit vector for (model, text)."""
    values: list[float] = []
    block = 0
    while len(values) < dimensions:
        digest = hashlib.blake2b(
            model.encode() + b"\x00" + text.encode() + block.to_bytes(4, "big"), digest_size=64
        ).digest()
        values.extend((b - 127.5) / 127.5 for b in digest)
        block += 1
    values = values[:dimensions]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return [v / norm for v in values]
