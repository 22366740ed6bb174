"""Inference token streams through the proxy: merged for slow callers, resumed on failure.

A GenerateStream call is forwarded chunk by chunk. The proxy keeps what it has delivered
(the text and the next token index), so when the backend fails mid-stream it can re-issue
the request to another endpoint with `continuation` set to that text and splice the new
stream in: the caller sees one stream, no token twice, none missing, `index` continuous.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from aimesh.inference.v1.inference_pb2 import GenerateChunk, GenerateRequest

EOF_ = grpc.aio.EOF  # type: ignore[attr-defined]
# Chunks read ahead of a slow caller before the proxy stops reading (and so, through
# HTTP/2 flow control, slows the backend).
MAX_BACKLOG = 256


@dataclass(slots=True)
class Delivered:
    """What the caller has received so far."""

    parts: list[str] = field(default_factory=list)
    tokens: int = 0
    next_index: int | None = None  # index the next chunk must carry
    finished: bool = False
    headers_sent: bool = False
    prompt_tokens: int = 0  # from the usage on the last chunk

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def record(self, chunk: GenerateChunk) -> None:
        self.parts.append(chunk.text)
        if len(self.parts) >= 64:  # one string per chunk would cost ~50 bytes each
            self.parts[:] = ["".join(self.parts)]
        self.tokens += chunk.token_count
        self.next_index = chunk.index + chunk.token_count
        if chunk.finish_reason:
            self.finished = True
        if chunk.HasField("usage"):
            self.prompt_tokens = chunk.usage.prompt_tokens


def resumed_request(original: bytes, delivered: Delivered) -> bytes:
    """The request re-issued after `delivered`: same prompt, continuation extended."""
    req = GenerateRequest.FromString(original)
    req.continuation = req.continuation + delivered.text
    return bytes(req.SerializeToString())


def merge_chunks(raw: list[bytes]) -> GenerateChunk:
    chunks = [GenerateChunk.FromString(b) for b in raw]
    first, last = chunks[0], chunks[-1]
    merged = GenerateChunk(
        text="".join(c.text for c in chunks),
        index=first.index,
        token_count=sum(c.token_count for c in chunks),
        model=first.model or last.model,
        finish_reason=last.finish_reason,
    )
    if last.HasField("usage"):
        merged.usage.CopyFrom(last.usage)
    return merged


async def pump(
    call: Any,
    write: Callable[[bytes], Awaitable[None]],
    delivered: Delivered,
    *,
    merge: bool = True,
    first: bytes | None = None,
) -> None:
    """Copies chunks from `call` to `write`, recording each in `delivered`.

    With `merge`, chunks that queue up while the caller has not taken the previous write
    go out as one; a caller that keeps up gets every chunk as it arrives. Raises the
    upstream's AioRpcError if the stream breaks; what was written before stays recorded.
    """
    backlog: list[bytes] = [first] if first is not None else []
    wake = asyncio.Event()
    room = asyncio.Event()  # cleared while the backlog is full: flow control still holds
    room.set()
    done = False

    async def reader() -> None:
        nonlocal done
        read = call.read
        try:
            while True:
                msg = await read()
                if msg is EOF_:
                    return
                backlog.append(msg)
                wake.set()
                if len(backlog) >= MAX_BACKLOG or not merge:
                    room.clear()
                    await room.wait()
        finally:
            done = True
            wake.set()

    task = asyncio.get_running_loop().create_task(reader())
    try:
        while True:
            if not backlog:
                if done:  # the reader has finished and everything is written
                    break
                await wake.wait()
                wake.clear()
                continue
            batch = backlog[:]
            backlog.clear()
            room.set()
            chunk = GenerateChunk.FromString(batch[0]) if len(batch) == 1 else merge_chunks(batch)
            raw = batch[0] if len(batch) == 1 else None
            if delivered.next_index is not None and chunk.index != delivered.next_index:
                # A resumed backend may count differently; the caller's index stays continuous.
                chunk.index = delivered.next_index
                raw = None
            await write(raw if raw is not None else bytes(chunk.SerializeToString()))
            delivered.record(chunk)
    finally:
        if not task.done():
            task.cancel()
    await task  # re-raises the upstream's error, if any
