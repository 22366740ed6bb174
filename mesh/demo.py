"""`aimesh demo` (what `make run` starts): a local fleet of sim backends and a streamed answer.

The fleet mirrors the product's topology panel: GPT-4 Gateway x3, Claude Gateway x2 and
Custom LLM x3, each instance a real process serving the Inference API.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from . import procs

FLEET: tuple[tuple[str, str, int], ...] = (
    # (service, model, instances)
    ("gpt4-gateway", "gpt-4", 3),
    ("claude-gateway", "claude-3-5-sonnet", 2),
    ("custom-llm", "llama-3-8b", 3),
)
DEMO_PROMPT = "In one paragraph: why put a service mesh in front of AI backends?"


def _healthy(address: str) -> bool:
    with grpc.insecure_channel(address) as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return False
    return bool(r.status == health_pb2.HealthCheckResponse.SERVING)


def run_demo(host: str = "127.0.0.1", once: bool = False) -> int:
    started = time.perf_counter()
    specs = [
        (f"{service}-{i}", service, model)
        for service, model, count in FLEET
        for i in range(1, count + 1)
    ]
    print(f"aimesh demo: starting {len(specs)} sim backends ...", flush=True)
    fleet: list[tuple[str, str, procs.Proc]] = []
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

        target = fleet[0][2].address
        print(f"\n$ aimesh chat --target {target} --model gpt-4 {DEMO_PROMPT!r}\n", flush=True)
        from .cli import main as cli_main

        rc = cli_main(["chat", "--target", target, "--model", "gpt-4", DEMO_PROMPT])
        if rc != 0:
            return rc
        if once:
            return 0
        print(
            "\nThe fleet keeps serving; try:\n"
            f"  .venv/bin/aimesh chat --target {fleet[3][2].address} --model claude-3-5-sonnet "
            "'hello'\n"
            f"  .venv/bin/aimesh sim stats --target {target}\n"
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
            with ThreadPoolExecutor(max_workers=len(fleet)) as pool:
                list(pool.map(lambda p: p.terminate(timeout=10), (p for _, _, p in fleet)))
            print("aimesh demo: stopped", flush=True)
