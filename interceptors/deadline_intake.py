"""Deadline intake: a call that arrives with too little time left is not started."""

from __future__ import annotations

import grpc

from .base import InboundCall, Next


class DeadlineIntake:
    """Ends calls whose remaining deadline is below `minimum` with DEADLINE_EXCEEDED at
    once: they could not finish, and starting them only takes capacity from ones that can."""

    def __init__(self, minimum: float = 0.001) -> None:
        if minimum < 0:
            raise ValueError(f"minimum must not be negative, got {minimum}")
        self.minimum = minimum
        self.refused = 0

    async def around(self, call: InboundCall, call_next: Next) -> None:
        remaining = call.time_remaining()
        if remaining is not None and remaining < self.minimum:
            self.refused += 1
            await call.context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"only {remaining * 1000:.1f} ms left of the call's deadline on arrival, "
                f"below the minimum of {self.minimum * 1000:.1f} ms; not started",
            )
        await call_next()

    def __repr__(self) -> str:
        return f"<DeadlineIntake min={self.minimum * 1000:g}ms refused={self.refused}>"
