"""The proxyless MeshChannel against a direct grpc.aio channel, in one run.

    python -m bench.proxyless [--duration SECONDS]

Same process, same sim backend, same load generator; the MeshChannel runs the proxy's
routing, balancing and resilience code in-process (round robin over one endpoint, a
retry policy configured), so the difference is what that code costs per call.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from aimesh.clients import MeshChannel
from aimesh.mesh import procs
from aimesh.mesh.config import load_text

from . import loadgen

CONFIG = """apiVersion: mesh.ai/v1
kind: ServiceMesh
metadata: {name: bench}
spec:
  services:
    - name: llm
      models: [gpt-4]
      loadBalancer: {algorithm: round_robin}
  trafficPolicies:
    - name: all
      routes: [{destination: llm}]
      retry: {attempts: 3, retryOn: [UNAVAILABLE]}
"""


async def run(duration: float) -> str:
    sim = procs.start_sim("bench-sim", ["gpt-4"], "--ttft", "0", "--tps", "0", "--slots", "512")
    rows = []
    try:
        async with MeshChannel(load_text(CONFIG), endpoints={"llm": [sim.address]}) as mesh:
            for conc in (1, 16):
                direct = await loadgen.unary(sim.address, concurrency=conc, duration=duration)
                viamesh = await loadgen.unary(mesh, concurrency=conc, duration=duration)
                print(
                    f"  c={conc:<3} direct {direct.rate:7.0f}/s p50 {direct.p50() * 1e3:.3f} ms"
                    f" | MeshChannel {viamesh.rate:7.0f}/s p50 {viamesh.p50() * 1e3:.3f} ms",
                    flush=True,
                )
                rows.append((conc, direct, viamesh))
    finally:
        sim.terminate()
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {duration:g} s per "
        "cell; unary Generate (4 tokens) to one unpaced sim backend; the MeshChannel with "
        "round robin and a retry policy.",
        "",
        "| concurrency | direct calls/s | MeshChannel calls/s | ratio (target >= 0.95x) "
        "| direct p50 ms | MeshChannel p50 ms | added p50 (target <= 0.05 ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for conc, d, m in rows:
        lines.append(
            f"| {conc} | {d.rate:,.0f} | {m.rate:,.0f} | {m.rate / d.rate:.2f}x | "
            f"{d.p50() * 1e3:.3f} | {m.p50() * 1e3:.3f} | {(m.p50() - d.p50()) * 1e3:+.3f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.proxyless")
    parser.add_argument("--duration", type=float, default=5.0)
    print(asyncio.run(run(parser.parse_args().duration)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
