"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from aimesh.inference.v1 import inference_pb2 as pb
from aimesh.mesh.proxy.cluster import EndpointAddr
from aimesh.mesh.sim.server import RunningSim
from aimesh.mesh.sim.service import SimConfig

# Unpaced by default: tests that are about timing set ttft/tokens_per_second themselves.
FAST = SimConfig(models=("gpt-4", "claude-3-5-sonnet"), ttft=0.0, tokens_per_second=0.0)

SimFactory = Callable[..., Awaitable[RunningSim]]


def prompt(text: str = "Why use a service mesh?", **fields: object) -> pb.GenerateRequest:
    """A one-message GenerateRequest for gpt-4; keyword fields override or add."""
    values: dict[str, object] = {"model": "gpt-4", **fields}
    return pb.GenerateRequest(messages=[pb.Message(role="user", content=text)], **values)  # type: ignore[arg-type]


def mesh_doc(
    services: list[dict[str, object]],
    policies: list[dict[str, object]] | None = None,
) -> dict[str, object]:
    """A ServiceMesh document (as a dict) for tests."""
    spec: dict[str, object] = {"services": services}
    if policies:
        spec["trafficPolicies"] = policies
    return {
        "apiVersion": "mesh.ai/v1",
        "kind": "ServiceMesh",
        "metadata": {"name": "test"},
        "spec": spec,
    }


async def eventually(
    predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition"
) -> None:
    """Waits until `predicate()` holds, checking every 10 ms; fails after `timeout` seconds."""
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def endpoint(sim: RunningSim) -> EndpointAddr:
    return EndpointAddr(f"127.0.0.1:{sim.port}")


def llm_mesh(
    sims: Sequence[RunningSim],
    *,
    eject_after: int | None = None,
    health: dict[str, object] | None = None,
    breaker: dict[str, object] | None = None,
    retry: dict[str, object] | None = None,
) -> tuple[dict[str, object], dict[str, list[EndpointAddr]]]:
    """A mesh of one round-robin service `llm` serving gpt-4 on `sims` (in that order):
    the document and the endpoints, for `make_proxy(doc, extra=extra)`."""
    lb: dict[str, object] = {"algorithm": "round_robin"}
    if eject_after is not None:
        lb["outlierDetection"] = {"consecutiveErrors": eject_after}
    if health is not None:
        lb["healthCheck"] = health
    service: dict[str, object] = {"name": "llm", "models": ["gpt-4"], "loadBalancer": lb}
    if breaker is not None:
        service["circuitBreaker"] = breaker
    policies = None
    if retry is not None:
        policies = [{"name": "all", "routes": [{"destination": "llm"}], "retry": retry}]
    return mesh_doc([service], policies), {"llm": [endpoint(s) for s in sims]}


def installed(find: Callable[[], str | None], script: str) -> tuple[str | None, str]:
    """A tool the tests need, found or installed by `scripts/<script>`: (its path or None,
    what the install script said, for the skip reason when it could not)."""
    import subprocess
    from pathlib import Path

    found = find()
    if found:
        return found, ""
    try:
        proc = subprocess.run(
            [str(Path(__file__).resolve().parent.parent / "scripts" / script)],
            stdin=subprocess.DEVNULL,  # so sudo, if needed, fails instead of prompting
            capture_output=True,
            text=True,
            timeout=600,
        )
        output = proc.stdout + proc.stderr
    except (OSError, subprocess.TimeoutExpired) as exc:
        output = str(exc)
    return find(), output.strip()
