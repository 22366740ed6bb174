"""Runs the Node.js Inference client (tests/node/client.js: @grpc/grpc-js with the
@grpc/grpc-js-xds plugin) as a subprocess and reads its JSON lines.

Two ways to use it:

* `run_calls(target, n, env)` makes `n` calls and returns a `Summary` (with every call's
  record);
* `NodeClient.start(target, env=...)` calls until stopped (`--calls 0`): read the records
  while it runs (`wait_ready`, `get`, `drain`, iteration, or `async for` / `anext` from
  asyncio code), then `stop()` for the `Summary`. It is also a context manager.

`env` is added to this process's environment: for an `xds:///NAME` target, pass
`{"GRPC_XDS_BOOTSTRAP": path}` (plus `GRPC_EXPERIMENTAL_XDS_WRR_LB=true` for
weighted_round_robin; and `AIMESH_CACHE_ORCA_PROTO=1` so client.js parses grpc-js's ORCA proto
once rather than at every call's end, a grpc-js 1.14.7 cost that caps a weighted_round_robin
client at a few dozen calls a second). The client's packages are installed by
scripts/install-node-clients.sh.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

NODE_DIR = Path(__file__).resolve().parent / "node"
CLIENT_JS = NODE_DIR / "client.js"
# Present once `npm ci` has installed tests/node's packages.
_INSTALLED_MARK = NODE_DIR / "node_modules" / "@grpc" / "grpc-js-xds" / "package.json"


class NodeClientError(RuntimeError):
    """The Node client did not start, or ended without its summary line."""


@dataclass(frozen=True)
class CallRecord:
    """One call, as client.js reported it when the call ended."""

    t: float  # end time, epoch milliseconds
    instance: str | None  # the `aimesh-instance` trailer; None when the server sent none
    code: int  # gRPC status code, 0 = OK
    ms: float  # latency, milliseconds
    tokens: int | None = None  # GenerateStream only: tokens received
    chunks: int | None = None  # GenerateStream only: chunks received
    details: str | None = None  # failed calls only: the status details

    @property
    def ok(self) -> bool:
        return self.code == 0

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> CallRecord:
        return cls(
            t=float(obj["t"]),
            instance=obj.get("instance"),
            code=int(obj["code"]),
            ms=float(obj["ms"]),
            tokens=obj.get("tokens"),
            chunks=obj.get("chunks"),
            details=obj.get("details"),
        )


@dataclass
class Summary:
    """The client's closing line, with what was read before it."""

    counts: dict[str, int]  # successful calls per instance
    errors: dict[int, int]  # failed calls per status code
    calls: int  # calls made
    records: list[CallRecord] = field(default_factory=list)
    stderr: str = ""
    returncode: int | None = None

    @property
    def ok_calls(self) -> int:
        return sum(self.counts.values())

    @property
    def failed_calls(self) -> int:
        return sum(self.errors.values())

    def share(self, instance: str) -> float:
        """The fraction of successful calls that `instance` served (0 when none succeeded)."""
        total = self.ok_calls
        return self.counts.get(instance, 0) / total if total else 0.0

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Summary:
        return cls(
            counts={str(k): int(v) for k, v in obj.get("counts", {}).items()},
            errors={int(k): int(v) for k, v in obj.get("errors", {}).items()},
            calls=int(obj.get("calls", 0)),
        )


def node_binary() -> str | None:
    """The `node` executable on PATH, or None."""
    return shutil.which("node")


def require_client() -> str:
    """`node`'s path, with tests/node's packages installed (scripts/install-node-clients.sh
    if need be); skips the test when there is no Node.js, fails it when npm cannot install."""
    import pytest

    from .support import installed

    found, output = installed(client_installed, "install-node-clients.sh")
    if found:
        return found
    if node_binary() is None:
        pytest.skip(f"node is not installed (scripts/install-node-clients.sh: {output})")
    pytest.fail(
        f"scripts/install-node-clients.sh could not install tests/node's packages:\n{output}"
    )


def client_installed() -> str | None:
    """`node`'s path when client.js can run (node on PATH, tests/node's packages installed)."""
    node = node_binary()
    return node if node and _INSTALLED_MARK.is_file() else None


@dataclass(frozen=True)
class Program:
    """One of the JSON-lines call runners: client.js here, the grpcio one in
    tests/xds_grpc_client.py. Both take the same options and print the same lines."""

    name: str  # for messages: "client.js"
    argv: tuple[str, ...]  # the program, before its options
    cwd: Path
    env: Mapping[str, str] = field(default_factory=dict)


