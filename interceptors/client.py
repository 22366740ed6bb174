"""Outbound grpc.aio client interceptors for apps inside the mesh.

An app serving a call (behind the inbound `Stack`) that calls other services passes on
what the mesh knows about the call it is serving: the remaining deadline (so a slow
first hop cannot leave the second more time than the caller has) and the request id.

    channel = grpc.aio.insecure_channel(target, interceptors=propagation())

These continue on the channel they are installed on; routing, balancing and resilience
for outbound calls come from `aimesh.clients.MeshChannel`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio

from .base import current_call
from .request_id import HEADER


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
