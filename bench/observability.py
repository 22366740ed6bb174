"""The cost of observability: proxy CPU per call with metrics, tracing and audit on and off.

    python -m bench observability      (also rewrites its section of docs/benchmarks.md)
    python -m bench.observability [--duration SECONDS] [--rounds N] [--write]

The claim under test (issue 7): with metrics on and tracing sampling 10% of calls, the
proxy spends at most 15% more CPU per call than with both off.

Processes, all on 127.0.0.1: two unpaced sim backends (`--ttft 0 --tps 0`, plenty of
slots), started once; a counting OTLP/gRPC collector (`python -m bench.observability
collector`: a grpc.aio TraceService that decodes each export and counts its spans),
started once; and, for each configuration in turn, a fresh `aimesh proxy` process (round
robin over the two sims) with that configuration's flags:

    a  all off           no --admin, no tracing, no audit
    b  metrics           --admin 127.0.0.1:0, /metrics scraped once a second
    c  metrics + 10%     b, and --otlp-endpoint COLLECTOR --trace-sampling 0.1
    d  metrics + 100%    b, and --otlp-endpoint COLLECTOR --trace-sampling 1
    e  c + audit         c, and --audit-log TMP/audit.log

Each proxy gets the same load from this process (bench/loadgen.py, closed loop, one
channel): a short warm-up, then `duration` seconds of unary Generate (4 tokens) and
`duration` seconds of GenerateStream (50 tokens), 8 calls in flight each. Its CPU time
(/proc/PID/stat, user + system, every thread: the span exporter's and the audit writer's
included) over each measured load, divided by the calls it served, is its CPU per call.
The configurations run a, b, c, d, e, a, b, ... for `rounds` rounds, so drift on the
machine falls on all of them alike, and each figure is the median over the rounds. The
collector's span count after each proxy has exited (it sends what it holds on SIGTERM)
checks that tracing did what it says: 3 spans per sampled call (server, route, attempt).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from aimesh.mesh import procs, runtime

from . import loadgen
from .control_plane import machine_busy, self_cpu
from .proxy import CONFIG

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.15  # extra proxy CPU per call allowed for metrics + tracing at 10%
CONCURRENCY = 8
STREAM_TOKENS = 50
DURATION = 8.0  # seconds per load, per configuration, per round
ROUNDS = 4
WARMUP = 1.0  # seconds of each load before measuring (lazy imports, first series, ...)
SCRAPE_EVERY = 1.0  # seconds, as a Prometheus with scrape_interval: 1s
SPANS_PER_CALL = 3  # a sampled call through the proxy: server, route, attempt
OTHERS_LIMIT = 0.1  # cores other processes may use before the figures are called disturbed
LOADS = ("unary", "stream")


@dataclass(frozen=True)
class Setup:
    key: str
    label: str
    metrics: bool = False
    sampling: float | None = None  # None: tracing off
    audit: bool = False

    def flags(self, collector: str, workdir: Path, n: int) -> list[str]:
        out: list[str] = []
        if self.metrics:
            out += ["--admin", "127.0.0.1:0"]
        if self.sampling is not None:
            out += ["--otlp-endpoint", collector, "--trace-sampling", f"{self.sampling:g}"]
        if self.audit:
            out += ["--audit-log", str(workdir / f"audit-{n}.log")]
        return out


SETUPS = (
    Setup("a", "all off"),
    Setup("b", "metrics (scraped every 1 s)", metrics=True),
    Setup("c", "metrics + tracing 10%", metrics=True, sampling=0.1),
    Setup("d", "metrics + tracing 100%", metrics=True, sampling=1.0),
    Setup("e", "metrics + tracing 10% + audit log", metrics=True, sampling=0.1, audit=True),
)
JUDGED = "c"


Sample = loadgen.CpuSample  # one configuration's one load in one round


@dataclass
class Outcome:
    """One configuration over all rounds."""

    setup: Setup
    samples: dict[str, list[Sample]] = field(default_factory=lambda: {k: [] for k in LOADS})
    calls: int = 0  # every call the proxies of this configuration served, warm-ups included
    spans: int = 0
    audit_lines: int = 0
    scrapes: int = 0
    scrape_errors: int = 0

    def median(self, load: str, what: str) -> float:
        samples = self.samples[load]
        if what == "cpu":
            values = [s.per_call_us for s in samples]
        elif what == "rate":
            values = [s.result.rate for s in samples]
        elif what == "p50":
            values = [s.result.p50() * 1e3 for s in samples]
        else:
            values = [s.result.p99() * 1e3 for s in samples]
        return statistics.median(values) if values else float("nan")

    def errors(self) -> int:
        return sum(s.result.errors for ss in self.samples.values() for s in ss)


@dataclass
class Results:
    outcomes: dict[str, Outcome]
    duration: float
    rounds: int
    measured_seconds: float = 0.0
    other_cpu: float = 0.0  # CPU seconds of processes outside the benchmark while measuring
    total_seconds: float = 0.0


# -- the collector (a child process) ---------------------------------------------------------


async def _collect(listen: str) -> None:
    import grpc.aio
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as tpb
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as tgrpc

    class Counter(tgrpc.TraceServiceServicer):
        spans = 0

        async def Export(self, request, context):  # noqa: N802 (the gRPC method's name)
            n = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
            Counter.spans += n
            print(f"spans {Counter.spans}", flush=True)
            return tpb.ExportTraceServiceResponse()

    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    tgrpc.add_TraceServiceServicer_to_server(Counter(), server)
    port = server.add_insecure_port(listen)
    await server.start()
    print(f"otlp collector listening on {listen.rpartition(':')[0]}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def _start_collector() -> procs.Proc:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return procs.start(
        "otlp-collector",
        [sys.executable, "-m", "bench.observability", "collector"],
        env={"PYTHONPATH": path},
    )


def _spans(collector: procs.Proc) -> int:
    for line in reversed(list(collector.output)):
        if line.startswith("spans "):
            return int(line.split()[1])
    return 0


async def _settled_spans(collector: procs.Proc, quiet: float = 0.3, limit: float = 5.0) -> int:
    """The collector's count once no export has come for `quiet` seconds."""
    deadline = time.monotonic() + limit
    last, since = _spans(collector), time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        now = _spans(collector)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return last


