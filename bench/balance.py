"""Balancing quality for LLM traffic: p99 time to first token behind each balancer.

    python -m bench.balance [--duration SECONDS] [--seed N] [--load FRACTION]
                            [--rounds N] [--only TEXT] [--dump FILE.json]

A fleet of four sim backends serves `gpt-4`, three fast and one 4x slower (4x the time
to first token, a quarter of the decode speed). One seeded, bursty, open-loop arrival
schedule (Poisson background plus Poisson bursts, 70% of the fleet's capacity on
average) is replayed through each balancer, on the same fleet, drained between runs:

    Envoy ROUND_ROBIN, Envoy LEAST_REQUEST (P2C), aimesh round_robin,
    aimesh least_connections (P2C), aimesh load_aware (ORCA reports in trailers).

The duration is split into rounds; each round replays its own part of the schedule
through every balancer, in reverse order on alternate rounds, so load from other
processes on a shared machine (reported per row) does not all land on one balancer.

Every call is a GenerateStream; TTFT is send -> first chunk, total is send -> end of
stream, and the `aimesh-instance` trailer says which backend served it (the share sent
to the slow instance comes from the backends' own call counters). The claim tested
(from the issue): load_aware p99 TTFT <= 0.5x Envoy LEAST_REQUEST and <= 0.3x round robin.
`run(duration, seed)` returns the markdown section for docs/benchmarks.md."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import random
import resource
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc.aio

from aimesh.mesh import procs
from aimesh.sim.v1 import sim_pb2, sim_pb2_grpc

from . import loadgen
from .envoy import Envoy

MODEL = "gpt-4"


@dataclass(frozen=True)
class Instance:
    name: str
    ttft: float  # seconds
    tps: float
    slots: int = 4
    batch_slowdown: float = 0.1  # the sim's default
    length: tuple[int, int] = (20, 40)

    def flags(self) -> list[str]:
        return [
            "--slots",
            str(self.slots),
            "--max-queue",
            "1000",
            "--ttft",
            f"{self.ttft * 1000:g}ms",
            "--tps",
            f"{self.tps:g}",
            "--batch-slowdown",
            f"{self.batch_slowdown:g}",
            "--length",
            f"{self.length[0]}-{self.length[1]}",
            "--grace",
            "1s",
        ]

    def capacity(self) -> float:
        """Calls per second with every slot busy (decode slowed by the full batch)."""
        mean_len = sum(self.length) / 2
        per_call = self.ttft + mean_len * (1 + self.batch_slowdown * (self.slots - 1)) / self.tps
        return self.slots / per_call


FLEET = (
    Instance("fast-1", ttft=0.040, tps=100),
    Instance("fast-2", ttft=0.040, tps=100),
    Instance("fast-3", ttft=0.040, tps=100),
    Instance("slow-1", ttft=0.160, tps=25),
)
SLOW = "slow-1"


# -- the arrival schedule ---------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """Poisson background plus Poisson bursts of `burst` calls spread over `spread` s."""

    rate: float  # mean calls per second, all told
    burst_share: float = 0.6  # of the calls, the share that come in bursts
    burst: tuple[int, int] = (8, 16)  # calls per burst, uniform
    spread: float = 0.1  # seconds a burst's calls are spread over

    def arrivals(self, duration: float, seed: int) -> list[float]:
        """Seeded arrival times in [0, duration), exactly round(rate * duration) of them.

        Drawn from the process over a longer span, then the first N are stretched or
        squeezed onto [0, duration): the bursts keep their shape, and a short run is not
        lighter or heavier than asked for by the luck of the draw.
        """
        n = round(self.rate * duration)
        if n <= 0:
            return []
        rng = random.Random(seed)
        out: list[float] = []
        span = 2.0 * duration
        background = self.rate * (1 - self.burst_share)
        t = rng.expovariate(background) if background > 0 else span
        while t < span:
            out.append(t)
            t += rng.expovariate(background)
        burst_rate = self.rate * self.burst_share / (sum(self.burst) / 2)
        t = rng.expovariate(burst_rate) if burst_rate > 0 else span
        while t < span:
            for _ in range(rng.randint(*self.burst)):
                out.append(t + rng.uniform(0, self.spread))
            t += rng.expovariate(burst_rate)
        out.sort()
        while len(out) <= n:  # a very unlucky draw: extend it
            out.append(out[-1] + rng.expovariate(self.rate) if out else 0.0)
        scale = duration / out[n]  # the (n+1)-th arrival lands on `duration`
        return [x * scale for x in out[:n]]


# -- processes --------------------------------------------------------------------------


PROXY_CONFIG = """apiVersion: mesh.ai/v1
kind: ServiceMesh
metadata: {{name: bench-balance}}
spec:
  services:
    - name: llm
      models: [{model}]
      loadBalancer: {{algorithm: {algorithm}}}
