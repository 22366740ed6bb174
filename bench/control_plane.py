"""Control-plane change propagation: 1,000 instances, 100 watchers, one change at a time.

    python -m bench control_plane          (also rewrites its section of docs/benchmarks.md)
    python -m bench.control_plane [--changes N] [--watchers N] [--proxies N] [--no-reports]
                                  [--samples FILE] [--profile DIR] [--write]

The claim under test: "a new instance gets traffic, a removed one gets none, a config
change applies, all within 100 ms p99 of the change, with 100 watchers and 1,000
instances".

Processes, all on 127.0.0.1:

- the control plane: `aimesh control-plane --listen 127.0.0.1:0 --store memory`;
- this one (the driver): registers 1,000 instances through the Registry API (10 services
  x 100 instances with made-up 10.x.y.z addresses that nothing is ever sent to, each with
  its service's model), keeps their leases alive over ONE KeepAlive stream (each lease
  renewed every ttl/3, the renewals spread evenly over that interval, as 1,000 separate
  instances would send them), applies a ServiceMesh document, and then makes the changes;
- a watcher process (`python -m bench.control_plane watchers ...`): 100 `MeshWatcher`s
  (no cache), each on its own connection, as 100 proxies would have;
- 3 proxy processes (the same command with `--proxies 1`): a real `Proxy` in each,
  following the control plane through `follow(...)` as `aimesh proxy --control-plane`
  does.

Each change is made once every observer has reported the previous one (no fixed sleeps),
plus a short gap: (1) Register a new instance into one of the services, (2) Deregister
it, (3) Config.Apply a new document (only metadata.name differs). The observers record
`time.monotonic()` (CLOCK_MONOTONIC, one clock for every process on the machine) when
they see the change: a watcher in its on_catalog / on_config callback; a proxy once the
new endpoint is in `proxy.clusters[service].upstreams` (it gets traffic), once it is gone
from there, and once `proxy.config.metadata.name` is the new name. Latency is that time
minus the time taken just before the RPC was sent. The observers send their timestamps to
the driver as JSON lines on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import math
import os
import platform
import resource
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import grpc
import grpc.aio

from aimesh.control.v1 import control_plane_pb2 as pb
from aimesh.control.v1 import control_plane_pb2_grpc as pb_grpc
from aimesh.mesh import procs, runtime

from .loadgen import cpu_seconds

ROOT = Path(__file__).resolve().parents[1]

# (service, the model its instances serve)
SERVICES: list[tuple[str, str]] = [
    ("gpt4-gateway", "gpt-4"),
    ("gpt4o-gateway", "gpt-4o"),
    ("claude-gateway", "claude-3-5-sonnet"),
    ("llama-70b", "llama-3-70b"),
    ("llama-8b", "llama-3-8b"),
    ("mistral-large", "mistral-large"),
    ("mixtral", "mixtral-8x22b"),
    ("qwen-72b", "qwen-2-72b"),
    ("embeddings", "text-embedding-3-large"),
    ("rerank", "rerank-v3"),
]
PER_SERVICE = 100
TTL = 30.0  # seconds; renewed every TTL / 3
REGISTER_CONCURRENCY = 8
TARGET = 0.100  # seconds, p99
WATCHERS = 100
PROXIES = 3
CHANGES = 100  # of each kind
GAP = 0.03  # seconds between one change being seen everywhere and the next
WAIT = 10.0  # seconds an observer may take to report a change before the run fails
FLUSH = 0.005  # seconds an observer holds its records before writing them out
OTHERS_LIMIT = 0.1  # cores other processes may use before the figures are called disturbed
ALGORITHMS = ["least_connections", "load_aware", "round_robin", "latency", "random"]
ZONES = ["us-east-1a", "us-east-1b", "us-east-1c"]


# -- what is registered and applied --------------------------------------------------------


def instance(k: int, j: int) -> pb.Instance:
    """Instance j of service k: a made-up address nothing is ever sent to."""
    service, model = SERVICES[k]
    return pb.Instance(
        service=service,
        address=f"10.{10 + k}.{j // 200}.{10 + j % 200}:8000",
        instance_id=f"{service}-{j:03d}",
        models=[model],
        version="v2" if j % 4 == 0 else "v1",
        zone=ZONES[j % len(ZONES)],
        weight=2 if j % 5 == 0 else 1,
        labels={"pool": f"pool-{j % 4}", "gpu": "h100" if j % 2 else "a100", "team": "infer"},
    )


def probe_service(i: int) -> str:
    return SERVICES[i % len(SERVICES)][0]


def probe_address(i: int) -> str:
    return f"10.99.{i // 200}.{10 + i % 200}:8000"


def probe_key(i: int) -> tuple[str, str]:
    return (probe_service(i), f"probe-{i}")


def probe(i: int) -> pb.Instance:
    """Change i's new instance: one more instance of an existing service, same model."""
    k = i % len(SERVICES)
    return pb.Instance(
        service=SERVICES[k][0],
        address=probe_address(i),
        instance_id=probe_key(i)[1],
        models=[SERVICES[k][1]],
        version="v3",
        zone=ZONES[i % len(ZONES)],
        labels={"pool": "scale-up", "gpu": "h100", "team": "infer"},
    )


