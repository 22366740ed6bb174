"""`aimesh demo` (what `make run` starts): a local fleet of sim backends and a streamed answer.

The fleet mirrors the product's topology panel: GPT-4 Gateway x3, Claude Gateway x2 and
Custom LLM x3, each instance a real process serving the Inference API.
"""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from . import procs

FLEET: tuple[tuple[str, str, int], ...] = (
    # (service, model, instances)
    ("gpt4-gateway", "gpt-4", 3),
    ("claude-gateway", "claude-3-5-sonnet", 2),
    ("custom-llm", "llama-3-8b", 3),
)
# The gateway routes each model to its service and balances on the instances' load reports.
DEMO_PROMPT = "In one paragraph: why put a service mesh in front of AI backends?"


def _healthy(address: str) -> bool:
    with grpc.insecure_channel(address) as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return False
    return bool(r.status == health_pb2.HealthCheckResponse.SERVING)


def _mesh_yaml(fleet: list[tuple[str, str, procs.Proc]]) -> str:
    """The local mesh: one service per model, its instances as static endpoints."""
    lines = [
        "apiVersion: mesh.ai/v1",
        "kind: ServiceMesh",
        "metadata:",
        "  name: demo-mesh",
        "spec:",
        "  services:",
    ]
    for service, model, _ in FLEET:
        lines += [f"    - name: {service}", f"      models: [{model}]", "      endpoints:"]
        lines += [f"        - address: {p.address}" for s, _, p in fleet if s == service]
        lines += [
            "      loadBalancer:",
            "        algorithm: load_aware",
            "        healthCheck: {interval: 2s}",
        ]
    return "\n".join(lines) + "\n"


def run_demo(host: str = "127.0.0.1", once: bool = False) -> int:
    started = time.perf_counter()
    specs = [
        (f"{service}-{i}", service, model)
        for service, model, count in FLEET
        for i in range(1, count + 1)
    ]
    print(f"aimesh demo: starting {len(specs)} sim backends ...", flush=True)
    fleet: list[tuple[str, str, procs.Proc]] = []
    workdir = tempfile.mkdtemp(prefix="aimesh-demo-")
    try:
        with ThreadPoolExecutor(max_workers=len(specs)) as pool:
            futures = [
                (service, model, pool.submit(procs.start_sim, name, [model], host=host))
                for name, service, model in specs
            ]
            for service, model, fut in futures:
                proc = fut.result()
                fleet.append((service, model, proc))
                print(f"  started {proc.name:<18} {model:<20} {proc.address}", flush=True)
        healthy = sum(_healthy(p.address) for _, _, p in fleet)
        print(
            f"\n{healthy} Healthy · {len(FLEET)} Services · ready in "
            f"{time.perf_counter() - started:.1f}s\n",
            flush=True,
        )
        print(f"{'SERVICE':<16} {'MODEL':<20} INSTANCES")
        for service, model, count in FLEET:
            addrs = ", ".join(p.address for s, _, p in fleet if s == service)
            print(f"{service:<16} {model:<20} {count}  {addrs}")

        config = Path(workdir) / "mesh.yaml"
        config.write_text(_mesh_yaml(fleet))
        gateway = procs.start(
            "gateway",
            procs.aimesh_command(
                "proxy", "--listen", f"{host}:0", "--config", str(config), "--admin", f"{host}:0"
            ),
        )
        fleet.append(("gateway", "", gateway))
        admin = procs.wait_for_output(gateway, "admin on").split("admin on ", 1)[1].split(";")[0]
        print(f"\ngateway proxy on {gateway.address} (admin {admin}), config {config}")
        target = gateway.address
        print(f"\n$ aimesh chat --target {target} --model gpt-4 {DEMO_PROMPT!r}\n", flush=True)
        from .cli import main as cli_main

        rc = cli_main(["chat", "--target", target, "--model", "gpt-4", DEMO_PROMPT])
        if rc != 0:
            return rc
        if once:
            return 0
        print(
            "\nThe fleet keeps serving; try:\n"
            f"  .venv/bin/aimesh chat --target {target} --model claude-3-5-sonnet 'hello'\n"
            f"  .venv/bin/aimesh chat --target {target} --model llama-3-8b 'hello'\n"
            f"  curl {admin}\n"
            f"  .venv/bin/aimesh sim stats --target {fleet[0][2].address}\n"
            "Press Ctrl-C to stop.",
            flush=True,
        )
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(1.0):
                dead = [p.name for _, _, p in fleet if not p.alive()]
                if dead:
                    print(f"aimesh demo: {', '.join(dead)} exited; stopping", file=sys.stderr)
                    return 1
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        if fleet:
            print("\naimesh demo: stopping the fleet (SIGTERM, graceful drain) ...", flush=True)
            # The gateway first, so nothing is routed to a backend that is going away.
            for _, _, p in fleet:
                if p.name == "gateway":
                    p.terminate(timeout=10)
            with ThreadPoolExecutor(max_workers=len(fleet)) as pool:
                list(pool.map(lambda p: p.terminate(timeout=10), (p for _, _, p in fleet)))
            print("aimesh demo: stopped", flush=True)
        shutil.rmtree(workdir, ignore_errors=True)
