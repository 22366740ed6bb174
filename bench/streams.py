"""One `aimesh proxy` process holding N (default 10,000) concurrent open token streams.

    python -m bench.streams [--streams N] [--tps TOKENS_PER_S] [--window SECONDS] [--no-direct]

Four paced sim backends (a token every few seconds per stream, slots and queue sized for
all N) serve GenerateStream calls that a client in this process opens over 20 grpc.aio
channels (each its own HTTP/2 connection). A stream counts as open once its first chunk
has arrived. With all N open the run records the proxy's RSS (VmRSS), CPU, threads and
fds, counts the chunks each stream receives during a window (every stream must get some),
then cancels them all and checks that the backends saw N cancellations and went idle.

The same is done first with the client connected straight to the backends (no proxy), so
the report shows what the proxy adds.

The pacing matters: the proxy forwards every chunk on one Python thread, at roughly
200-300 µs of CPU each, so it tops out near 3,500-4,500 chunks/s. Past that its event loop
falls behind; grpc.aio then accepts new calls only about once per (ever longer) loop
iteration, and grpc core cancels calls left unaccepted for 30 s
(`grpc.server_max_unrequested_time_in_server`), which the client sees as CANCELLED. At
0.5 tokens/s x 10,000 streams (5,000 chunks/s) that stalls opening near 5,000-7,000
streams; at 0.2 tokens/s (2,000 chunks/s) all 10,000 open. The number of open streams
itself is not limited: at 0.02 tokens/s 10,000 open in about 17 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio

from aimesh.inference.v1 import inference_pb2 as pb
from aimesh.mesh import procs
from aimesh.sim.v1 import sim_pb2, sim_pb2_grpc

from .loadgen import cpu_seconds

CONFIG = """apiVersion: mesh.ai/v1
kind: ServiceMesh
metadata: {name: bench-streams}
spec:
  services:
    - name: llm
      models: [gpt-4]
      loadBalancer: {algorithm: round_robin}
      # Envoy's default thresholds (1024 calls in flight) would refuse most of the 10,000.
      circuitBreaker: {maxRequests: 100000, maxPending: 100000}
