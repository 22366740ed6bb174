"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aimesh.inference.v1 import inference_pb2 as pb
from aimesh.mesh.sim.server import RunningSim
from aimesh.mesh.sim.service import SimConfig

# Unpaced by default: tests that are about timing set ttft/tokens_per_second themselves.
FAST = SimConfig(models=("gpt-4", "claude-3-5-sonnet"), ttft=0.0, tokens_per_second=0.0)

SimFactory = Callable[..., Awaitable[RunningSim]]


def prompt(text: str = "Why use a service mesh?", **fields: object) -> pb.GenerateRequest:
    """A one-message GenerateRequest for gpt-4; keyword fields override or add."""
    values: dict[str, object] = {"model": "gpt-4", **fields}
    return pb.GenerateRequest(messages=[pb.Message(role="user", content=text)], **values)  # type: ignore[arg-type]
