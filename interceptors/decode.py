"""Malformed request bytes get a clear status (server side).

grpc.aio reports a request deserializer's exception as UNKNOWN ("Unexpected <class
'google.protobuf.message.DecodeError'>"). gRPC's status code table says a server that
cannot parse the request answers INTERNAL; this interceptor does that, with a message that
names the expected message type, and logs nothing (a bad client is not a server fault).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

Deserializer = Callable[[bytes], Any]


def _type_name(deserializer: Deserializer) -> str:
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "the request message"))


async def _parse(
    raw: bytes, deserializer: Deserializer, context: grpc.aio.ServicerContext[Any, Any]
) -> Any:
    try:
        return deserializer(raw)
    except Exception as exc:  # protobuf raises DecodeError; custom codecs anything
        await context.abort(
            grpc.StatusCode.INTERNAL,
            f"cannot parse the request as {_type_name(deserializer)} ({len(raw)} bytes): {exc}",
        )


async def _drain(result: Any) -> AsyncIterator[Any]:
    # A streaming handler is either an async generator or a coroutine using context.write.
    if hasattr(result, "__aiter__"):
        async for item in result:
            yield item
    else:
        await result


def _wrap(handler: Any) -> Any:
    # grpc's handler attributes are typed for the sync API; here they hold coroutines.
    des = handler.request_deserializer
    if des is None:
        return handler
    ser = handler.response_serializer

    if handler.unary_unary:
        inner_uu = handler.unary_unary

        async def uu(raw: bytes, ctx: grpc.aio.ServicerContext[Any, Any]) -> Any:
            return await inner_uu(await _parse(raw, des, ctx), ctx)

        return grpc.unary_unary_rpc_method_handler(uu, response_serializer=ser)
    if handler.unary_stream:
        inner_us = handler.unary_stream

        async def us(raw: bytes, ctx: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            async for item in _drain(inner_us(await _parse(raw, des, ctx), ctx)):
                yield item

        return grpc.unary_stream_rpc_method_handler(us, response_serializer=ser)

    async def parsed(
        raws: AsyncIterator[bytes], ctx: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        async for raw in raws:
            yield await _parse(raw, des, ctx)

    if handler.stream_unary:
        inner_su = handler.stream_unary

        async def su(raws: AsyncIterator[bytes], ctx: grpc.aio.ServicerContext[Any, Any]) -> Any:
            return await inner_su(parsed(raws, ctx), ctx)

        return grpc.stream_unary_rpc_method_handler(su, response_serializer=ser)
    inner_ss = handler.stream_stream

    async def ss(
        raws: AsyncIterator[bytes], ctx: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        async for item in _drain(inner_ss(parsed(raws, ctx), ctx)):
            yield item

    return grpc.stream_stream_rpc_method_handler(ss, response_serializer=ser)


class DecodeErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps every handler so undecodable requests end with INTERNAL and a clear message."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        return _wrap(handler) if handler is not None else handler