"""

METHOD = "/aimesh.inference.v1.Inference/GenerateStream"
BACKENDS = 4
CHANNELS = 20  # client connections in total (each its own HTTP/2 connection)
OPENING = 500  # streams being opened (first chunk not yet seen) at once
MAX_TOKENS = 1000  # far more than a run lasts: streams end only when cancelled
# A token every 5 s per stream: 2,000 chunks/s at 10,000 streams. The proxy spends roughly
# 200 µs of its one Python thread per forwarded chunk, so at 0.5 tokens/s (5,000 chunks/s)
# it saturates a core and stops accepting new calls (see the module docstring).
TPS = 0.2


# -- /proc ------------------------------------------------------------------------------


def _status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def rss_mib(pid: int) -> float:
    return int(_status(pid)["VmRSS"].split()[0]) / 1024


def threads(pid: int) -> int:
    return int(_status(pid)["Threads"])


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def raise_nofile(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        soft = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


# -- the client -------------------------------------------------------------------------


def _requests() -> list[bytes]:
    return [
        pb.GenerateRequest(
            model="gpt-4",
            messages=[pb.Message(role="user", content=f"hold this stream open {i}")],
            max_tokens=MAX_TOKENS,
        ).SerializeToString()
        for i in range(50)
    ]


class StreamSet:
    """N GenerateStream calls spread round robin over `channels` connections to `targets`.

    Messages stay raw bytes (no deserializing): the client only counts chunks.
    """

    def __init__(self, targets: Sequence[str], n: int, channels: int = CHANNELS) -> None:
        self.n = n
        # A local subchannel pool per channel: otherwise grpc shares one connection
        # between all channels to the same target.
        self.channels = [
            grpc.aio.insecure_channel(
                targets[i % len(targets)], options=[("grpc.use_local_subchannel_pool", 1)]
            )
            for i in range(channels)
        ]
        self.mcs = [
            ch.unary_stream(METHOD, request_serializer=None, response_deserializer=None)
            for ch in self.channels
        ]
        self.requests = _requests()
        self.counts = [0] * n
        self.ttft = [0.0] * n
        self.opened = 0
        self.ended = 0  # ended by the server before we cancelled
        self.errors: Counter[str] = Counter()
        self.error_sample: dict[str, str] = {}
        self.all_open = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.calls: list[object] = []
        self.cancelling = False

    async def warm_up(self) -> None:
        """Connects every channel and runs a few one-token streams over each."""
        req = pb.GenerateRequest(
            model="gpt-4", messages=[pb.Message(role="user", content="warm up")], max_tokens=1
        ).SerializeToString()

        async def one(mc: Callable[..., object]) -> None:
            async for _ in mc(req):  # type: ignore[attr-defined]
                pass

        await asyncio.gather(*(ch.channel_ready() for ch in self.channels))
        for _ in range(5):
            await asyncio.gather(*(one(mc) for mc in self.mcs))

    async def _one(self, i: int, gate: asyncio.Semaphore) -> None:
        await gate.acquire()
        released = False
        call = self.mcs[i % len(self.mcs)](self.requests[i % len(self.requests)])
        self.calls.append(call)
        t0 = time.perf_counter()
        read, eof = call.read, grpc.aio.EOF  # type: ignore[attr-defined]
        try:
            msg = await read()
            gate.release()
            released = True
            if msg is eof:
                self.ended += 1
                return
            self.ttft[i] = time.perf_counter() - t0
            self.counts[i] = 1
            self.opened += 1
            if self.opened == self.n:
                self.all_open.set()
            counts = self.counts
            while (msg := await read()) is not eof:
                counts[i] += 1
            self.ended += 1
        except grpc.aio.AioRpcError as exc:
            if not (self.cancelling and exc.code() == grpc.StatusCode.CANCELLED):
                name = exc.code().name
                self.errors[name] += 1
                self.error_sample.setdefault(name, exc.details() or "")
        finally:
            if not released:
                gate.release()

    def start(self) -> None:
        gate = asyncio.Semaphore(OPENING)
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._one(i, gate)) for i in range(self.n)]

    def failed(self) -> int:
        return sum(self.errors.values())

    async def cancel(self) -> None:
        self.cancelling = True
        for call in self.calls:
            call.cancel()  # type: ignore[attr-defined]
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def close(self) -> None:
        await asyncio.gather(*(ch.close(None) for ch in self.channels), return_exceptions=True)


# -- backends ---------------------------------------------------------------------------


async def sim_stats(addresses: Sequence[str]) -> list[sim_pb2.Stats]:
    out = []
    for a in addresses:
        async with grpc.aio.insecure_channel(a) as ch:
            out.append(
                await sim_pb2_grpc.SimControlStub(ch).GetStats(
                    sim_pb2.GetStatsRequest(), timeout=10
                )
            )
    return out


async def wait_backends_idle(
    addresses: Sequence[str], timeout: float = 20.0
) -> list[sim_pb2.Stats]:
    deadline = time.monotonic() + timeout
    while True:
        stats = await sim_stats(addresses)
        if all(s.active == 0 and s.queued == 0 for s in stats) or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.25)


# -- one phase: open N, hold, count, cancel ---------------------------------------------


@dataclass
class Phase:
    label: str
    n: int
    opened: int = 0
    open_seconds: float = 0.0
    ttft_p50: float = float("nan")
    ttft_p99: float = float("nan")
    window: float = 0.0
    window_min: int = 0
    window_median: float = 0.0
    window_zero: int = 0
    chunks_per_s: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    error_sample: dict[str, str] = field(default_factory=dict)
    ended_early: int = 0
    # proxy (None for the direct phase)
    proxy_rss_idle: float | None = None
    proxy_rss_open: float | None = None
    proxy_rss_after: float | None = None
    proxy_cpu: float | None = None  # % of one core, during the window
    proxy_threads: int | None = None
    proxy_fds: int | None = None
    backend_rss_delta: float = 0.0  # MiB, all backends together
    backend_cpu: float = 0.0  # % of one core, all backends, during the window
    client_rss_delta: float = 0.0
    client_cpu: float = 0.0
    cancelled: int = 0  # seen by the backends
    active_after: int = 0
    queued_after: int = 0

    def per_stream_kib(self, delta_mib: float | None) -> float:
        return float("nan") if delta_mib is None else delta_mib * 1024 / max(self.opened, 1)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def phase(
    label: str,
    targets: Sequence[str],
    n: int,
    backends: Sequence[procs.Proc],
    proxy: procs.Proc | None,
    *,
    window: float,
    open_timeout: float,
) -> Phase:
    me = os.getpid()
    addrs = [b.address for b in backends]
    res = Phase(label, n, window=window)
    ss = StreamSet(targets, n)
    try:
        await ss.warm_up()
        await asyncio.sleep(0.5)
        before = await sim_stats(addrs)
        b_rss0 = sum(rss_mib(b.pid) for b in backends)
        c_rss0 = rss_mib(me)
        if proxy:
            res.proxy_rss_idle = rss_mib(proxy.pid)
            print(
                f"  [{label}] idle after warm-up: proxy RSS {res.proxy_rss_idle:.1f} MiB, "
                f"{threads(proxy.pid)} threads, {fds(proxy.pid)} fds",
                flush=True,
            )

        t0 = time.perf_counter()
        ss.start()
        step = max(1, min(1000, n // 10))
        mark = step
        deadline = t0 + open_timeout
        while ss.opened < n:
            done = ss.opened + ss.failed() + ss.ended
            if done >= n or time.perf_counter() > deadline:
                break
            await asyncio.sleep(0.05)
            while ss.opened >= mark:
                extra = f", proxy RSS {rss_mib(proxy.pid):.1f} MiB" if proxy else ""
                print(
                    f"  [{label}] {mark:>6,} open  {time.perf_counter() - t0:6.1f} s{extra}"
                    f"{'  errors ' + str(dict(ss.errors)) if ss.errors else ''}",
                    flush=True,
                )
                mark += step
        res.open_seconds = time.perf_counter() - t0
        res.opened = ss.opened
        ttfts = [t for t in ss.ttft if t]
        res.ttft_p50 = statistics.median(ttfts) if ttfts else float("nan")
        res.ttft_p99 = _pct(ttfts, 0.99)
        if ss.opened < n:
            print(
                f"  [{label}] only {ss.opened:,} of {n:,} open after {res.open_seconds:.1f} s; "
                f"errors {dict(ss.errors)} {ss.error_sample}; ended {ss.ended}",
                flush=True,
            )
        else:
            print(
                f"  [{label}] all {n:,} open in {res.open_seconds:.1f} s "
                f"(first chunk p50 {res.ttft_p50 * 1e3:.0f} ms, p99 {res.ttft_p99 * 1e3:.0f} ms)",
                flush=True,
            )

        # Hold: measure with everything open, and count chunks per stream over the window.
        await asyncio.sleep(1.0)
        if proxy:
            res.proxy_rss_open = rss_mib(proxy.pid)
            res.proxy_threads = threads(proxy.pid)
            res.proxy_fds = fds(proxy.pid)
        res.backend_rss_delta = sum(rss_mib(b.pid) for b in backends) - b_rss0
        res.client_rss_delta = rss_mib(me) - c_rss0
        counts0 = list(ss.counts)
        cpu0 = [cpu_seconds(b.pid) for b in backends]
        pcpu0 = cpu_seconds(proxy.pid) if proxy else 0.0
        me0 = cpu_seconds(me)
        w0 = time.perf_counter()
        await asyncio.sleep(window)
        elapsed = time.perf_counter() - w0
        if proxy:
            res.proxy_cpu = 100 * (cpu_seconds(proxy.pid) - pcpu0) / elapsed
        res.backend_cpu = (
            100 * sum(cpu_seconds(b.pid) - c for b, c in zip(backends, cpu0, strict=True)) / elapsed
        )
        res.client_cpu = 100 * (cpu_seconds(me) - me0) / elapsed
        got = [c1 - c0 for c0, c1, t in zip(counts0, ss.counts, ss.ttft, strict=True) if t]
        res.window_min = min(got) if got else 0
        res.window_median = statistics.median(got) if got else 0.0
        res.window_zero = sum(1 for g in got if g == 0)
        res.chunks_per_s = sum(got) / elapsed
        res.ended_early = ss.ended
        line = (
            f"  [{label}] {elapsed:.1f} s window: {res.chunks_per_s:,.0f} chunks/s, per stream "
            f"min {res.window_min} median {res.window_median:g}, {res.window_zero} streams got "
            f"none; CPU (% of a core): backends {res.backend_cpu:.0f}, client {res.client_cpu:.0f}"
        )
        if proxy:
            line += (
                f", proxy {res.proxy_cpu:.0f}; proxy RSS {res.proxy_rss_open:.1f} MiB, "
                f"{res.proxy_threads} threads, {res.proxy_fds} fds"
            )
        print(line, flush=True)

        await ss.cancel()
        after = await wait_backends_idle(addrs)
        res.cancelled = sum(
            a.cancelled_total - b.cancelled_total for a, b in zip(after, before, strict=True)
        )
        res.active_after = sum(a.active for a in after)
        res.queued_after = sum(a.queued for a in after)
        if proxy:
            await asyncio.sleep(1.0)
            res.proxy_rss_after = rss_mib(proxy.pid)
        res.errors = dict(ss.errors)
        res.error_sample = dict(ss.error_sample)
        print(
            f"  [{label}] cancelled: backends saw {res.cancelled:,} cancellations, now "
            f"{res.active_after} active, {res.queued_after} queued"
            + (f"; proxy RSS {res.proxy_rss_after:.1f} MiB" if proxy else ""),
            flush=True,
        )
        for s in after:
            print(
                f"    {s.instance}: {s.calls_total} calls, {s.cancelled_total} cancelled; "
                f"now {s.active}/{s.slots} active, {s.queued}/{s.max_queue} queued",
                flush=True,
            )
    finally:
        if ss.tasks and not ss.cancelling:
            await ss.cancel()
        await ss.close()
    return res


# -- the run ----------------------------------------------------------------------------


def _start_backends(n: int, tps: float) -> list[procs.Proc]:
    per = -(-n // BACKENDS)
    flags = (
        "--slots",
        str(per + 100),
        "--max-queue",
        str(per + 100),
        "--ttft",
        "0",
        "--tps",
        f"{tps:g}",
        "--batch-slowdown",
        "0",
        "--length",
        f"{MAX_TOKENS}-{MAX_TOKENS}",
        "--grace",
        "1",
    )
    return [procs.start_sim(f"streams-sim-{i}", ["gpt-4"], *flags) for i in range(BACKENDS)]


def _start_proxy(backends: Sequence[procs.Proc], workdir: Path) -> procs.Proc:
    cfg = workdir / "mesh.yaml"
    cfg.write_text(CONFIG)
    flags = [a for b in backends for a in ("--endpoint", f"llm={b.address}")]
    return procs.start(
        "streams-proxy",
        procs.aimesh_command(
            "proxy", "--listen", "127.0.0.1:0", "--config", str(cfg), "--grace", "1", *flags
        ),
    )


async def _run(streams: int, tps: float, window: float, direct: bool) -> list[Phase]:
    raise_nofile(4 * streams + 1024)
    backends = _start_backends(streams, tps)
    tmp = tempfile.TemporaryDirectory(prefix="aimesh-streams-")
    proxy = None
    phases = []
    try:
        proxy = _start_proxy(backends, Path(tmp.name))
        open_timeout = max(30.0, streams / 200)
        if direct:
            print(f"direct: {streams:,} streams straight to {BACKENDS} sim backends", flush=True)
            phases.append(
                await phase(
                    "direct",
                    [b.address for b in backends],
                    streams,
                    backends,
                    None,
                    window=window,
                    open_timeout=open_timeout,
                )
            )
        print(f"proxy: {streams:,} streams through one aimesh proxy process", flush=True)
        phases.append(
            await phase(
                "proxy",
                [proxy.address],
                streams,
                backends,
                proxy,
                window=window,
                open_timeout=open_timeout,
            )
        )
    finally:
        if proxy is not None:
            proxy.terminate()
        for b in backends:
            b.terminate()
        tmp.cleanup()
    return phases


def _mib(v: float | None) -> str:
    return "" if v is None else f"{v:,.1f} MiB"


def report(phases: list[Phase], tps: float) -> str:
    p = next(ph for ph in phases if ph.label == "proxy")
    d = next((ph for ph in phases if ph.label == "direct"), None)
    n = p.n
    delta = (p.proxy_rss_open or 0) - (p.proxy_rss_idle or 0)

    def row(
        name: str, fn: Callable[[Phase], str], proxy_only: bool = False, direct_only: bool = False
    ) -> str:
        dv = "" if d is None or proxy_only else fn(d)
        pv = "" if direct_only and d is not None else fn(p)
        return f"| {name} | {dv} | {pv} |"

    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {os.cpu_count()} "
        f"cores. {BACKENDS} sim backend processes (`--ttft 0 --tps {tps:g} --batch-slowdown 0`, "
        f"slots and queue sized for all streams, so each stream gets a token every "
        f"{1 / tps:g} s and never ends by itself); one `aimesh proxy` process (round robin, "
        f"one upstream connection per backend); the client is one Python process (grpc.aio) "
        f"with {CHANNELS} channels, each its own HTTP/2 connection, at most {OPENING} streams "
        f"opening at once. A stream counts as open when its first chunk has arrived. RSS is "
        f"VmRSS from /proc; CPU is user+system time over the {p.window:g} s hold window, in % "
        f"of one core. The direct column is the same client connected to the backends "
        f"({CHANNELS // BACKENDS} channels each) without the proxy.",
        "",
        f"| {n:,} concurrent GenerateStream calls | direct | via aimesh proxy |",
        "|---|---|---|",
        row("streams open end to end", lambda x: f"{x.opened:,} / {x.n:,}"),
        row(
            "time to open all",
            lambda x: f"{x.open_seconds:.1f} s ({x.opened / x.open_seconds:,.0f}/s)",
        ),
        row(
            "first chunk while opening, p50 / p99",
            lambda x: f"{x.ttft_p50 * 1e3:.0f} / {x.ttft_p99 * 1e3:.0f} ms",
        ),
        row(
            f"chunks per stream in {p.window:g} s held open (min / median; streams with none)",
            lambda x: f"{x.window_min} / {x.window_median:g}; {x.window_zero}",
        ),
        row("chunks/s delivered while held", lambda x: f"{x.chunks_per_s:,.0f}"),
        row("proxy RSS idle (after warm-up)", lambda x: _mib(x.proxy_rss_idle), True),
        row(f"proxy RSS with {n:,} open", lambda x: _mib(x.proxy_rss_open), True),
        f"| **proxy RSS per open stream** | | **{delta * 1024 / max(p.opened, 1):.1f} KiB** |",
        row("proxy RSS after cancelling all", lambda x: _mib(x.proxy_rss_after), True),
        row(
            "proxy CPU while held (per chunk forwarded)",
            lambda x: (
                f"{x.proxy_cpu:.0f}% ({1e4 * (x.proxy_cpu or 0) / max(x.chunks_per_s, 1):.0f} µs)"
            ),
            True,
        ),
        row("proxy threads / open fds", lambda x: f"{x.proxy_threads} / {x.proxy_fds}", True),
        row(
            "backends' RSS growth per stream (fresh processes)",
            lambda x: f"{x.per_stream_kib(x.backend_rss_delta):.1f} KiB",
            direct_only=True,
        ),
        row(
            "client RSS growth per stream (fresh process)",
            lambda x: f"{x.per_stream_kib(x.client_rss_delta):.1f} KiB",
            direct_only=True,
        ),
        row(
            "CPU while held: backends / client / all",
            lambda x: (
                f"{x.backend_cpu:.0f}% / {x.client_cpu:.0f}% / "
                f"{x.backend_cpu + x.client_cpu + (x.proxy_cpu or 0):.0f}%"
            ),
        ),
        row(
            "after cancelling: backends' `cancelled` count; generations still active",
            lambda x: f"{x.cancelled:,}; {x.active_after}",
        ),
        row("errors", lambda x: ", ".join(f"{k} {v}" for k, v in x.errors.items()) or "0"),
    ]
    for ph in phases:
        for code, details in ph.error_sample.items():
            lines.append(f"\n{ph.label}: {code}: {details}")
    return "\n".join(lines)


def run(
    streams: int = 10000, *, tps: float = TPS, window: float = 10.0, direct: bool = True
) -> str:
    """Runs the benchmark; returns the markdown section for docs/benchmarks.md."""
    t0 = time.perf_counter()
    try:
        import uvloop  # the client's CPU is part of the machine's budget

        phases = uvloop.run(_run(streams, tps, window, direct))
    except ImportError:
        phases = asyncio.run(_run(streams, tps, window, direct))
    print(f"done in {time.perf_counter() - t0:.0f} s", flush=True)
    return report(phases, tps)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.streams")
    parser.add_argument("--streams", type=int, default=10000)
    parser.add_argument(
        "--tps",
        type=float,
        default=TPS,
        help=f"tokens per second per stream at the backends (default {TPS:g})",
    )
    parser.add_argument(
        "--window",
        type=float,
        default=10.0,
        help="seconds to hold all streams open while counting chunks",
    )
    parser.add_argument(
        "--no-direct", action="store_true", help="skip the comparison run without the proxy"
    )
    parser.add_argument(
        "--write",
        action="store_true",
        help="also rewrite the bench:streams section of docs/benchmarks.md",
    )
    args = parser.parse_args()
    section = run(args.streams, tps=args.tps, window=args.window, direct=not args.no_direct)
    print(section)
    if args.write:
        from .__main__ import _update

        _update("streams", section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
