"""Outbound propagation: a handler's calls inherit its deadline and request id."""

from __future__ import annotations

from typing import Any

import grpc
import grpc.aio

from aimesh.interceptors.base import Stack
from aimesh.interceptors.client import propagation
from aimesh.interceptors.request_id import RequestId

from . import echo


async def test_a_handler_calling_out_passes_on_deadline_and_request_id() -> None:
    backend, backend_port = await echo.start("deep")
    seen: dict[str, Any] = {}
    out = grpc.aio.insecure_channel(f"127.0.0.1:{backend_port}", interceptors=propagation())

    async def middle(request: bytes, context: Any) -> bytes:
        # The app's handler: calls the next service with no deadline or id of its own.
        call = out.unary_unary(f"/{echo.SERVICE}/Unary")(request)
        reply: bytes = await call
        seen["deadline_ms"] = int(dict(await call.trailing_metadata())["x-deadline-ms"])
        seen["request_id"] = dict(await call.initial_metadata()).get("echo-x-request-id")
        return reply

    app = grpc.aio.server(interceptors=[Stack([RequestId()])])
    app.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.App", {"Call": grpc.unary_unary_rpc_method_handler(middle)}
            ),
        )
    )
    port = app.add_insecure_port("127.0.0.1:0")
    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            reply = await ch.unary_unary("/test.App/Call")(
                b"x", timeout=0.3, metadata=(("x-request-id", "trace-42"),)
            )
        assert reply == b"u:x"
        assert 0 < seen["deadline_ms"] < 300
        assert seen["request_id"] == "trace-42"
    finally:
        await out.close()
        await app.stop(None)
        await backend.stop(None)


async def test_retry_and_breaker_interceptors_on_a_plain_channel() -> None:
    from aimesh.interceptors.breaker import CircuitBreaker, State
    from aimesh.interceptors.client import BreakerInterceptor, RetryInterceptor
    from aimesh.interceptors.retry_policy import RetryPolicy
    from aimesh.mesh.config import RetrySpec

    calls: list[bytes] = []
    server, port = await echo.start("e", calls)
    retry = RetryInterceptor(RetryPolicy.from_spec(RetrySpec(attempts=3)))
    breaker = CircuitBreaker(
        "echo",
        error_threshold=0.5,
        min_requests=100,
        window=10.0,
        consecutive_errors=3,
        open_duration=60.0,
        max_open_duration=60.0,
    )
    # Interceptors run in list order: the breaker sees each try the retry makes.
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", interceptors=[retry, BreakerInterceptor(breaker)]
    ) as ch:
        unary = ch.unary_unary(f"/{echo.SERVICE}/Unary")
        assert await unary(b"fine") == b"u:fine"
        call = unary(echo.UNAVAILABLE, timeout=5)
        try:
            await call
            raise AssertionError("expected UNAVAILABLE")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
        assert calls.count(echo.UNAVAILABLE) == 3  # the first try and two retries
        assert retry.retries == 2
        assert breaker.state is State.OPEN  # three failures in a row
        try:
            await unary(b"fine")
            raise AssertionError("expected the open breaker to refuse")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
            assert "is open; not sent" in (exc.details() or "")
        assert calls.count(b"fine") == 1
    await server.stop(None)
