"""The simulated backend's gRPC services: Inference and SimControl.

The servicer keeps all protocol concerns (validation, statuses, trailers); timing and
admission live in `SlotPool`, text in `tokens`, fault decisions in `Faults`.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from aimesh.inference.v1 import inference_pb2 as pb
from aimesh.inference.v1 import inference_pb2_grpc as pb_grpc
from aimesh.sim.v1 import sim_pb2, sim_pb2_grpc

from ..errors import MeshError, invalid_argument, status_code_from_number
from ..observability.tracing import INFERENCE, annotate_current_span
from ..orca import ACTIVE, LOAD_TRAILERS, QUEUE_DEPTH, SLOTS, LoadReport
from .faults import Faults
from .slots import PoolClosed, QueueFull, SlotPool
from .tokens import Completion, StopMatcher, count_tokens, embedding

INSTANCE_TRAILER = "aimesh-instance"
PUSHBACK_TRAILER = "grpc-retry-pushback-ms"
MAX_STOP_SEQUENCES = 4
GENERATE, GENERATE_STREAM, EMBED = (INFERENCE + m for m in ("Generate", "GenerateStream", "Embed"))


@dataclass(frozen=True, slots=True)
class SimConfig:
    models: tuple[str, ...]
    instance_id: str = ""
    slots: int = 4
    max_queue: int = 64
    ttft: float = 0.05  # seconds before the first token, once a slot is free
    tokens_per_second: float = 50.0  # per generation; 0 = as fast as possible
    # Each extra concurrent generation slows every generation by this fraction, as
    # batched decoding does on a real accelerator.
    batch_slowdown: float = 0.1
    length_range: tuple[int, int] = (16, 64)  # natural completion length, in tokens
    default_max_tokens: int = 256
    context_window: int = 8192
    embedding_dimensions: int = 64
    owned_by: str = "aimesh-sim"

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("at least one --model is required")
        lo, hi = self.length_range
        if not 1 <= lo <= hi:
            raise ValueError(f"length range must be 1 <= MIN <= MAX, got {lo}-{hi}")
        if self.tokens_per_second < 0 or self.ttft < 0:
            raise ValueError("ttft and tokens per second must not be negative")


@dataclass(slots=True)
class Stats:
    calls: int = 0
    tokens: int = 0
    rejected: int = 0
    cancelled: int = 0
    faults: int = 0
    _recent: deque[float] = field(default_factory=deque)

    def record_call(self, now: float) -> None:
        self.calls += 1
        self._recent.append(now)

    def rps(self, now: float, window: float = 1.0) -> float:
        while self._recent and self._recent[0] < now - window:
            self._recent.popleft()
        return len(self._recent) / window


class SimBackend:
    """State shared by the services of one instance."""

    def __init__(
        self,
        config: SimConfig,
        *,
        faults: Faults | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.faults = faults or Faults()
        self.rng = rng or random.Random()
        self.clock = clock
        self.pool = SlotPool(config.slots, config.max_queue)
        self.stats = Stats()
        self.instance_id = config.instance_id
        # Set by the server: switches grpc.health.v1 (SimControl.SetServing).
        self.on_serving_change: Callable[[bool], Awaitable[None]] | None = None
        self.serving = True
        self.draining = False  # new generations are refused
        self.aborting = False  # in-flight generations end now (grace period over)
        self.inflight = 0
        self.traced = False  # a tracing interceptor makes spans: add the GenAI attributes
        self._idle = asyncio.Event()
        self._idle.set()

    async def drain(self, grace: float) -> int:
        """Refuses new generations and waits up to `grace` for in-flight ones to finish;
        then ends the rest with UNAVAILABLE. Returns how many were cut short."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
            return 0
        except TimeoutError:
            self.aborting = True
            cut = self.inflight
            self.pool.close()
            return cut

    async def wait_idle(self) -> None:
        """Returns once no generation is running or queued on this instance."""
        await self._idle.wait()

    def _enter(self) -> None:
        if self.draining:
            raise MeshError(
                grpc.StatusCode.UNAVAILABLE,
                f"{self.instance_id} is shutting down; retry on another instance",
            )
        self.inflight += 1
        self._idle.clear()

    def _exit(self) -> None:
        self.inflight -= 1
        if not self.inflight:
            self._idle.set()

    def load_report(self, finishing: bool = False) -> LoadReport:
        """`finishing`: the report closes a call that held a slot until just now. Its
        utilization counts that slot, as it was busy for the whole call: otherwise a lone
        call always reports 0, and ORCA-weighted balancers (gRPC and Envoy skip reports of
        zero utilization) never learn this backend's weight."""
        slots = self.config.slots
        return LoadReport(
            application_utilization=min(1.0, (self.pool.active + finishing) / slots),
            rps=self.stats.rps(self.clock()),
            named={
                QUEUE_DEPTH: float(self.pool.queued),
                ACTIVE: float(self.pool.active),
                SLOTS: float(slots),
            },
        )

    def trailers(self, finishing: bool = False) -> tuple[tuple[str, str | bytes], ...]:
        report = self.load_report(finishing).encode()
        return ((INSTANCE_TRAILER, self.instance_id), *((k, report) for k in LOAD_TRAILERS))


