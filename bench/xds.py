"""xDS: the same Inference load four ways, and how fast a change reaches Envoy and gRPC.

    python -m bench xds                 (also rewrites its section of docs/benchmarks.md)
    python -m bench.xds [--duration S] [--endpoints 1000] [--changes 100] [--write]

One run, all on 127.0.0.1, one control plane (`aimesh control-plane --store memory`,
serving ADS v3 and the aimesh APIs), two phases:

A. Data plane. One unpaced sim backend (`--ttft 0 --tps 0`, 200-token completions) that
   registers itself as service `llm`; a config that sends every call to `llm` (round
   robin, no active health checks, no retries). The same closed-loop load
   (bench/loadgen.py: unary Generate of 4 tokens, GenerateStream of 200 tokens with the
   time to first token; 1 and 16 calls in flight) goes four ways, interleaved cell by
   cell for ROUNDS rounds (the order rotating; each figure is the median over the rounds):
   straight to the sim; through `aimesh proxy --control-plane`; through Envoy 1.40
   (`--concurrency 1`) bootstrapped onto the control plane's ADS (`envoy_bootstrap()`,
   what `aimesh xds bootstrap --for envoy` writes); and proxyless, grpcio dialing
   `xds:///llm` with a bootstrap from `grpc_bootstrap()`. grpcio's xDS client is global
   to a process and reads GRPC_XDS_BOOTSTRAP once, so the load runs in a child process
   (`python -m bench.xds load`, driven by JSON lines on stdin) for all four ways alike:
   one load generator, and its own CPU per call is comparable across them. The proxies'
   CPU comes from /proc (`loadgen.CpuSample`).

B. Push latency. The config becomes a realistic 10-service document
   (bench/control_plane.py's, plus `llm`) and ENDPOINTS fake instances are registered
   through the Registry API over those 10 services (made-up 10.x addresses nothing is
   sent to; their leases kept alive on one stream), so every xDS rebuild and every EDS
   response carries them all. Then CHANGES times each, one change at a time:

   - add: Register a second, real sim (`late-sim`, not self-registered) into `llm`;
   - remove: Deregister it;
   - weight: Config.Apply the document with the gpt-4 canary split moved by one point
     (a RouteConfiguration change: weighted clusters).

   Observers, each timestamping with CLOCK_MONOTONIC (one clock for every process here;
   Envoy with its wall clock, compared with this process's time.time()):

   - Envoy: its admin `/stats?filter=^(...)$` (four exact names) polled every POLL s on
     a kept-alive connection. It shows that the change is in: `cluster.llm.
     membership_total` (add/remove: the host set Envoy's cluster manager holds once EDS
     is applied) and `http.aimesh.rds.aimesh.config_reload` (weight: the route table was
     reloaded); and when it got in, by Envoy's own wall clock in ms: `cluster.llm.
     update_time` and `http.aimesh.rds.aimesh.config_reload_time_ms`, set right after
     the update was applied. So the poll rate costs no accuracy (latency = that stamp
     minus time.time() just before the RPC), and Envoy's main thread, which also runs
     xDS, is queried at most 200 times a second. The alternatives cost more and say less:
     /config_dump and /clusters serialise every resource or host (1,000 here) per query,
     and the version stats alone carry no time.
   - a raw ADS client in this process (grpc.aio, node flavor "grpc" like grpcio's,
     subscribed to every cluster's endpoints and to the route table, ACKing each
     response like a client): the arrival of the response that carries the change. That
     is the control plane's push, as any gRPC client receives it.
   - grpcio itself: the child process calls `xds:///llm` in a paced loop (one Generate
     every PACE seconds) and reports the first call served by `late-sim` (the
     `aimesh-instance` trailer) after an add, and after a remove the second call served
     elsewhere after its last one (round robin over two: that one was its turn). That
     includes grpcio's own xDS processing and, for an add, its connecting to the new
     endpoint. Upper bounds, to one or two calls (about PACE + 0.5 ms each).

   Latency is from just before the change's RPC is sent to the observation. The next
   change is made once every observer has seen this one, plus GAP.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.100  # seconds, p99 of push latency
SERVICE = "llm"
LATE = "late-sim"
CONCURRENCIES = (1, 16)
ROUNDS = 3  # of A's cells, interleaved; each figure is the median over them
STREAM_TOKENS = 200
POLL = 0.005  # seconds between two Envoy stats queries (the latency is from its own clock)
PACE = 0.002  # seconds between two calls of the grpcio watch loop
GONE = 0.05  # seconds without a call served by LATE after which it counts as removed
GAP = 0.03  # seconds between one change being seen everywhere and the next
WAIT = 10.0  # seconds an observer may take to see a change before the run fails
TTL = 30.0
OTHERS_LIMIT = 0.1  # cores other processes may use before the figures are called disturbed
MODES = ("direct", "aimesh", "envoy", "proxyless")
FAST = ("--ttft", "0", "--tps", "0", "--slots", "512", "--max-queue", "4096")

PHASE_A = f"""apiVersion: mesh.ai/v1
kind: ServiceMesh
metadata: {{name: bench-xds}}
spec:
  services:
    - name: {SERVICE}
      models: [gpt-4]
      loadBalancer:
        algorithm: round_robin
        healthCheck: {{enabled: false}}
  trafficPolicies:
    - name: all
      routes: [{{destination: {SERVICE}}}]
