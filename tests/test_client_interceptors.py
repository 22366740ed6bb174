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