def mesh_document(name: str) -> str:
    """A ServiceMesh document of realistic size (about 5 KB): every service declared with
    its load balancer, breakers on some, four traffic policies. Only `name` varies."""
    lines = [
        "apiVersion: mesh.ai/v1",
        "kind: ServiceMesh",
        "metadata:",
        f"  name: {name}",
        "  namespace: prod",
        "  labels: {team: platform, source: bench}",
        "spec:",
        "  services:",
    ]
    for k, (service, model) in enumerate(SERVICES):
        lines += [
            f"    - name: {service}",
            f"      models: [{model}]",
            "      loadBalancer:",
            f"        algorithm: {ALGORITHMS[k % len(ALGORITHMS)]}",
            "        # The instances' addresses are made up: nothing to probe.",
            "        healthCheck: {enabled: false}",
            "        outlierDetection:",
            "          consecutiveErrors: 5",
            "          baseEjectionTime: 30s",
            "          maxEjectionPercent: 34%",
        ]
        if k % 2 == 0:
            lines += [
                "      circuitBreaker:",
                "        enabled: true",
                "        errorThreshold: 50%",
                "        minRequests: 20",
                "        window: 10s",
                "        maxRequests: 2048",
                "        maxPending: 2048",
            ]
        lines.append("      timeout: 120s")
    lines += [
        "  trafficPolicies:",
        "    - name: gpt4-canary",
        "      match: {models: [gpt-4]}",
        "      routes:",
        "        - {destination: gpt4-gateway, weight: 90}",
        "        - {destination: gpt4o-gateway, weight: 10}",
        "      backups: [claude-gateway]",
        "      retry: {attempts: 2, retryOn: [UNAVAILABLE], backoff: {base: 25ms, max: 250ms}}",
        "    - name: llama-ab",
        "      match:",
        "        models: [llama-3-70b]",
        "        headers: {x-ab-group: b}",
        "      routes:",
        "        - {destination: llama-70b, weight: 50}",
        "        - {destination: qwen-72b, weight: 50}",
        "      timeout: 60s",
        "    - name: embeddings",
        "      match: {models: [text-embedding-3-large]}",
        "      routes: [{destination: embeddings}]",
        "      hedge: {delay: 50ms, attempts: 2}",
        "    - name: default",
        "      routes: [{destination: claude-gateway}]",
        "      backups: [mistral-large, llama-8b]",
        "  security:",
        "    mtls: {mode: DISABLE}",
    ]
    return "\n".join(lines) + "\n"


# -- the observers (the child process) -----------------------------------------------------


class _Recorder:
    """Timestamps observations and writes them to stdout in small batches."""

    def __init__(self, loop: asyncio.AbstractEventLoop, out: TextIO) -> None:
        self.loop = loop
        self.out = out
        self.pending: list[list[Any]] = []
        self.handle: asyncio.TimerHandle | None = None

    def add(self, source: str, kind: str, key: int, extra: Any = None) -> None:
        self.pending.append([source, kind, key, time.monotonic(), extra])
        if self.handle is None:
            # Written a moment later, so a change's observers are not slowed by the writes.
            self.handle = self.loop.call_later(FLUSH, self.flush)

    def send(self, message: dict[str, Any]) -> None:
        self.out.write(json.dumps(message) + "\n")
        self.out.flush()

    def flush(self) -> None:
        self.handle = None
        if self.pending:
            records, self.pending = self.pending, []
            self.send({"r": records})


class _Tracker:
    """Which probe change an observer expects next: add i, then remove i, then add i+1."""

    def __init__(self) -> None:
        self.i = 0
        self.adding = True

    def step(self, present: Callable[[int], bool]) -> list[tuple[str, int]]:
        seen: list[tuple[str, int]] = []
        while True:
            here = present(self.i)
            if self.adding and here:
                seen.append(("add", self.i))
                self.adding = False
            elif not self.adding and not here:
                seen.append(("remove", self.i))
                self.adding = True
                self.i += 1
            else:
                return seen