"""


def start_fleet() -> list[procs.Proc]:
    sims: list[procs.Proc] = []
    try:
        for inst in FLEET:
            sims.append(procs.start_sim(inst.name, [MODEL], *inst.flags()))
    except BaseException:
        for s in sims:
            s.kill()
        raise
    return sims


def start_aimesh(algorithm: str, backends: Sequence[str], workdir: Path, seed: int) -> procs.Proc:
    cfg = workdir / f"mesh-{algorithm}.yaml"
    cfg.write_text(PROXY_CONFIG.format(model=MODEL, algorithm=algorithm))
    flags = [a for b in backends for a in ("--endpoint", f"llm={b}")]
    return procs.start(
        f"aimesh-proxy-{algorithm}",
        procs.aimesh_command(
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--config",
            str(cfg),
            "--seed",
            str(seed),
            "--grace",
            "2s",
            *flags,
        ),
    )


async def sim_stats(address: str) -> sim_pb2.Stats:
    async with grpc.aio.insecure_channel(address) as ch:
        return await sim_pb2_grpc.SimControlStub(ch).GetStats(sim_pb2.GetStatsRequest(), timeout=5)


async def sim_busy(address: str) -> int:
    """Calls running or queued on a sim backend."""
    s = await sim_stats(address)
    return int(s.active + s.queued)


async def sim_calls(sims: Sequence[procs.Proc]) -> dict[str, int]:
    return {s.name: int((await sim_stats(s.address)).calls_total) for s in sims}


async def wait_idle(sims: Sequence[procs.Proc], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        busy = [await sim_busy(s.address) for s in sims]
        if not any(busy) or time.monotonic() > deadline:
            return
        await asyncio.sleep(0.1)


# -- one configuration ------------------------------------------------------------------


@dataclass
class Run:
    """The calls one configuration served, pooled over its segments (rounds)."""

    label: str
    calls: list[loadgen.Call] = field(default_factory=list)
    wall: float = 0.0  # seconds measured
    cpu: dict[str, float] = field(default_factory=dict)  # process group -> CPU seconds
    busy: float = 0.0  # CPU seconds the whole machine was busy while measuring
    served: dict[str, int] = field(default_factory=dict)  # calls each backend counted

    def add(self, other: Run) -> None:
        self.calls += other.calls
        self.wall += other.wall
        self.busy += other.busy
        for k, v in other.cpu.items():
            self.cpu[k] = self.cpu.get(k, 0.0) + v
        for k, n in other.served.items():
            self.served[k] = self.served.get(k, 0) + n

    @property
    def others(self) -> float:
        """Cores used by processes outside this benchmark while measuring (contention)."""
        if not self.wall:
            return math.nan
        return max(0.0, (self.busy - sum(self.cpu.values())) / self.wall)

    def ttft_pct(self, q: float) -> tuple[float, bool]:
        """The q-quantile of TTFT over every call; a call cut off before its first token
        counts with the time it had waited (a lower bound): returns (value, is_bound)."""
        values = [
            (c.ttft, False) if c.ttft is not None else (c.waited, True)
            for c in self.calls
            if c.ttft is not None or c.error == "UNFINISHED"
        ]
        return _pct(values, q)

    def total_pct(self, q: float) -> tuple[float, bool]:
        values = [
            (c.total, False) if c.total is not None else (c.waited, True)
            for c in self.calls
            if c.total is not None or c.error == "UNFINISHED"
        ]
        return _pct(values, q)

    def share(self, instance: str) -> float:
        """Share of the calls sent to `instance`, by the backends' own counters (which
        also count calls cut off before their trailers named the instance)."""
        total = sum(self.served.values())
        return self.served.get(instance, 0) / total if total else math.nan

    def ttft_by_instance(self, q: float) -> dict[str, float]:
        by: dict[str, list[float]] = {}
        for c in self.calls:
            if c.ttft is not None and c.instance:
                by.setdefault(c.instance, []).append(c.ttft)
        return {k: sorted(v)[min(len(v) - 1, int(q * len(v)))] for k, v in sorted(by.items())}

    def errors(self) -> Counter[str]:
        return Counter(c.error for c in self.calls if c.error)

    def max_lag(self) -> float:
        return max((c.lag for c in self.calls), default=0.0)


def _pct(values: list[tuple[float, bool]], q: float) -> tuple[float, bool]:
    """The q-quantile of (value, is_lower_bound) pairs, and whether it is itself only a
    lower bound: so it is when a censored value sorts at or below it, since that call's
    true value may lie anywhere above its bound."""
    if not values:
        return math.nan, False
    ordered = sorted(values)
    i = min(len(ordered) - 1, int(q * len(ordered)))
    return ordered[i][0], any(bound for _, bound in ordered[: i + 1])


def _cpu(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += loadgen.cpu_seconds(pid)
        except OSError:
            pass
    return total


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    ticks = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields) - idle) / ticks, sum(fields) / ticks


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def measure(
    label: str,
    target: str,
    proxy_pid: int,
    sims: Sequence[procs.Proc],
    arrivals: list[float],
    warmup: float,
    drain_timeout: float,
) -> Run:
    """One segment: `arrivals` (the first `warmup` seconds of them unmeasured, so the
    balancer has latencies and load reports and the fleet is in its stride), then the
    calls still running are given `drain_timeout` s, and the fleet is let drain."""
    sim_pids = [s.pid for s in sims]
    c0 = (_cpu([proxy_pid]), _cpu(sim_pids), _self_cpu())
    m0 = machine_busy()
    n0 = await sim_calls(sims)
    t0 = time.perf_counter()
    calls = await loadgen.open_loop_streams(
        target, arrivals, drain_timeout=drain_timeout, prompt="balance prompt {i}"
    )
    wall = time.perf_counter() - t0
    c1 = (_cpu([proxy_pid]), _cpu(sim_pids), _self_cpu())
    m1 = machine_busy()
    n1 = await sim_calls(sims)
    await wait_idle(sims)
    measured = [c for c in calls if c.scheduled >= warmup]
    # Backends count calls, not which of them were warm-up: count warm-up calls off by
    # the instance named in their trailers (all finish, being early).
    served = {k: n1[k] - n0[k] for k in n1}
    for c in calls:
        if c.scheduled < warmup and c.instance in served:
            served[c.instance] -= 1
    return Run(
        label,
        measured,
        wall,
        {"proxy": c1[0] - c0[0], "backends": c1[1] - c0[1], "generator": c1[2] - c0[2]},
        m1[0] - m0[0],
        served,
    )


CONFIGS: tuple[tuple[str, str, str], ...] = (
    ("Envoy round robin", "envoy", "ROUND_ROBIN"),
    ("Envoy least request", "envoy", "LEAST_REQUEST"),
    ("aimesh round_robin", "aimesh", "round_robin"),
    ("aimesh least_connections", "aimesh", "least_connections"),
    ("aimesh load_aware", "aimesh", "load_aware"),
)


async def run_all(
    duration: float,
    seed: int,
    *,
    load: float = 0.7,
    rounds: int = 2,
    warmup: float = 1.5,
    drain_timeout: float = 6.0,
    only: Callable[[str], bool] = lambda _: True,
) -> tuple[list[Run], Schedule]:
    """Every configuration gets `duration` seconds of arrivals, in `rounds` segments.

    Round k replays one schedule (seed `seed`, round k) through every configuration, in
    list order on even rounds and reversed on odd ones, so a drift in the machine's load
    (other processes) weighs on every configuration alike rather than on the last ones.
    Calls still running `drain_timeout` s after a segment's last arrival are cut off.
    """
    capacity = sum(i.capacity() for i in FLEET)
    schedule = Schedule(rate=load * capacity)
    segment = duration / rounds
    # Each round: `warmup` s of unmeasured arrivals, then `segment` s of measured ones.
    plans = [
        schedule.arrivals(warmup, seed * 1_000 + 500 + k)
        + [warmup + t for t in schedule.arrivals(segment, seed * 1_000 + k)]
        for k in range(rounds)
    ]
    n = sum(sum(t >= warmup for t in p) for p in plans)
    print(
        f"fleet capacity ~{capacity:.1f} calls/s; schedule: {n} calls in {duration:g}s "
        f"({n / duration:.1f}/s, {load:.0%} of capacity) per configuration, {rounds} rounds, "
        f"seed {seed}",
        flush=True,
    )
    configs = [c for c in CONFIGS if only(c[0])]
    runs = {label: Run(label) for label, _, _ in configs}
    sims = start_fleet()
    tmp = tempfile.TemporaryDirectory(prefix="aimesh-bench-balance-")
    try:
        backends = [s.address for s in sims]
        for k, arrivals in enumerate(plans):
            for label, kind, policy in configs if k % 2 == 0 else configs[::-1]:
                args = (sims, arrivals, warmup, drain_timeout)
                if kind == "envoy":
                    with Envoy(backends, lb_policy=policy) as envoy:
                        r = await measure(label, envoy.address, envoy.pid, *args)
                else:
                    proxy = start_aimesh(policy, backends, Path(tmp.name), seed)
                    try:
                        r = await measure(label, proxy.address, proxy.pid, *args)
                    finally:
                        proxy.terminate()
                print(f"  round {k + 1}: {row_text(r)}", flush=True)
                print(f"    {instances_text(r)}", flush=True)
                runs[label].add(r)
    finally:
        for s in sims:
            s.terminate()
        tmp.cleanup()
    return list(runs.values()), schedule


# -- reporting --------------------------------------------------------------------------


def _ms(v: tuple[float, bool]) -> str:
    value, bound = v
    return ("≥" if bound else "") + f"{value * 1000:,.0f}"


def instances_text(r: Run) -> str:
    return (
        "served "
        + ", ".join(f"{k} {v}" for k, v in r.served.items())
        + "; TTFT p50 "
        + ", ".join(f"{k} {v * 1000:.0f}" for k, v in r.ttft_by_instance(0.5).items())
        + " ms; p90 "
        + ", ".join(f"{k} {v * 1000:.0f}" for k, v in r.ttft_by_instance(0.9).items())
        + " ms"
    )


def row_text(r: Run) -> str:
    cores = sum(r.cpu.values()) / r.wall if r.wall else math.nan
    return (
        f"{r.label:<26} TTFT p50 {_ms(r.ttft_pct(0.5)):>7} p95 {_ms(r.ttft_pct(0.95)):>7} "
        f"p99 {_ms(r.ttft_pct(0.99)):>7} ms  total p99 {_ms(r.total_pct(0.99)):>7} ms  "
        f"slow share {r.share(SLOW):5.1%}  errors {sum(r.errors().values())}  "
        f"max send lag {r.max_lag() * 1000:.0f} ms  CPU {cores:.2f} cores "
        f"(others {r.others:.2f})"
    )


def _by(runs: Sequence[Run], label: str) -> Run | None:
    return next((r for r in runs if r.label == label), None)


def ratios(runs: Sequence[Run]) -> list[tuple[str, float, float, bool]]:
    """(name, load_aware p99 TTFT / baseline p99 TTFT, target, baseline is a lower bound)."""
    la = _by(runs, "aimesh load_aware")
    out = []
    for label, target in (("Envoy least request", 0.5), ("Envoy round robin", 0.3)):
        base = _by(runs, label)
        if la and base:
            value, bound = base.ttft_pct(0.99)
            out.append((f"load_aware / {label}", la.ttft_pct(0.99)[0] / value, target, bound))
    return out


def report(
    runs: Sequence[Run], schedule: Schedule, duration: float, seed: int, rounds: int = 2
) -> str:
    n = len(runs[0].calls) if runs else 0
    fast, slow = FLEET[0], next(i for i in FLEET if i.name == SLOW)
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {os.cpu_count()} "
        f"cores, {platform.machine()}, Python {platform.python_version()}, with "
        "`python -m bench.balance`. Fleet: "
        f"{len(FLEET) - 1} sim backends with {fast.slots} slots, TTFT {fast.ttft * 1000:g} ms, "
        f"{fast.tps:g} tokens/s and one 4x slower (TTFT {slow.ttft * 1000:g} ms, "
        f"{slow.tps:g} tokens/s), completions of {fast.length[0]}-{fast.length[1]} tokens, "
        f"batch slowdown {fast.batch_slowdown:g} per extra generation; about "
        f"{sum(i.capacity() for i in FLEET):.0f} calls/s at full batches. Load: a seeded "
        f"(seed {seed}) open-loop schedule of {n} GenerateStream calls in {duration:g} s per "
        f"balancer, {schedule.rate:.1f} calls/s on average "
        f"({schedule.rate / sum(i.capacity() for i in FLEET):.0%} of that capacity; "
        f"{1 - schedule.burst_share:.0%} Poisson, {schedule.burst_share:.0%} in Poisson "
        f"bursts of {schedule.burst[0]}-{schedule.burst[1]} calls within "
        f"{schedule.spread * 1000:g} ms, which overflow the fleet's slots for a moment), "
        f"identical for every balancer. It runs in {rounds} rounds of {duration / rounds:g} s, "
        "each replaying its part through every balancer (order reversed on alternate rounds) "
        "after 1.5 s of unmeasured warm-up arrivals, with the fleet drained in between. Envoy 1.40 "
        "`--concurrency 1`; one `aimesh proxy` process. TTFT is send to first chunk; `≥` marks "
        "a lower bound (calls still queued 6 s after the last arrival are cut off: round "
        "robin keeps feeding the slow instance more than it can serve).",
        "",
        "| balancer | TTFT p50 ms | TTFT p95 ms | TTFT p99 ms | total p99 ms | "
        "calls to slow instance | errors | max send lag ms | other processes' CPU (cores) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        errs = r.errors()
        err = str(sum(errs.values())) + (
            " (" + ", ".join(f"{k} {v}" for k, v in sorted(errs.items())) + ")" if errs else ""
        )
        lines.append(
            f"| {r.label} | {_ms(r.ttft_pct(0.5))} | {_ms(r.ttft_pct(0.95))} | "
            f"{_ms(r.ttft_pct(0.99))} | {_ms(r.total_pct(0.99))} | {r.share(SLOW):.1%} | {err} | "
            f"{r.max_lag() * 1000:.0f} | {r.others:.2f} |"
        )
    lines.append("")
    for name, value, target, bound in ratios(runs):
        verdict = "met" if value <= target else "NOT met"
        note = (
            " (the round-robin p99 is a lower bound, so this ratio is an upper bound)"
            if bound
            else ""
        )
        lines.append(
            f"- p99 TTFT {name}: **{value:.2f}x** (target <= {target:g}x: {verdict}){note}"
        )
    fast_names = [i.name for i in FLEET if i.name != SLOW]
    unqueued = [v for r in runs for k, v in r.ttft_by_instance(0.5).items() if k in fast_names]
    if unqueued:
        lo, hi = min(unqueued) * 1000, max(unqueued) * 1000
        lines += [
            "",
            f"Sanity: median TTFT on the fast instances, per run, {lo:.0f}-{hi:.0f} "
            f"ms (configured {fast.ttft * 1000:g} ms). The last column is the CPU that "
            "processes outside this benchmark used during each run (of 2 cores): above "
            "~0.3 the fleet's pacing and the proxy are slowed and that row is not "
            "comparable.",
        ]
    return "\n".join(lines)


def run(duration: float, seed: int) -> str:
    """Runs every configuration and returns the markdown section for docs/benchmarks.md."""
    runs, schedule = asyncio.run(run_all(duration, seed))
    return report(runs, schedule, duration, seed)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.balance")
    parser.add_argument(
        "--duration",
        type=float,
        default=20.0,
        help="seconds of arrivals per configuration (default 20)",
    )
    parser.add_argument("--seed", type=int, default=1, help="arrival schedule seed")
    parser.add_argument(
        "--load",
        type=float,
        default=0.7,
        help="mean arrival rate as a fraction of fleet capacity (default 0.7)",
    )
    parser.add_argument(
        "--only",
        default="",
        help="run only configurations whose label contains this text (e.g. load_aware)",
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="segments the duration is split into (default 2)"
    )
    parser.add_argument("--dump", default="", help="write every call of every run as JSON here")
    args = parser.parse_args()
    runs, schedule = asyncio.run(
        run_all(
            args.duration,
            args.seed,
            load=args.load,
            rounds=args.rounds,
            only=lambda label: args.only in label,
        )
    )
    if args.dump:
        import dataclasses
        import json

        Path(args.dump).write_text(
            json.dumps({r.label: [dataclasses.asdict(c) for c in r.calls] for r in runs})
        )
    print()
    print(report(runs, schedule, args.duration, args.seed, args.rounds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
