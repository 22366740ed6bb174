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


def _request(i: int, max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model="gpt-4",
        messages=[pb.Message(role="user", content=f"benchmark prompt {i % 50}")],
        max_tokens=max_tokens,
    )


async def unary(
    target: str, *, concurrency: int, duration: float, max_tokens: int = 4, name: str = ""
) -> Result:
    result = Result(name=name or target)
    async with grpc.aio.insecure_channel(target) as channel:
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
    target: str, *, concurrency: int, duration: float, max_tokens: int = 200, name: str = ""
) -> Result:
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
                    async for chunk in stub.GenerateStream(_request(i, max_tokens)):
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