def node_program(node: str | None = None) -> Program:
    return Program("client.js", (node or node_binary() or "node", str(CLIENT_JS)), NODE_DIR)


def client_options(
    target: str,
    *,
    calls: int = 1,
    concurrency: int = 1,
    method: str = "Generate",
    model: str = "gpt-4",
    prompt: str | None = None,
    max_tokens: int = 0,
    deadline_ms: int = 10_000,
    interval_ms: int = 0,
    headers: Mapping[str, str] | None = None,
    wait_for_ready: bool = False,
) -> list[str]:
    """The options every runner takes."""
    argv = [
        "--target",
        target,
        "--calls",
        str(calls),
        "--concurrency",
        str(concurrency),
        "--method",
        method,
        "--model",
        model,
        "--max-tokens",
        str(max_tokens),
        "--deadline-ms",
        str(deadline_ms),
        "--interval-ms",
        str(interval_ms),
    ]
    if prompt is not None:
        argv += ["--prompt", prompt]
    for key, value in (headers or {}).items():
        argv += ["--header", f"{key}={value}"]
    if wait_for_ready:
        argv.append("--wait-for-ready")
    return argv


def client_command(target: str, *, node: str | None = None, **options: Any) -> list[str]:
    """The command line that runs client.js with these options."""
    return [*node_program(node).argv, *client_options(target, **options)]


def _environment(program: Program, env: Mapping[str, str] | None) -> dict[str, str]:
    return {**os.environ, **program.env, **(env or {})}


def parse_lines(lines: Sequence[str]) -> tuple[bool, list[CallRecord], Summary | None]:
    """(whether `ready` was printed, the call records, the summary if printed) from
    client.js's stdout lines. Lines that are not JSON objects are ignored."""
    ready = False
    records: list[CallRecord] = []
    summary: Summary | None = None
    for line in lines:
        obj = _parse(line)
        if obj is None:
            continue
        event = obj.get("event")
        if event == "ready":
            ready = True
        elif event == "summary":
            summary = Summary.from_json(obj)
        elif "code" in obj:
            records.append(CallRecord.from_json(obj))
    return ready, records, summary