"""


def phase_b_document(n: int) -> str:
    """bench/control_plane.py's 10-service document, plus `llm` (and a policy sending
    Envoy's catch-all traffic there), with the gpt-4 canary split at 90-k / 10+k."""
    from .control_plane import mesh_document

    k = n % 50
    doc = mesh_document(f"bench-xds-{n}")
    doc = doc.replace(
        "{destination: gpt4-gateway, weight: 90}",
        f"{{destination: gpt4-gateway, weight: {90 - k}}}",
    ).replace(
        "{destination: gpt4o-gateway, weight: 10}",
        f"{{destination: gpt4o-gateway, weight: {10 + k}}}",
    )
    llm = (
        f"    - name: {SERVICE}\n"
        "      models: [gpt-4-bench]\n"
        "      loadBalancer: {algorithm: round_robin, healthCheck: {enabled: false}}\n"
    )
    doc = doc.replace("  trafficPolicies:\n", llm + "  trafficPolicies:\n", 1)
    return doc.replace(
        "    - name: default\n",
        f"    - name: {SERVICE}-all\n      routes: [{{destination: {SERVICE}}}]\n"
        "    - name: default\n",
        1,
    )


# -- the load process (a child: grpcio's xDS client is per process) ------------------------


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _cpu() -> float:
    from .control_plane import self_cpu

    return self_cpu()


async def _load(cmd: dict[str, Any]) -> dict[str, Any]:
    from . import loadgen

    kind, target = cmd["kind"], cmd["target"]
    kw = {"concurrency": cmd["concurrency"], "duration": cmd["duration"]}
    cpu0 = _cpu()
    if kind == "unary":
        r = await loadgen.unary(target, **kw)
    else:
        r = await loadgen.streams(target, max_tokens=STREAM_TOKENS, **kw)
    return {
        "calls": r.calls,
        "errors": r.errors,
        "tokens": r.tokens,
        "elapsed": r.elapsed,
        "p50": r.p50(),
        "p99": r.p99(),
        "ttft_p50": r.pct(r.ttfts, 0.5),
        "ttft_p99": r.pct(r.ttfts, 0.99),
        "cpu": _cpu() - cpu0,
    }


async def _ready(target: str, timeout: float = 30.0) -> dict[str, Any]:
    """Calls until one call succeeds (the path is configured end to end)."""
    import grpc.aio

    from aimesh.inference.v1 import inference_pb2 as pb
    from aimesh.inference.v1 import inference_pb2_grpc as pb_grpc

    t0 = time.monotonic()
    failures, last = 0, ""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        request = pb.GenerateRequest(
            model="gpt-4", messages=[pb.Message(role="user", content="ready?")], max_tokens=1
        )
        while time.monotonic() - t0 < timeout:
            try:
                await stub.Generate(request, timeout=5)
                return {"seconds": time.monotonic() - t0, "failures": failures}
            except grpc.aio.AioRpcError as exc:
                failures, last = failures + 1, f"{exc.code().name}: {exc.details()}"
                await asyncio.sleep(0.05)
    return {"seconds": time.monotonic() - t0, "failures": failures, "error": last}


async def _watch(target: str, instance: str, stop: asyncio.Event) -> None:
    """Calls `target` every PACE s; reports when `instance` starts serving calls, and when
    it has stopped for good (GONE s of calls served elsewhere).

    Upper bounds, to a call or two: "first" is the start of the first call it served (it
    joined the picker after the call before); "gone" is the start of the second call
    served elsewhere after its last one: with two endpoints in round robin, that call
    would have been its turn had it still been in the picker."""
    import grpc.aio

    from aimesh.inference.v1 import inference_pb2 as pb
    from aimesh.inference.v1 import inference_pb2_grpc as pb_grpc

    from .loadgen import _instance

    request = pb.GenerateRequest(
        model="gpt-4", messages=[pb.Message(role="user", content="watch")], max_tokens=1
    )
    on = False
    last_on = 0.0
    since: list[float] = []  # starts of the calls served elsewhere since last_on
    calls = errors = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        while not stop.is_set():
            t0 = time.monotonic()
            call = stub.Generate(request, timeout=5)
            try:
                await call
                served = _instance(await call.trailing_metadata())
                calls += 1
            except grpc.aio.AioRpcError:
                served = ""
                errors += 1
            if served == instance:
                if not on:
                    _emit({"ev": "first", "at": t0})
                    on = True
                last_on, since = t0, []
            elif on and served:
                since.append(t0)
                if t0 - last_on > GONE and len(since) > 1:
                    _emit({"ev": "gone", "at": since[1]})
                    on = False
            await asyncio.sleep(PACE)
    _emit({"ev": "watched", "calls": calls, "errors": errors})


