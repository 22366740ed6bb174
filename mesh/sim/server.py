"""Runs a sim instance: the gRPC server with Inference, SimControl, health and reflection."""

from __future__ import annotations

import asyncio
import os
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import grpc

from aimesh.inference.v1 import inference_pb2, inference_pb2_grpc
from aimesh.interceptors import DecodeErrorInterceptor
from aimesh.sim.v1 import sim_pb2, sim_pb2_grpc

from ..observability.tracing import (
    TracingFlags,
    server_interceptor,
    setup_tracing,
    shutdown_tracing,
)
from ..security.mtls import bind_ports
from ..serving import Health, enable_reflection, server_options, stop_on_signals
from .faults import Faults
from .service import InferenceService, SimBackend, SimConfig, SimControlService

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from ..control.client import Registrar
    from ..security.cli import MtlsFlags
    from ..security.workload import WorkloadIdentity

INFERENCE = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
SIM_CONTROL = sim_pb2.DESCRIPTOR.services_by_name["SimControl"].full_name


@dataclass(frozen=True)
class Registration:
    """How a sim instance registers itself with the control plane."""

    control_plane: str
    service: str
    zone: str = ""
    version: str = ""
    weight: int = 1
    ttl: float = 5.0
    deregister_delay: float = 0.25  # new calls still taken after deregistering

    @classmethod
    def from_args(cls, args: Any, first_model: str) -> Registration:
        """From the registration flags (`add_registration_flags`); the service defaults
        to the first model's name as a DNS label. ValueError says what to pass instead."""
        from ..config import is_dns_label

        service = args.service or first_model.lower().replace(".", "-").replace("_", "-")
        if not is_dns_label(service):
            raise ValueError(
                f"--service {service!r} is not a DNS label (lowercase letters, digits and "
                "'-'); pass --service NAME"
            )
        if args.weight < 1:
            raise ValueError("--weight must be at least 1")
        return cls(
            control_plane=args.control_plane,
            service=service,
            zone=args.zone,
            version=args.build_version,
            weight=args.weight,
            ttl=args.ttl,
            deregister_delay=args.deregister_delay,
        )

    def registrar(
        self,
        address: str,
        instance_id: str,
        models: Sequence[str],
        backend: Any,
        identity: WorkloadIdentity | None = None,
    ) -> Registrar:
        """A registrar for a backend (sim or provider adapter) serving at `address`, with
        `backend.on_serving_change` (SetServing, drain) reaching the catalog at once.
        With an identity and --secure-control-plane: over the control plane's mTLS port."""
        from aimesh.control.v1 import control_plane_pb2 as cp_pb

        from ..control.client import Registrar

        registrar = Registrar(
            self.control_plane,
            cp_pb.Instance(
                service=self.service,
                address=address,
                instance_id=instance_id,
                models=models,
                version=self.version,
                zone=self.zone,
                weight=self.weight,
                serving=True,
            ),
            ttl=self.ttl,
            identity=identity,
            linger=self.deregister_delay,
        )
        previous = backend.on_serving_change

        async def on_change(serving: bool) -> None:
            if previous is not None:
                await previous(serving)
            registrar.set_serving(serving)

        backend.on_serving_change = on_change
        return registrar


@dataclass
class RunningSim:
    server: grpc.aio.Server
    backend: SimBackend
    health: Health
    port: int
    plaintext_port: int = 0  # PERMISSIVE: the plaintext port next to the mTLS one

    async def stop(self, grace: float = 5.0) -> int:
        """Graceful stop: NOT_SERVING, refuse new generations, let in-flight ones finish
        within `grace`, end the rest with UNAVAILABLE. Returns how many were cut short."""
        await self.health.shutdown()
        cut = await self.backend.drain(grace)
        # Only calls being ended with a status are left; give them a moment to send it.
        await self.server.stop(1.0)
        return cut