def _own_connection(f: _Follower, target: str) -> None:
    """grpc shares one connection among the channels of a process that have the same
    target and options; 100 proxies would have 100 connections, so each watcher gets its
    own. (MeshWatcher and Reporter open their channels lazily through `replicas`, so it is
    set there; a proxy's watcher and reporter share one connection, as in `aimesh proxy`.)"""
    from aimesh.mesh.control.client import CHANNEL_OPTIONS

    channel = grpc.aio.insecure_channel(
        target, options=[*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    )
    f.watcher.replicas._channels[target] = channel
    if f.reporter is not None:
        f.reporter.replicas._channels[target] = channel


@dataclass
class _Follower:
    source: str
    watcher: Any  # MeshWatcher
    catalog_at: float = 0.0  # first catalog callback
    config_at: float = 0.0  # first config callback
    instances: Callable[[], int] = lambda: 0
    reporter: Any = None  # Reporter, with --reports

    @property
    def ready(self) -> bool:
        return bool(self.catalog_at and self.config_at)


async def _observe(target: str, watchers: int, proxies: int, first: int, reports: bool) -> None:
    from aimesh.mesh.config import load_text
    from aimesh.mesh.control.client import MeshState, MeshWatcher, Reporter
    from aimesh.mesh.proxy.main import ControlPlaneSettings, follow
    from aimesh.mesh.proxy.server import Proxy, ProxySettings

    loop = asyncio.get_running_loop()
    go = asyncio.Event()
    stop = asyncio.Event()

    def stdin() -> None:
        # The driver writes "go" when the catalog is in place, and closes stdin to stop
        # this process (a driver that dies closes it too).
        if sys.stdin.readline().strip() == "go":
            loop.call_soon_threadsafe(go.set)
            sys.stdin.read()
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=stdin, daemon=True).start()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    rec = _Recorder(loop, sys.stdout)
    followers: list[_Follower] = []

    def watcher(n: int) -> _Follower:
        tracker = _Tracker()
        f = _Follower(f"w{n}", None)

        def on_catalog(state: MeshState) -> None:
            f.catalog_at = f.catalog_at or time.monotonic()
            for kind, i in tracker.step(lambda i: probe_key(i) in state.instances):
                rec.add(f.source, kind, i)

        def on_config(state: MeshState) -> None:
            f.config_at = f.config_at or time.monotonic()
            rec.add(f.source, "config", state.config_version)

        f.watcher = MeshWatcher(target, on_catalog=on_catalog, on_config=on_config)
        f.instances = lambda: len(f.watcher.state.instances)
        if reports:
            cache: list[Any] = [-1, []]

            def collect() -> list[pb.EndpointReport]:
                # What a proxy routing to every service reports: each endpoint it knows.
                state = f.watcher.state
                if cache[0] != state.catalog_version:
                    cache[:] = [
                        state.catalog_version,
                        [
                            pb.EndpointReport(
                                service=i.service, address=i.address, requests=0, healthy=True
                            )
                            for i in state.instances.values()
                        ],
                    ]
                return list(cache[1])

            f.reporter = Reporter(target, f"bench-watcher-{n}", collect)
        return f

    live: list[Proxy] = []

    async def proxy(n: int) -> _Follower:
        # Started with the document the control plane serves (what `aimesh proxy --config
        # mesh.yaml --control-plane ...` does), so no cluster is ever built with health
        # checks on against the made-up addresses.
        config = load_text(mesh_document("bench-0"), source="<bench>")
        p = Proxy(ProxySettings(listen="127.0.0.1:0"))
        await p.start(config)
        live.append(p)
        w = follow(p, ControlPlaneSettings(target, None, f"bench-proxy-{n}"), config)
        f = _Follower(f"p{n}", w)
        tracker = _Tracker()
        inner_catalog, inner_config = w.on_catalog, w.on_config

        def present(i: int) -> bool:
            cluster = p.clusters.get(probe_service(i))
            return cluster is not None and probe_address(i) in cluster.upstreams

        def on_catalog(state: MeshState) -> None:
            inner_catalog(state)  # set_discovered: the clusters change here
            f.catalog_at = f.catalog_at or time.monotonic()
            for kind, i in tracker.step(present):
                rec.add(f.source, kind, i)

        def on_config(state: MeshState) -> None:
            inner_config(state)  # parses the document and applies it
            f.config_at = f.config_at or time.monotonic()
            assert p.config is not None
            rec.add(f.source, "config", state.config_version, p.config.metadata.name)

        w.on_catalog, w.on_config = on_catalog, on_config
        f.instances = lambda: sum(len(c.upstreams) for c in p.clusters.values())
        if reports:
            f.reporter = Reporter(target, f"bench-proxy-{n}", p.endpoint_reports)
        return f

    try:
        followers = [watcher(first + n) for n in range(watchers)]
        followers += [await proxy(first + n) for n in range(proxies)]
        for f in followers:
            _own_connection(f, target)
        if proxies:
            # As `aimesh proxy` does once started: what is allocated so far stays out of
            # the garbage collector's scans.
            gc.collect()
            gc.freeze()
        rec.send({"loaded": True})
        await asyncio.wait(
            [loop.create_task(go.wait()), loop.create_task(stop.wait())],
            return_when=asyncio.FIRST_COMPLETED,
        )
        if stop.is_set():
            return
        start = time.monotonic()
        for f in followers:
            f.watcher.start()
        while not all(f.ready for f in followers):
            if stop.is_set():
                return
            await asyncio.sleep(0.005)
        if watchers:
            # 100 watchers in one process hold 100 copies of the catalog where a proxy
            # holds one: keep them out of the collector's scans too, or its full
            # collections here would take 100 times a proxy's.
            gc.collect()
            gc.freeze()
        reporters = [f.reporter for f in followers if f.reporter is not None]
        for n, r in enumerate(reporters):
            # Proxies start at different times: their reports are spread over the interval.
            loop.call_later(n * r.interval / len(reporters), r.start)
        rec.send(
            {
                "ready": {
                    "start": start,
                    "at": {f.source: max(f.catalog_at, f.config_at) for f in followers},
                    "instances": {f.source: f.instances() for f in followers},
                    "reconnects": sum(f.watcher.reconnects for f in followers),
                }
            }
        )
        await stop.wait()
        rec.flush()
        rec.send({"final": {"reconnects": sum(f.watcher.reconnects for f in followers)}})
    finally:
        rec.flush()
        await asyncio.gather(*(f.watcher.stop() for f in followers), return_exceptions=True)
        await asyncio.gather(
            *(f.reporter.stop() for f in followers if f.reporter is not None),
            return_exceptions=True,
        )
        await asyncio.gather(*(p.stop(0) for p in live), return_exceptions=True)


