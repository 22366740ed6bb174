"""The Node.js client (tests/node/client.js: @grpc/grpc-js + @grpc/grpc-js-xds) against real
sim backends on plain targets, and its xDS plugin loading on Node: the consumer the xDS
tests will drive, checked before there is an xDS server."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aimesh.mesh import procs
from aimesh.mesh.control.etcd_server import free_port

from .node_client import (
    CLIENT_JS,
    NodeClient,
    NodeClientError,
    node_binary,
    require_client,
    run_calls,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def node_client() -> str:
    return require_client()


@pytest.fixture(scope="module")
def sim_a() -> Iterator[procs.Proc]:
    proc = procs.start_sim("sim-a", ["gpt-4"], "--ttft", "0", "--tps", "0")
    try:
        yield proc
    finally:
        proc.terminate()


@pytest.fixture(scope="module")
def sim_b() -> Iterator[procs.Proc]:
    proc = procs.start_sim("sim-b", ["gpt-4"], "--ttft", "0", "--tps", "0")
    try:
        yield proc
    finally:
        proc.terminate()


def test_unary_calls_name_their_instance(sim_a: procs.Proc) -> None:
    summary = run_calls(sim_a.address, 20, concurrency=4)
    assert summary.counts == {"sim-a": 20}
    assert summary.errors == {}
    assert summary.calls == 20 and summary.returncode == 0
    assert len(summary.records) == 20
    assert all(r.ok and r.instance == "sim-a" and r.ms > 0 for r in summary.records)
    assert all(r.tokens is None for r in summary.records)


def test_streams_count_tokens(sim_b: procs.Proc) -> None:
    summary = run_calls(sim_b.address, 6, method="GenerateStream", max_tokens=16, concurrency=2)
    assert summary.counts == {"sim-b": 6}
    assert summary.errors == {}
    assert [r.instance for r in summary.records] == ["sim-b"] * 6
    for r in summary.records:
        assert r.tokens is not None and r.chunks is not None
        assert 0 < r.tokens <= 16 and 0 < r.chunks <= r.tokens


def test_failed_calls_are_counted_by_code(sim_a: procs.Proc) -> None:
    summary = run_calls(sim_a.address, 3, model="gpt-9")
    assert summary.counts == {}
    assert summary.errors == {5: 3}  # NOT_FOUND
    assert all(r.code == 5 and r.details and "gpt-9" in r.details for r in summary.records)
    assert "NOT_FOUND" in summary.stderr


def test_continuous_mode_until_stopped(sim_a: procs.Proc) -> None:
    with NodeClient.start(sim_a.address, concurrency=2, interval_ms=5) as client:
        client.wait_ready()
        taken = [client.get(timeout=10) for _ in range(10)]
        assert all(r is not None and r.ok and r.instance == "sim-a" for r in taken)
        summary = client.stop()
    assert summary.returncode == 0
    assert summary.errors == {}
    assert summary.calls == len(summary.records) >= 10
    assert summary.counts == {"sim-a": summary.calls}
    last = taken[-1]
    assert last is not None and last in client.records_since(last.t)


async def test_continuous_mode_from_asyncio(sim_b: procs.Proc) -> None:
    client = NodeClient.start(sim_b.address, method="GenerateStream", max_tokens=8, interval_ms=5)
    try:
        got = []
        async for record in client:
            got.append(record)
            if len(got) == 5:
                break
        assert all(r.ok and r.instance == "sim-b" and r.tokens for r in got)
    finally:
        summary = client.stop()
    assert summary.errors == {} and summary.counts == {"sim-b": summary.calls}
    # Ended: what was not read yet comes at once, then nothing (and nothing blocks).
    assert len(got) + len(client.drain()) == summary.calls
    assert client.exhausted and await client.anext() is None and client.get() is None


def test_sigterm_ends_with_a_summary(sim_a: procs.Proc) -> None:
    client = NodeClient.start(sim_a.address, interval_ms=10)
    try:
        client.wait_ready()
        assert client.get(timeout=10) is not None
        client.popen.terminate()
        assert client.popen.wait(10) == 0
        summary = client.stop()
    finally:
        client.kill()
    assert summary.errors == {} and summary.counts == {"sim-a": summary.calls}


# -- the xDS plugin on this Node ----------------------------------------------------------


def _xds_run(target: str, env: dict[str, str], *args: str) -> tuple[int, str, str, float]:
    node = node_binary()
    assert node
    t0 = time.monotonic()
    proc = subprocess.run(
        [node, str(CLIENT_JS), "--target", target, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0


def _env_without_bootstrap() -> dict[str, str]:
    import os

    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("GRPC_XDS_BOOTSTRAP", "GRPC_XDS_BOOTSTRAP_CONFIG")
    }


def test_xds_target_without_bootstrap_fails_clearly() -> None:
    code, out, err, took = _xds_run("xds:///llm", _env_without_bootstrap())
    assert code == 1, (out, err)
    assert "xDS bootstrap: The GRPC_XDS_BOOTSTRAP or GRPC_XDS_BOOTSTRAP_CONFIG" in err
    assert took < 10
    with pytest.raises(NodeClientError, match="GRPC_XDS_BOOTSTRAP"):
        run_calls("xds:///llm", 1, env={"GRPC_XDS_BOOTSTRAP": "", "GRPC_XDS_BOOTSTRAP_CONFIG": ""})


def _bootstrap(tmp_path: Path, node: dict[str, object]) -> str:
    path = tmp_path / "bootstrap.json"
    doc = {
        "xds_servers": [
            {
                "server_uri": f"127.0.0.1:{free_port()}",  # nothing serves there
                "channel_creds": [{"type": "insecure"}],
                "server_features": ["ignore_resource_deletion"],
            }
        ],
        "node": node,
    }
    path.write_text(json.dumps(doc))
    return str(path)


def test_xds_bootstrap_is_accepted_and_resolution_waits(tmp_path: Path) -> None:
    """A valid bootstrap whose xDS server is down: the xDS resolver is in charge, and the
    call waits for name resolution until its deadline."""
    env = {
        **_env_without_bootstrap(),
        "GRPC_XDS_BOOTSTRAP": _bootstrap(tmp_path, {"id": "node-test", "locality": {}}),
    }
    code, out, err, _ = _xds_run("xds:///llm", env, "--deadline-ms", "800")
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[0]["code"] == 4 and "name resolution" in lines[0]["details"], lines
    assert lines[-1] == {"event": "summary", "counts": {}, "errors": {"4": 1}, "calls": 1}


def test_xds_bootstrap_node_needs_a_locality(tmp_path: Path) -> None:
    """grpc-js-xds rejects a bootstrap whose node has no `locality`: what `aimesh xds
    bootstrap --for grpc` writes must have one, `{}` at least."""
    env = {**_env_without_bootstrap(), "GRPC_XDS_BOOTSTRAP": _bootstrap(tmp_path, {"id": "n"})}
    code, _, err, _ = _xds_run("xds:///llm", env)
    assert code == 1
    assert "locality field missing in node element" in err
