"""Raw-bytes forwarding of any gRPC call to the endpoint the router and balancer choose.

Messages are never deserialized (the one exception: the `model` field of Inference
requests is read off the wire when a route needs it). Request headers, response headers,
trailers, status codes, messages and `grpc-status-details-bin` pass through unchanged;
cancellation and deadlines propagate; flow control holds because every write is awaited.

The four call types share one shape: route and pick (`_open`), run the upstream call,
report the outcome to the cluster (`_close`). Each has its own handler type, because a
`stream_stream` handler for a unary method costs about half again as much per call.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc
import grpc.aio

from aimesh.inference.v1.inference_pb2 import GenerateChunk

from ..errors import MeshError
from .cluster import SS, SU, US, UU, Cluster, Upstream
from .router import INFERENCE_SERVICE, MODEL_METHODS, RouteDecision, Router, split_path
from .wire import read_string_field

# Headers grpc manages itself on each hop; everything else is forwarded as is.
_HOP_HEADERS = frozenset(
    {
        "user-agent",
        "te",
        "content-type",
        "grpc-timeout",
        "grpc-encoding",
        "grpc-accept-encoding",
        ":authority",
        "host",
    }
)

EOF = grpc.aio.EOF  # type: ignore[attr-defined]  # (grpc-stubs predates it)
GENERATE_STREAM = f"/{INFERENCE_SERVICE}/GenerateStream"
# Chunks read ahead of a slow caller before the proxy stops reading (and so, through
# HTTP/2 flow control, slows the backend).
MAX_BACKLOG = 256
MERGE_STREAMS = os.environ.get("AIMESH_MERGE_STREAMS", "1") != "0"


def forwardable(metadata: Any) -> tuple[tuple[str, Any], ...]:
    return tuple((k, v) for k, v in metadata if k not in _HOP_HEADERS)


class NoRoute(MeshError):
    pass


class Forwarder:
    """Holds the routing table and clusters; builds one handler per (method, call type)."""

    def __init__(
        self, router: Router, clusters: Mapping[str, Cluster], rng: random.Random | None = None
    ) -> None:
        self.router = router
        self.clusters = dict(clusters)
        self.rng = rng or random.Random()
        self._handlers: dict[tuple[str, str], grpc.RpcMethodHandler] = {}  # type: ignore[type-arg]

    def update(self, router: Router, clusters: Mapping[str, Cluster]) -> None:
        """Swaps in a new routing table; calls in flight keep the upstream they have."""
        self.router = router
        self.clusters = dict(clusters)

    # -- routing ------------------------------------------------------------------------

    def _available(self, service: str) -> bool:
        c = self.clusters.get(service)
        return c is not None and c.has_eligible()

    def decide(self, path: str, metadata: Any, request: bytes | None) -> RouteDecision:
        service, method = split_path(path)
        router = self.router
        model = None
        if (
            router.uses_model
            and request is not None
            and service == INFERENCE_SERVICE
            and (method in MODEL_METHODS)
        ):
            model = read_string_field(request, 1)
        headers = {k: v for k, v in metadata if isinstance(v, str)} if router.uses_headers else {}
        decision = router.route(service, method, headers, model)
        if decision is None:
            what = f"model {model!r}" if model else path
            raise NoRoute(
                grpc.StatusCode.UNIMPLEMENTED,
                f"no route for {what}: no traffic policy matches and no service serves it",
            )
        return decision

    def pick(
        self, decision: RouteDecision, exclude: tuple[str, ...] = ()
    ) -> tuple[Cluster, Upstream]:
        for name in decision.order(self._available, self.rng):
            return self.clusters[name], self.clusters[name].pick(exclude)
        services = ", ".join(decision.services())
        raise MeshError(
            grpc.StatusCode.UNAVAILABLE,
            f"no healthy endpoint for {services} (route {decision.policy}); "
            "check the services' health in the proxy's admin endpoint",
        )

    # -- handlers -----------------------------------------------------------------------

    def handler(self, path: str, kind: str) -> grpc.RpcMethodHandler:  # type: ignore[type-arg]
        key = (path, kind)
        h = self._handlers.get(key)
        if h is None:
            h = self._make(path, kind)
            self._handlers[key] = h
        return h

    def _make(self, path: str, kind: str) -> grpc.RpcMethodHandler:  # type: ignore[type-arg]
        if kind == UU:
            return grpc.unary_unary_rpc_method_handler(self._uu(path))
        if kind == US:
            return grpc.unary_stream_rpc_method_handler(self._us(path))
        if kind == SU:
            return grpc.stream_unary_rpc_method_handler(self._su(path))
        return grpc.stream_stream_rpc_method_handler(self._ss(path))

    def _open(
        self, path: str, context: Any, request: bytes | None, kind: str
    ) -> tuple[Cluster, Upstream, Any, tuple[tuple[str, Any], ...], float | None]:
        md = context.invocation_metadata()
        decision = self.decide(path, md, request)
        cluster, up = self.pick(decision)
        timeout = context.time_remaining()
        for cap in (decision.timeout, cluster.timeout):
            if cap is not None and (timeout is None or cap < timeout):
                timeout = cap
        return cluster, up, up.multicallable(path, kind), forwardable(md), timeout

    def _uu(self, path: str) -> Callable[[bytes, Any], Any]:
        async def handle(request: bytes, context: Any) -> bytes:
            try:
                cluster, up, mc, md, timeout = self._open(path, context, request, UU)
            except MeshError as err:
                await context.abort(err.code, err.message)
            started = time.perf_counter()
            call = mc(request, metadata=md, timeout=timeout)
            code = None
            trailers = None
            try:
                response: bytes = await call
                initial = await call.initial_metadata()
                if initial:  # an empty send would cost a batch of its own
                    await context.send_initial_metadata(initial)
                trailers = await call.trailing_metadata()
                context.set_trailing_metadata(trailers)
                return response
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                trailers = exc.trailing_metadata()
                await _relay_error(context, exc)
                raise  # not reached: abort raises
            except BaseException:
                code = grpc.StatusCode.CANCELLED
                call.cancel()
                raise
            finally:
                cluster.finished(up, time.perf_counter() - started, code, trailers)

        return handle

    def _us(self, path: str) -> Callable[[bytes, Any], Any]:
        merge = MERGE_STREAMS and path == GENERATE_STREAM

        async def handle(request: bytes, context: Any) -> None:
            try:
                cluster, up, mc, md, timeout = self._open(path, context, request, US)
            except MeshError as err:
                await context.abort(err.code, err.message)
            started = time.perf_counter()
            call = mc(request, metadata=md, timeout=timeout)
            code = None
            trailers = None
            try:
                initial = await call.initial_metadata()
                if initial:
                    await context.send_initial_metadata(initial)
                if merge:
                    await pump_merging(call, context)
                else:
                    read, write, eof = call.read, context.write, EOF
                    while True:
                        msg = await read()
                        if msg is eof:
                            break
                        await write(msg)
                trailers = await call.trailing_metadata()
                context.set_trailing_metadata(trailers)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                trailers = exc.trailing_metadata()
                await _relay_error(context, exc)
            except BaseException:
                code = grpc.StatusCode.CANCELLED
                call.cancel()
                raise
            finally:
                cluster.finished(up, time.perf_counter() - started, code, trailers)

        return handle

    def _su(self, path: str) -> Callable[[AsyncIterator[bytes], Any], Any]:
        async def handle(requests: AsyncIterator[bytes], context: Any) -> bytes:
            try:
                cluster, up, mc, md, timeout = self._open(path, context, None, SU)
            except MeshError as err:
                await context.abort(err.code, err.message)
            started = time.perf_counter()
            call = mc(requests, metadata=md, timeout=timeout)
            code = None
            try:
                response: bytes = await call
                initial = await call.initial_metadata()
                if initial:
                    await context.send_initial_metadata(initial)
                context.set_trailing_metadata(await call.trailing_metadata())
                return response
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                await _relay_error(context, exc)
                raise
            except BaseException:
                code = grpc.StatusCode.CANCELLED
                call.cancel()
                raise
            finally:
                cluster.finished(up, time.perf_counter() - started, code)

        return handle

    def _ss(self, path: str) -> Callable[[AsyncIterator[bytes], Any], Any]:
        async def handle(requests: AsyncIterator[bytes], context: Any) -> None:
            try:
                cluster, up, mc, md, timeout = self._open(path, context, None, SS)
            except MeshError as err:
                await context.abort(err.code, err.message)
            started = time.perf_counter()
            call = mc(requests, metadata=md, timeout=timeout)
            code = None
            try:
                initial = await call.initial_metadata()
                if initial:
                    await context.send_initial_metadata(initial)
                read, write, eof = call.read, context.write, EOF
                while True:
                    msg = await read()
                    if msg is eof:
                        break
                    await write(msg)
                context.set_trailing_metadata(await call.trailing_metadata())
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                await _relay_error(context, exc)
            except BaseException:
                code = grpc.StatusCode.CANCELLED
                call.cancel()
                raise
            finally:
                cluster.finished(up, time.perf_counter() - started, code)

        return handle


async def pump_merging(call: Any, context: Any) -> None:
    """Copies an Inference token stream downstream, merging the chunks that queued up while
    the caller was still reading the previous write.

    A caller that keeps up gets every chunk as it arrives; one that falls behind gets the
    backlog as one chunk (texts joined, index of the first, token counts summed, finish and
    usage of the last), so a slow reader costs fewer writes instead of an ever longer queue.
    Every token and its order are kept.
    """
    backlog: list[bytes] = []
    wake = asyncio.Event()
    room = asyncio.Event()  # cleared while the backlog is full: flow control still holds
    room.set()
    finished = False

    async def reader() -> None:
        nonlocal finished
        read, eof = call.read, EOF
        try:
            while True:
                msg = await read()
                if msg is eof:
                    return
                backlog.append(msg)
                wake.set()
                if len(backlog) >= MAX_BACKLOG:
                    room.clear()
                    await room.wait()
        finally:
            finished = True
            wake.set()

    task = asyncio.get_running_loop().create_task(reader())
    write = context.write
    try:
        while True:
            await wake.wait()
            wake.clear()
            if backlog:
                batch = backlog[:]
                backlog.clear()
                room.set()
                await write(batch[0] if len(batch) == 1 else merge_chunks(batch))
            elif finished:
                break
    finally:
        if not task.done():
            task.cancel()
    await task  # re-raises the upstream's error, if any


def merge_chunks(raw: list[bytes]) -> bytes:
    chunks = [GenerateChunk.FromString(b) for b in raw]
    first, last = chunks[0], chunks[-1]
    merged = GenerateChunk(
        text="".join(c.text for c in chunks),
        index=first.index,
        token_count=sum(c.token_count for c in chunks),
        model=first.model or last.model,
        finish_reason=last.finish_reason,
    )
    if last.HasField("usage"):
        merged.usage.CopyFrom(last.usage)
    return bytes(merged.SerializeToString())


async def _relay_error(context: Any, exc: grpc.aio.AioRpcError) -> None:
    """Ends the downstream call with the upstream's status, message, headers and trailers."""
    initial = exc.initial_metadata()
    if initial:
        await context.send_initial_metadata(initial)
    await context.abort(
        exc.code(), exc.details() or "", trailing_metadata=tuple(exc.trailing_metadata() or ())
    )


class GenericHandler(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """Serves any method: the call type comes from known descriptors, else stream-stream.

    Register it after the proxy's own services (health, reflection): grpc asks generic
    handlers in order, and this one answers every path.
    """

    def __init__(self, forwarder: Forwarder, kinds: Mapping[str, str]) -> None:
        self.forwarder = forwarder
        self.kinds = kinds  # '/pkg.Service/Method' -> UU/US/SU/SS

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        path = handler_call_details.method
        return self.forwarder.handler(path, self.kinds.get(path, SS))
