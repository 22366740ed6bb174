"""Outbound grpc.aio client interceptors for apps inside the mesh.

An app serving a call (behind the inbound `Stack`) that calls other services passes on
what the mesh knows about the call it is serving: the remaining deadline (so a slow
first hop cannot leave the second more time than the caller has) and the request id.

    channel = grpc.aio.insecure_channel(target, interceptors=propagation())

`RetryInterceptor` and `BreakerInterceptor` bring the mesh's retry (A6 with a budget) and
circuit breaking to unary calls on any grpc.aio channel whose target balances by itself.
Balancing over the mesh's endpoints, and resumable token streams, need a channel that
chooses endpoints: `aimesh.clients.MeshChannel`. (A grpc.aio unary-stream interceptor
cannot answer with its own response iterator in grpcio 1.85: InterceptedCall breaks.)
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio

from .base import current_call
from .breaker import CircuitBreaker
from .budget import RetryBudget
from .request_id import HEADER
from .retry_policy import Retry, RetryPolicy, decide


def _details(details: Any) -> Any:
    """The call's details with the inbound call's deadline and request id applied."""
    inbound = current_call()
    if inbound is None:
        return details
    timeout = details.timeout
    remaining = inbound.time_remaining()
    if remaining is not None and (timeout is None or remaining < timeout):
        timeout = max(0.0, remaining)
    metadata = list(details.metadata or ())
    if inbound.request_id and not any(k == HEADER for k, _ in metadata):
        metadata.append((HEADER, inbound.request_id))
    return grpc.aio.ClientCallDetails(
        details.method,
        timeout,
        grpc.aio.Metadata(*metadata),
        details.credentials,
        details.wait_for_ready,
    )


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc,type-arg]
    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return await continuation(_details(details), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc,type-arg]
    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return await continuation(_details(details), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc,type-arg]
    async def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: Any, requests: Any
    ) -> Any:
        return await continuation(_details(details), requests)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc,type-arg]
    async def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: Any, requests: Any
    ) -> Any:
        return await continuation(_details(details), requests)


def propagation() -> list[Any]:
    """Interceptors for all four call types that pass on deadline and request id."""
    return [_UnaryUnary(), _UnaryStream(), _StreamUnary(), _StreamStream()]


def _pushback(trailers: Any) -> str | None:
    pairs: Any = trailers or ()
    for key, value in pairs:
        if key == "grpc-retry-pushback-ms":
            return str(value)
    return None


class RetryInterceptor(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc,type-arg]
    """Retries unary calls on the channel it is installed on, under gRFC A6 semantics and
    a retry budget, with the same decision (`retry_policy.decide`) the proxy makes. For
    channels whose target balances by itself (a proxy, a DNS or xDS name)."""

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        budget: RetryBudget | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.policy = policy
        self.budget = budget or RetryBudget()
        self.rng = rng or random.Random()
        self.retries = 0

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        self.budget.record_request()
        loop = asyncio.get_running_loop()
        end = None if details.timeout is None else loop.time() + details.timeout
        attempt, since_pushback = 1, 1
        while True:
            left = None if end is None else max(0.0, end - loop.time())
            timeout = left
            per_try = self.policy.per_try_timeout
            if per_try is not None and (timeout is None or per_try < timeout):
                timeout = per_try
            metadata = list(details.metadata or ())
            if attempt > 1:
                metadata.append(("grpc-previous-rpc-attempts", str(attempt - 1)))
            call = await continuation(
                grpc.aio.ClientCallDetails(
                    details.method,
                    timeout,
                    grpc.aio.Metadata(*metadata),
                    details.credentials,
                    details.wait_for_ready,
                ),
                request,
            )
            try:
                await call
                return call
            except grpc.aio.AioRpcError as exc:
                left = None if end is None else end - loop.time()
                pushback = _pushback(exc.trailing_metadata())
                verdict = decide(
                    self.policy,
                    attempt,
                    exc.code(),
                    pushback,
                    left,
                    self.budget,
                    self.rng,
                    backoff_attempt=since_pushback,
                )
                if not isinstance(verdict, Retry):
                    return call  # the caller's await raises this attempt's error
            self.retries += 1
            attempt += 1
            since_pushback = 1 if verdict.pushback else since_pushback + 1
            await asyncio.sleep(verdict.delay)


class BreakerInterceptor(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc,type-arg]
    """Fails unary calls fast with UNAVAILABLE while the breaker is open, and feeds it
    every outcome (application errors count as successes: the service answered)."""

    failures = frozenset(
        {
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.INTERNAL,
            grpc.StatusCode.UNKNOWN,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        }
    )

    def __init__(self, breaker: CircuitBreaker) -> None:
        self.breaker = breaker

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        if not self.breaker.allow():
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                details=f"circuit breaker {self.breaker!r} is open; not sent",
                debug_error_string="aimesh BreakerInterceptor: open",
            )
        call = await continuation(details, request)
        try:
            await call
            self.breaker.record(True)
        except grpc.aio.AioRpcError as exc:
            self.breaker.record(exc.code() not in self.failures)
        return call
