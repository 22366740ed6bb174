"""A grpcio Inference client for the xDS tests, run as its own process, and the helper
that drives it from a test.

grpcio's xDS client is process-global and reads GRPC_XDS_BOOTSTRAP once, so a proxyless
client never runs inside the pytest process: each one is

    GRPC_XDS_BOOTSTRAP=FILE python -m tests.xds_grpc_client --target xds:///gpt4-gateway \\
        --calls 2000 --concurrency 8 [--method Generate|GenerateStream]

printing the same JSON lines as the Node client (tests/node/client.js), one a line:

    {"event":"ready"}                        once: the channel is READY (or a call succeeded)
    {"t":..,"instance":..,"code":0,"ms":..}  one per call, when it ends (`t` epoch ms, the
                                             `aimesh-instance` trailer, latency); streams add
                                             `tokens` and `chunks`; failures add `details`
    {"event":"summary","counts":{..},"errors":{..},"calls":N}

`--calls 0` calls until stdin closes or SIGTERM/SIGINT; the calls in flight then finish and
the summary is printed. Exit code 0 when the run finished (whatever the calls' statuses), 2
for bad arguments.

From a test, `GrpcClient.start(target, env=...)` (calls until stopped) and `run_calls(...)`
(n calls, then the summary) read these lines with the Node helper's reader
(tests/node_client.py: `NodeClient`, `CallRecord`, `Summary`), so one test helper reads both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

from . import node_client
from .node_client import NodeClient, Program, Summary

REPO = Path(__file__).resolve().parent.parent
INSTANCE_TRAILER = "aimesh-instance"
ERROR_PAUSE = 0.02  # after a failed call, so a broken channel is not spun on
METHODS = ("Generate", "GenerateStream")


# -- the helper (pytest side) -------------------------------------------------------------


# The runner as a Program: NodeClient, run_calls and client_options serve it as they serve
# client.js (same options, same lines).
PROGRAM = Program(
    "the grpcio client",
    (sys.executable, "-m", "tests.xds_grpc_client"),
    REPO,
    {"PYTHONUNBUFFERED": "1"},
)


class GrpcClient(NodeClient):
    """The grpcio client calling until stopped (`NodeClient` with this program)."""

    @classmethod
    def start(  # type: ignore[override]
        cls,
        target: str,
        env: Mapping[str, str] | None = None,
        *,
        calls: int = 0,
        **options: Any,
    ) -> Self:
        return super().start(target, env, calls=calls, program=PROGRAM, **options)


def run_calls(target: str, n: int, env: Mapping[str, str] | None = None, **options: Any) -> Summary:
    """`n` calls with the grpcio client in a subprocess: node_client.run_calls' summary."""
    return node_client.run_calls(target, n, env, program=PROGRAM, **options)


# -- the client (its own process) ---------------------------------------------------------