def observe_main(target: str, watchers: int, proxies: int, first: int, reports: bool) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="observer: %(message)s")
    runtime.run(_observe(target, watchers, proxies, first, reports))
    return 0


# -- the driver ----------------------------------------------------------------------------


class _Signal:
    def __init__(self) -> None:
        self.current = asyncio.Event()

    def fire(self) -> None:
        old, self.current = self.current, asyncio.Event()
        old.set()


class Observers:
    """A child process of observers, and what it has reported."""

    def __init__(self, label: str, seen: Seen) -> None:
        self.label = label
        self.seen = seen
        self.proc: asyncio.subprocess.Process | None = None
        self.messages: dict[str, Any] = {}
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.reader: asyncio.Task[None] | None = None

    async def start(
        self,
        target: str,
        watchers: int,
        proxies: int,
        first: int = 0,
        *,
        reports: bool = False,
        profile: Path | None = None,
    ) -> None:
        """Starts the process; it connects nowhere until `go`."""
        python = [sys.executable]
        if profile is not None:
            python += ["-m", "cProfile", "-o", str(profile)]
        self.proc = await asyncio.create_subprocess_exec(
            *[*python, "-m", "bench.control_plane", "watchers", "--target", target],
            *["--watchers", str(watchers), "--proxies", str(proxies), "--first", str(first)],
            *(["--reports"] if reports else []),
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=self.stderr,
            start_new_session=True,
            limit=16 * 1024 * 1024,
        )
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for line in self.proc.stdout:
            msg = json.loads(line)
            if "r" in msg:
                for source, kind, key, at, extra in msg["r"]:
                    self.seen.add(source, kind, key, at, extra)
            else:
                self.messages.update(msg)
                self.seen.signal.fire()
        self.seen.signal.fire()  # wake waiters: the process is gone

    async def wait_for(self, message: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while message not in self.messages:
            event = self.seen.signal.current
            if not self.alive() or self.reader is None or self.reader.done():
                raise RuntimeError(f"the {self.label} process exited early:\n{self.tail()}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(
                    f"the {self.label} process sent no {message!r} in {timeout:g} s:\n"
                    + self.tail()
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), min(left, 0.5))
        return self.messages[message]

    async def go(self) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        await self.proc.stdin.drain()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid) if self.proc is not None else 0.0

    def tail(self, lines: int = 30) -> str:
        self.stderr.seek(0)
        return "".join(self.stderr.readlines()[-lines:])

    async def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            if proc.stdin is not None:
                proc.stdin.close()  # the child stops when its stdin closes
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self.reader is not None:  # it ends at the end of the output
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self.reader, 5)
        self.stderr.close()


class Seen:
    """(kind, key) -> {source: (monotonic time, extra)}, from every observer process."""

    def __init__(self) -> None:
        self.by_change: dict[tuple[str, int], dict[str, tuple[float, Any]]] = {}
        self.signal = _Signal()

    def add(self, source: str, kind: str, key: int, at: float, extra: Any) -> None:
        self.by_change.setdefault((kind, key), {}).setdefault(source, (at, extra))
        self.signal.fire()

    async def wait(
        self, kind: str, key: int, sources: set[str], children: Sequence[Observers]
    ) -> dict[str, tuple[float, Any]]:
        deadline = time.monotonic() + WAIT
        while True:
            event = self.signal.current
            got = self.by_change.get((kind, key), {})
            if sources <= got.keys():
                return got
            dead = [c.label for c in children if not c.alive()]
            left = deadline - time.monotonic()
            if dead or left <= 0:
                missing = sorted(sources - got.keys())
                why = f"the {', '.join(dead)} process exited" if dead else f"after {WAIT:g} s"
                tails = "\n".join(f"[{c.label}]\n{c.tail()}" for c in children)
                raise RuntimeError(
                    f"{kind} {key}: {len(missing)} observers never reported it ({why}): "
                    f"{', '.join(missing[:10])}\n{tails}"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), min(left, 0.5))