async def _child() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    watching: tuple[asyncio.Task[None], asyncio.Event] | None = None
    _emit({"ev": "started"})
    while line := await reader.readline():
        cmd = json.loads(line)
        if cmd["op"] == "ready":
            _emit({"ev": "ready", **await _ready(cmd["target"])})
        elif cmd["op"] == "load":
            _emit({"ev": "result", **await _load(cmd)})
        elif cmd["op"] == "watch":
            stop = asyncio.Event()
            watching = (loop.create_task(_watch(cmd["target"], cmd["instance"], stop)), stop)
        elif cmd["op"] == "unwatch" and watching is not None:
            watching[1].set()
            await watching[0]
            watching = None
    if watching is not None:
        watching[1].set()
        await watching[0]


class Child:
    """The load process, seen from the driver."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.xds",
            "load",
            cwd=ROOT,
            env={**os.environ, **self.env},
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=self.stderr,
            start_new_session=True,
        )
        self.reader = asyncio.get_running_loop().create_task(self._read())
        await self.next("started", 60)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.events.put_nowait(json.loads(line))
        self.events.put_nowait({"ev": "exited"})

    def tail(self) -> str:
        self.stderr.seek(0)
        return "".join(self.stderr.readlines()[-30:])

    async def send(self, **cmd: Any) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await self.proc.stdin.drain()

    async def next(self, ev: str, timeout: float) -> dict[str, Any]:
        try:
            msg = await asyncio.wait_for(self.events.get(), timeout)
        except TimeoutError:
            raise RuntimeError(f"the load process sent no {ev!r} in {timeout:g} s") from None
        if msg["ev"] != ev:
            raise RuntimeError(f"the load process sent {msg}, not {ev!r}:\n{self.tail()}")
        return msg

    async def load(self, **cmd: Any) -> dict[str, Any]:
        await self.send(op="load", **cmd)
        return await self.next("result", cmd["duration"] + 60)

    async def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self.reader is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self.reader, 5)


# -- the raw ADS client ---------------------------------------------------------------------


class AdsClient:
    """One ADS stream as a gRPC client holds it (node flavor "grpc"): every cluster (CDS
    wildcard), every cluster's endpoints, the route table; each response ACKed. Keeps what
    it was sent and when each response arrived."""

    def __init__(self, target: str, node_id: str) -> None:
        self.target = target
        self.node_id = node_id
        self.endpoints: dict[str, set[str]] = {}  # cluster -> addresses
        self.weights: dict[str, int] = {}  # the gpt-4 canary split: cluster -> weight
        self.at: dict[str, float] = {}  # type url -> arrival of the last response
        self.responses = 0
        self.changed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.channel: Any = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        import grpc.aio
        from envoy.config.core.v3 import base_pb2
        from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

        from aimesh.mesh.control.xds.resources import CLUSTER, ENDPOINT, ROUTE, ROUTE_TABLE

        self.channel = grpc.aio.insecure_channel(self.target)
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        call = stub.StreamAggregatedResources()
        node = base_pb2.Node(id=self.node_id, user_agent_name="aimesh-bench")
        names: dict[str, list[str]] = {CLUSTER: [], ROUTE: [ROUTE_TABLE], ENDPOINT: []}
        state: dict[str, tuple[str, str]] = {}  # type -> (version, nonce) last received

        async def request(type_url: str) -> None:
            version, nonce = state.get(type_url, ("", ""))
            await call.write(
                discovery_pb2.DiscoveryRequest(
                    node=node,
                    type_url=type_url,
                    resource_names=names[type_url],
                    version_info=version,
                    response_nonce=nonce,
                )
            )

        await request(CLUSTER)
        await request(ROUTE)
        while True:
            response = await call.read()
            at = time.monotonic()
            if response is grpc.aio.EOF:  # type: ignore[attr-defined]
                raise RuntimeError("the control plane ended the ADS stream")
            t = response.type_url
            state[t] = (response.version_info, response.nonce)
            self.responses += 1
            self.at[t] = at
            if t == CLUSTER:
                clusters = sorted(self._name(r) for r in response.resources)
                await request(CLUSTER)  # ACK
                if clusters != names[ENDPOINT]:
                    names[ENDPOINT] = clusters
                    await request(ENDPOINT)
            elif t == ENDPOINT:
                self._endpoints(response.resources)
                await request(ENDPOINT)
            elif t == ROUTE:
                self._routes(response.resources)
                await request(ROUTE)
            self.changed.set()
            self.changed = asyncio.Event()

    @staticmethod
    def _name(packed: Any) -> str:
        from envoy.config.cluster.v3 import cluster_pb2

        c = cluster_pb2.Cluster()
        packed.Unpack(c)
        return str(c.name)

    def _endpoints(self, resources: Any) -> None:
        from envoy.config.endpoint.v3 import endpoint_pb2

        out: dict[str, set[str]] = {}
        for packed in resources:
            cla = endpoint_pb2.ClusterLoadAssignment()
            packed.Unpack(cla)
            out[cla.cluster_name] = {
                f"{e.endpoint.address.socket_address.address}:"
                f"{e.endpoint.address.socket_address.port_value}"
                for loc in cla.endpoints
                for e in loc.lb_endpoints
            }
        self.endpoints = out

    def _routes(self, resources: Any) -> None:
        from envoy.config.route.v3 import route_pb2

        weights: dict[str, int] = {}
        for packed in resources:
            table = route_pb2.RouteConfiguration()
            packed.Unpack(table)
            for vh in table.virtual_hosts:
                if vh.name != "default":
                    continue
                for r in vh.routes:
                    if r.name == "gpt4-canary":
                        for w in r.route.weighted_clusters.clusters:
                            weights[w.name] = w.weight.value
        self.weights = weights

    async def wait(self, done: Callable[[AdsClient], bool], type_url: str) -> float:
        """The arrival time of the response after which `done` holds."""
        deadline = time.monotonic() + WAIT
        while not done(self):
            if self.task is not None and self.task.done():
                self.task.result()
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"the ADS client did not see the change in {WAIT:g} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)
        return self.at[type_url]

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task
        if self.channel is not None:
            await self.channel.close(None)


# -- Envoy's stats, polled --------------------------------------------------------------------


class EnvoyStats:
    """Envoy's admin /stats with an exact filter, on one kept-alive HTTP/1.1 connection
    (a thread: http.client blocks)."""

    def __init__(self, admin: str, names: list[str]) -> None:
        host, _, port = admin.removeprefix("http://").rpartition(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=5)
        pattern = "^(" + "|".join(re.escape(n) for n in names) + ")$"
        self.path = "/stats?filter=" + urllib_quote(pattern)
        self.polls = 0
        self.seconds = 0.0  # spent in queries

    def get(self) -> dict[str, int]:
        t0 = time.monotonic()
        self.conn.request("GET", self.path)
        body = self.conn.getresponse().read().decode()
        self.seconds += time.monotonic() - t0
        self.polls += 1
        out = {}
        for line in body.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out

    def wait_sync(self, done: Callable[[dict[str, int]], bool]) -> tuple[float, dict[str, int]]:
        """When a query first showed `done` (monotonic), and what it showed."""
        deadline = time.monotonic() + WAIT
        while True:
            stats = self.get()
            at = time.monotonic()
            if done(stats):
                return at, stats
            if at > deadline:
                raise RuntimeError(f"Envoy did not show the change in {WAIT:g} s: {stats}")
            time.sleep(POLL)

    async def wait(self, done: Callable[[dict[str, int]], bool]) -> tuple[float, dict[str, int]]:
        return await asyncio.to_thread(self.wait_sync, done)


def urllib_quote(s: str) -> str:
    from urllib.parse import quote

    return quote(s, safe="")


# -- the driver -------------------------------------------------------------------------------


@dataclass
class Cell:
    mode: str
    kind: str  # unary | stream
    concurrency: int
    r: dict[str, Any]
    proxy_cpu: float | None  # seconds over the load; None: no proxy process

    @property
    def rate(self) -> float:
        return float(self.r["calls"] / self.r["elapsed"]) if self.r["elapsed"] else 0.0

    @property
    def tps(self) -> float:
        return float(self.r["tokens"] / self.r["elapsed"]) if self.r["elapsed"] else 0.0

    def per(self, cpu: float) -> float:
        """µs per call (unary) or per token (stream)."""
        n = self.r["calls"] if self.kind == "unary" else self.r["tokens"]
        return float(1e6 * cpu / max(n, 1))


def median_cell(cs: list[Cell]) -> Cell:
    """One cell over the rounds: each figure's median (errors summed)."""
    med = statistics.median
    first = cs[0]
    r: dict[str, Any] = {
        "elapsed": 1.0,
        "calls": med(c.rate for c in cs),
        "tokens": med(c.tps for c in cs),
        "errors": sum(c.r["errors"] for c in cs),
        **{k: med(c.r[k] for c in cs) for k in ("p50", "p99", "ttft_p50", "ttft_p99")},
    }
    n = r["calls"] if first.kind == "unary" else r["tokens"]
    r["cpu"] = med(c.per(c.r["cpu"]) for c in cs) * n / 1e6
    proxy = None
    if first.proxy_cpu is not None:
        proxy = med(c.per(c.proxy_cpu or 0.0) for c in cs) * n / 1e6
    return Cell(first.mode, first.kind, first.concurrency, r, proxy)


