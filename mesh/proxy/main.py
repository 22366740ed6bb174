"""`aimesh proxy`: run the proxy until SIGTERM; SIGHUP reloads the config file."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..admin import AdminServer, json_response, text_response
from ..config import MeshConfig, load_dict, load_file, load_text, summary
from ..control.catalog import Snapshot
from ..control.client import MeshState, MeshWatcher, Reporter
from ..errors import ConfigError
from ..observability.metrics import metrics_route, proxy_registry
from ..observability.tracing import proxy_tracing, shutdown_tracing
from ..security.mtls import stats as mtls_stats
from ..serving import stop_on_signals
from .cluster import EndpointAddr
from .server import Proxy, ProxySettings

log = logging.getLogger("aimesh.proxy")


def parse_endpoint_flag(text: str) -> tuple[str, EndpointAddr]:
    """'gpt4-gateway=127.0.0.1:9000' or 'gpt4-gateway=127.0.0.1:9000@3' (weight 3)."""
    service, sep, rest = text.partition("=")
    if not sep or not service or not rest:
        raise ValueError(f"--endpoint {text!r}: expected SERVICE=HOST:PORT[@WEIGHT]")
    address, _, weight = rest.partition("@")
    if ":" not in address:
        raise ValueError(f"--endpoint {text!r}: {address!r} is not HOST:PORT")
    try:
        w = int(weight) if weight else 1
    except ValueError:
        raise ValueError(f"--endpoint {text!r}: weight {weight!r} is not a whole number") from None
    if w < 1:
        raise ValueError(f"--endpoint {text!r}: weight must be at least 1")
    return service, EndpointAddr(address, w)


def endpoints_from_flags(flags: list[str]) -> dict[str, list[EndpointAddr]]:
    out: dict[str, list[EndpointAddr]] = defaultdict(list)
    for f in flags:
        service, ep = parse_endpoint_flag(f)
        out[service].append(ep)
    return dict(out)


@dataclass(frozen=True)
class ControlPlaneSettings:
    address: str  # HOST:PORT[,HOST:PORT...]
    cache: Path | None
    proxy_id: str


def default_cache(listen: str, env: Mapping[str, str] = os.environ) -> Path:
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    name = "".join(c if c.isalnum() else "-" for c in listen)
    return Path(base) / "aimesh" / f"proxy-{name}.json"


EMPTY = {
    "apiVersion": "mesh.ai/v1",
    "kind": "ServiceMesh",
    "metadata": {"name": "empty"},
    "spec": {},
}


def discovered(state: MeshState) -> tuple[dict[str, list[EndpointAddr]], dict[str, str]]:
    """The catalog as the proxy uses it: serving instances' endpoints by service, and the
    models they serve."""
    endpoints: dict[str, list[EndpointAddr]] = {}
    for inst in state.instances.values():
        if inst.serving:
            endpoints.setdefault(inst.service, []).append(
                EndpointAddr(inst.address, inst.weight, inst.zone)
            )
    models = Snapshot(state.catalog_version, state.instances).models()
    return endpoints, models


def follow(proxy: Proxy, mesh: ControlPlaneSettings, fallback: MeshConfig) -> MeshWatcher:
    """Wires a watcher to the proxy: config and catalog changes become live as they come."""

    def on_config(state: MeshState) -> None:
        try:
            config = load_text(
                state.config_document, source=state.config_source or "<control-plane>"
            )
        except ConfigError as exc:
            log.error(
                "control plane config v%d rejected, keeping the live one: %s",
                state.config_version,
                exc,
            )
            raise
        proxy.apply(config)
        proxy.config_version = state.config_version
        log.info("config v%d (%s) live", state.config_version, config.metadata.name)

    def on_catalog(state: MeshState) -> None:
        endpoints, models = discovered(state)
        proxy.set_discovered(endpoints, models)
        proxy.catalog_version = state.catalog_version

    # With an identity and --secure-control-plane, over the control plane's mTLS port.
    return MeshWatcher(
        mesh.address,
        on_catalog=on_catalog,
        on_config=on_config,
        cache=mesh.cache,
        identity=proxy.identity,
    )


async def run(
    config_path: str | None,
    settings: ProxySettings,
    admin: str | None,
    grace: float,
    mesh: ControlPlaneSettings | None = None,
) -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="aimesh proxy: %(levelname)s %(message)s",
    )
    try:
        config = load_file(config_path) if config_path else load_dict(EMPTY, source="<empty>")
    except ConfigError as exc:
        print(f"aimesh proxy: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"aimesh proxy: cannot read {config_path}: {exc.strerror}", file=sys.stderr)
        return 2
    for w in config.warnings:
        print(f"aimesh proxy: warning: {w}", file=sys.stderr)
    proxy = Proxy(settings)
    # Tracing from flags, the config file and OTEL_* (read once: reloads do not change it).
    tracer_provider = proxy_tracing(proxy, config.observability.tracing, os.environ)
    registry = proxy_registry(proxy) if admin else None  # /metrics (its sink: before start)
    await proxy.start(config)
    watcher = reporter = None
    if mesh is not None:
        watcher = follow(proxy, mesh, config)
        watcher.load_cache()
        watcher.start()
        reporter = Reporter(
            mesh.address, mesh.proxy_id, proxy.endpoint_reports, identity=proxy.identity
        )
        reporter.start()
    # Everything allocated so far (modules, descriptors, config) lives as long as the
    # process: keep it out of the garbage collector's scans, which otherwise show up as
    # millisecond pauses in the latency tail.
    gc.collect()
    gc.freeze()
    admin_server = None
    if admin:
        admin_server = AdminServer(
            {
                "/ready": lambda: text_response("ready\n"),
                "/metrics": metrics_route(registry),
                "/clusters": lambda: json_response(proxy.snapshot()),
                "/stats": lambda: json_response({**proxy.counters.snapshot(), **mtls_stats(proxy)}),
                "/config": lambda: text_response(
                    summary(proxy.config) + "\n" if proxy.config else "no config\n"
                ),
                "/mesh": lambda: json_response(
                    {
                        "control_plane": (
                            ",".join(watcher.replicas.addresses) if watcher else None
                        ),
                        "control_plane_mtls": watcher.replicas.secure if watcher else False,
                        "connected": watcher.connected.is_set() if watcher else False,
                        "catalog_version": proxy.catalog_version,
                        "config_version": proxy.config_version,
                        "reconnects": watcher.reconnects if watcher else 0,
                    }
                ),
            }
        )
        await admin_server.start(admin)

    loop = asyncio.get_running_loop()

    def reload() -> None:
        if config_path is None:
            print("aimesh proxy: SIGHUP ignored: no --config file", file=sys.stderr, flush=True)
            return
        try:
            new = load_file(config_path)
        except (ConfigError, OSError) as exc:
            # Rejected whole: the running config stays live.
            print(
                f"aimesh proxy: reload rejected, keeping the previous config: {exc}",
                file=sys.stderr,
                flush=True,
            )
            return
        proxy.apply(new)
        print(f"aimesh proxy: reloaded {config_path}", file=sys.stderr, flush=True)

    loop.add_signal_handler(signal.SIGHUP, reload)
    stop = asyncio.Event()
    stop_on_signals(stop)
    host = settings.listen.rpartition(":")[0]
    parts = [f"aimesh proxy ({settings.mode}) listening on {host}:{proxy.ports['listen']}"]
    if "inbound" in proxy.ports:
        parts.append(
            f"inbound on {settings.inbound_listen.rpartition(':')[0]}:"  # type: ignore[union-attr]
            f"{proxy.ports['inbound']} -> {settings.local_app}"
        )
    if admin_server is not None:
        parts.append(f"admin on http://{admin.rpartition(':')[0]}:{admin_server.port}/clusters")  # type: ignore[union-attr]
    clusters = ", ".join(f"{c.name} ({len(c.upstreams)})" for c in proxy.clusters.values())
    source = Path(config_path).name if config_path else "none"
    if watcher is not None:
        secure = " (mTLS)" if watcher.replicas.secure else ""
        parts.append(f"control plane {','.join(watcher.replicas.addresses)}{secure}")
    if settings.audit is not None:
        parts.append(f"audit to {settings.audit.path}")
    print("; ".join(parts) + f"; config {source}: {clusters or 'no services yet'}", flush=True)
    await stop.wait()
    if reporter is not None:
        await reporter.stop()
    if watcher is not None:
        await watcher.stop()
    print(f"aimesh proxy: draining (grace {grace:g}s)", file=sys.stderr, flush=True)
    if admin_server is not None:
        await admin_server.stop()
    cut = await proxy.stop(grace)
    await asyncio.to_thread(shutdown_tracing, tracer_provider)  # the last spans
    note = f" ({cut} calls cut short after the grace period)" if cut else ""
    print(f"aimesh proxy: stopped{note}", file=sys.stderr, flush=True)
    return 0
