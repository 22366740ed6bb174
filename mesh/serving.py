"""What every aimesh gRPC server has: health, reflection (v1 and v1alpha), sane options,
and a graceful stop on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterable, Sequence

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer

REFLECTION_V1ALPHA = reflection.SERVICE_NAME  # grpc.reflection.v1alpha.ServerReflection
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
HEALTH = health.SERVICE_NAME

DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024


def server_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE) -> list[tuple[str, int]]:
    return [
        # grpc turns SO_REUSEPORT on by default, which lets a second process bind a port
        # that is already in use and silently share its traffic.
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ]


def _register_reflection_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    """Adds grpc/reflection/v1/reflection.proto to the pool so `describe` works for it.

    v1 is v1alpha with a new package name (identical messages and field numbers), and
    grpcio-reflection ships only v1alpha, so we derive v1's descriptor from it.
    """
    try:
        pool.FindServiceByName(REFLECTION_V1)
        return
    except KeyError:
        pass
    fdp = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(fdp)
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    fdp.name = "grpc/reflection/v1/reflection.proto"
    fdp.package = "grpc.reflection.v1"
    fdp.options.Clear()
    for msg in fdp.message_type:
        for f in msg.field:
            if f.type_name.startswith(old):
                f.type_name = new + f.type_name[len(old) :]
    for svc in fdp.service:
        for m in svc.method:
            m.input_type = new + m.input_type[len(old) :]
            m.output_type = new + m.output_type[len(old) :]
    pool.Add(fdp)


def enable_reflection(
    server: grpc.aio.Server,
    service_names: Iterable[str],
    pool: descriptor_pool.DescriptorPool | None = None,
) -> None:
    """Serves reflection v1alpha and v1 for `service_names` plus health and reflection."""
    pool = pool or descriptor_pool.Default()
    _register_reflection_v1_descriptor(pool)
    names = sorted({*service_names, HEALTH, REFLECTION_V1ALPHA, REFLECTION_V1})
    servicer = ReflectionServicer(names, pool=pool)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    # Same wire format for both versions, so one servicer serves both.
    for service in (REFLECTION_V1ALPHA, REFLECTION_V1):
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {"ServerReflectionInfo": handler}),)
        )


class Health:
    """grpc.health.v1 for a set of services, switched together."""

    def __init__(self, server: grpc.aio.Server, service_names: Sequence[str]) -> None:
        self.servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.service_names = ["", *service_names]
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)
        self.serving = False

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self.service_names:
            await self.servicer.set(name, status)
        self.serving = serving

    async def shutdown(self) -> None:
        """NOT_SERVING for every service, and no later change (draining)."""
        self.serving = False
        await self.servicer.enter_graceful_shutdown()


def stop_on_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set `stop`; a second signal falls back to the default (exit now)."""
    loop = asyncio.get_running_loop()

    def _handler(sig: signal.Signals) -> None:
        if stop.is_set():
            loop.remove_signal_handler(sig)
            signal.raise_signal(sig)
            return
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _handler, sig)


def bind(
    server: grpc.aio.Server, listen: str, credentials: grpc.ServerCredentials | None = None
) -> int:
    """Binds HOST:PORT (port 0 picks a free one) and returns the port, or explains the failure.
    With `credentials` the port speaks TLS only (mTLS when they require client certs)."""
    try:
        if credentials is not None:
            port = server.add_secure_port(listen, credentials)
        else:
            port = server.add_insecure_port(listen)
    except RuntimeError as exc:
        raise SystemExit(f"cannot listen on {listen}: {exc}; is the port already in use?") from exc
    if port == 0:
        raise SystemExit(f"cannot listen on {listen}: the address is in use or not local")
    return port


def host_of(listen: str) -> str:
    host, _, _ = listen.rpartition(":")
    return host.strip("[]") or "0.0.0.0"
