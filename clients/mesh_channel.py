"""A proxyless mesh client: the proxy's routing, balancing and resilience, in-process.

    async with MeshChannel(load_file("mesh.yaml"), endpoints={"gpt4-gateway": [...]}) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        reply = await stub.Generate(request, timeout=10)
        async for chunk in stub.GenerateStream(request):
            ...

`MeshChannel` quacks like a `grpc.aio.Channel` for generated stubs. Each call runs
through the very code a proxy runs for its callers (`mesh/proxy/forward.py`: route by
service, method, headers and model; weighted splits and backups; the service's picker
over healthy endpoints; retries under the budget; circuit breakers; resumable token
streams), with no proxy hop: the app talks to the backends directly, one channel each.
Errors surface as `grpc.aio.AioRpcError`, as from any grpc.aio channel.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

from aimesh.mesh.config import MeshConfig
from aimesh.mesh.proxy.cluster import US, UU, EndpointAddr
from aimesh.mesh.proxy.server import Proxy, ProxySettings

Serializer = Callable[[Any], bytes] | None
_END = object()


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str, trailers: Any) -> None:
        super().__init__(details)
        self.code, self.details, self.trailers = code, details, trailers


class _CallContext:
    """The slice of grpc.aio.ServicerContext the forwarder uses, for a local caller."""

    __slots__ = ("_deadline", "_metadata", "initial", "queue", "trailers")

    def __init__(
        self,
        metadata: Sequence[tuple[str, Any]],
        timeout: float | None,
        queue: asyncio.Queue[Any] | None = None,
    ) -> None:
        self._metadata = tuple(metadata)
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self.initial: Any = ()
        self.trailers: Any = ()
        self.queue = queue

    def invocation_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else self._deadline - time.monotonic()

    async def send_initial_metadata(self, metadata: Any) -> None:
        self.initial = metadata

    def set_trailing_metadata(self, metadata: Any) -> None:
        self.trailers = metadata

    async def write(self, message: bytes) -> None:
        assert self.queue is not None
        await self.queue.put(message)  # bounded: a slow reader slows the upstream

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> None:
        raise _Abort(code, details, trailing_metadata)


def _rpc_error(exc: _Abort, ctx: _CallContext) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        exc.code,
        grpc.aio.Metadata(*tuple(ctx.initial or ())),
        grpc.aio.Metadata(*tuple(exc.trailers or ())),
        details=exc.details,
        debug_error_string=f"aimesh MeshChannel: {exc.code.name}: {exc.details}",
    )


class _UnaryUnary:
    def __init__(self, mesh: MeshChannel, path: str, ser: Serializer, des: Serializer) -> None:
        self.mesh, self.path, self.ser, self.des = mesh, path, ser, des

    async def __call__(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, Any]] = (),
        **_: Any,
    ) -> Any:
        forwarder = self.mesh.proxy.forwarder
        assert forwarder is not None, "use MeshChannel in `async with` (or await start())"
        ctx = _CallContext(metadata, timeout)
        body = self.ser(request) if self.ser else request
        try:
            raw = await forwarder.handler(self.path, UU).unary_unary(body, ctx)
        except _Abort as exc:
            raise _rpc_error(exc, ctx) from None
        return self.des(raw) if self.des else raw


class _UnaryStream:
    def __init__(self, mesh: MeshChannel, path: str, ser: Serializer, des: Serializer) -> None:
        self.mesh, self.path, self.ser, self.des = mesh, path, ser, des

    def __call__(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, Any]] = (),
        **_: Any,
    ) -> AsyncIterator[Any]:
        return self._stream(request, timeout, metadata)

    async def _stream(
        self, request: Any, timeout: float | None, metadata: Sequence[tuple[str, Any]]
    ) -> AsyncIterator[Any]:
        forwarder = self.mesh.proxy.forwarder
        assert forwarder is not None, "use MeshChannel in `async with` (or await start())"
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=64)
        ctx = _CallContext(metadata, timeout, queue)
        body = self.ser(request) if self.ser else request
        handler = forwarder.handler(self.path, US).unary_stream

        async def run() -> None:
            try:
                await handler(body, ctx)
            finally:
                await queue.put(_END)

        task = asyncio.get_running_loop().create_task(run())
        des = self.des
        try:
            while (item := await queue.get()) is not _END:
                yield des(item) if des else item
            try:
                await task
            except _Abort as exc:
                raise _rpc_error(exc, ctx) from None
        finally:
            if not task.done():
                task.cancel()  # the caller stopped reading: cancel the upstream call


class MeshChannel:
    """A channel-like object for generated grpc.aio stubs; see the module docstring."""

    def __init__(
        self,
        config: MeshConfig,
        *,
        endpoints: Mapping[str, Sequence[str]] | None = None,
        seed: int | None = None,
        max_message_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        extra = {s: [EndpointAddr(a) for a in addrs] for s, addrs in (endpoints or {}).items()}
        self.config = config
        self.proxy = Proxy(
            ProxySettings(extra_endpoints=extra, seed=seed, max_message_bytes=max_message_bytes)
        )

    async def start(self) -> MeshChannel:
        self.proxy.apply(self.config)
        return self

    def apply(self, config: MeshConfig) -> None:
        """A new config takes effect for the next call."""
        self.config = config
        self.proxy.apply(config)

    async def close(self, grace: float | None = None) -> None:
        await self.proxy.stop(grace or 0.0)

    async def __aenter__(self) -> MeshChannel:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- what generated stubs call ------------------------------------------------------

    def unary_unary(
        self,
        method: str,
        request_serializer: Serializer = None,
        response_deserializer: Serializer = None,
        **_: Any,
    ) -> _UnaryUnary:
        return _UnaryUnary(self, method, request_serializer, response_deserializer)

    def unary_stream(
        self,
        method: str,
        request_serializer: Serializer = None,
        response_deserializer: Serializer = None,
        **_: Any,
    ) -> _UnaryStream:
        return _UnaryStream(self, method, request_serializer, response_deserializer)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"{method}: client-streaming calls are not supported by MeshChannel yet; "
            "call them through an aimesh proxy"
        )

    stream_stream = stream_unary


__all__ = ["MeshChannel"]