@dataclass
class Change:
    kind: str  # add | remove | weight
    rpc: list[float] = field(default_factory=list)
    ads: list[float] = field(default_factory=list)
    envoy: list[float] = field(default_factory=list)
    grpcio: list[float] = field(default_factory=list)


@dataclass
class Result:
    duration: float
    rounds: int
    endpoints: int
    changes: int
    cells: list[Cell] = field(default_factory=list)
    kinds: dict[str, Change] = field(default_factory=dict)
    a_seconds: float = 0.0
    a_other_cpu: float = 0.0
    register_seconds: float = 0.0
    ads_sync: float = 0.0  # seconds from the last registration to a new ADS client's sync
    envoy_sync: float = 0.0  # ... to Envoy's having every endpoint (it followed them all)
    b_seconds: float = 0.0
    b_other_cpu: float = 0.0
    cp_cpu: float = 0.0
    envoy_cpu: float = 0.0
    poll_ms: float = 0.0
    polls: int = 0
    watch: dict[str, Any] = field(default_factory=dict)
    total_seconds: float = 0.0


async def _phase_a(
    res: Result, child: Child, targets: dict[str, tuple[str, int | None]], ours: list[int]
) -> None:
    from . import loadgen
    from .control_plane import machine_busy, self_cpu

    for mode, (target, _) in targets.items():  # every path routes; then warm it up
        await child.send(op="ready", target=target)
        ready = await child.next("ready", 60)
        if "error" in ready:
            raise RuntimeError(f"{mode} ({target}) never served a call: {ready['error']}")
        await child.load(kind="unary", target=target, concurrency=1, duration=0.3)
    plans = [(k, c) for k in ("unary", "stream") for c in CONCURRENCIES]
    modes = list(targets)
    # Each round starts the rotation one way later, so no way always follows the same one.
    cells = [
        (n, k, c, m)
        for n in range(res.rounds)
        for k, c in plans
        for m in modes[n % len(modes) :] + modes[: n % len(modes)]
    ]
    for n, kind, conc, mode in cells:
        target, pid = targets[mode]
        pids = [*ours, *([pid] if pid else [])]
        cpu0 = loadgen.cpu_seconds(pid) if pid else 0.0
        others0, self0, busy0, m0 = (
            loadgen.cpu_of(pids),
            self_cpu(),
            machine_busy(),
            time.monotonic(),
        )
        r = await child.load(kind=kind, target=target, concurrency=conc, duration=res.duration)
        cpu = loadgen.cpu_seconds(pid) - cpu0 if pid else None
        mine = loadgen.cpu_of(pids) - others0 + self_cpu() - self0
        res.a_other_cpu += max(0.0, machine_busy() - busy0 - mine)
        res.a_seconds += time.monotonic() - m0
        cell = Cell(mode, kind, conc, r, cpu)
        res.cells.append(cell)
        what = (
            f"{cell.rate:7.0f} calls/s p50 {r['p50'] * 1e3:6.2f} p99 {r['p99'] * 1e3:6.2f} ms"
            if kind == "unary"
            else f"{cell.tps:8.0f} tokens/s TTFT p50 {r['ttft_p50'] * 1e3:6.2f} "
            f"p99 {r['ttft_p99'] * 1e3:6.2f} ms"
        )
        proxy = f" proxy {cell.per(cpu):5.1f} µs" if cpu is not None else ""
        print(
            f"  {n + 1}/{res.rounds} {kind:<6} c={conc:<2} {mode:<9} {what}{proxy} client "
            f"{cell.per(r['cpu']):5.1f} µs/{'call' if kind == 'unary' else 'token'}"
            + (f" errors {r['errors']}" if r["errors"] else ""),
            flush=True,
        )


