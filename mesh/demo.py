"""`aimesh demo` (what `make run` starts): the whole local mesh.

A control plane; the product page's topology (GPT-4 Gateway x3, Claude Gateway x2, Custom
LLM x3) as sim instances that register themselves, plus the one `gpt4-gateway-v2` canary
instance the reference YAML's canary-rollout sends 10% to (and, when OPENAI_API_KEY or
ANTHROPIC_API_KEY is set, an instance of that provider's adapter); a gateway that follows
the control plane; the reference YAML applied; a streamed answer through the gateway; and
`aimesh status`. Every piece is a real process; Ctrl-C stops them all, gateway first.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from aimesh.control.v1 import control_plane_pb2 as cp_pb
from aimesh.control.v1 import control_plane_pb2_grpc as cp_grpc
from aimesh.inference.v1 import inference_pb2 as pb
from aimesh.inference.v1 import inference_pb2_grpc as pb_grpc

from . import procs

FLEET: tuple[tuple[str, str, int, str], ...] = (
    # (service, model, instances, version)
    ("gpt4-gateway", "gpt-4", 3, "v1"),
    ("claude-gateway", "claude-3-5-sonnet", 2, "v1"),
    ("custom-llm", "llama-3-8b", 3, "v1"),
    # The reference YAML's canary-rollout splits 90/10 onto this service.
    ("gpt4-gateway-v2", "gpt-4", 1, "v2"),
)
DEMO_PROMPT = "In one paragraph: why put a service mesh in front of AI backends?"
REFERENCE = Path(__file__).resolve().parent.parent / "deploy" / "examples" / "reference.yaml"
SPLIT_CALLS = 50


# (service, key variable, provider model, base URL variable): started by `make run` when
# the key variable is set; the mesh names the model as the provider does.
PROVIDERS: tuple[tuple[str, str, str, str], ...] = (
    ("openai", "OPENAI_API_KEY", "gpt-4o-mini", "OPENAI_BASE_URL"),
    ("anthropic", "ANTHROPIC_API_KEY", "claude-3-5-haiku-latest", "ANTHROPIC_BASE_URL"),
)


def provider_commands(
    env: Mapping[str, str], control_plane: str, host: str
) -> list[tuple[str, list[str]]]:
    """The provider-backed instances to start: one per provider whose key is set (its
    service `<provider>-gateway`, serving the provider's model under its own name)."""
    out: list[tuple[str, list[str]]] = []
    for provider, key_var, model, url_var in PROVIDERS:
        if not env.get(key_var):
            continue
        argv = [
            "backend",
            provider,
            "--listen",
            f"{host}:0",
            "--api-key-env",
            key_var,
            "--model",
            model,
            "--instance-id",
            f"{provider}-gateway-1",
            "--control-plane",
            control_plane,
            "--service",
            f"{provider}-gateway",
        ]
        if env.get(url_var):
            argv += ["--base-url", env[url_var]]
        out.append((f"{provider}-gateway-1", procs.aimesh_command(*argv)))
    return out


def _cli(*args: str) -> int:
    from .cli import main as cli_main

    print(f"\n$ aimesh {shlex.join(args)}", flush=True)
    return cli_main(list(args))


async def _wait_registered(cp: str, count: int, timeout: float = 20.0) -> int:
    """Waits on the catalog watch (no polling) until `count` instances are registered."""
    async with grpc.aio.insecure_channel(cp) as ch:
        call = cp_grpc.RegistryStub(ch).Watch(cp_pb.WatchCatalogRequest())
        seen: set[tuple[str, str]] = set()

        async def follow() -> None:
            async for update in call:
                if update.full:
                    seen.clear()
                seen.update((i.service, i.instance_id) for i in update.upserted)
                seen.difference_update((r.service, r.instance_id) for r in update.removed)
                if len(seen) >= count:
                    return

        try:
            await asyncio.wait_for(follow(), timeout)
        finally:
            call.cancel()
        return len(seen)


async def _split(target: str, calls: int) -> dict[str, int]:
    """Which services answered: the canary split as callers see it."""
    by_service: dict[str, int] = {}
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.InferenceStub(ch)
        for i in range(calls):
            call = stub.Generate(
                pb.GenerateRequest(
                    model="gpt-4",
                    messages=[pb.Message(role="user", content=f"canary {i}")],
                    max_tokens=4,
                ),
                timeout=10,
            )
            await call
            instance = str(dict(await call.trailing_metadata() or ()).get("aimesh-instance", "?"))
            service = instance.rpartition("-")[0] or instance
            by_service[service] = by_service.get(service, 0) + 1
    return by_service


async def _reported(cp: str, timeout: float = 10.0) -> None:
    """Waits until the gateway's traffic report has reached the control plane."""
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(cp) as ch:
        stub = cp_grpc.StatusStub(ch)
        while time.monotonic() < deadline:
            t = await stub.GetTopology(cp_pb.TopologyRequest(), timeout=5)
            if t.requests_per_minute > 0:
                return
            await asyncio.sleep(0.25)


def run_demo(host: str = "127.0.0.1", once: bool = False) -> int:
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="aimesh-demo-"))
    running: list[procs.Proc] = []
    try:
        print("aimesh demo: starting the control plane ...", flush=True)
        cp = procs.start_control_plane(
            "--dns", f"{host}:0", host=host, store=f"sqlite:{workdir / 'control-plane.db'}"
        )
        running.append(cp)
        print(f"  {cp.output[-1].strip()}", flush=True)
        dashboard = procs.admin_url(cp) + "/"
        specs = [
            (f"{service}-{i}", service, model, version)
            for service, model, count, version in FLEET
            for i in range(1, count + 1)
        ]
        print(f"\naimesh demo: starting {len(specs)} sim backends that register themselves ...")
        with ThreadPoolExecutor(max_workers=len(specs)) as pool:
            futures = [
                pool.submit(
                    procs.start_sim,
                    name,
                    [model],
                    "--control-plane",
                    cp.address,
                    "--service",
                    service,
                    "--version",
                    version,
                    host=host,
                )
                for name, service, model, version in specs
            ]
            for fut in futures:
                proc = fut.result()
                running.append(proc)
        for proc, (_, service, model, version) in zip(running[1:], specs, strict=True):
            print(f"  {proc.name:<20} {service:<16} {model:<18} {version}  {proc.address}")
        providers = provider_commands(os.environ, cp.address, host)
        for name, argv in providers:
            # A real provider behind the mesh, when its key is in the environment.
            proc = procs.start(name, argv)
            running.append(proc)
            print(
                f"  {proc.name:<20} (a real provider, its key from the environment) {proc.address}"
            )
        registered = asyncio.run(_wait_registered(cp.address, len(specs) + len(providers)))
        print(
            f"  {registered} instances registered; fleet ready in "
            f"{time.perf_counter() - started:.1f}s",
            flush=True,
        )

        gateway = procs.start(
            "gateway",
            procs.aimesh_command(
                "proxy",
                "--listen",
                f"{host}:0",
                "--control-plane",
                cp.address,
                "--cache",
                str(workdir / "gateway-cache.json"),
                "--admin",
                f"{host}:0",
            ),
        )
        running.append(gateway)
        admin = procs.admin_url(gateway) + "/clusters"
        print(f"\ngateway proxy on {gateway.address} (admin {admin}), following {cp.address}")

        target = gateway.address
        if REFERENCE.exists():
            rc = _cli("apply", "-f", str(REFERENCE), "--control-plane", cp.address)
            if rc != 0:
                return rc
        rc = _cli("chat", "--target", target, "--model", "gpt-4", DEMO_PROMPT)
        if rc != 0:
            return rc
        split = asyncio.run(_split(target, SPLIT_CALLS))
        shares = ", ".join(f"{svc} {n}" for svc, n in sorted(split.items()))
        print(f"\ncanary-rollout over {SPLIT_CALLS} gpt-4 calls: {shares} (weights 90/10)")
        asyncio.run(_reported(cp.address))
        _cli("status", "--control-plane", cp.address)
        if once:
            return 0
        print(
            "\nThe mesh keeps running; try, in another terminal:\n"
            f"  export AIMESH_CONTROL_PLANE={cp.address}\n"
            "  .venv/bin/aimesh status --watch\n"
            "  .venv/bin/aimesh get instances\n"
            f"  .venv/bin/aimesh chat --target {target} --model gpt-4 'hello'\n"
            "  .venv/bin/aimesh apply -f deploy/examples/control-plane.yaml  # gpt-4 canary only\n"
            f"  .venv/bin/aimesh chat --target {target} --model claude-3-5-sonnet 'hello'\n"
            f"  curl {admin.replace('/clusters', '/mesh')}\n"
            f"  open {dashboard} in a browser: the live topology\n"
            + "".join(
                f"  .venv/bin/aimesh chat --target {target} --model {model} 'hello'"
                f"   # {provider}, for real (after the control-plane.yaml apply)\n"
                for provider, _, model, _ in PROVIDERS
                if any(name.startswith(provider) for name, _ in providers)
            )
            + (
                ""
                if providers
                else "  (set OPENAI_API_KEY or ANTHROPIC_API_KEY to add a real provider)\n"
            )
            + "Press Ctrl-C to stop.",
            flush=True,
        )
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(1.0):
                dead = [p.name for p in running if not p.alive()]
                if dead:
                    print(f"aimesh demo: {', '.join(dead)} exited; stopping", file=sys.stderr)
                    return 1
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        if running:
            print("\naimesh demo: stopping (SIGTERM, graceful drain) ...", flush=True)
            # The gateway first, then the instances (they deregister as they go), then
            # the control plane.
            for p in running:
                if p.name == "gateway":
                    p.terminate(timeout=10)
            sims = [p for p in running if p.name not in ("gateway", "control-plane")]
            with ThreadPoolExecutor(max_workers=max(1, len(sims))) as pool:
                list(pool.map(lambda p: p.terminate(timeout=10), sims))
            for p in running:
                if p.name == "control-plane":
                    p.terminate(timeout=10)
            print("aimesh demo: stopped", flush=True)
        shutil.rmtree(workdir, ignore_errors=True)