class KeepAlive:
    """One KeepAlive stream renewing every lease once per ttl/3, spread evenly over it."""

    def __init__(self, registry: Any, leases: list[int], ttl: float) -> None:
        self.registry = registry
        self.leases = leases
        self.interval = ttl / 3
        self.sent = 0
        self.renewed = 0
        self.not_found = 0
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        call: Any = self.registry.KeepAlive()
        reader = asyncio.get_running_loop().create_task(self._read(call))
        batch = 10
        pause = self.interval / max(1, math.ceil(len(self.leases) / batch))
        try:
            while True:
                for n in range(0, len(self.leases), batch):
                    for lease in self.leases[n : n + batch]:
                        await call.write(pb.KeepAliveRequest(lease_id=lease))
                        self.sent += 1
                    await asyncio.sleep(pause)
        finally:
            reader.cancel()
            call.cancel()

    async def _read(self, call: Any) -> None:
        while (response := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
            if response.found:
                self.renewed += 1
            else:
                self.not_found += 1

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.RpcError):
                await self.task


def _status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def rss_mib(pid: int) -> float:
    return int(_status(pid)["VmRSS"].split()[0]) / 1024


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@dataclass
class Kind:
    """One kind of change, all its samples (seconds)."""

    label: str
    rpc: list[float] = field(default_factory=list)
    watchers: list[float] = field(default_factory=list)  # one per watcher per change
    last_watcher: list[float] = field(default_factory=list)  # per change: the slowest watcher
    proxies: list[float] = field(default_factory=list)  # one per proxy per change
    # per change: (sent at, seconds since the measured phase began; RPC; slowest watcher;
    # slowest proxy)
    changes: list[tuple[float, float, float, float]] = field(default_factory=list)


@dataclass
class Result:
    watchers: int
    proxies: int
    changes: int
    reports: bool
    instances: int = 0
    register_seconds: float = 0.0
    watcher_sync: float = 0.0  # until all watchers had catalog and config
    watcher_sync_p50: float = 0.0
    proxy_sync: float = 0.0
    rss_start: float = 0.0
    rss_registered: float = 0.0
    rss_synced: float = 0.0
    rss_end: float = 0.0
    cp_cpu: float = 0.0  # seconds, during the measured phase
    observer_cpu: float = 0.0
    driver_cpu: float = 0.0
    other_cpu: float = 0.0  # seconds: processes outside the benchmark, same phase
    measured_seconds: float = 0.0
    measured_from: float = 0.0  # time.monotonic() when the measured phase began
    renewals: int = 0
    renewals_missed: int = 0
    sync_reconnects: int = 0  # watch streams that broke while the observers synced
    reconnects: int = 0  # ... and afterwards, while the changes were measured
    kinds: dict[str, Kind] = field(default_factory=dict)
    total_seconds: float = 0.0


async def _register_all(registry: Any, total: int) -> list[int]:
    todo = [(k, j) for j in range(PER_SERVICE) for k in range(len(SERVICES))][:total]
    leases: list[int] = []
    step = max(1, total // 5)

    async def worker() -> None:
        while todo:
            k, j = todo.pop()
            request = pb.RegisterRequest(instance=instance(k, j))
            request.ttl.FromNanoseconds(int(TTL * 1e9))
            response = await registry.Register(request, timeout=10)
            leases.append(response.lease_id)
            if len(leases) % step == 0:
                print(
                    f"  registering {total:,} instances ... {len(leases):,}/{total:,}", flush=True
                )

    await asyncio.gather(*(worker() for _ in range(REGISTER_CONCURRENCY)))
    return leases


def _pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(q * len(s)) - 1))]


def _ms(v: float) -> str:
    return f"{v * 1e3:.1f}"