def _parse(line: str) -> dict[str, Any] | None:
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def run_calls(
    target: str,
    n: int,
    env: Mapping[str, str] | None = None,
    *,
    timeout: float = 60.0,
    program: Program | None = None,
    **options: Any,
) -> Summary:
    """Makes `n` calls (n >= 1) to `target` with `program` (default client.js) and returns
    the summary, with each call's record. `options` are `client_options`' (method,
    concurrency, deadline_ms, ...). Raises NodeClientError when the client fails to start
    or prints no summary."""
    if n < 1:
        raise ValueError("run_calls needs n >= 1 (NodeClient.start runs until stopped)")
    program = program or node_program()
    try:
        proc = subprocess.run(
            [*program.argv, *client_options(target, calls=n, **options)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_environment(program, env),
            cwd=program.cwd,
        )
    except subprocess.TimeoutExpired as exc:
        raise NodeClientError(
            f"{program.name} did not finish {n} calls within {timeout:g}s; stderr:\n"
            f"{_text(exc.stderr)}"
        ) from exc
    _, records, summary = parse_lines(proc.stdout.splitlines())
    if summary is None or proc.returncode != 0:
        raise NodeClientError(
            f"{program.name} exited with code {proc.returncode} without a summary; "
            f"stderr:\n{proc.stderr}\nstdout:\n{proc.stdout[-4000:]}"
        )
    summary.records = records
    summary.stderr = proc.stderr
    summary.returncode = proc.returncode
    return summary


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


_END = object()  # put on the record queue when stdout closes


class NodeClient:
    """client.js calling until stopped. Records arrive on a queue filled by a reader thread
    (which also keeps the pipe drained); `records` holds every one read so far."""

    def __init__(self, popen: subprocess.Popen[str]) -> None:
        self.popen = popen
        self.records: list[CallRecord] = []
        self.lines: list[str] = []  # stdout, raw
        self.stderr_lines: list[str] = []
        self.summary: Summary | None = None
        self._ready = threading.Event()
        self._ended = threading.Event()
        self._exhausted = False  # _END taken off the queue
        self._queue: queue.Queue[object] = queue.Queue()
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for t in self._threads:
            t.start()

    @classmethod
    def start(
        cls,
        target: str,
        env: Mapping[str, str] | None = None,
        *,
        calls: int = 0,
        program: Program | None = None,
        **options: Any,
    ) -> Self:
        """Starts `program` (default client.js) on `target`; with calls=0 (the default) it
        calls until `stop()`. `options` are `client_options`' (method, concurrency,
        interval_ms, ...)."""
        program = program or node_program()
        popen = subprocess.Popen(
            [*program.argv, *client_options(target, calls=calls, **options)],
            stdin=subprocess.PIPE,  # closing it is the graceful stop
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=_environment(program, env),
            cwd=program.cwd,
            start_new_session=True,  # a Ctrl-C in the terminal reaches the parent only
        )
        return cls(popen)

    # -- reader threads ---------------------------------------------------------------

    def _read_stdout(self) -> None:
        assert self.popen.stdout is not None
        try:
            for line in self.popen.stdout:
                self.lines.append(line)
                obj = _parse(line)
                if obj is None:
                    continue
                event = obj.get("event")
                if event == "ready":
                    self._ready.set()
                elif event == "summary":
                    self.summary = Summary.from_json(obj)
                elif "code" in obj:
                    record = CallRecord.from_json(obj)
                    if record.ok:
                        self._ready.set()
                    self.records.append(record)
                    self._queue.put(record)
        finally:
            self._ended.set()
            self._queue.put(_END)

    def _read_stderr(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            self.stderr_lines.append(line)

    # -- while it runs ------------------------------------------------------------------

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Returns once the client printed `ready` (channel READY or a call succeeded);
        raises NodeClientError if it exits or `timeout` passes first."""
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self._ended.is_set() or time.monotonic() > deadline:
                why = "exited" if self._ended.is_set() else f"was not ready within {timeout:g}s"
                raise NodeClientError(f"client.js {why}; stderr:\n{self.stderr}")

    def get(self, timeout: float | None = None) -> CallRecord | None:
        """The next record (waiting up to `timeout` seconds, forever if None); None when
        the time passed, or when the client has ended and every record was taken."""
        if self._exhausted:
            return None
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        return self._record(item)

    def get_nowait(self) -> CallRecord | None:
        """The next record if one is waiting, else None (never blocks)."""
        if self._exhausted:
            return None
        try:
            item = self._queue.get_nowait()
        except queue.Empty:
            return None
        return self._record(item)

    def drain(self) -> list[CallRecord]:
        """Every record that arrived and was not taken yet, without waiting."""
        out: list[CallRecord] = []
        while (record := self.get_nowait()) is not None:
            out.append(record)
        return out

    @property
    def exhausted(self) -> bool:
        """Whether the client's output has ended and every record was taken."""
        return self._exhausted

    def _record(self, item: object) -> CallRecord | None:
        if item is _END:
            self._exhausted = True
            return None
        assert isinstance(item, CallRecord)
        return item

    def records_since(self, t_ms: float) -> list[CallRecord]:
        """The records of calls that ended at or after `t_ms` (epoch ms)."""
        return [r for r in list(self.records) if r.t >= t_ms]

    def __iter__(self) -> Iterator[CallRecord]:
        """Blocks for each next record; ends when the client's output ends."""
        while (record := self.get()) is not None:
            yield record

    async def anext(self, timeout: float | None = None) -> CallRecord | None:
        """`get` for asyncio code: polls without blocking the event loop."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            record = self.get_nowait()
            if record is not None or self._exhausted:
                return record
            if deadline is not None and loop.time() >= deadline:
                return None
            await asyncio.sleep(0.005)

    async def __aiter__(self) -> AsyncIterator[CallRecord]:
        while (record := await self.anext()) is not None:
            yield record

    # -- stopping -------------------------------------------------------------------------

    def stop(self, timeout: float = 15.0) -> Summary:
        """Stops calling (closes stdin; SIGTERM if it has not ended within `timeout`, then
        SIGKILL), waits for the exit and returns the summary with every record."""
        if self.alive():
            try:
                assert self.popen.stdin is not None
                self.popen.stdin.close()
            except OSError:
                pass
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.send_signal(signal.SIGTERM)
                try:
                    self.popen.wait(5)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
        self.popen.wait()
        for t in self._threads:
            t.join(5)
        if self.summary is None:
            raise NodeClientError(
                f"client.js exited with code {self.popen.returncode} without a summary; "
                f"stderr:\n{self.stderr}"
            )
        self.summary.records = list(self.records)
        self.summary.stderr = self.stderr
        self.summary.returncode = self.popen.returncode
        return self.summary

    def kill(self) -> None:
        if self.alive():
            self.popen.kill()
        self.popen.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.stop()
        else:
            self.kill()
