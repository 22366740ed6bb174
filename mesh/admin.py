"""A small HTTP/1.1 admin endpoint (GET only) for proxies and the control plane.

Routes map a path to a function returning (status, content type, body). Enough for
`curl`, Prometheus scrapes and a browser; not a web framework.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Mapping
from typing import Any

Response = tuple[int, str, bytes]
Route = Callable[[], Response]

_REASONS = {
    200: "OK",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def json_response(value: Any, status: int = 200) -> Response:
    return status, "application/json", (json.dumps(value, indent=2) + "\n").encode()


def text_response(text: str, status: int = 200) -> Response:
    return status, "text/plain; charset=utf-8", text.encode()


class AdminServer:
    def __init__(self, routes: Mapping[str, Route]) -> None:
        self.routes = dict(routes)
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, listen: str) -> int:
        host, _, port = listen.rpartition(":")
        self._server = await asyncio.start_server(self._handle, host.strip("[]"), int(port))
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), 10)
            while (await asyncio.wait_for(reader.readline(), 10)) not in (b"\r\n", b"\n", b""):
                pass  # headers: nothing here needs them
            parts = request_line.decode("latin-1").split()
            method, target = (parts[0], parts[1]) if len(parts) >= 2 else ("", "/")
            path = target.split("?", 1)[0]
            if method != "GET":
                status, ctype, body = text_response("only GET is supported\n", 405)
            elif path in self.routes:
                try:
                    status, ctype, body = self.routes[path]()
                except Exception as exc:  # an admin page must never take the process down
                    status, ctype, body = text_response(f"error: {exc}\n", 500)
            else:
                listing = "\n".join(sorted(self.routes))
                status, ctype, body = text_response(f"not found; try:\n{listing}\n", 404)
            head = (
                f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