async def _run(
    changes: int, watchers: int, proxies: int, reports: bool, profile: Path | None
) -> Result:
    res = Result(watchers, proxies, changes, reports)
    res.kinds = {
        "add": Kind("Register a new instance: it gets traffic"),
        "remove": Kind("Deregister it: it gets none"),
        "config": Kind("Config.Apply a new document: it applies"),
    }
    t_begin = time.monotonic()
    command = procs.aimesh_command("control-plane", "--listen", "127.0.0.1:0", "--store", "memory")
    if profile is not None:  # cProfile of the whole run (it slows the profiled processes)
        command[1:1] = ["-m", "cProfile", "-o", str(profile / "control-plane.prof")]
    cp = procs.start("control-plane", command)
    seen = Seen()
    children: list[Observers] = []
    channel: grpc.aio.Channel | None = None
    keepalive: KeepAlive | None = None
    try:
        print(f"control plane {cp.address} (pid {cp.pid}), store memory", flush=True)
        res.rss_start = rss_mib(cp.pid)
        # The observer processes start first (before this process opens a channel: grpc
        # warns about a fork while its threads run) and wait for "go".
        wchild = Observers("watchers", seen)
        children.append(wchild)
        await wchild.start(
            cp.address,
            watchers,
            0,
            reports=reports,
            profile=profile / "watchers.prof" if profile else None,
        )
        pchildren = [Observers(f"proxy {n}", seen) for n in range(proxies)]
        children += pchildren
        for n, c in enumerate(pchildren):
            await c.start(cp.address, 0, 1, first=n, reports=reports)
        for c in children:
            await c.wait_for("loaded", 60)

        channel = grpc.aio.insecure_channel(cp.address)
        await asyncio.wait_for(channel.channel_ready(), 10)
        # Any: grpc-stubs types the stubs as blocking; on an aio channel they are awaitable.
        registry: Any = pb_grpc.RegistryStub(channel)
        config: Any = pb_grpc.ConfigStub(channel)
        total = PER_SERVICE * len(SERVICES)
        t0 = time.monotonic()
        leases = await _register_all(registry, total)
        res.register_seconds = time.monotonic() - t0
        res.instances = len(leases)
        print(
            f"  registered {len(leases):,} in {res.register_seconds:.2f} s "
            f"({len(leases) / res.register_seconds:,.0f}/s, {REGISTER_CONCURRENCY} at a time)",
            flush=True,
        )
        keepalive = ka = KeepAlive(registry, leases, TTL)
        ka.start()
        await config.Apply(
            pb.ApplyConfigRequest(document=mesh_document("bench-0"), source="bench"), timeout=10
        )
        res.rss_registered = rss_mib(cp.pid)

        # The watchers first, on their own, so that their sync time is theirs alone.
        print(f"starting {watchers} MeshWatchers (one process) ...", flush=True)
        await wchild.go()
        ready = await wchild.wait_for("ready", 120)
        syncs = [at - ready["start"] for at in ready["at"].values()]
        res.watcher_sync, res.watcher_sync_p50 = max(syncs), _pct(syncs, 0.5)
        res.sync_reconnects += ready["reconnects"]
        wrong = {s: n for s, n in ready["instances"].items() if n != total}
        if wrong:
            raise RuntimeError(f"watchers synced with the wrong number of instances: {wrong}")
        print(
            f"  all {watchers} had the full catalog ({total:,} instances) and the config "
            f"{res.watcher_sync:.2f} s after they started (p50 {res.watcher_sync_p50:.2f} s)",
            flush=True,
        )
        sources = set(ready["at"])
        if pchildren:
            print(f"starting {proxies} proxies (one process each) ...", flush=True)
            for c in pchildren:
                await c.go()
            for c in pchildren:
                ready = await c.wait_for("ready", 120)
                res.proxy_sync = max(
                    res.proxy_sync, *(at - ready["start"] for at in ready["at"].values())
                )
                wrong = {s: n for s, n in ready["instances"].items() if n != total}
                if wrong:
                    raise RuntimeError(
                        f"a proxy synced with the wrong number of endpoints: {wrong}"
                    )
                sources |= set(ready["at"])
                res.sync_reconnects += ready["reconnects"]
            print(
                f"  all {proxies} had {total:,} endpoints in their clusters and the config "
                f"{res.proxy_sync:.2f} s after they started",
                flush=True,
            )
        res.rss_synced = rss_mib(cp.pid)
        await asyncio.sleep(0.5)  # let the startup settle

        print(f"measuring {changes} changes of each kind, one at a time ...", flush=True)
        cpu0 = cpu_seconds(cp.pid)
        ocpu0 = sum(c.cpu() for c in children)
        dcpu0, busy0 = self_cpu(), machine_busy()
        m0 = res.measured_from = time.monotonic()

        async def measure(kind: str, key: int | None, send: Callable[[], Any]) -> Any:
            """Makes one change and waits for every observer to see it; `key` None means
            the change is known by the version the response carries (a config)."""
            k = res.kinds[kind]
            t_send = time.monotonic()
            response = await send()
            k.rpc.append(time.monotonic() - t_send)
            got = await seen.wait(
                kind, int(response.version) if key is None else key, sources, children
            )
            ws = [got[s][0] - t_send for s in sources if s.startswith("w")]
            k.watchers += ws
            if ws:
                k.last_watcher.append(max(ws))
            ps = [got[s][0] - t_send for s in sources if s.startswith("p")]
            k.proxies += ps
            k.changes.append((t_send - m0, k.rpc[-1], max(ws, default=0), max(ps, default=0)))
            if ka.task is not None and ka.task.done():
                raise RuntimeError(f"the KeepAlive stream ended: {ka.task!r}")
            await asyncio.sleep(GAP)
            return got, response

        for i in range(changes):
            request = pb.RegisterRequest(instance=probe(i))
            request.ttl.FromNanoseconds(int(TTL * 1e9))
            _, reg = await measure("add", i, partial(registry.Register, request, timeout=10))
            remove = pb.DeregisterRequest(lease_id=reg.lease_id)
            await measure("remove", i, partial(registry.Deregister, remove, timeout=10))
            name = f"bench-{i + 1}"
            apply = pb.ApplyConfigRequest(document=mesh_document(name), source="bench")
            got, applied = await measure("config", None, partial(config.Apply, apply, timeout=10))
            names = {extra for s, (_, extra) in got.items() if s.startswith("p")}
            if names - {name}:
                raise RuntimeError(f"config v{applied.version}: proxies run {names}, not {name}")
            if (i + 1) % 10 == 0 or i + 1 == changes:
                line = "; ".join(
                    f"{kind} p99 {_ms(_pct(k.watchers, 0.99))} ms" for kind, k in res.kinds.items()
                )
                print(f"  change {i + 1}/{changes}: watchers so far: {line}", flush=True)
        res.measured_seconds = time.monotonic() - m0
        res.cp_cpu = cpu_seconds(cp.pid) - cpu0
        res.observer_cpu = sum(c.cpu() for c in children) - ocpu0
        res.driver_cpu = self_cpu() - dcpu0
        ours = res.cp_cpu + res.observer_cpu + res.driver_cpu
        res.other_cpu = max(0.0, machine_busy() - busy0 - ours)
        res.rss_end = rss_mib(cp.pid)
        res.renewals = ka.renewed
        res.renewals_missed = ka.not_found
        if ka.not_found:
            raise RuntimeError(f"{ka.not_found} lease renewals found no lease")
        for c in children:
            await c.stop()
            res.reconnects += c.messages.get("final", {}).get("reconnects", 0) - c.messages.get(
                "ready", {}
            ).get("reconnects", 0)
    finally:
        if keepalive is not None:
            await keepalive.stop()
        for c in children:
            await c.stop()
        if channel is not None:
            await channel.close(None)
        cp.terminate()
    res.total_seconds = time.monotonic() - t_begin
    return res


