"""Typed call events for metrics, tracing and audit sinks."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from .base import CallFacts, InboundCall, Next


@dataclass(frozen=True, slots=True)
class CallEnded:
    method: str
    code: grpc.StatusCode
    duration: float  # seconds
    request_id: str
    identity: str
    facts: CallFacts = field(default_factory=CallFacts)
    started_ns: int = 0  # wall clock when the call arrived
    details: str = ""  # the status message, for audit records of failed calls


Sink = Callable[[CallEnded], None]


class CallEvents:
    """Emits one `CallEnded` per call to every sink, whatever the outcome."""

    def __init__(self, sinks: Sequence[Sink]) -> None:
        self.sinks = list(sinks)

    async def around(self, call: InboundCall, call_next: Next) -> None:
        code = grpc.StatusCode.OK
        try:
            await call_next()
            code = call.code()
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except BaseException:
            # abort() raises; grpc knows the status it set.
            code = call.code()
            if code is grpc.StatusCode.OK:
                code = grpc.StatusCode.UNKNOWN
            raise
        finally:
            event = CallEnded(
                call.method,
                code,
                time.monotonic() - call.started,
                call.request_id,
                call.identity,
                call.facts,
                call.started_ns,
                call.details() if code is not grpc.StatusCode.OK else "",
            )
            for sink in self.sinks:
                sink(event)


class Counters:
    """A sink that counts calls by (method, status) and sums their durations."""

    def __init__(self) -> None:
        self.calls: dict[tuple[str, str], int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)

    def __call__(self, event: CallEnded) -> None:
        self.calls[(event.method, event.code.name)] += 1
        self.seconds[event.method] += event.duration

    def snapshot(self) -> dict[str, Any]:
        methods: dict[str, Any] = {}
        for (method, code), n in sorted(self.calls.items()):
            m = methods.setdefault(method, {"calls": {}, "seconds": 0.0})
            m["calls"][code] = n
            m["seconds"] = round(self.seconds[method], 6)
        return methods
