"""Request ids: every call carries one, end to end."""

from __future__ import annotations

import uuid

from .base import InboundCall, Next

HEADER = "x-request-id"


class RequestId:
    """Takes the caller's `x-request-id`, or makes one and sends it on upstream, so logs,
    traces and audit records of every hop name the same request."""

    def __init__(self, header: str = HEADER) -> None:
        self.header = header

    async def around(self, call: InboundCall, call_next: Next) -> None:
        rid = call.header(self.header)
        if not rid:
            rid = uuid.uuid4().hex
            call.forward_headers.append((self.header, rid))
        call.request_id = rid
        await call_next()