# -- the report ----------------------------------------------------------------------------


def report(res: Result) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    machine = f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}"
    n = res.changes
    missed: list[str] = []
    judged = 0
    rows = [
        "| change | seen by | samples | p50 ms | p99 ms | max ms | p99 ≤ 100 ms |",
        "|---|---|---|---|---|---|---|",
    ]

    def row(change: str, who: str, values: list[float], what: str = "") -> None:
        nonlocal judged
        p99 = _pct(values, 0.99)
        mark = ""
        if what:
            judged += 1
            mark = "yes" if p99 <= TARGET else "**no**"
            if p99 > TARGET:
                missed.append(f"{what} (p99 {_ms(p99)} ms)")
        rows.append(
            f"| {change} | {who} | {len(values):,} | {_ms(_pct(values, 0.5))} | {_ms(p99)} | "
            f"{_ms(max(values) if values else float('nan'))} | {mark} |"
        )

    rpcs = {"add": "Register", "remove": "Deregister", "config": "Config.Apply"}
    seen_by_proxy = {
        "add": "endpoint in the cluster",
        "remove": "endpoint gone",
        "config": "new config live",
    }
    for kind, k in res.kinds.items():
        row(k.label, f"each of {res.watchers} MeshWatchers", k.watchers, f"{kind}, watchers")
        row("", f"the last of the {res.watchers}, per change", k.last_watcher)
        if res.proxies:
            who = f"each of {res.proxies} proxies ({seen_by_proxy[kind]})"
            row("", who, k.proxies, f"{kind}, proxies")
        row("", f"the {rpcs[kind]} RPC's own round trip", k.rpc)
    if missed:
        verdict = f"missed by {len(missed)} of {judged} rows: {', '.join(missed)}"
    else:
        verdict = f"met by all {judged} rows"
    cpu_share = 100 * res.cp_cpu / max(res.measured_seconds, 1e-9)
    setup = [
        "| setup | |",
        "|---|---|",
        f"| register {res.instances:,} instances ({REGISTER_CONCURRENCY} Register calls at a "
        f"time, before any watcher) | {res.register_seconds:.2f} s "
        f"({res.instances / max(res.register_seconds, 1e-9):,.0f}/s) |",
        f"| initial sync: {res.watchers} MeshWatchers started at once, until every one had the "
        f"full catalog and the config | {res.watcher_sync:.2f} s (p50 "
        f"{res.watcher_sync_p50:.2f} s) |",
    ]
    if res.proxies:
        setup.append(
            f"| initial sync of {res.proxies} proxies (all {res.instances:,} endpoints in "
            f"their clusters, config live), after the watchers | {res.proxy_sync:.2f} s |"
        )
    setup += [
        f"| control plane RSS: started / {res.instances:,} registered / {res.watchers} "
        f"watchers and {res.proxies} proxies synced / at the end | {res.rss_start:.1f} / "
        f"{res.rss_registered:.1f} / {res.rss_synced:.1f} / {res.rss_end:.1f} MiB |",
        f"| control plane CPU during the measured phase ({3 * n} changes and everything else "
        f"it did, {res.measured_seconds:.1f} s) | {res.cp_cpu:.2f} s ({cpu_share:.0f}% of a "
        f"core; {1e3 * res.cp_cpu / max(3 * n, 1):.1f} ms per change) |",
        f"| CPU in the same phase: observer processes / this driver / processes outside "
        f"the benchmark | {res.observer_cpu:.2f} / {res.driver_cpu:.2f} / "
        f"{res.other_cpu:.2f} s ({res.other_cpu / max(res.measured_seconds, 1e-9):.2f} "
        f"cores) |",
        f"| lease renewals answered during the run (none may be missed) | "
        f"{res.renewals:,} ({res.renewals_missed} not found) |",
        f"| watch streams broken and resumed: during the initial sync / while measuring | "
        f"{res.sync_reconnects} / {res.reconnects} |",
    ]
    reports = (
        "Each watcher and proxy also reports its 1,000 endpoints to the control plane every "
        "2 s (Status.Report, as `aimesh proxy --control-plane` does)."
        if res.reports
        else "No Status.Report traffic: the watchers are bare MeshWatchers and the proxies run "
        "without a Reporter."
    )
    others = res.other_cpu / max(res.measured_seconds, 1e-9)
    disturbed = (
        [
            "",
            f"Processes outside the benchmark used {others:.2f} cores on average while it "
            "measured: these figures are disturbed; run it again on a quiet machine.",
        ]
        if others > OTHERS_LIMIT
        else []
    )
    return "\n".join(
        [
            f"Measured {stamp} on {machine}, with `python -m bench control_plane` "
            f"({res.total_seconds:.0f} s). {res.instances:,} instances ({len(SERVICES)} services "
            f"x {PER_SERVICE}), {res.watchers} MeshWatchers in one process, {res.proxies} "
            f"proxies in one process each, {n} changes of each kind one at a time. {reports} "
            "Latency is from just before the RPC was sent to the moment the observer saw the "
            "change, on the machine's one monotonic clock.",
            "",
            *rows,
            "",
            f"**Target, p99 ≤ 100 ms for every kind of change, watchers and proxies: {verdict}.**",
            *disturbed,
            "",
            *setup,
        ]
    )