# -- the proxies -------------------------------------------------------------------------


def _start_proxy(
    setup: Setup, sims: list[procs.Proc], collector: str, workdir: Path, n: int
) -> tuple[procs.Proc, str | None]:
    cfg = workdir / "mesh.yaml"
    cfg.write_text(CONFIG)
    endpoints = [a for s in sims for a in ("--endpoint", f"llm={s.address}")]
    argv = procs.aimesh_command(
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--config",
        str(cfg),
        "--grace",
        "2",
        *endpoints,
        *setup.flags(collector, workdir, n),
    )
    proxy = procs.start(f"proxy-{setup.key}", argv)
    admin = None
    if setup.metrics:
        admin = procs.admin_url(proxy).removeprefix("http://")
    return proxy, admin


class _Scraper:
    """GET /metrics every SCRAPE_EVERY seconds from a thread, as Prometheus would."""

    def __init__(self, admin: str | None) -> None:
        self.url = f"http://{admin}/metrics" if admin else None
        self.stop = threading.Event()
        self.scrapes = self.errors = 0
        self.thread = threading.Thread(target=self._run, name="scraper", daemon=True)

    def _run(self) -> None:
        assert self.url is not None
        while not self.stop.wait(SCRAPE_EVERY):
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    r.read()
                self.scrapes += 1
            except OSError:
                self.errors += 1

    def __enter__(self) -> _Scraper:
        if self.url:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.url:
            self.thread.join()


async def _load(kind: str, target: str, duration: float) -> loadgen.Result:
    if kind == "unary":
        return await loadgen.unary(target, concurrency=CONCURRENCY, duration=duration)
    return await loadgen.streams(
        target, concurrency=CONCURRENCY, duration=duration, max_tokens=STREAM_TOKENS
    )