def _emit(obj: Mapping[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.xds_grpc_client", description=__doc__)
    p.add_argument("--target", required=True, help="HOST:PORT or xds:///NAME")
    p.add_argument("--calls", type=int, default=1, help="0 = until stdin closes or SIGTERM")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--method", choices=METHODS, default="Generate")
    p.add_argument("--model", default="gpt-4")
    p.add_argument("--prompt", default="Why use a service mesh?")
    p.add_argument("--max-tokens", type=int, default=0)
    p.add_argument("--deadline-ms", type=int, default=10_000)
    p.add_argument("--interval-ms", type=int, default=0)
    p.add_argument("--header", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--wait-for-ready", action="store_true")
    args = p.parse_args(argv)
    if args.calls < 0 or args.concurrency < 1:
        p.error("--calls must be >= 0 and --concurrency >= 1")
    for h in args.header:
        if "=" not in h or h.startswith("="):
            p.error(f"--header wants KEY=VALUE, got {h!r}")
    return args


def _trailer(metadata: object) -> str | None:
    for key, value in metadata or ():  # type: ignore[attr-defined]
        if key == INSTANCE_TRAILER:
            return value if isinstance(value, str) else bytes(value).decode()
    return None


async def _run(args: argparse.Namespace) -> int:
    import grpc
    import grpc.aio

    from aimesh.inference.v1 import inference_pb2 as pb
    from aimesh.inference.v1 import inference_pb2_grpc as pb_grpc

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    stop_count = 0
    inflight: set[Any] = set()

    def stop() -> None:
        nonlocal stop_count
        stop_count += 1
        stopping.set()
        if stop_count > 1:  # a second signal: do not wait for the calls in flight
            for call in list(inflight):
                call.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    if args.calls == 0:

        def watch_stdin() -> None:
            try:
                while sys.stdin.buffer.read(4096):
                    pass
            except (OSError, ValueError):
                pass
            loop.call_soon_threadsafe(stop)

        threading.Thread(target=watch_stdin, daemon=True).start()

    metadata = tuple((k.lower(), v) for k, _, v in (h.partition("=") for h in args.header))
    request = pb.GenerateRequest(
        model=args.model,
        messages=[pb.Message(role="user", content=args.prompt)],
        max_tokens=args.max_tokens,
    )
    counts: dict[str, int] = {}
    errors: dict[str, int] = {}
    reported: set[str] = set()
    ready = False
    started = 0

    def mark_ready() -> None:
        nonlocal ready
        if not ready:
            ready = True
            _emit({"event": "ready"})

    async with grpc.aio.insecure_channel(args.target) as channel:
        stub = pb_grpc.InferenceStub(channel)

        async def watch_ready() -> None:
            state = channel.get_state(try_to_connect=True)
            while not ready:
                if state == grpc.ChannelConnectivity.READY:
                    mark_ready()
                    return
                await channel.wait_for_state_change(state)
                state = channel.get_state(try_to_connect=True)

        async def call_once() -> int:
            t0 = time.perf_counter()
            record: dict[str, Any] = {}
            tokens = chunks = 0
            timeout = args.deadline_ms / 1000
            kw: dict[str, Any] = {"timeout": timeout, "wait_for_ready": args.wait_for_ready}
            if metadata:
                kw["metadata"] = metadata
            if args.method == "Generate":
                call: Any = stub.Generate(request, **kw)
            else:
                call = stub.GenerateStream(request, **kw)
            inflight.add(call)
            try:
                if args.method == "Generate":
                    await call
                else:
                    async for chunk in call:
                        chunks += 1
                        tokens += chunk.token_count
                code = grpc.StatusCode.OK
                trailers = await call.trailing_metadata()
                details = ""
            except grpc.aio.AioRpcError as err:
                code = err.code()
                trailers = err.trailing_metadata()
                details = err.details() or ""
            except asyncio.CancelledError:
                code, trailers, details = grpc.StatusCode.CANCELLED, None, "cancelled"
            finally:
                inflight.discard(call)
            ms = (time.perf_counter() - t0) * 1000
            instance = _trailer(trailers)
            number = int(code.value[0])
            record = {"t": time.time() * 1000, "instance": instance, "code": number}
            record["ms"] = round(ms, 2)
            if args.method == "GenerateStream":
                record["tokens"] = tokens
                record["chunks"] = chunks
            if number == 0:
                mark_ready()
                key = str(instance)
                counts[key] = counts.get(key, 0) + 1
            else:
                record["details"] = details
                errors[str(number)] = errors.get(str(number), 0) + 1
                seen = f"{code.name}: {details}"
                if seen not in reported:
                    reported.add(seen)
                    print(f"xds_grpc_client: call failed: {seen}", file=sys.stderr, flush=True)
            _emit(record)
            return number

        async def worker() -> None:
            nonlocal started
            while not stopping.is_set() and (args.calls == 0 or started < args.calls):
                started += 1
                code = await call_once()
                pause = args.interval_ms / 1000
                if code != 0:
                    pause = max(pause, ERROR_PAUSE)
                if pause > 0 and not stopping.is_set():
                    try:
                        await asyncio.wait_for(stopping.wait(), pause)
                    except TimeoutError:
                        pass

        watcher = asyncio.create_task(watch_ready())
        n = args.concurrency if args.calls == 0 else min(args.concurrency, args.calls)
        await asyncio.gather(*(worker() for _ in range(n)))
        watcher.cancel()
    _emit({"event": "summary", "counts": counts, "errors": errors, "calls": started})
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    return int(asyncio.run(_run(args)))


if __name__ == "__main__":
    sys.exit(main())
