"""The few error types aimesh raises, and their mapping to gRPC statuses.

`MeshError` is the one expected failure: it carries the gRPC status code and a message a
user can act on. `ConfigError` is for configuration the user wrote; it lists every
problem by path. Low-level exceptions are converted to these at the edges.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc


class MeshError(Exception):
    """A failure reported to the caller as a gRPC status."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        pushback_ms: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        # gRFC A6 server pushback: how long the caller should wait before retrying.
        self.pushback_ms = pushback_ms

    def __repr__(self) -> str:
        return f"MeshError({self.code.name}, {self.message!r})"


def invalid_argument(field: str, problem: str) -> MeshError:
    """INVALID_ARGUMENT whose message starts with the field's name."""
    return MeshError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {problem}")


class ConfigError(ValueError):
    """Configuration that cannot be used; `errors` names every problem by its path."""

    def __init__(self, errors: Sequence[str], *, source: str = "config") -> None:
        self.errors = list(errors)
        self.source = source
        lines = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(f"{source}: {len(self.errors)} error(s)\n{lines}")


def status_code_from_name(name: str) -> grpc.StatusCode:
    """'UNAVAILABLE', 'unavailable' or '14' -> grpc.StatusCode.UNAVAILABLE."""
    text = name.strip()
    for code in grpc.StatusCode:
        if text.upper() == code.name or (text.isdigit() and int(text) == code.value[0]):
            return code
    names = ", ".join(c.name for c in grpc.StatusCode)
    raise ValueError(f"unknown gRPC status {name!r}; use a name ({names}) or its number")


def status_code_from_number(number: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    raise ValueError(f"unknown gRPC status number {number}")
