"""A fake provider HTTP server for the adapter tests: no internet, real sockets.

An asyncio raw-socket server on 127.0.0.1 (port 0), in a thread of its own so sync tests
and subprocesses can call it too. It reads HTTP/1.1 requests itself (request line,
headers, a Content-Length body), records each one (method, path, headers, body), and
answers with a transcript file from tests/providers/ byte for byte: status line, headers
and body exactly as stored. A chunked body goes out one chunk-encoding frame at a time
(optionally paced), so the client sees the same pieces a real server's framing produces;
a transcript that ends before its body does (a truncated chunk, a short Content-Length
body) is a connection dropped mid-response. Connections stay open for the next request
(keep-alive) unless the response ends the connection.

It also sees what the client does to the connection: `closed_early` counts connections
the client closed while a response was still being sent, or was held open (`hold=True`),
or was not started yet (`delay`); that is how the tests check cancellation and deadlines
close the provider's HTTP stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRANSCRIPTS = Path(__file__).resolve().parent / "providers"


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Reply:
    """How to answer one request: a transcript, and how to play it."""

    transcript: str
    pace: float = 0.0  # seconds between chunk frames
    delay: float = 0.0  # seconds before the first byte
    hold: bool = False  # after the last byte, keep the connection open until the client closes


@dataclass(frozen=True)
class Transcript:
    head: bytes  # status line and headers, through the blank line
    frames: list[bytes]  # the body, one chunk-encoding frame (or the whole body) each
    complete: bool  # the body is whole: the connection may serve another request
    keep_alive: bool


def load(name: str) -> bytes:
    return (TRANSCRIPTS / name).read_bytes()


def split_transcript(raw: bytes) -> Transcript:
    """A stored response cut where it goes out in pieces. Raises ValueError on a chunked
    body whose sizes do not match its data (unless it is cut short at the end)."""
    end = raw.index(b"\r\n\r\n") + 4
    head, body = raw[:end], raw[end:]
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    keep_alive = headers.get("connection", "").lower() != "close"
    if headers.get("transfer-encoding", "").lower() == "chunked":
        frames: list[bytes] = []
        pos = 0
        while pos < len(body):
            eol = body.find(b"\r\n", pos)
            if eol < 0:
                frames.append(body[pos:])
                return Transcript(head, frames, False, keep_alive)
            size = int(body[pos:eol].split(b";")[0], 16)
            stop = eol + 2 + size + 2
            if stop > len(body):
                frames.append(body[pos:])
                return Transcript(head, frames, False, keep_alive)
            if body[stop - 2 : stop] != b"\r\n":
                raise ValueError(f"chunk at byte {pos}: {size:#x} bytes not followed by CRLF")
            frames.append(body[pos:stop])
            pos = stop
            if size == 0:
                return Transcript(head, frames, pos == len(body), keep_alive)
        return Transcript(head, frames, False, keep_alive)
    length = int(headers.get("content-length", "-1"))
    if length < 0:
        return Transcript(head, [body], False, False)  # delimited by closing the connection
    if len(body) > length:
        raise ValueError(f"body of {len(body)} bytes, Content-Length says {length}")
    return Transcript(head, [body], len(body) == length, keep_alive)


@dataclass
class FakeProvider:
    """Start with `start()`; script answers with `reply(path, ...)`; read `received`."""

    host: str = "127.0.0.1"
    port: int = 0
    received: list[Received] = field(default_factory=list)
    connections: int = 0
    closed_early: int = 0
    _replies: dict[str, deque[Reply]] = field(default_factory=dict)
    _sticky: dict[str, Reply] = field(default_factory=dict)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _server: asyncio.Server | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    # -- control (any thread) -----------------------------------------------------------

    def start(self) -> FakeProvider:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._server = loop.run_until_complete(asyncio.start_server(self._serve, self.host, 0))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-provider", daemon=True)
        self._thread.start()
        ready.wait(5)
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None:
            return

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for w in list(self._writers):
                w.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(5)

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    def reply(self, path: str, transcript: str, *, always: bool = False, **how: Any) -> None:
        """Answers the next request for `path` with `transcript` (every later one too,
        with always=True). Without a scripted reply a request gets a 599."""
        r = Reply(transcript, **how)
        with self._lock:
            if always:
                self._sticky[path] = r
            else:
                self._replies.setdefault(path, deque()).append(r)

    def requests(self, path: str | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self.received if path is None or r.path == path]

    # -- serving (the server's thread) --------------------------------------------------

    def _next(self, path: str) -> Reply | None:
        with self._lock:
            queue = self._replies.get(path)
            if queue:
                return queue.popleft()
            return self._sticky.get(path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            while await self._one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _client_closed_within(self, reader: asyncio.StreamReader, seconds: float) -> bool:
        """Waits `seconds` (None: forever); True as soon as the client closes."""
        try:
            data = await asyncio.wait_for(reader.read(1), seconds)
        except TimeoutError:
            return False
        return data == b""

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False  # the client closed an idle connection
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        with self._lock:
            self.received.append(Received(method, path, headers, body))
        reply = self._next(path)
        if reply is None:
            msg = f"no reply scripted for {method} {path}".encode()
            writer.write(
                b"HTTP/1.1 599 Unscripted\r\nContent-Length: %d\r\n\r\n%s" % (len(msg), msg)
            )
            await writer.drain()
            return True
        t = split_transcript(load(reply.transcript))
        if reply.delay and await self._client_closed_within(reader, reply.delay):
            self.closed_early += 1
            return False
        try:
            writer.write(t.head)
            for i, frame in enumerate(t.frames):
                if i and reply.pace and await self._client_closed_within(reader, reply.pace):
                    self.closed_early += 1
                    return False
                writer.write(frame)
                await writer.drain()
        except ConnectionError:
            self.closed_early += 1
            return False
        if reply.hold:
            await self._client_closed_within(reader, 3600)
            self.closed_early += 1
            return False
        return t.complete and t.keep_alive


@contextlib.contextmanager
def running() -> Any:
    fake = FakeProvider().start()
    try:
        yield fake
    finally:
        fake.stop()


def every_transcript() -> list[str]:
    return sorted(p.name for p in TRANSCRIPTS.glob("*.http"))
