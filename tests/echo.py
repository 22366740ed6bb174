"""A test service the proxy knows nothing about (no descriptors, no reflection).

Raw-bytes handlers for all four call types; it echoes request headers back as response
headers, reports the deadline it saw, and can fail with a rich status on request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio

SERVICE = "test.echo.v1.Echo"
FAIL = b"fail"  # a request with this body fails with rich status details
DETAILS_BIN = b"\x08\x05\x12\x0bnot here at"  # google.rpc.Status bytes (code 5, message)


def _echo_headers(context: Any) -> tuple[tuple[str, Any], ...]:
    return tuple(
        (f"echo-{k}", v)
        for k, v in context.invocation_metadata()
        if k.startswith("x-") or k == "grpc-previous-rpc-attempts"
    )


UNAVAILABLE = b"unavailable"  # a request with this body fails with UNAVAILABLE
STOP_RETRYING = b"stop"  # fails with UNAVAILABLE and pushback "-1" (do not retry)


def _trailers(context: Any, instance: str) -> tuple[tuple[str, str], ...]:
    remaining = context.time_remaining()
    return (
        ("x-trailer", "bye"),
        ("aimesh-instance", instance),
        ("x-deadline-ms", "none" if remaining is None else str(int(remaining * 1000))),
    )


async def _fail(context: Any) -> None:
    await context.abort(
        grpc.StatusCode.FAILED_PRECONDITION,
        "asked to fail",
        trailing_metadata=(("grpc-status-details-bin", DETAILS_BIN), ("x-why", "asked")),
    )


def handlers(instance: str, calls: list[bytes] | None = None) -> grpc.GenericRpcHandler:
    calls = calls if calls is not None else []

    async def unary(request: bytes, context: Any) -> bytes:
        await context.send_initial_metadata(_echo_headers(context))
        calls.append(request)
        if request == FAIL:
            await _fail(context)
        if request == UNAVAILABLE:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{instance} is unavailable")
        if request == STOP_RETRYING:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "overloaded, do not retry",
                trailing_metadata=(("grpc-retry-pushback-ms", "-1"),),
            )
        context.set_trailing_metadata(_trailers(context, instance))
        return b"u:" + request

    async def server_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
        await context.send_initial_metadata(_echo_headers(context))
        if request == FAIL:
            await _fail(context)
        for i in range(3):
            yield b"s%d:" % i + request
        context.set_trailing_metadata(_trailers(context, instance))

    async def client_stream(requests: AsyncIterator[bytes], context: Any) -> bytes:
        await context.send_initial_metadata(_echo_headers(context))
        parts = [r async for r in requests]
        if FAIL in parts:
            await _fail(context)
        context.set_trailing_metadata(_trailers(context, instance))
        return b"c:" + b"|".join(parts)

    async def bidi(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        await context.send_initial_metadata(_echo_headers(context))
        async for r in requests:
            if r == FAIL:
                await _fail(context)
            yield b"b:" + r
        context.set_trailing_metadata(_trailers(context, instance))

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        },
    )


async def start(
    instance: str = "echo", calls: list[bytes] | None = None
) -> tuple[grpc.aio.Server, int]:
    """Starts an echo server; `calls` (if given) collects every unary request it receives."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handlers(instance, calls),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port
