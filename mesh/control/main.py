"""`aimesh control-plane`: serve the registry, config and status until SIGTERM; SIGHUP
reloads the mesh CA from --ca-dir (after `aimesh identity root prepare|rotate`)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf import json_format

from ..admin import AdminServer, Response, json_response, text_response
from ..observability.metrics import control_plane_registry, metrics_route
from ..observability.tracing import TracingFlags, setup_tracing, shutdown_tracing
from ..serving import host_of, stop_on_signals
from .dashboard import dashboard
from .server import ControlPlane, ControlPlaneServer

if TYPE_CHECKING:
    from ..security.cli import CaFlags
    from .identity import IdentityService
from .store import EmbeddedStore, Store


def default_store(env: Mapping[str, str] = os.environ) -> str:
    state = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return f"sqlite:{Path(state) / 'aimesh' / 'control-plane.db'}"


def make_store(spec: str) -> Store:
    """'memory', 'sqlite:PATH' or 'etcd://HOST:PORT[,HOST:PORT...][/PREFIX]' (ValueError
    otherwise)."""
    if spec == "memory":
        return EmbeddedStore(None)
    if spec.startswith("sqlite:"):
        path = spec.removeprefix("sqlite:")
        if not path:
            raise ValueError("--store sqlite:PATH needs a file path")
        return EmbeddedStore(Path(path).expanduser())
    if spec.startswith("etcd://"):
        from .etcd_store import EtcdStore

        # etcd://HOST:PORT[,HOST:PORT...][/PREFIX]: several meshes may share one etcd.
        endpoints, slash, prefix = spec.removeprefix("etcd://").partition("/")
        if not endpoints:
            raise ValueError("--store etcd://HOST:PORT needs an address")
        return EtcdStore(endpoints, f"/{prefix}" if slash and prefix else "/aimesh/v1/")
    raise ValueError(
        f"--store {spec!r}: use 'memory', 'sqlite:PATH' (the default, {default_store()}) "
        "or 'etcd://HOST:PORT[,HOST:PORT...]'"
    )


def admin_routes(cp: ControlPlane, server: ControlPlaneServer) -> dict[str, object]:
    def topology() -> Response:
        return json_response(
            json_format.MessageToDict(
                server.status.topology(), always_print_fields_with_no_presence=True
            )
        )

    def catalog() -> Response:
        return json_response(json_format.MessageToDict(cp.catalog.snapshot.to_proto()))

    def config() -> Response:
        if cp.config is None:
            return text_response("no config applied yet\n", 404)
        return text_response(cp.config.document)

    return {
        "/ready": lambda: text_response("ready\n"),
        "/metrics": metrics_route(control_plane_registry(cp, server.xds)),
        "/topology": topology,
        "/": dashboard,  # the live topology page, polling /topology
        "/dashboard": dashboard,
        "/catalog": catalog,
        "/config": config,
        "/xds": lambda: json_response(server.xds.describe()),  # streams, versions, NACKs
    }


def reload_ca(identity: IdentityService | None, ca_dir: str | None, trust_domain: str) -> None:
    """SIGHUP: the CA directory again (a root rotation step); a directory that does not
    load is rejected whole and the running CA stays."""
    if identity is None or ca_dir is None:
        message = "SIGHUP ignored: no --ca-dir"
    else:
        try:
            change = identity.reload_ca(ca_dir, trust_domain)
            message = f"reloaded the mesh CA from {ca_dir}: {change}"
        except (ValueError, OSError) as exc:
            message = f"CA reload rejected, keeping the current CA: {exc}"
    print(f"aimesh control-plane: {message}", file=sys.stderr, flush=True)


async def run(
    listen: str,
    store_spec: str,
    admin: str | None,
    dns: str | None,
    mesh_domain: str,
    tracing: TracingFlags | None = None,
    ca: CaFlags | None = None,  # --ca-dir, --trust-domain, --cert-lifetime, --secure-listen
) -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="aimesh control-plane: %(levelname)s %(message)s",
    )
    try:
        store = make_store(store_spec)
    except ValueError as exc:
        print(f"aimesh control-plane: {exc}", file=sys.stderr)
        return 2
    cp = ControlPlane(store)
    # Spans of the API's unary calls, when --otlp-endpoint or OTEL_* name a collector.
    provider = setup_tracing("aimesh-control-plane", None, os.environ, tracing)
    identity = None
    if ca is not None:
        from .identity import IdentityService, load_or_create_ca

        try:
            authority, created = load_or_create_ca(ca.ca_dir, ca.trust_domain)
            identity = IdentityService(authority, lifetime=ca.cert_lifetime)
        except ValueError as exc:
            print(f"aimesh control-plane: --ca-dir {ca.ca_dir}: {exc}", file=sys.stderr)
            return 2
        print(
            f"aimesh control-plane: mesh CA for {authority.trust_domain} "
            f"{'created in' if created else 'loaded from'} {ca.ca_dir}",
            file=sys.stderr,
            flush=True,
        )
    server = ControlPlaneServer(
        cp,
        tracer_provider=provider,
        identity=identity,
        mtls_mode=ca.mtls_mode if ca else "PERMISSIVE",
    )
    try:
        port = await server.start(listen, ca.secure_listen if ca else None)
    except Exception as exc:  # the store could not open: say which and why, then exit
        print(f"aimesh control-plane: cannot start on {store.description}: {exc}", file=sys.stderr)
        return 1
    parts = [
        f"aimesh control-plane listening on {host_of(listen)}:{port}",
        f"store {store.description}",
    ]
    if server.secure_port and ca and ca.secure_listen:
        parts.insert(1, f"mTLS on {host_of(ca.secure_listen)}:{server.secure_port}")
        if server.guard is not None:
            parts.insert(2, "STRICT: plaintext serves only Identity, health and reflection")
    admin_server = None
    if admin:
        admin_server = AdminServer(admin_routes(cp, server))  # type: ignore[arg-type]
        admin_port = await admin_server.start(admin)
        parts.append(f"admin on http://{host_of(admin)}:{admin_port}/topology")
    dns_server = None
    if dns:
        from .dns import DnsServer

        dns_server = DnsServer(lambda: cp.catalog.snapshot, domain=mesh_domain)
        dns_port = await dns_server.start(dns)
        parts.append(f"dns on {host_of(dns)}:{dns_port} for *.{mesh_domain}")
    snap = cp.catalog.snapshot
    parts.append(
        f"{len(snap.instances)} instances (catalog v{snap.version}), "
        f"config {f'v{cp.config.version}' if cp.config else 'none'}"
    )
    print("; ".join(parts), flush=True)
    stop = asyncio.Event()
    stop_on_signals(stop)
    asyncio.get_running_loop().add_signal_handler(
        signal.SIGHUP, reload_ca, identity, ca.ca_dir if ca else None, ca.trust_domain if ca else ""
    )
    await stop.wait()
    print("aimesh control-plane: stopping", file=sys.stderr, flush=True)
    if dns_server is not None:
        await dns_server.stop()
    if admin_server is not None:
        await admin_server.stop()
    await server.stop()
    await asyncio.to_thread(shutdown_tracing, provider)  # the last spans
    print("aimesh control-plane: stopped", file=sys.stderr, flush=True)
    return 0