async def _run(duration: float, rounds: int) -> Results:
    t_start = time.monotonic()
    fast = ("--ttft", "0", "--tps", "0", "--slots", "256", "--max-queue", "1024")
    sims = [procs.start_sim(f"obs-sim-{i}", ["gpt-4"], *fast) for i in range(2)]
    collector = _start_collector()
    tmp = tempfile.TemporaryDirectory(prefix="aimesh-bench-obs-")
    workdir = Path(tmp.name)
    res = Results({s.key: Outcome(s) for s in SETUPS}, duration, rounds)
    ours = [s.pid for s in sims] + [collector.pid]
    n = 0
    try:
        for r in range(rounds):
            for setup in SETUPS:
                n += 1
                out = res.outcomes[setup.key]
                spans0 = await _settled_spans(collector)
                proxy, admin = _start_proxy(setup, sims, collector.address, workdir, n)
                line = []
                try:
                    with _Scraper(admin) as scraper:
                        for kind in LOADS:
                            warm = await _load(kind, proxy.address, WARMUP)
                            out.calls += warm.calls + warm.errors + 1  # + loadgen's first call
                            pids = [proxy.pid, *ours]
                            cpu0, others0 = loadgen.cpu_seconds(proxy.pid), loadgen.cpu_of(pids)
                            self0, busy0, m0 = self_cpu(), machine_busy(), time.monotonic()
                            result = await _load(kind, proxy.address, duration)
                            cpu = loadgen.cpu_seconds(proxy.pid) - cpu0
                            mine = loadgen.cpu_of(pids) - others0 + self_cpu() - self0
                            res.other_cpu += max(0.0, machine_busy() - busy0 - mine)
                            res.measured_seconds += time.monotonic() - m0
                            out.calls += result.calls + result.errors + 1
                            sample = Sample(result, cpu)
                            out.samples[kind].append(sample)
                            line.append(
                                f"{kind} {sample.per_call_us:5.0f} µs/call {result.rate:6.0f}/s "
                                f"p50 {result.p50() * 1e3:5.2f} p99 {result.p99() * 1e3:6.2f} ms"
                                + (f" errors {result.errors}" if result.errors else "")
                            )
                    out.scrapes += scraper.scrapes
                    out.scrape_errors += scraper.errors
                finally:
                    proxy.terminate()
                if setup.sampling is not None:
                    out.spans += await _settled_spans(collector) - spans0
                if setup.audit:
                    out.audit_lines += (workdir / f"audit-{n}.log").read_bytes().count(b"\n")
                print(f"  round {r + 1}/{rounds} {setup.key}: " + "; ".join(line), flush=True)
    finally:
        collector.terminate()
        for s in sims:
            s.terminate()
        tmp.cleanup()
    res.total_seconds = time.monotonic() - t_start
    return res


# -- the report --------------------------------------------------------------------------


def _extra(value: float, base: float) -> float:
    return (value / base - 1) * 100 if base else float("nan")