async def _run(
    duration: float,
    rounds: int,
    endpoints: int,
    changes: int,
    load: bool = True,
    profile: Path | None = None,
) -> Result:
    import grpc.aio

    from aimesh.control.v1 import control_plane_pb2 as pb
    from aimesh.control.v1 import control_plane_pb2_grpc as pb_grpc
    from aimesh.mesh import procs
    from aimesh.mesh.control.xds.bootstrap import envoy_bootstrap, grpc_bootstrap
    from aimesh.mesh.control.xds.resources import ENDPOINT, ROUTE

    from . import loadgen
    from .control_plane import KeepAlive, _register_all, machine_busy, self_cpu
    from .envoy import Envoy

    res = Result(duration, rounds, endpoints, changes)
    res.kinds = {k: Change(k) for k in ("add", "remove", "weight")}
    t_begin = time.monotonic()
    tmp = tempfile.TemporaryDirectory(prefix="aimesh-bench-xds-")
    work = Path(tmp.name)
    started: list[procs.Proc] = []
    envoy: Envoy | None = None
    child: Child | None = None
    channel: grpc.aio.Channel | None = None
    keepalive: KeepAlive | None = None
    ads: AdsClient | None = None
    try:
        cp = procs.start_control_plane()
        started.append(cp)
        print(f"control plane {cp.address} (pid {cp.pid})", flush=True)
        doc = work / "a.yaml"
        doc.write_text(PHASE_A)
        subprocess_run(procs.aimesh_command("apply", "-f", str(doc), "--control-plane", cp.address))
        sim = procs.start_sim(
            "bench-sim",
            ["gpt-4"],
            *FAST,
            "--length",
            "1000-1000",
            "--control-plane",
            cp.address,
            "--service",
            SERVICE,
        )
        started.append(sim)
        late = procs.start_sim(LATE, ["gpt-4"], *FAST)
        started.append(late)
        proxy = procs.start(
            "aimesh-proxy",
            procs.aimesh_command(
                "proxy",
                "--listen",
                "127.0.0.1:0",
                "--control-plane",
                cp.address,
                "--cache",
                str(work / "proxy-cache.json"),
            ),
        )
        started.append(proxy)
        boot = work / "grpc-bootstrap.json"
        boot.write_text(json.dumps(grpc_bootstrap("bench-proxyless", [cp.address])))
        envoy = Envoy(
            config=envoy_bootstrap(
                "bench-envoy", [cp.address], listen="127.0.0.1:0", admin="127.0.0.1:0"
            )
        ).start()
        print(
            f"sim {sim.address}, aimesh proxy {proxy.address} (pid {proxy.pid}), envoy "
            f"{envoy.address} (pid {envoy.pid}), proxyless xds:///{SERVICE}",
            flush=True,
        )
        child = Child({"GRPC_XDS_BOOTSTRAP": str(boot), "PYTHONUNBUFFERED": "1"})
        await child.start()

        # -- A ------------------------------------------------------------------------------
        print("A. the same load four ways", flush=True)
        targets: dict[str, tuple[str, int | None]] = {
            "direct": (sim.address, None),
            "aimesh": (proxy.address, proxy.pid),
            "envoy": (envoy.address, envoy.pid),
            "proxyless": (f"xds:///{SERVICE}", None),
        }
        ours = [cp.pid, sim.pid, late.pid, proxy.pid, envoy.pid, child.pid]
        if load:
            await _phase_a(res, child, targets, ours)
        proxy.terminate()
        started.remove(proxy)

        # -- B ------------------------------------------------------------------------------
        print(f"B. push latency with {endpoints:,} endpoints", flush=True)
        channel = grpc.aio.insecure_channel(cp.address)
        registry: Any = pb_grpc.RegistryStub(channel)
        config: Any = pb_grpc.ConfigStub(channel)
        await config.Apply(
            pb.ApplyConfigRequest(document=phase_b_document(0), source="bench"), timeout=10
        )
        t0 = time.monotonic()
        leases = await _register_all(registry, endpoints)
        t_registered = time.monotonic()
        res.register_seconds = t_registered - t0
        keepalive = KeepAlive(registry, leases, TTL)
        keepalive.start()
        ads = AdsClient(cp.address, "bench-ads")
        ads.start()
        total = endpoints + 1  # and the self-registered sim
        await ads.wait(lambda a: sum(map(len, a.endpoints.values())) == total, ENDPOINT)
        res.ads_sync = time.monotonic() - t_registered
        from .control_plane import SERVICES

        clusters = [s for s, _ in SERVICES] + [SERVICE]
        stats = EnvoyStats(
            envoy.admin,
            [f"cluster.{c}.membership_total" for c in clusters],
        )
        # Envoy stamps each applied update with its wall-clock time, in ms: EDS per cluster
        # (update_time), the route table (config_reload_time_ms).
        membership = f"cluster.{SERVICE}.membership_total"
        eds_time = f"cluster.{SERVICE}.update_time"
        rds = "http.aimesh.rds.aimesh.config_reload"
        rds_time = "http.aimesh.rds.aimesh.config_reload_time_ms"
        full, _ = await stats.wait(
            lambda s: sum(v for k, v in s.items() if k.endswith("membership_total")) == total
        )
        res.envoy_sync = full - t_registered
        stats = EnvoyStats(envoy.admin, [membership, eds_time, rds, rds_time])
        await child.send(op="watch", target=f"xds:///{SERVICE}", instance=LATE)
        await asyncio.sleep(0.5)

        late_inst = pb.Instance(
            service=SERVICE, address=late.address, instance_id=LATE, models=["gpt-4"]
        )
        pids = [cp.pid, sim.pid, late.pid, envoy.pid, child.pid]
        cpu0, ecpu0 = loadgen.cpu_seconds(cp.pid), loadgen.cpu_seconds(envoy.pid)
        others0, self0, busy0, m0 = (
            loadgen.cpu_of(pids),
            self_cpu(),
            machine_busy(),
            time.monotonic(),
        )
        polls0, poll_s0 = stats.polls, stats.seconds
        spy = None
        if profile is not None:  # sampling: it barely slows the control plane
            spy = _py_spy(cp.pid, profile)
            await asyncio.sleep(1.0)

        async def measure(
            kind: str,
            send: Callable[[], Any],
            ads_done: Callable[[AdsClient], bool],
            ads_type: str,
            envoy_done: Callable[[dict[str, int]], bool],
            envoy_at: str,
            grpcio_ev: str | None,
        ) -> Any:
            k = res.kinds[kind]
            wall, t_send = time.time(), time.monotonic()
            response = await send()
            k.rpc.append(time.monotonic() - t_send)
            got = await asyncio.gather(
                ads.wait(ads_done, ads_type),
                stats.wait(envoy_done),
                *([child.next(grpcio_ev, WAIT)] if grpcio_ev else []),
            )
            k.ads.append(got[0] - t_send)
            k.envoy.append(got[1][1][envoy_at] / 1e3 - wall)
            if grpcio_ev:
                k.grpcio.append(got[2]["at"] - t_send)
            await asyncio.sleep(GAP)
            return response

        prev_rds = stats.get()[rds]
        for i in range(changes):
            request = pb.RegisterRequest(instance=late_inst)
            request.ttl.FromNanoseconds(int(TTL * 1e9))
            reg = await measure(
                "add",
                partial(registry.Register, request, timeout=10),
                lambda a: late.address in a.endpoints.get(SERVICE, ()),
                ENDPOINT,
                lambda s: s[membership] == 2,
                eds_time,
                "first",
            )
            await measure(
                "remove",
                partial(
                    registry.Deregister, pb.DeregisterRequest(lease_id=reg.lease_id), timeout=10
                ),
                lambda a: late.address not in a.endpoints.get(SERVICE, ()),
                ENDPOINT,
                lambda s: s[membership] == 1,
                eds_time,
                "gone",
            )
            n = i + 1
            weight = 10 + n % 50
            before = prev_rds

            def moved(a: AdsClient, w: int = weight) -> bool:
                return a.weights.get("gpt4o-gateway") == w

            def reloaded(s: dict[str, int], b: int = before) -> bool:
                return s[rds] > b

            await measure(
                "weight",
                partial(
                    config.Apply,
                    pb.ApplyConfigRequest(document=phase_b_document(n), source="bench"),
                    timeout=10,
                ),
                moved,
                ROUTE,
                reloaded,
                rds_time,
                None,
            )
            prev_rds = stats.get()[rds]
            if n % 10 == 0 or n == changes:
                line = "; ".join(
                    f"{c.kind} p99 ads {_ms(_pct(c.ads, 0.99))} envoy {_ms(_pct(c.envoy, 0.99))}"
                    + (f" grpcio {_ms(_pct(c.grpcio, 0.99))}" if c.grpcio else "")
                    for c in res.kinds.values()
                )
                print(f"  change {n}/{changes}: {line} ms", flush=True)
        res.b_seconds = time.monotonic() - m0
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        res.cp_cpu = loadgen.cpu_seconds(cp.pid) - cpu0
        res.envoy_cpu = loadgen.cpu_seconds(envoy.pid) - ecpu0
        mine = loadgen.cpu_of(pids) - others0 + self_cpu() - self0
        res.b_other_cpu = max(0.0, machine_busy() - busy0 - mine)
        res.polls = stats.polls - polls0
        res.poll_ms = 1e3 * (stats.seconds - poll_s0) / max(res.polls, 1)
        await child.send(op="unwatch")
        res.watch = await child.next("watched", 30)
    finally:
        if ads is not None:
            await ads.stop()
        if keepalive is not None:
            await keepalive.stop()
        if channel is not None:
            await channel.close(None)
        if child is not None:
            await child.stop()
        if envoy is not None:
            envoy.stop()
        for p in reversed(started):
            p.terminate()
        tmp.cleanup()
    res.total_seconds = time.monotonic() - t_begin
    return res


