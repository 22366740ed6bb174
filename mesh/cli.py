"""The `aimesh` command line."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import grpc.aio

from . import runtime
from .control.client import add_registration_flags
from .errors import status_code_from_name, status_code_from_number
from .observability.tracing import add_tracing_flags, flags_from_args
from .units import parse_duration

EXIT_USAGE = 2
EXIT_RPC = 1


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _length_range(text: str) -> tuple[int, int]:
    try:
        lo, _, hi = text.partition("-")
        return (int(lo), int(hi or lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not MIN-MAX, e.g. 16-64") from None


def _status(text: str) -> grpc.StatusCode:
    try:
        return status_code_from_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_sim_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "sim",
        help="a simulated LLM backend (deterministic text, realistic timing, faults)",
        description="Serve the Inference API with simulated models.",
    )
    p.add_argument("--listen", default="127.0.0.1:50051", help="HOST:PORT (port 0 picks one)")
    p.add_argument(
        "--model",
        action="append",
        required=True,
        dest="models",
        help="a model name to serve (repeat for more)",
    )
    p.add_argument(
        "--instance-id", default="", help="name in the aimesh-instance trailer (default HOST:PORT)"
    )
    p.add_argument("--slots", type=int, default=4, help="concurrent generations (default 4)")
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="calls waiting for a slot before RESOURCE_EXHAUSTED (default 64)",
    )
    p.add_argument(
        "--ttft",
        type=_duration,
        default=0.05,
        help="time to first token once a slot is free (default 50ms)",
    )
    p.add_argument(
        "--tps",
        type=float,
        default=50.0,
        help="tokens per second per generation, 0 = unpaced (default 50)",
    )
    p.add_argument(
        "--batch-slowdown",
        type=float,
        default=0.1,
        help="slowdown per extra concurrent generation (default 0.1)",
    )
    p.add_argument(
        "--length",
        type=_length_range,
        default=(16, 64),
        help="natural completion length in tokens, MIN-MAX (default 16-64)",
    )
    p.add_argument("--error-rate", type=float, default=0.0, help="fraction of calls to fail")
    p.add_argument(
        "--error-code",
        type=_status,
        default=grpc.StatusCode.UNAVAILABLE,
        help="status of injected errors (default UNAVAILABLE)",
    )
    p.add_argument(
        "--extra-latency",
        type=_duration,
        default=0.0,
        help="added before the first token, e.g. 200ms",
    )
    p.add_argument(
        "--die-after-tokens",
        type=int,
        default=0,
        help="break every stream after N tokens (UNAVAILABLE)",
    )
    p.add_argument(
        "--die-exits-process",
        action="store_true",
        help="with --die-after-tokens: crash the whole process instead",
    )
    p.add_argument("--seed", type=int, default=None, help="seed for fault decisions")
    add_registration_flags(p, _duration)
    from .security.cli import add_mtls_flags

    add_mtls_flags(p, proxy=False)
    add_tracing_flags(p)
    p.add_argument(
        "--grace",
        type=_duration,
        default=10.0,
        help="on SIGTERM, time for in-flight calls to finish (default 10s)",
    )


def _cmd_backend_sim(args: argparse.Namespace) -> int:
    from .sim.faults import Faults
    from .sim.server import serve
    from .sim.service import SimConfig

    try:
        config = SimConfig(
            models=tuple(args.models),
            instance_id=args.instance_id,
            slots=args.slots,
            max_queue=args.max_queue,
            ttft=args.ttft,
            tokens_per_second=args.tps,
            batch_slowdown=args.batch_slowdown,
            length_range=args.length,
        )
        faults = Faults(
            error_rate=args.error_rate,
            error_code=args.error_code,
            extra_latency=args.extra_latency,
            die_after_tokens=args.die_after_tokens,
            die_exits_process=args.die_exits_process,
        )
    except ValueError as exc:
        print(f"aimesh backend sim: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from .security.cli import mtls_from_args

    try:
        mtls = mtls_from_args(args, args.control_plane)
    except ValueError as exc:
        print(f"aimesh backend sim: {exc}", file=sys.stderr)
        return EXIT_USAGE
    registration = None
    if args.control_plane:
        from .sim.server import Registration

        try:
            registration = Registration.from_args(args, args.models[0])
        except ValueError as exc:
            print(f"aimesh backend sim: {exc}", file=sys.stderr)
            return EXIT_USAGE
    runtime.run(
        serve(
            config,
            args.listen,
            faults=faults,
            seed=args.seed,
            grace=args.grace,
            registration=registration,
            tracing=flags_from_args(args),
            mtls=mtls,
        )
    )
    return 0


def _rpc_error(prog: str, exc: grpc.RpcError, target: str) -> int:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    hint = ""
    if code == grpc.StatusCode.UNAVAILABLE:
        hint = f"\n  hint: is something serving on {target}? (start one with `aimesh backend sim`)"
    elif code == grpc.StatusCode.NOT_FOUND:
        hint = "\n  hint: list the models with `aimesh models --target " + target + "`"
    name = code.name if code is not None else "ERROR"
    print(f"{prog}: {name}: {details}{hint}", file=sys.stderr)
    return EXIT_RPC


async def _chat(args: argparse.Namespace, interceptors: Sequence[object] = ()) -> int:
    from aimesh.clients import AsyncInferenceClient

    async with grpc.aio.insecure_channel(
        args.target,
        interceptors=list(interceptors) or None,  # type: ignore[arg-type]
    ) as channel:
        client = AsyncInferenceClient(channel, model=args.model, timeout=args.timeout)
        started = time.perf_counter()
        first: float | None = None
        tokens = 0
        stream = client.stream(
            args.prompt,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            seed=args.seed,
            system=args.system,
        )
        try:
            async for chunk in stream:
                if first is None:
                    first = time.perf_counter() - started
                tokens += chunk.token_count
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
            instance = await stream.instance()
        except grpc.aio.AioRpcError as exc:
            if tokens:
                sys.stdout.write("\n")
            return _rpc_error("aimesh chat", exc, args.target)
    elapsed = time.perf_counter() - started
    sys.stdout.write("\n")
    rate = tokens / (elapsed - first) if first is not None and elapsed > first else 0.0
    if not args.quiet:
        print(
            f"-- {tokens} tokens from {instance or args.target} · first token "
            f"{(first or 0) * 1000:.0f} ms · {rate:.1f} tokens/s · {elapsed:.2f} s",
            file=sys.stderr,
        )
    return 0


async def _models(args: argparse.Namespace) -> int:
    from aimesh.clients import AsyncInferenceClient

    async with grpc.aio.insecure_channel(args.target) as channel:
        try:
            models = await AsyncInferenceClient(channel, timeout=args.timeout).list_models()
        except grpc.aio.AioRpcError as exc:
            return _rpc_error("aimesh models", exc, args.target)
    print(f"{'MODEL':<24} {'OWNED BY':<14} {'CONTEXT':>8} {'EMBED DIM':>9}")
    for m in models:
        print(f"{m.id:<24} {m.owned_by:<14} {m.context_window:>8} {m.embedding_dimensions:>9}")
    return 0


async def _sim_ctl(args: argparse.Namespace) -> int:
    from aimesh.sim.v1 import sim_pb2, sim_pb2_grpc

    async with grpc.aio.insecure_channel(args.target) as channel:
        stub = sim_pb2_grpc.SimControlStub(channel)
        try:
            if args.sim_cmd == "stats":
                s = await stub.GetStats(sim_pb2.GetStatsRequest(), timeout=args.timeout)
                print(
                    f"{s.instance}: {s.calls_total} calls, {s.tokens_generated_total} tokens, "
                    f"{s.rejected_total} rejected, {s.cancelled_total} cancelled, "
                    f"{s.faults_total} faults; now {s.active}/{s.slots} active, "
                    f"{s.queued}/{s.max_queue} queued"
                )
            elif args.sim_cmd == "faults":
                f = await stub.SetFaults(
                    sim_pb2.Faults(
                        error_rate=args.error_rate,
                        error_code=args.error_code.value[0],
                        extra_latency_ms=int(args.extra_latency * 1000),
                        die_after_tokens=args.die_after_tokens,
                        die_exits_process=args.die_exits_process,
                    ),
                    timeout=args.timeout,
                )
                code = status_code_from_number(f.error_code).name
                print(
                    f"faults now: error rate {f.error_rate:g} ({code}), "
                    f"extra latency {f.extra_latency_ms} ms, die after {f.die_after_tokens} tokens"
                    f"{' (process exits)' if f.die_exits_process else ''}"
                )
            else:
                r = await stub.SetServing(
                    sim_pb2.SetServingRequest(serving=args.state == "on"), timeout=args.timeout
                )
                print(f"health: {'SERVING' if r.serving else 'NOT_SERVING'}")
        except grpc.aio.AioRpcError as exc:
            return _rpc_error(f"aimesh sim {args.sim_cmd}", exc, args.target)
    return 0


def _cmd_proxy(args: argparse.Namespace) -> int:
    from .proxy.main import endpoints_from_flags, run
    from .proxy.server import ProxySettings

    try:
        extra = endpoints_from_flags(args.endpoint)
    except ValueError as exc:
        print(f"aimesh proxy: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not args.config and not args.control_plane:
        print(
            "aimesh proxy: give --config FILE, --control-plane ADDR, or both",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.mode == "sidecar" and not (args.inbound and args.local_app):
        print(
            "aimesh proxy: --mode sidecar needs --inbound HOST:PORT and --local-app HOST:PORT",
            file=sys.stderr,
        )
        return EXIT_USAGE
    from .observability.audit import settings_from_args as audit_settings

    try:
        audit = audit_settings(args)
    except ValueError as exc:
        print(f"aimesh proxy: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from .security.cli import mtls_from_args

    try:
        mtls = mtls_from_args(args, args.control_plane)
    except ValueError as exc:
        print(f"aimesh proxy: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from .security.callers import caller_auth
    from .security.callers import flags_from_args as caller_flags

    try:
        callers = caller_auth(caller_flags(args))
    except ValueError as exc:
        print(f"aimesh proxy: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if callers is not None and args.mode != "gateway":
        print("aimesh proxy: --api-keys and --jwt-keys are for --mode gateway", file=sys.stderr)
        return EXIT_USAGE
    settings = ProxySettings(
        mtls=mtls,
        listen=args.listen,
        mode=args.mode,
        inbound_listen=args.inbound,
        local_app=args.local_app,
        max_message_bytes=args.max_message_bytes,
        extra_endpoints=extra,
        seed=args.seed,
        audit=audit,
        tracing=flags_from_args(args),
        callers=callers,
        service=args.service,
    )
    mesh = None
    if args.control_plane:
        from .proxy.main import ControlPlaneSettings, default_cache

        mesh = ControlPlaneSettings(
            address=args.control_plane,
            cache=Path(args.cache) if args.cache else default_cache(args.listen),
            proxy_id=args.proxy_id or f"{args.mode}@{args.listen}",
        )
    return runtime.run(run(args.config, settings, args.admin, args.grace, mesh))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aimesh",
        description="aimesh: a gRPC-native service mesh for AI inference traffic.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    backend = sub.add_parser("backend", help="run an AI backend that serves the Inference API")
    backend_sub = backend.add_subparsers(dest="backend", metavar="KIND", required=True)
    _add_sim_parser(backend_sub)
    from .providers.cli import add_parsers as add_provider_parsers

    add_provider_parsers(backend_sub)

    chat = sub.add_parser("chat", help="stream a completion to the terminal")
    chat.add_argument("prompt", help="what to ask")
    chat.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of a backend or proxy")
    chat.add_argument("--model", required=True)
    chat.add_argument("--system", default=None, help="a system prompt")
    chat.add_argument("--max-tokens", type=int, default=0)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--seed", type=int, default=None)
    chat.add_argument("--timeout", type=_duration, default=60.0, help="deadline (default 60s)")
    chat.add_argument("-q", "--quiet", action="store_true", help="no summary line")
    add_tracing_flags(chat)

    models = sub.add_parser("models", help="list the models a backend or proxy serves")
    models.add_argument("--target", default="127.0.0.1:50051")
    models.add_argument("--timeout", type=_duration, default=10.0)

    sim = sub.add_parser("sim", help="control a running sim backend (faults, health, stats)")
    sim_sub = sim.add_subparsers(dest="sim_cmd", metavar="ACTION", required=True)
    stats = sim_sub.add_parser("stats", help="counters and current load")
    faults = sim_sub.add_parser("faults", help="replace the fault settings")
    faults.add_argument("--error-rate", type=float, default=0.0)
    faults.add_argument("--error-code", type=_status, default=grpc.StatusCode.UNAVAILABLE)
    faults.add_argument("--extra-latency", type=_duration, default=0.0)
    faults.add_argument("--die-after-tokens", type=int, default=0)
    faults.add_argument("--die-exits-process", action="store_true")
    serving = sim_sub.add_parser("health", help="switch grpc.health.v1 SERVING on or off")
    serving.add_argument("state", choices=["on", "off"])
    for p in (stats, faults, serving):
        p.add_argument("--target", default="127.0.0.1:50051")
        p.add_argument("--timeout", type=_duration, default=10.0)

    proxy = sub.add_parser(
        "proxy",
        help="run the routing gRPC proxy (gateway or sidecar)",
        description="Forward any gRPC call to the services of a ServiceMesh "
        "config, with weighted, health- and load-aware balancing.",
    )
    proxy.add_argument(
        "--listen",
        default="127.0.0.1:8443",
        help="HOST:PORT callers use (sidecar: the local app's outbound side)",
    )
    proxy.add_argument(
        "--config",
        "-f",
        default=None,
        help="ServiceMesh YAML file (with --control-plane: used until the control plane has one)",
    )
    proxy.add_argument(
        "--control-plane",
        default=None,
        metavar="ADDR",
        help="follow catalog and config from the control plane (HOST:PORT[,HOST:PORT] replicas)",
    )
    proxy.add_argument(
        "--cache",
        default=None,
        metavar="FILE",
        help="with --control-plane: keep the last good catalog and config here, and start "
        "from it when the control plane is unreachable (default: a file per listen address "
        "under $XDG_CACHE_HOME/aimesh)",
    )
    proxy.add_argument("--proxy-id", default="", help="name in reports (default mode@listen)")
    proxy.add_argument("--admin", default=None, help="HOST:PORT for the HTTP admin endpoint")
    proxy.add_argument("--mode", choices=["gateway", "sidecar"], default="gateway")
    proxy.add_argument("--inbound", default=None, help="sidecar: HOST:PORT the mesh calls")
    proxy.add_argument("--local-app", default=None, help="sidecar: HOST:PORT of the local app")
    proxy.add_argument(
        "--endpoint",
        action="append",
        default=[],
        metavar="SERVICE=HOST:PORT[@W]",
        help="add an endpoint to a service (repeat); until the control plane supplies them",
    )
    proxy.add_argument("--max-message-bytes", type=int, default=16 * 1024 * 1024)
    proxy.add_argument(
        "--grace",
        type=_duration,
        default=10.0,
        help="on SIGTERM, time for in-flight calls to finish (default 10s)",
    )
    proxy.add_argument("--seed", type=int, default=None, help="seed for splits and pickers")
    proxy.add_argument(
        "--min-deadline",
        type=_duration,
        default=0.001,
        help="calls with less time left fail at once with DEADLINE_EXCEEDED (default 1ms)",
    )
    from .observability.audit import add_proxy_flags as add_audit_flags

    add_audit_flags(proxy)
    from .security.cli import add_mtls_flags

    add_mtls_flags(proxy, proxy=True)
    add_tracing_flags(proxy)
    proxy.add_argument(
        "--service",
        default=None,
        metavar="NAME",
        help="sidecar: the local app's service name, the destination its inbound side "
        "authorizes calls to (default local-app)",
    )
    from .security.callers import add_proxy_flags as add_caller_flags

    add_caller_flags(proxy)

    config = sub.add_parser("config", help="work with ServiceMesh config files")
    config_sub = config.add_subparsers(dest="config_cmd", metavar="ACTION", required=True)
    validate = config_sub.add_parser(
        "validate", help="check a file; print every error or a summary"
    )
    validate.add_argument("-f", "--file", required=True)

    cp = sub.add_parser(
        "control-plane",
        help="run the control plane: registry, config, status (and DNS)",
        description="Serve the mesh's registry, declarative config and topology over gRPC.",
    )
    cp.add_argument(
        "--listen", default="127.0.0.1:15010", help="HOST:PORT (default 127.0.0.1:15010)"
    )
    cp.add_argument(
        "--store",
        default=None,
        help="memory | sqlite:PATH (default: under $XDG_STATE_HOME/aimesh) | etcd://HOST:PORT[,...]",
    )
    cp.add_argument("--admin", default=None, help="HOST:PORT for the HTTP admin endpoint")
    cp.add_argument("--dns", default=None, help="HOST:PORT to answer DNS (SRV, A) for services")
    cp.add_argument("--mesh-domain", default="mesh.local", help="DNS domain (default mesh.local)")
    from .security.cli import add_control_plane_flags

    add_control_plane_flags(cp)
    add_tracing_flags(cp)
    from .control.cli import add_parsers as add_control_parsers

    add_control_parsers(sub)
    from .security.cli import add_parsers as add_identity_parsers

    add_identity_parsers(sub)
    from .observability.audit_report import add_parsers as add_audit_parsers

    add_audit_parsers(sub)
    from .observability.experiments import add_parsers as add_experiment_parsers

    add_experiment_parsers(sub)
    from .security.callers import add_parsers as add_apikey_parsers

    add_apikey_parsers(sub)
    from .control.xds.bootstrap import add_parsers as add_xds_parsers

    add_xds_parsers(sub)

    demo = sub.add_parser("demo", help="a local setup of sim backends with a streamed answer")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--once", action="store_true", help="exit after the demo answer")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "backend":
            if args.backend != "sim":
                from .providers.cli import run as run_provider_backend

                return run_provider_backend(args)
            return _cmd_backend_sim(args)
        if args.command == "chat":
            from .observability.tracing import client_tracing

            with client_tracing("aimesh-chat", flags_from_args(args), os.environ) as traced:
                return asyncio.run(_chat(args, traced))
        if args.command == "models":
            return asyncio.run(_models(args))
        if args.command == "sim":
            return asyncio.run(_sim_ctl(args))
        if args.command == "proxy":
            return _cmd_proxy(args)
        if args.command == "config":
            from .config import run_validate

            return run_validate(args.file, sys.stdout, sys.stderr)
        if args.command == "control-plane":
            from .control.main import default_store
            from .control.main import run as run_control_plane
            from .security.cli import ca_from_args

            try:
                ca = ca_from_args(args)
            except ValueError as exc:
                print(f"aimesh control-plane: {exc}", file=sys.stderr)
                return EXIT_USAGE
            return runtime.run(
                run_control_plane(
                    args.listen,
                    args.store or default_store(),
                    args.admin,
                    args.dns,
                    args.mesh_domain,
                    flags_from_args(args),
                    ca=ca,
                )
            )
        if args.command == "identity":
            from .security.cli import run as run_identity

            return run_identity(args)
        if args.command in ("apply", "get", "status", "deregister"):
            from .control.cli import run as run_control_cli

            return run_control_cli(args)
        if args.command == "audit":
            from .observability.audit_report import run as run_audit_report

            return run_audit_report(args)
        if args.command == "apikey":
            from .security.callers import run as run_apikey

            return run_apikey(args)
        if args.command == "experiments":
            from .observability.experiments import run as run_experiments_report

            return run_experiments_report(args)
        if args.command == "xds":
            from .control.xds.bootstrap import run as run_xds

            return run_xds(args)
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(host=args.host, once=args.once)
    except KeyboardInterrupt:
        return 130
    return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