def run(
    changes: int = CHANGES,
    watchers: int = WATCHERS,
    proxies: int = PROXIES,
    reports: bool = True,
    profile: Path | None = None,
    samples: Path | None = None,
) -> str:
    """Runs the benchmark; returns the markdown section for docs/benchmarks.md."""
    if profile is not None:
        profile.mkdir(parents=True, exist_ok=True)
    res = runtime.run(_run(changes, watchers, proxies, reports, profile))
    if samples is not None:
        samples.write_text(
            json.dumps(
                {
                    "measured_from": res.measured_from,
                    **{
                        kind: [
                            dict(zip(("at", "rpc", "last_watcher", "last_proxy"), c, strict=True))
                            for c in k.changes
                        ]
                        for kind, k in res.kinds.items()
                    },
                },
                indent=1,
            )
        )
    others = res.other_cpu / max(res.measured_seconds, 1e-9)
    note = f"; other processes used {others:.2f} cores meanwhile" if others > OTHERS_LIMIT else ""
    print(f"done in {res.total_seconds:.0f} s{note}", flush=True)
    return report(res)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.control_plane")
    sub = parser.add_subparsers(dest="command")
    child = sub.add_parser("watchers", help="(internal) the observer process the run starts")
    child.add_argument("--target", required=True)
    child.add_argument("--watchers", dest="n_watchers", type=int, default=WATCHERS)
    child.add_argument("--proxies", dest="n_proxies", type=int, default=0)
    child.add_argument("--first", type=int, default=0, help="number of the first observer")
    child.add_argument("--reports", action="store_true")
    parser.add_argument("--changes", type=int, default=CHANGES, help="of each kind")
    parser.add_argument("--watchers", type=int, default=WATCHERS)
    parser.add_argument("--proxies", type=int, default=PROXIES)
    parser.add_argument(
        "--write", action="store_true", help="also rewrite its section of docs/benchmarks.md"
    )
    parser.add_argument(
        "--no-reports",
        dest="reports",
        action="store_false",
        help="leave out what `aimesh proxy --control-plane` also does: report its endpoints "
        "to the control plane every 2 s (each watcher and proxy here does, by default)",
    )
    parser.add_argument(
        "--samples", type=Path, metavar="FILE", help="write every change's timings here (JSON)"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="run the control plane and the watcher process under cProfile, stats into DIR "
        "(slows them: for finding where the time goes, not for the figures)",
    )
    args = parser.parse_args(argv)
    if args.command == "watchers":
        return observe_main(args.target, args.n_watchers, args.n_proxies, args.first, args.reports)
    section = run(
        args.changes, args.watchers, args.proxies, args.reports, args.profile, args.samples
    )
    print(section)
    if args.write:
        from .__main__ import _update

        _update("control_plane", section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