def report(res: Results) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    machine = f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}"
    base = res.outcomes["a"]
    rows = [
        "| configuration | load | proxy CPU per call (µs) | extra vs (a) | rounds' range (µs) "
        "| calls/s | p50 ms | p99 ms | spans received (per call) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts: list[str] = []
    for out in res.outcomes.values():
        s = out.setup
        spans = ""
        if s.sampling is not None:
            spans = f"{out.spans:,} ({out.spans / max(out.calls, 1):.2f})"
        for kind in LOADS:
            cpu = out.median(kind, "cpu")
            extra = _extra(cpu, base.median(kind, "cpu"))
            per = [x.per_call_us for x in out.samples[kind]]
            what = (
                "unary Generate (4 tokens)"
                if kind == "unary"
                else f"GenerateStream ({STREAM_TOKENS} tokens)"
            )
            rows.append(
                f"| ({s.key}) {s.label} | {what} | {cpu:,.0f} | "
                f"{'' if s.key == 'a' else f'{extra:+.1f}%'} | {min(per):,.0f}-{max(per):,.0f} | "
                f"{out.median(kind, 'rate'):,.0f} | {out.median(kind, 'p50'):.2f} | "
                f"{out.median(kind, 'p99'):.2f} | {spans if kind == 'unary' else ''} |"
            )
            if s.key == JUDGED:
                verdicts.append(f"{kind} {extra:+.1f}%")
    judged = res.outcomes[JUDGED]
    extras = [_extra(judged.median(k, "cpu"), base.median(k, "cpu")) for k in LOADS]
    met = all(x <= TARGET * 100 for x in extras)
    verdict = ("met" if met else "not met") + f" ({', '.join(verdicts)})"
    ten = [o for o in res.outcomes.values() if o.setup.sampling is not None]
    sanity = "; ".join(
        f"({o.setup.key}) {o.spans:,} spans for {o.calls:,} calls, "
        f"{o.spans / max(o.calls, 1) / SPANS_PER_CALL:.1%} of calls sampled "
        f"(set: {o.setup.sampling:.0%})"
        for o in ten
    )
    audit = res.outcomes["e"]
    scrapes = sum(o.scrapes for o in res.outcomes.values())
    scrape_errors = sum(o.scrape_errors for o in res.outcomes.values())
    errors = sum(o.errors() for o in res.outcomes.values())
    others = res.other_cpu / max(res.measured_seconds, 1e-9)
    noise = (
        f"Processes outside the benchmark used {others:.2f} cores on average while it measured"
        + (
            ": these figures are disturbed; run it again on a quiet machine."
            if others > OTHERS_LIMIT
            else "."
        )
    )
    return "\n".join(
        [
            f"Measured {stamp} on {machine}, with `python -m bench observability` "
            f"({res.total_seconds:.0f} s): {res.rounds} rounds of a, b, c, d, e, each a fresh "
            f"`aimesh proxy` process (round robin over 2 unpaced sim backends) given "
            f"{res.duration:g} s of each load after a {WARMUP:g} s warm-up, closed loop, "
            f"{CONCURRENCY} calls in flight. Figures are medians over the rounds; CPU is the "
            "proxy process's user + system time (all its threads) over the load, per call "
            "served.",
            "",
            *rows,
            "",
            f"**Target, metrics + tracing at 10% ≤ {TARGET:.0%} extra proxy CPU per call over "
            f"all off: {verdict}.**",
            "",
            f"Sanity: {sanity} (each sampled call is {SPANS_PER_CALL} spans: server, route, "
            f"attempt). Audit (e): {audit.audit_lines:,} lines for {audit.calls:,} calls. "
            f"/metrics scraped {scrapes:,} times ({scrape_errors} failed). Errors over all "
            f"runs: {errors}.",
            "",
            f"{noise} The machine has {os.cpu_count()} cores, shared by the load generator, "
            "the proxy, the two sims and the collector, and by processes outside the "
            "benchmark: a configuration's rounds differ by the range shown, so differences "
            "smaller than that are noise.",
        ]
    )


def run(duration: float = DURATION, rounds: int = ROUNDS) -> str:
    """Runs the benchmark; returns the markdown section for docs/benchmarks.md."""
    res = runtime.run(_run(duration, rounds))
    others = res.other_cpu / max(res.measured_seconds, 1e-9)
    print(f"done in {res.total_seconds:.0f} s; other processes used {others:.2f} cores meanwhile")
    return report(res)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.observability")
    sub = parser.add_subparsers(dest="command")
    child = sub.add_parser("collector", help="(internal) the counting OTLP/gRPC collector")
    child.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument(
        "--duration", type=float, default=DURATION, help="seconds per load, configuration, round"
    )
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument(
        "--write", action="store_true", help="also rewrite its section of docs/benchmarks.md"
    )
    args = parser.parse_args()
    if args.command == "collector":
        runtime.run(_collect(args.listen))
        return 0
    section = run(args.duration, args.rounds)
    print(section)
    if args.write:
        from .__main__ import _update

        _update("observability", section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