async def start_sim(
    config: SimConfig,
    listen: str = "127.0.0.1:0",
    *,
    faults: Faults | None = None,
    seed: int | None = None,
    tracer_provider: TracerProvider | None = None,
    identity: WorkloadIdentity | None = None,
    plaintext_listen: str | None = None,
) -> RunningSim:
    """Starts an instance in this event loop (tests use it directly; the CLI wraps it).
    With a `tracer_provider`, every call but health and reflection gets a server span,
    child of the caller's trace context, with the GenAI attributes."""
    interceptors: list[Any] = [DecodeErrorInterceptor()]
    if tracer_provider is not None:
        interceptors.insert(0, server_interceptor(tracer_provider))
    server = grpc.aio.server(options=server_options(), interceptors=interceptors)
    port, plaintext_port = bind_ports(server, listen, identity, plaintext_listen)
    host = listen.rpartition(":")[0]
    if not config.instance_id:
        config = replace(config, instance_id=f"{host}:{port}")
    backend = SimBackend(config, faults=faults, rng=random.Random(seed))
    backend.traced = tracer_provider is not None
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceService(backend), server)
    sim_pb2_grpc.add_SimControlServicer_to_server(SimControlService(backend), server)
    health = Health(server, [INFERENCE, SIM_CONTROL])
    backend.on_serving_change = health.set_serving
    enable_reflection(server, [INFERENCE, SIM_CONTROL])
    await server.start()
    await health.set_serving(True)
    sim = RunningSim(server=server, backend=backend, health=health, port=port)
    sim.plaintext_port = plaintext_port
    return sim


async def serve(
    config: SimConfig,
    listen: str,
    *,
    faults: Faults | None = None,
    seed: int | None = None,
    grace: float = 10.0,
    registration: Registration | None = None,
    tracing: TracingFlags | None = None,
    mtls: MtlsFlags | None = None,
) -> None:
    """Serves until SIGTERM/SIGINT, then drains for up to `grace` seconds. With a
    `registration`, the instance registers itself once serving and deregisters first
    thing on SIGTERM, so proxies stop sending before the drain begins. Traces when
    `tracing` flags or the OTEL_* environment name a collector."""
    provider = setup_tracing(
        "aimesh-sim", None, os.environ, tracing, instance_id=config.instance_id or None
    )
    try:
        await _serve(config, listen, faults, seed, grace, registration, provider, mtls)
    finally:
        await asyncio.to_thread(shutdown_tracing, provider)  # the last spans


async def _serve(
    config: SimConfig,
    listen: str,
    faults: Faults | None,
    seed: int | None,
    grace: float,
    registration: Registration | None,
    provider: TracerProvider | None,
    mtls: MtlsFlags | None = None,
) -> None:
    identity = None
    if mtls is not None:
        from ..security.mtls import start_workload_identity

        identity = await start_workload_identity(mtls, "aimesh backend sim")
        print(
            f"aimesh sim backend: identity {identity.spiffe_id} ({mtls.mode or 'STRICT'})",
            flush=True,
        )
    sim = await start_sim(
        config,
        listen,
        faults=faults,
        seed=seed,
        tracer_provider=provider,
        identity=identity,
        plaintext_listen=mtls.plaintext_listen if mtls else None,
    )
    registrar = None
    host = listen.rpartition(":")[0]
    c = sim.backend.config
    if registration is not None:
        # With an identity and --secure-control-plane: over the control plane's mTLS port.
        registrar = registration.registrar(
            f"{host}:{sim.port}", c.instance_id, c.models, sim.backend, identity
        )
        registrar.start()
    stop = asyncio.Event()
    stop_on_signals(stop)
    print(
        f"aimesh sim backend {c.instance_id} listening on {host}:{sim.port}: "
        f"models {', '.join(c.models)}; {c.slots} slots, queue {c.max_queue}; "
        f"ttft {c.ttft * 1000:.0f}ms, {c.tokens_per_second:g} tokens/s",
        flush=True,
    )
    await stop.wait()
    if registrar is not None:
        await registrar.stop(deregister=True)
    p = sim.backend.pool
    print(
        f"aimesh sim backend {c.instance_id}: draining ({p.active} active, {p.queued} queued, "
        f"grace {grace:g}s)",
        file=sys.stderr,
        flush=True,
    )
    cut = await sim.stop(grace)
    if identity is not None:
        await identity.stop()
    note = f" ({cut} calls cut short after the grace period)" if cut else ""
    print(f"aimesh sim backend {c.instance_id}: stopped{note}", file=sys.stderr, flush=True)