def _py_spy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    py_spy = str(Path(sys.executable).with_name("py-spy"))
    argv = [py_spy, "record", "--pid", str(pid), "--rate", "500", "--format", "raw"]
    return subprocess.Popen(
        [*argv, "--nonblocking", "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def subprocess_run(argv: list[str]) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {r.stderr}")


def _pct(values: list[float], q: float) -> float:
    from .control_plane import _pct as pct

    return pct(values, q)


def _ms(v: float) -> str:
    return f"{v * 1e3:.1f}"


# -- the report -------------------------------------------------------------------------------


def report(res: Result) -> str:
    from .control_plane import REGISTER_CONCURRENCY

    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    machine = f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}"
    grouped: dict[tuple[str, str, int], list[Cell]] = {}
    for c in res.cells:
        grouped.setdefault((c.mode, c.kind, c.concurrency), []).append(c)
    cells = {key: median_cell(cs) for key, cs in grouped.items()}
    labels = {
        "direct": "direct",
        "aimesh": "aimesh proxy",
        "envoy": "Envoy on aimesh xDS",
        "proxyless": "proxyless grpcio (xds:///)",
    }
    lines = [
        f"Measured {stamp} on {machine}, with `python -m bench xds` ({res.total_seconds:.0f} s "
        "in all)."
    ]
    if res.cells:
        lines[0] += (
            f" **A**: one unpaced sim backend, {res.duration:g} s per cell, the four ways "
            f"interleaved cell by cell for {res.rounds} rounds (each figure the median over "
            "them), one load process for all (bench/loadgen.py, closed "
            "loop, one channel); Envoy 1.40 `--concurrency 1` and one `aimesh proxy` process, "
            "both on the control plane, round robin, no retries. Ratios are throughput against "
            "direct; CPU is per call (unary) or per streamed token."
        )
        lines += [
            "",
            "| load | way | throughput | vs direct | p50 ms | p99 ms | TTFT p50 / p99 ms "
            "| proxy CPU | client CPU | errors |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
    for kind in ("unary", "stream"):
        for conc in CONCURRENCIES:
            d = cells.get(("direct", kind, conc))
            for mode in MODES:
                cell = cells.get((mode, kind, conc))
                if cell is None or d is None:
                    continue
                c = cell
                unit = "call" if kind == "unary" else "token"
                if kind == "unary":
                    load = f"unary Generate (4 tokens), {conc} in flight"
                    thr, base = f"{c.rate:,.0f} calls/s", d.rate
                    ratio = c.rate / base if base else float("nan")
                    ttft = ""
                else:
                    load = f"GenerateStream ({STREAM_TOKENS} tokens), {conc} in flight"
                    thr, base = f"{c.tps:,.0f} tokens/s", d.tps
                    ratio = c.tps / base if base else float("nan")
                    ttft = f"{c.r['ttft_p50'] * 1e3:.2f} / {c.r['ttft_p99'] * 1e3:.2f}"
                proxy = f"{c.per(c.proxy_cpu):.1f} µs/{unit}" if c.proxy_cpu is not None else ""
                lines.append(
                    f"| {load if mode == 'direct' else ''} | {labels[mode]} | {thr} | "
                    f"{ratio:.2f}x | {c.r['p50'] * 1e3:.2f} | {c.r['p99'] * 1e3:.2f} | {ttft} | "
                    f"{proxy} | {c.per(c.r['cpu']):.1f} µs/{unit} | {c.r['errors']} |"
                )
    a_others = res.a_other_cpu / max(res.a_seconds, 1e-9)
    if res.cells and a_others > OTHERS_LIMIT:
        lines += [
            "",
            f"Processes outside the benchmark used {a_others:.2f} cores on average during A: "
            "the figures are disturbed (ratios less so, the four ways being interleaved).",
        ]
    lines += [
        "",
        f"**B**: {res.endpoints:,} registered endpoints (10 services, made-up addresses, "
        f"registered in {res.register_seconds:.1f} s) plus `llm`'s; {res.changes} changes of "
        "each kind, one at a time. Latency from just before the change's RPC to the "
        "observation (CLOCK_MONOTONIC, shared by every process here).",
        "",
        "| change | seen by | samples | p50 ms | p99 ms | max ms | p99 ≤ 100 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    missed: list[str] = []
    judged = 0
    who = {
        "ads": "a gRPC-flavor ADS client: the response arrives (the push)",
        "grpcio": "grpcio on xds:///llm: a call lands on it / none do",
        "envoy": "Envoy: stats show it applied",
        "rpc": "the RPC's own round trip",
    }
    what = {
        "add": "Register a real sim into `llm`",
        "remove": "Deregister it",
        "weight": "Config.Apply: the gpt-4 canary split moves a point (RDS)",
    }
    for kind, ch in res.kinds.items():
        first = True
        for obs in ("ads", "grpcio", "envoy", "rpc"):
            values: list[float] = getattr(ch, obs)
            if not values:
                continue
            p99 = _pct(values, 0.99)
            mark = ""
            if obs != "rpc":
                judged += 1
                mark = "yes" if p99 <= TARGET else "**no**"
                if p99 > TARGET:
                    missed.append(f"{kind} seen by {obs} (p99 {_ms(p99)} ms)")
            lines.append(
                f"| {what[kind] if first else ''} | {who[obs]} | {len(values)} | "
                f"{_ms(_pct(values, 0.5))} | {_ms(p99)} | {_ms(max(values))} | {mark} |"
            )
            first = False
    verdict = (
        f"missed by {len(missed)} of {judged} rows: {', '.join(missed)}"
        if missed
        else f"met by all {judged} rows"
    )
    b_others = res.b_other_cpu / max(res.b_seconds, 1e-9)
    lines += [
        "",
        f"**Target, p99 ≤ 100 ms with {res.endpoints:,} endpoints: {verdict}.**",
        "",
        f"Control plane CPU during B: {res.cp_cpu:.2f} s over {res.b_seconds:.1f} s "
        f"({1e3 * res.cp_cpu / max(3 * res.changes, 1):.1f} ms per change, everything "
        f"included); Envoy's: {res.envoy_cpu:.2f} s (its stats polled {res.polls:,} times, "
        f"{res.poll_ms:.2f} ms a query). After the last of the {res.endpoints:,} registrations "
        f"(made {REGISTER_CONCURRENCY} at a time, Envoy following them all the while), Envoy had "
        f"all {res.endpoints + 1:,} endpoints {_ms(res.envoy_sync)} ms later; a new ADS client, "
        f"started then, had them {_ms(res.ads_sync)} ms later. The grpcio watch loop made "
        f"{res.watch.get('calls', 0):,} calls ({res.watch.get('errors', 0)} failed).",
    ]
    if b_others > OTHERS_LIMIT:
        lines += [
            "",
            f"Processes outside the benchmark used {b_others:.2f} cores on average during B: "
            "these latencies are disturbed; run it again on a quiet machine.",
        ]
    return "\n".join(lines)


def run(
    duration: float = 5.0,
    rounds: int = ROUNDS,
    endpoints: int = 1000,
    changes: int = 100,
    load: bool = True,
    profile: Path | None = None,
) -> str:
    from aimesh.mesh import runtime

    res = runtime.run(_run(duration, rounds, endpoints, changes, load, profile))
    print(f"done in {res.total_seconds:.0f} s", flush=True)
    return report(res)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.xds")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("load", help="(internal) the load process the run starts")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per load cell")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="of A's cells (medians)")
    parser.add_argument("--endpoints", type=int, default=1000, help="registered for B (<= 1000)")
    parser.add_argument("--changes", type=int, default=100, help="of each kind, in B")
    parser.add_argument(
        "--write", action="store_true", help="also rewrite its section of docs/benchmarks.md"
    )
    parser.add_argument("--no-load", dest="load", action="store_false", help="only part B")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="py-spy the control plane during B (collapsed stacks into FILE)",
    )
    args = parser.parse_args(argv)
    if args.command == "load":
        from aimesh.mesh import runtime

        runtime.run(_child())
        return 0
    if not 1 <= args.endpoints <= 1000:
        parser.error("--endpoints must be 1..1000 (10 services x 100, bench/control_plane.py's)")
    section = run(args.duration, args.rounds, args.endpoints, args.changes, args.load, args.profile)
    print(section)
    if args.write:
        from .__main__ import _update

        _update("xds", section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
