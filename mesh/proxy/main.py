"""`aimesh proxy`: run the proxy until SIGTERM; SIGHUP reloads the config file."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from collections import defaultdict
from pathlib import Path

from ..admin import AdminServer, json_response, text_response
from ..config import load_file, summary
from ..errors import ConfigError
from ..serving import stop_on_signals
from .cluster import EndpointAddr
from .server import Proxy, ProxySettings


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


async def run(config_path: str, settings: ProxySettings, admin: str | None, grace: float) -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="aimesh proxy: %(levelname)s %(message)s",
    )
    try:
        config = load_file(config_path)
    except ConfigError as exc:
        print(f"aimesh proxy: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"aimesh proxy: cannot read {config_path}: {exc.strerror}", file=sys.stderr)
        return 2
    for w in config.warnings:
        print(f"aimesh proxy: warning: {w}", file=sys.stderr)
    proxy = Proxy(settings)
    await proxy.start(config)
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
                "/clusters": lambda: json_response(proxy.snapshot()),
                "/stats": lambda: json_response(proxy.counters.snapshot()),
                "/config": lambda: text_response(
                    summary(proxy.config) + "\n" if proxy.config else "no config\n"
                ),
            }
        )
        await admin_server.start(admin)

    loop = asyncio.get_running_loop()

    def reload() -> None:
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
    print("; ".join(parts) + f"; config {Path(config_path).name}: {clusters}", flush=True)
    await stop.wait()
    print(f"aimesh proxy: draining (grace {grace:g}s)", file=sys.stderr, flush=True)
    if admin_server is not None:
        await admin_server.stop()
    cut = await proxy.stop(grace)
    note = f" ({cut} calls cut short after the grace period)" if cut else ""
    print(f"aimesh proxy: stopped{note}", file=sys.stderr, flush=True)
    return 0
