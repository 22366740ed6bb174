"""A closed-loop gRPC load generator for Inference, shared by every benchmark.

Each of `concurrency` workers sends its next call when the previous one ends, for
`duration` seconds, over one grpc.aio channel, so the same generator drives a direct
call, the aimesh proxy and Envoy alike.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from aimesh.inference.v1 import inference_pb2 as pb
from aimesh.inference.v1 import inference_pb2_grpc as pb_grpc


@dataclass
class Result:
    name: str
    calls: int = 0
    errors: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds, per call
    ttfts: list[float] = field(default_factory=list)  # seconds, per stream

    @property
    def rate(self) -> float:
        return self.calls / self.elapsed if self.elapsed else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.elapsed if self.elapsed else 0.0

    @staticmethod
    def pct(values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def p50(self) -> float:
        return statistics.median(self.latencies) if self.latencies else float("nan")

    def p99(self) -> float:
        return self.pct(self.latencies, 0.99)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def cpu_of(pids: list[int]) -> float:
    """CPU seconds (user + system, all threads) of several processes together."""
    return sum(cpu_seconds(p) for p in pids)


@dataclass
class CpuSample:
    """One load against one proxy: its result and the proxy's CPU seconds over it."""

    result: Result
    cpu: float

    @property
    def per_call_us(self) -> float:
        return 1e6 * self.cpu / max(self.result.calls, 1)


class _AsIs:
    def __init__(self, channel: Any) -> None:
        self.channel = channel

    async def __aenter__(self) -> Any:
        return self.channel

    async def __aexit__(self, *exc: object) -> None:
        return None


def _request(i: int, max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model="gpt-4",
        messages=[pb.Message(role="user", content=f"benchmark prompt {i % 50}")],
        max_tokens=max_tokens,
    )


async def unary(
    target: str | Any, *, concurrency: int, duration: float, max_tokens: int = 4, name: str = ""
) -> Result:
    """`target` is HOST:PORT, or a channel-like object (a MeshChannel) to use as is."""
    result = Result(name=name or str(target))
    async with (
        grpc.aio.insecure_channel(target) if isinstance(target, str) else _AsIs(target)
    ) as channel:
        stub = pb_grpc.InferenceStub(channel)
        await stub.Generate(_request(0, max_tokens))  # connect and warm up
        stop_at = time.perf_counter() + duration

        async def worker(w: int) -> None:
            i = w
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    await stub.Generate(_request(i, max_tokens))
                    result.latencies.append(time.perf_counter() - t0)
                    result.calls += 1
                except grpc.aio.AioRpcError:
                    result.errors += 1
                i += concurrency

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        result.elapsed = time.perf_counter() - t0
    return result


async def streams(
    target: str,
    *,
    concurrency: int,
    duration: float,
    max_tokens: int = 200,
    name: str = "",
    tokens_per_second: float | None = None,
) -> Result:
    """Closed-loop GenerateStream calls; `tokens_per_second` paces the sim backend's tokens
    for these requests (its `sim_tokens_per_second` extension) instead of its own flag."""
    result = Result(name=name or target)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        async for _ in stub.GenerateStream(_request(0, 2)):
            pass
        stop_at = time.perf_counter() + duration

        async def worker(w: int) -> None:
            i = w
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                first = True
                try:
                    req = _request(i, max_tokens)
                    if tokens_per_second is not None:
                        req.extensions.update({"sim_tokens_per_second": tokens_per_second})
                    async for chunk in stub.GenerateStream(req):
                        if first:
                            result.ttfts.append(time.perf_counter() - t0)
                            first = False
                        result.tokens += chunk.token_count
                    result.latencies.append(time.perf_counter() - t0)
                    result.calls += 1
                except grpc.aio.AioRpcError:
                    result.errors += 1
                i += concurrency

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        result.elapsed = time.perf_counter() - t0
    return result


# -- open loop ---------------------------------------------------------------------------


@dataclass
class Call:
    """One call of an open-loop run; times in seconds, relative to the run's start."""

    index: int
    scheduled: float  # when the schedule says to send it
    lag: float = 0.0  # how late it was actually sent (generator overload shows here)
    ttft: float | None = None  # send -> first chunk
    total: float | None = None  # send -> end of stream (None: failed or cut off)
    instance: str = ""  # the `aimesh-instance` trailer: which backend served it
    error: str = ""  # status code name, or "UNFINISHED" when cut off at the drain limit
    tokens: int = 0
    waited: float = 0.0  # UNFINISHED: send -> cut off (a lower bound of ttft/total)


def _instance(metadata: Any) -> str:
    """The `aimesh-instance` trailer (the sim backend's name for itself), or ""."""
    for key, value in metadata or ():
        if key == "aimesh-instance":
            return str(value)
    return ""


async def open_loop_streams(
    target: str,
    arrivals: list[float],
    *,
    drain_timeout: float = 30.0,
    max_tokens: int = 0,
    prompt: str = "open loop prompt {i}",
    model: str = "gpt-4",
) -> list[Call]:
    """Sends one GenerateStream at each time in `arrivals` (seconds from start, sorted),
    whatever happened to earlier calls: an open loop, so a slow system gets no relief
    from the generator slowing down with it (no coordinated omission).

    Call i asks with prompt `prompt.format(i=i)`, so with the sim backend its completion
    length depends only on i and the schedule replays identically against any target.
    Calls still running `drain_timeout` seconds after the last send are cancelled and
    reported with error "UNFINISHED" (their ttft stays None if no token had come yet).
    """
    calls = [Call(i, t) for i, t in enumerate(arrivals)]
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        await channel.channel_ready()
        loop = asyncio.get_running_loop()

        async def one(c: Call) -> None:
            request = pb.GenerateRequest(
                model=model,
                messages=[pb.Message(role="user", content=prompt.format(i=c.index))],
                max_tokens=max_tokens,
            )
            t0 = time.perf_counter()
            c.lag = t0 - (start + c.scheduled)
            call = stub.GenerateStream(request)
            try:
                async for chunk in call:
                    if c.ttft is None:
                        c.ttft = time.perf_counter() - t0
                    c.tokens += chunk.token_count
                c.total = time.perf_counter() - t0
                c.instance = _instance(await call.trailing_metadata())
            except grpc.aio.AioRpcError as exc:
                c.error = exc.code().name
                c.instance = _instance(exc.trailing_metadata())
            except asyncio.CancelledError:
                c.error = "UNFINISHED"
                c.waited = time.perf_counter() - t0
                call.cancel()

        tasks: list[asyncio.Task[None]] = []
        start = time.perf_counter()
        for c in calls:
            delay = start + c.scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(loop.create_task(one(c)))
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=drain_timeout)
            for t in pending:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return calls
