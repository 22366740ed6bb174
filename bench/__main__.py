"""Runs the benchmarks and rewrites their sections of docs/benchmarks.md.

    python -m bench [SECTION ...] [--duration SECONDS] [--only NAME]

Sections: `baseline` (direct calls to the sim backend), `proxy` (aimesh proxy against
Envoy 1.40 and a direct call), `proxyless` (MeshChannel against a direct channel),
`balance` (balancing quality on a fleet with a slow instance), `streams` (10,000
concurrent token streams through one proxy), `control_plane` (how fast 100 watchers and
3 proxies see a change to a catalog of 1,000 instances), `observability` (proxy CPU per call
with metrics, tracing and the audit trail on and off), `security` (proxy CPU per call and
latency with mTLS, authorization and API keys against plaintext, and the handshake cost of
a new connection), `xds` (the same load direct, through the aimesh proxy, through Envoy on
aimesh's xDS and proxyless grpcio on xds:///; and xDS push latency to Envoy and gRPC
clients with 1,000 endpoints). With no section named, all run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import time
from pathlib import Path

from aimesh.mesh import procs

from . import loadgen

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


async def _baseline(duration: float) -> str:
    sim = procs.start_sim(
        "bench-sim",
        ["gpt-4"],
        "--ttft",
        "0",
        "--tps",
        "0",
        "--slots",
        "256",
        "--max-queue",
        "1024",
        "--length",
        "1000-1000",
    )
    try:
        rows = []
        for conc in (1, 16):
            cpu0 = loadgen.cpu_seconds(sim.pid)
            r = await loadgen.unary(sim.address, concurrency=conc, duration=duration)
            cpu = loadgen.cpu_seconds(sim.pid) - cpu0
            print(
                f"  unary   c={conc:<3} {r.rate:8.0f} calls/s  p50 {_ms(r.p50())} ms  "
                f"p99 {_ms(r.p99())} ms  errors {r.errors}",
                flush=True,
            )
            rows.append(
                f"| unary Generate (4 tokens) | {conc} | {r.rate:,.0f} calls/s | {_ms(r.p50())} | "
                f"{_ms(r.p99())} | {1e6 * cpu / max(r.calls, 1):.0f} µs | {r.errors} |"
            )
        for conc in (1, 16):
            cpu0 = loadgen.cpu_seconds(sim.pid)
            r = await loadgen.streams(sim.address, concurrency=conc, duration=duration)
            cpu = loadgen.cpu_seconds(sim.pid) - cpu0
            print(
                f"  stream  c={conc:<3} {r.tokens_per_second:8.0f} tokens/s  ttft p50 "
                f"{_ms(r.pct(r.ttfts, 0.5))} ms  p99 {_ms(r.pct(r.ttfts, 0.99))} ms",
                flush=True,
            )
            rows.append(
                f"| GenerateStream (200 tokens) | {conc} | {r.tokens_per_second:,.0f} tokens/s | "
                f"TTFT {_ms(r.pct(r.ttfts, 0.5))} | TTFT {_ms(r.pct(r.ttfts, 0.99))} | "
                f"{1e6 * cpu / max(r.tokens, 1):.0f} µs/token | {r.errors} |"
            )
    finally:
        sim.terminate()
    return "\n".join(
        [
            "| call | concurrency | throughput | p50 ms | p99 ms | backend CPU per call | errors |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    )


def _update(section: str, body: str) -> None:
    DOC.parent.mkdir(exist_ok=True)
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    begin, end = f"<!-- bench:{section}:begin -->", f"<!-- bench:{section}:end -->"
    block = f"{begin}\n{body}\n{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(text)


SECTIONS = (
    "baseline",
    "proxy",
    "proxyless",
    "balance",
    "streams",
    "control_plane",
    "observability",
    "security",
    "xds",
)


def _section(name: str, duration: float) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    machine = f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}"
    if name == "baseline":
        table = asyncio.run(_baseline(duration))
        return (
            f"Measured {stamp} on {machine}; load generator: `bench/loadgen.py` (grpc.aio, "
            f"closed loop, one channel), {duration:g} s per row.\n\n{table}"
        )
    if name == "proxy":
        from . import proxy

        return proxy.report(asyncio.run(proxy.run(duration)), duration)
    if name == "proxyless":
        from . import proxyless

        return asyncio.run(proxyless.run(duration))
    if name == "balance":
        from . import balance

        return str(balance.run(20.0, 1))  # shorter rounds leave the queues no time to form
    if name == "control_plane":
        from . import control_plane

        return control_plane.run()
    if name == "observability":
        from . import observability

        return observability.run()
    if name == "security":
        from . import security

        return security.run()
    if name == "xds":
        from . import xds

        return xds.run(duration)
    from . import streams

    return str(streams.run())


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument(
        "sections", nargs="*", metavar="SECTION", help=f"run only these: {', '.join(SECTIONS)}"
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument(
        "--only", choices=SECTIONS, action="append", help="run only these sections (repeatable)"
    )
    args = parser.parse_args()
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}")
    chosen = [*args.sections, *(args.only or ())]
    for name in dict.fromkeys(chosen) if chosen else SECTIONS:
        print(f"== {name}", flush=True)
        _update(name, _section(name, args.duration))
        print(f"wrote the {name} section of {DOC}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
