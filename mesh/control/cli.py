"""kubectl-style commands against the control plane: apply, get, status, deregister.

Exit codes: 0 done; 1 the control plane refused (invalid config, not found, conflict);
2 usage; 3 the control plane is unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import grpc
import grpc.aio
from google.protobuf import json_format

from aimesh.control.v1 import control_plane_pb2 as pb
from aimesh.control.v1 import control_plane_pb2_grpc as pb_grpc

from .client import control_plane_channel, resolve_target, targets

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
TLS_ENV = "AIMESH_TLS_DIR"


def add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--control-plane",
        default=None,
        metavar="ADDR",
        help="HOST:PORT of the control plane (default $AIMESH_CONTROL_PLANE, then 127.0.0.1:15010)",
    )
    p.add_argument(
        "--tls-dir",
        default=os.environ.get(TLS_ENV) or None,
        metavar="DIR",
        help="connect over mTLS with the certificate in DIR (from `aimesh identity issue`); "
        f"--control-plane is then the control plane's --secure-listen port (default ${TLS_ENV})",
    )
    p.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    apply = sub.add_parser("apply", help="apply a ServiceMesh YAML to the control plane")
    apply.add_argument("-f", "--file", required=True, help="the YAML file ('-' for stdin)")
    apply.add_argument("--dry-run", action="store_true", help="validate only; change nothing")
    apply.add_argument(
        "--expected-version",
        type=int,
        default=0,
        help="apply only if this is the live config version (optimistic locking)",
    )
    add_target(apply)

    get = sub.add_parser("get", help="show services, instances or the live config")
    get.add_argument("what", choices=["services", "instances", "config"])
    get.add_argument("--service", default="", help="instances of this service only")
    get.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    add_target(get)

    status = sub.add_parser("status", help="the mesh topology: services, instances, traffic")
    status.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=2.0,
        default=None,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until Ctrl-C",
    )
    add_target(status)

    dereg = sub.add_parser("deregister", help="remove an instance from the catalog now")
    dereg.add_argument("service", nargs="?", help="the instance's service")
    dereg.add_argument("instance", nargs="?", help="instance id or HOST:PORT")
    dereg.add_argument("--lease", type=int, default=0, help="or: the instance's lease id")
    add_target(dereg)


def _channel(args: argparse.Namespace) -> grpc.aio.Channel:
    # Commands talk to one replica: the first given; with --tls-dir, over mTLS the way
    # workloads do (ValueError when the directory holds no usable certificate).
    identity = None
    if args.tls_dir:
        from ..security.workload import load_tls_dir  # cryptography: only when asked for

        identity = load_tls_dir(args.tls_dir)
    return control_plane_channel(targets(resolve_target(args.control_plane))[0], identity)


def _failed(prog: str, exc: grpc.aio.AioRpcError, target: str, err: TextIO) -> int:
    code = exc.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        print(
            f"{prog}: cannot reach the control plane at {target} ({code.name}: {exc.details()})\n"
            "  hint: start one with `aimesh control-plane`, or point --control-plane / "
            "$AIMESH_CONTROL_PLANE at it (with --tls-dir: at its --secure-listen port)",
            file=err,
        )
        return EXIT_UNREACHABLE
    print(f"{prog}: {code.name}: {exc.details()}", file=err)
    return EXIT_REFUSED


def _read(path: str) -> str:
    return sys.stdin.read() if path == "-" else Path(path).read_text()


async def _apply(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        text = _read(args.file)  # a local file, before any network: blocking is fine
    except OSError as exc:
        print(f"aimesh apply: cannot read {args.file}: {exc.strerror}", file=err)
        return EXIT_USAGE
    source = "<stdin>" if args.file == "-" else Path(args.file).name
    async with _channel(args) as ch:
        stub = pb_grpc.ConfigStub(ch)
        try:
            r = await stub.Apply(
                pb.ApplyConfigRequest(
                    document=text,
                    source=source,
                    dry_run=args.dry_run,
                    expected_version=args.expected_version,
                ),
                timeout=args.timeout,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                print(
                    f"aimesh apply: rejected, the live config is unchanged\n{exc.details()}",
                    file=err,
                )
                return EXIT_REFUSED
            return _failed("aimesh apply", exc, resolve_target(args.control_plane), err)
    for w in r.warnings:
        print(f"warning: {w}", file=err)
    if args.dry_run:
        print(f"{source}: valid (dry run; live config v{r.version} unchanged)", file=out)
    elif r.changed:
        print(f"{source}: applied as config v{r.version}", file=out)
    else:
        print(f"{source}: unchanged (identical to live config v{r.version})", file=out)
    return EXIT_OK


def _table(rows: list[list[str]], out: TextIO) -> None:
    buf: list[str] = []
    _table_into(rows, buf)
    for line in buf:
        print(line, file=out)


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def _dump(message: Any, fmt: str, out: TextIO) -> None:
    data = json_format.MessageToDict(message)
    if fmt == "json":
        print(json.dumps(data, indent=2), file=out)
    else:
        import yaml

        print(yaml.safe_dump(data, sort_keys=False).rstrip(), file=out)


async def _get(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    async with _channel(args) as ch:
        try:
            if args.what == "config":
                cfg = await pb_grpc.ConfigStub(ch).Get(pb.GetConfigRequest(), timeout=args.timeout)
                if args.output != "table":
                    _dump(cfg, args.output, out)
                else:
                    applied = time.time() - cfg.applied_at.ToNanoseconds() / 1e9
                    print(
                        f"# config v{cfg.version} ({cfg.name}) from {cfg.source}, "
                        f"applied {_age(applied)} ago",
                        file=out,
                    )
                    print(cfg.document.rstrip(), file=out)
                return EXIT_OK
            snap = await pb_grpc.RegistryStub(ch).List(
                pb.ListRequest(service=args.service), timeout=args.timeout
            )
        except grpc.aio.AioRpcError as exc:
            return _failed("aimesh get", exc, resolve_target(args.control_plane), err)
    if args.output != "table":
        _dump(snap, args.output, out)
        return EXIT_OK
    now = time.time()
    if args.what == "instances":
        rows = [
            [
                "SERVICE",
                "INSTANCE",
                "ADDRESS",
                "MODELS",
                "VERSION",
                "ZONE",
                "WEIGHT",
                "SERVING",
                "AGE",
            ]
        ]
        for i in snap.instances:
            rows.append(
                [
                    i.service,
                    i.instance_id,
                    i.address,
                    ",".join(i.models) or "-",
                    i.version or "-",
                    i.zone or "-",
                    str(i.weight),
                    "yes" if i.serving else "NO",
                    _age(now - i.registered_at.ToNanoseconds() / 1e9),
                ]
            )
    else:
        by: dict[str, list[pb.Instance]] = {}
        for i in snap.instances:
            by.setdefault(i.service, []).append(i)
        rows = [["SERVICE", "INSTANCES", "SERVING", "MODELS", "VERSIONS"]]
        for name in sorted(by):
            items = by[name]
            rows.append(
                [
                    name,
                    str(len(items)),
                    str(sum(1 for i in items if i.serving)),
                    ",".join(sorted({m for i in items for m in i.models})) or "-",
                    ",".join(sorted({i.version for i in items if i.version})) or "-",
                ]
            )
    _table(rows, out)
    print(f"(catalog v{snap.version})", file=out)
    return EXIT_OK


def format_topology(t: pb.Topology) -> str:
    lines = [
        f"{t.healthy} Healthy · {len(t.services)} Services · "
        f"{_count(t.requests_per_minute)} Requests/min · {t.avg_latency_ms:.1f}ms Avg Latency · "
        f"{t.uptime * 100:.2f}% Uptime",
        f"(catalog v{t.catalog_version}, config v{t.config_version}, "
        f"{t.proxies} reporting prox{'y' if t.proxies == 1 else 'ies'})",
        "",
    ]
    rows = [["SERVICE", "HEALTHY", "REQ/MIN", "AVG LATENCY", "ERRORS", "UPTIME", "MODELS"]]
    for s in t.services:
        rows.append(
            [
                s.name,
                f"{s.healthy}/{s.total}",
                _count(s.requests_per_minute),
                f"{s.avg_latency_ms:.1f}ms",
                f"{s.error_rate * 100:.1f}%",
                f"{s.uptime * 100:.2f}%",
                ",".join(s.models) or "-",
            ]
        )
    buf: list[str] = []
    _table_into(rows, buf)
    lines += buf
    lines.append("")
    rows = [["SERVICE", "INSTANCE", "ADDRESS", "STATE", "REQ/MIN", "AVG LATENCY", "AGE"]]
    for s in t.services:
        for i in s.instances:
            rows.append(
                [
                    s.name,
                    i.instance_id,
                    i.address,
                    "healthy" if i.healthy else "UNHEALTHY",
                    _count(i.requests_per_minute),
                    f"{i.avg_latency_ms:.1f}ms",
                    _age(i.age_seconds),
                ]
            )
    buf = []
    _table_into(rows, buf)
    lines += buf
    return "\n".join(lines)


def _table_into(rows: list[list[str]], buf: list[str]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        buf.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _count(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return f"{n:.0f}"


async def _status(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    async with _channel(args) as ch:
        stub = pb_grpc.StatusStub(ch)
        while True:
            try:
                t = await stub.GetTopology(pb.TopologyRequest(), timeout=args.timeout)
            except grpc.aio.AioRpcError as exc:
                return _failed("aimesh status", exc, resolve_target(args.control_plane), err)
            if args.watch is not None and out.isatty():
                print("\033[H\033[2J", end="", file=out)  # clear the screen between frames
            print(format_topology(t), file=out, flush=True)
            if args.watch is None:
                return EXIT_OK
            print("", file=out)
            await asyncio.sleep(args.watch)


async def _deregister(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.lease:
        request = pb.DeregisterRequest(lease_id=args.lease)
        what = f"lease {args.lease}"
    elif args.service and args.instance:
        request = pb.DeregisterRequest(
            instance=pb.InstanceRef(service=args.service, instance_id=args.instance)
        )
        what = f"{args.service}/{args.instance}"
    else:
        print("aimesh deregister: give SERVICE INSTANCE (id or HOST:PORT), or --lease ID", file=err)
        return EXIT_USAGE
    async with _channel(args) as ch:
        try:
            r = await pb_grpc.RegistryStub(ch).Deregister(request, timeout=args.timeout)
        except grpc.aio.AioRpcError as exc:
            return _failed("aimesh deregister", exc, resolve_target(args.control_plane), err)
    print(f"deregistered {what} (catalog v{r.version})", file=out)
    return EXIT_OK


def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    handlers = {"apply": _apply, "get": _get, "status": _status, "deregister": _deregister}
    try:
        return asyncio.run(handlers[args.command](args, out, err))
    except ValueError as exc:
        print(f"aimesh {args.command}: {exc}", file=err)
        return EXIT_USAGE


def main(argv: Sequence[str], out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    parser = argparse.ArgumentParser(prog="aimesh")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv), out, err)
