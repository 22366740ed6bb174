"""aimesh proxy against Envoy 1.40 and a direct call: same backend, same load, one run.

    python -m bench.proxy [--duration SECONDS]

Each row drives the same closed-loop load (bench/loadgen.py) at the sim backend directly,
through Envoy (--concurrency 1, round robin) and through `aimesh proxy` (one process,
round robin), and reads each proxy's CPU time from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from aimesh.mesh import procs

from . import loadgen
from .envoy import Envoy

CONFIG = """apiVersion: mesh.ai/v1
kind: ServiceMesh
metadata: {name: bench}
spec:
  services:
    - name: llm
      models: [gpt-4]
      loadBalancer: {algorithm: round_robin}
"""

# The same, with the resilience stack on: retries under the budget, circuit breakers.
RESILIENT = (
    CONFIG
    + """      circuitBreaker: {enabled: true, errorThreshold: 50%}
  trafficPolicies:
    - name: all
      routes: [{destination: llm}]
      retry: {attempts: 3, retryOn: [UNAVAILABLE]}
"""
)


@dataclass
class Row:
    label: str
    target: str
    result: loadgen.Result
    cpu: float  # proxy CPU seconds during the run (0 for direct)

    def per_call_us(self) -> float:
        return 1e6 * self.cpu / max(self.result.calls, 1)

    def per_token_us(self) -> float:
        return 1e6 * self.cpu / max(self.result.tokens, 1)


async def _measure(kind: str, label: str, target: str, pid: int | None, **kw: object) -> Row:
    cpu0 = loadgen.cpu_seconds(pid) if pid else 0.0
    if kind == "unary":
        r = await loadgen.unary(target, name=label, **kw)  # type: ignore[arg-type]
    else:
        r = await loadgen.streams(target, name=label, **kw)  # type: ignore[arg-type]
    cpu = loadgen.cpu_seconds(pid) - cpu0 if pid else 0.0
    return Row(label, target, r, cpu)


def start_aimesh_proxy(
    backends: list[str], workdir: Path, config: str = CONFIG, name: str = "mesh.yaml"
) -> procs.Proc:
    cfg = workdir / name
    cfg.write_text(config)
    flags = [a for b in backends for a in ("--endpoint", f"llm={b}")]
    return procs.start(
        "aimesh-proxy",
        procs.aimesh_command("proxy", "--listen", "127.0.0.1:0", "--config", str(cfg), *flags),
    )


async def run(duration: float) -> dict[str, list[Row]]:
    sim = procs.start_sim(
        "bench-sim",
        ["gpt-4"],
        "--ttft",
        "0",
        "--tps",
        "0",
        "--slots",
        "512",
        "--max-queue",
        "4096",
        "--length",
        "1000-1000",
    )
    tmp = tempfile.TemporaryDirectory(prefix="aimesh-bench-")
    proxy = start_aimesh_proxy([sim.address], Path(tmp.name))
    resilient = start_aimesh_proxy([sim.address], Path(tmp.name), RESILIENT, "resilient.yaml")
    envoy = Envoy([sim.address]).start()
    targets = [
        ("direct", sim.address, None),
        ("envoy", envoy.address, envoy.pid),
        ("aimesh", proxy.address, proxy.pid),
    ]
    out: dict[str, list[Row]] = {}
    try:
        plans = [
            ("unary-c1", "unary", {"concurrency": 1, "duration": duration}),
            ("unary-c16", "unary", {"concurrency": 16, "duration": duration}),
            # Paced like a real model (50 tokens/s), so the first token travels alone.
            (
                "stream-c1",
                "stream",
                {
                    "concurrency": 1,
                    "duration": duration,
                    "max_tokens": 2,  # short streams: many TTFT samples per second
                    "tokens_per_second": 50.0,
                },
            ),
            ("stream-c16", "stream", {"concurrency": 16, "duration": duration, "max_tokens": 200}),
        ]
        for name, kind, kw in plans:
            rows = []
            for label, target, pid in targets:
                row = await _measure(kind, label, target, pid, **kw)
                r = row.result
                print(
                    f"  {name:<11} {label:<7} calls/s {r.rate:8.0f}  tokens/s "
                    f"{r.tokens_per_second:8.0f}  p50 {r.p50() * 1e3:6.2f} ms  p99 "
                    f"{r.p99() * 1e3:6.2f} ms  ttft p99 {r.pct(r.ttfts, 0.99) * 1e3:6.2f} ms  "
                    f"cpu/call {row.per_call_us():6.0f} µs  errors {r.errors}",
                    flush=True,
                )
                rows.append(row)
            out[name] = rows
        kw = {"concurrency": 16, "duration": duration}
        pairs = (("aimesh", proxy), ("aimesh+resilience", resilient))
        out["resilience"] = [
            await _measure("unary", label, p.address, p.pid, **kw) for label, p in pairs
        ]
        for row in out["resilience"]:
            print(
                f"  resilience  {row.label:<17} calls/s {row.result.rate:8.0f}  cpu/call "
                f"{row.per_call_us():6.0f} µs  errors {row.result.errors}",
                flush=True,
            )
    finally:
        envoy.stop()
        resilient.terminate()
        proxy.terminate()
        sim.terminate()
        tmp.cleanup()
    return out


def report(rows: dict[str, list[Row]], duration: float) -> str:
    def by(name: str) -> dict[str, Row]:
        return {r.label: r for r in rows[name]}

    u1, u16, s1, s16 = by("unary-c1"), by("unary-c16"), by("stream-c1"), by("stream-c16")
    s16e_tps = s16["envoy"].result.tokens_per_second
    ratio = lambda a, b: a / b if b else float("nan")  # noqa: E731
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {duration:g} s per "
        "cell; one sim backend (unpaced), Envoy 1.40 `--concurrency 1`, one `aimesh proxy` "
        "process, both round robin, same load generator.",
        "",
        "| measure | direct | Envoy | aimesh | aimesh / Envoy | target |",
        "|---|---|---|---|---|---|",
        f"| unary throughput, 16 concurrent (calls/s) | {u16['direct'].result.rate:,.0f} | "
        f"{u16['envoy'].result.rate:,.0f} | {u16['aimesh'].result.rate:,.0f} | "
        f"{ratio(u16['aimesh'].result.rate, u16['envoy'].result.rate):.2f}x | >= 0.8x |",
        f"| proxy CPU per unary call, 16 concurrent (µs) | | {u16['envoy'].per_call_us():.0f} | "
        f"{u16['aimesh'].per_call_us():.0f} | "
        f"{ratio(u16['aimesh'].per_call_us(), u16['envoy'].per_call_us()):.2f}x | <= 2x |",
        f"| stream tokens/s, 16 concurrent, 200-token streams | "
        f"{s16['direct'].result.tokens_per_second:,.0f} | "
        f"{s16['envoy'].result.tokens_per_second:,.0f} | "
        f"{s16['aimesh'].result.tokens_per_second:,.0f} | "
        f"{ratio(s16['aimesh'].result.tokens_per_second, s16e_tps):.2f}x | >= 1x |",
        f"| proxy CPU per streamed token (µs) | | {s16['envoy'].per_token_us():.1f} | "
        f"{s16['aimesh'].per_token_us():.1f} | "
        f"{ratio(s16['aimesh'].per_token_us(), s16['envoy'].per_token_us()):.2f}x | |",
    ]
    d, e, a = (u1[k].result.p50() * 1e3 for k in ("direct", "envoy", "aimesh"))
    lines.append(
        f"| unary p50, 1 at a time (ms) | {d:.3f} | {e:.3f} (+{e - d:.3f}) | {a:.3f} "
        f"(+{a - d:.3f}) | | added <= 0.4 ms |"
    )
    d, e, a = (
        s1[k].result.pct(s1[k].result.ttfts, 0.99) * 1e3 for k in ("direct", "envoy", "aimesh")
    )
    lines.append(
        f"| time to first token p99, 1 at a time, backend at 50 tokens/s (ms) | {d:.3f} | "
        f"{e:.3f} (+{e - d:.3f})"
        f" | {a:.3f} (+{a - d:.3f}) | | added <= 1 ms |"
    )
    plain, full = by("resilience")["aimesh"], by("resilience")["aimesh+resilience"]
    lines += [
        "",
        "Cost of the resilience stack (retry policy with budget, service and endpoint "
        "breakers, concurrency limits), unary, 16 concurrent, in the same run: "
        f"{plain.per_call_us():.0f} µs of proxy CPU per call without, "
        f"{full.per_call_us():.0f} µs with "
        f"({(full.per_call_us() / plain.per_call_us() - 1) * 100:+.0f}%); "
        f"{plain.result.rate:,.0f} vs {full.result.rate:,.0f} calls/s.",
    ]
    errors = sum(r.result.errors for rs in rows.values() for r in rs)
    lines += ["", f"Errors over all runs: {errors}."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.proxy")
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()
    rows = asyncio.run(run(args.duration))
    print(report(rows, args.duration))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