def _prompt_turns(request: pb.GenerateRequest) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in request.messages]


class InferenceService(pb_grpc.InferenceServicer):
    def __init__(self, backend: SimBackend) -> None:
        self.b = backend

    # -- validation -------------------------------------------------------------------

    def _check_model(self, model: str) -> None:
        if not model:
            raise invalid_argument("model", "must not be empty")
        if model not in self.b.config.models:
            served = ", ".join(self.b.config.models)
            raise MeshError(
                grpc.StatusCode.NOT_FOUND,
                f"model {model!r} is not served by {self.b.instance_id} (it serves: {served})",
            )

    def _check_generate(self, r: pb.GenerateRequest) -> None:
        if not r.messages:
            raise invalid_argument("messages", "must not be empty; send at least one message")
        for i, m in enumerate(r.messages):
            if m.role not in ("system", "user", "assistant", "tool"):
                raise invalid_argument(
                    f"messages[{i}].role",
                    f"{m.role!r} is not one of system, user, assistant, tool",
                )
        if r.max_tokens < 0:
            raise invalid_argument("max_tokens", f"must not be negative, got {r.max_tokens}")
        if not 0.0 <= r.temperature <= 2.0:
            raise invalid_argument("temperature", f"must be between 0 and 2, got {r.temperature}")
        if not 0.0 <= r.top_p <= 1.0:
            raise invalid_argument("top_p", f"must be between 0 and 1, got {r.top_p}")
        if len(r.stop) > MAX_STOP_SEQUENCES:
            raise invalid_argument(
                "stop", f"at most {MAX_STOP_SEQUENCES} sequences, got {len(r.stop)}"
            )
        self._check_model(r.model)

    # -- shared call handling ---------------------------------------------------------

    async def _fail(self, context: grpc.aio.ServicerContext[Any, Any], err: MeshError) -> None:
        trailers = list(self.b.trailers())
        if err.pushback_ms is not None:
            trailers.append((PUSHBACK_TRAILER, str(err.pushback_ms)))
        await context.abort(err.code, err.message, trailing_metadata=tuple(trailers))

    def _pushback_ms(self) -> int:
        # A rough wait until a slot frees: one average generation per queued call.
        c = self.b.config
        per_gen = c.ttft + (sum(c.length_range) / 2) / (c.tokens_per_second or 1000.0)
        return max(1, int(1000 * per_gen * (1 + self.b.pool.queued) / c.slots))

    async def _generate(
        self, r: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.GenerateChunk]:
        """Yields chunks with pacing; the last has finish_reason and usage."""
        b = self.b
        self._check_generate(r)
        faults = b.faults
        if (code := faults.injected_error(b.rng)) is not None:
            b.stats.faults += 1
            raise MeshError(code, f"injected fault on {b.instance_id} ({code.name})")
        b._enter()
        try:
            async for chunk in self._generate_admitted(r):
                yield chunk
        finally:
            b._exit()

    async def _generate_admitted(self, r: pb.GenerateRequest) -> AsyncIterator[pb.GenerateChunk]:
        b, c = self.b, self.b.config
        faults = b.faults
        try:
            slot = b.pool.slot()
            await slot.__aenter__()
        except QueueFull as exc:
            b.stats.rejected += 1
            raise MeshError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{b.instance_id} is overloaded: {exc}; retry later or elsewhere",
                pushback_ms=self._pushback_ms(),
            ) from exc
        except PoolClosed as exc:
            raise MeshError(
                grpc.StatusCode.UNAVAILABLE,
                f"{b.instance_id} shut down before this call got a slot; retry elsewhere",
            ) from exc
        try:
            completion = Completion.for_prompt(
                r.model, _prompt_turns(r), r.seed if r.HasField("seed") else None, c.length_range
            )
            limit = r.max_tokens or c.default_max_tokens
            # A request may pace itself (extensions {"sim_tokens_per_second": N}), so one
            # instance can serve both paced and unpaced benchmark traffic.
            tps = c.tokens_per_second
            if "sim_tokens_per_second" in r.extensions.fields:
                tps = max(0.0, r.extensions.fields["sim_tokens_per_second"].number_value)
            end = min(completion.natural_length, limit)
            finish = (
                pb.FINISH_REASON_STOP
                if completion.natural_length <= limit
                else pb.FINISH_REASON_LENGTH
            )
            start, owed = completion.resume_point(r.continuation)
            prompt_tokens = sum(count_tokens(m.content) for m in r.messages)
            matcher = StopMatcher(r.stop)

            delay = c.ttft + faults.extra_latency
            if delay:
                await asyncio.sleep(delay)
            loop = asyncio.get_running_loop()
            next_at = loop.time()
            first = True
            chunk_start = start
            pending_text = owed
            pos = start
            stopped = False
            while pos < end and not stopped:
                if b.aborting:
                    raise MeshError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"{b.instance_id} shut down before this stream finished "
                        f"({pos - start} tokens delivered); resume elsewhere with continuation",
                    )
                if tps and not first:
                    interval = (1 + c.batch_slowdown * (b.pool.active - 1)) / tps
                    next_at += interval
                    wait = next_at - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    else:
                        next_at = loop.time()  # fell behind: do not burst to catch up
                first = False
                token = completion.token(pos)
                pos += 1
                b.stats.tokens += 1
                if faults.die_after_tokens and pos - start >= faults.die_after_tokens + 1:
                    self._die(pos - start - 1)
                emit, stopped = matcher.feed(token)
                pending_text += emit
                if stopped:
                    finish = pb.FINISH_REASON_STOP_SEQUENCE
                    break
                if pos >= end:
                    break
                if pending_text:
                    yield pb.GenerateChunk(
                        text=pending_text,
                        index=chunk_start,
                        token_count=pos - chunk_start,
                        model=r.model if chunk_start == start else "",
                    )
                    pending_text, chunk_start = "", pos
            if not stopped:
                pending_text += matcher.flush()
            yield pb.GenerateChunk(
                text=pending_text,
                index=chunk_start,
                token_count=pos - chunk_start,
                model=r.model if chunk_start == start else "",
                finish_reason=finish,
                usage=pb.Usage(
                    prompt_tokens=prompt_tokens,
                    completion_tokens=pos,
                    total_tokens=prompt_tokens + pos,
                ),
            )
        finally:
            await slot.__aexit__(None, None, None)

    def _die(self, delivered: int) -> None:
        if self.b.faults.die_exits_process:
            # A crash, not a shutdown: no trailers, no goodbye, connections reset.
            os._exit(17)
        raise MeshError(
            grpc.StatusCode.UNAVAILABLE,
            f"injected failure on {self.b.instance_id} after {delivered} tokens",
        )

    # -- RPCs -------------------------------------------------------------------------

    async def GenerateStream(  # noqa: N802 (gRPC method name)
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.GenerateChunk]:
        b = self.b
        b.stats.record_call(b.clock())
        traced, sent, usage = b.traced, 0, None
        try:
            async for chunk in self._generate(request, context):
                if traced:
                    sent += chunk.token_count
                    usage = chunk.usage if chunk.HasField("usage") else usage
                yield chunk
        except MeshError as err:
            await self._fail(context, err)
        except (asyncio.CancelledError, GeneratorExit):
            # A cancel that lands while grpc writes a chunk closes the generator instead.
            b.stats.cancelled += 1
            raise
        finally:
            if traced:  # this instance's tokens (a resumed stream's are its remainder)
                prompt_tokens = usage.prompt_tokens if usage is not None else 0
                annotate_current_span(GENERATE_STREAM, request.model, prompt_tokens, sent)
        context.set_trailing_metadata(b.trailers(finishing=True))

    async def Generate(  # noqa: N802
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GenerateResponse:
        b = self.b
        b.stats.record_call(b.clock())
        parts: list[str] = []
        last = pb.GenerateChunk()
        try:
            async for chunk in self._generate(request, context):
                parts.append(chunk.text)
                last = chunk
        except MeshError as err:
            if b.traced:
                annotate_current_span(GENERATE, request.model)
            await self._fail(context, err)
        except asyncio.CancelledError:
            b.stats.cancelled += 1
            raise
        if b.traced:
            u = last.usage
            annotate_current_span(GENERATE, request.model, u.prompt_tokens, u.completion_tokens)
        context.set_trailing_metadata(b.trailers(finishing=True))
        return pb.GenerateResponse(
            text="".join(parts),
            finish_reason=last.finish_reason,
            usage=last.usage,
            model=request.model,
            request_id=request.request_id or uuid.uuid4().hex,
        )

    async def Embed(  # noqa: N802
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.EmbedResponse:
        b = self.b
        b.stats.record_call(b.clock())
        try:
            self._check_model(request.model)
            if not request.inputs:
                raise invalid_argument("inputs", "must not be empty; send at least one text")
            if request.dimensions < 0:
                raise invalid_argument(
                    "dimensions", f"must not be negative, got {request.dimensions}"
                )
            if (code := b.faults.injected_error(b.rng)) is not None:
                b.stats.faults += 1
                raise MeshError(code, f"injected fault on {b.instance_id} ({code.name})")
        except MeshError as err:
            await self._fail(context, err)
        dims = request.dimensions or b.config.embedding_dimensions
        tokens = sum(count_tokens(t) for t in request.inputs)
        if b.traced:
            annotate_current_span(EMBED, request.model, tokens)
        context.set_trailing_metadata(b.trailers())
        return pb.EmbedResponse(
            embeddings=[
                pb.Embedding(index=i, values=embedding(t, request.model, dims))
                for i, t in enumerate(request.inputs)
            ],
            model=request.model,
            usage=pb.Usage(prompt_tokens=tokens, total_tokens=tokens),
        )

    async def ListModels(  # noqa: N802
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListModelsResponse:
        c = self.b.config
        self.b.stats.record_call(self.b.clock())
        context.set_trailing_metadata(self.b.trailers())
        return pb.ListModelsResponse(
            models=[
                pb.ModelInfo(
                    id=m,
                    owned_by=c.owned_by,
                    context_window=c.context_window,
                    supports_generate=True,
                    supports_embed=True,
                    embedding_dimensions=c.embedding_dimensions,
                )
                for m in sorted(c.models)
            ]
        )


class SimControlService(sim_pb2_grpc.SimControlServicer):
    def __init__(self, backend: SimBackend) -> None:
        self.b = backend

    def _faults_pb(self) -> sim_pb2.Faults:
        f = self.b.faults
        return sim_pb2.Faults(
            error_rate=f.error_rate,
            error_code=f.error_code.value[0],
            extra_latency_ms=round(f.extra_latency * 1000),
            die_after_tokens=f.die_after_tokens,
            die_exits_process=f.die_exits_process,
        )

    async def SetFaults(  # noqa: N802
        self, request: sim_pb2.Faults, context: grpc.aio.ServicerContext[Any, Any]
    ) -> sim_pb2.Faults:
        try:
            code = status_code_from_number(request.error_code or 14)
            self.b.faults = Faults(
                error_rate=request.error_rate,
                error_code=code,
                extra_latency=request.extra_latency_ms / 1000.0,
                die_after_tokens=request.die_after_tokens,
                die_exits_process=request.die_exits_process,
            )
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"faults: {exc}")
        return self._faults_pb()

    async def GetFaults(  # noqa: N802
        self, request: sim_pb2.GetFaultsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> sim_pb2.Faults:
        return self._faults_pb()

    async def GetStats(  # noqa: N802
        self, request: sim_pb2.GetStatsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> sim_pb2.Stats:
        b = self.b
        s = b.stats
        return sim_pb2.Stats(
            instance=b.instance_id,
            calls_total=s.calls,
            tokens_generated_total=s.tokens,
            rejected_total=s.rejected,
            cancelled_total=s.cancelled,
            faults_total=s.faults,
            active=b.pool.active,
            queued=b.pool.queued,
            slots=b.config.slots,
            max_queue=b.config.max_queue,
        )

    async def SetServing(  # noqa: N802
        self, request: sim_pb2.SetServingRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> sim_pb2.SetServingResponse:
        if self.b.on_serving_change is not None:
            await self.b.on_serving_change(request.serving)
        self.b.serving = request.serving
        return sim_pb2.SetServingResponse(serving=request.serving)
