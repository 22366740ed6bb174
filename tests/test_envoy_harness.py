"""The Envoy yardstick harness (bench/envoy.py): real Envoy in front of two sim backends."""

from __future__ import annotations

import subprocess
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest

from aimesh.inference.v1 import inference_pb2 as pb
from aimesh.inference.v1 import inference_pb2_grpc as pb_grpc
from aimesh.mesh import procs
from bench.envoy import Envoy, EnvoyNotFound, envoy_binary

pytestmark = pytest.mark.slow


def _runnable_envoy() -> str:
    """The envoy binary, or a skip that says exactly why it cannot run here."""
    try:
        binary = envoy_binary()
    except EnvoyNotFound as e:
        pytest.skip(f"no envoy binary: {e}")
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"envoy binary {binary} cannot run here: {e!r}")
    if out.returncode != 0 or "version" not in out.stdout:
        pytest.skip(
            f"`{binary} --version` exited {out.returncode} on this machine: "
            + (out.stderr or out.stdout).strip()[-800:]
        )
    return binary


def _instance(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    for key, value in metadata or ():
        if key == "aimesh-instance":
            return value if isinstance(value, str) else value.decode()
    raise AssertionError(f"no aimesh-instance trailer in {metadata!r}")


def _request(i: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model="gpt-4", messages=[pb.Message(role="user", content=f"through envoy {i}")]
    )


def test_envoy_proxies_unary_and_streams_to_both_backends() -> None:
    _runnable_envoy()
    sims = [procs.start_sim(name, ["gpt-4"], "--ttft", "0", "--tps", "0") for name in ("b1", "b2")]
    served: Counter[str] = Counter()
    try:
        proxy = Envoy([s.address for s in sims])
        with proxy, grpc.insecure_channel(proxy.address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            for i in range(50):
                reply, call = stub.Generate.with_call(_request(i), timeout=10)
                assert call.code() == grpc.StatusCode.OK
                assert reply.text and reply.model == "gpt-4"
                served[_instance(call.trailing_metadata())] += 1
            for i in range(5):
                stream = stub.GenerateStream(_request(i), timeout=10)
                chunks = list(stream)
                assert stream.code() == grpc.StatusCode.OK
                assert chunks and sum(c.token_count for c in chunks) > 0
                served[_instance(stream.trailing_metadata())] += 1
            # The calls really went through Envoy (and nothing else did).
            assert proxy.stats("cluster.backends.upstream_rq_total") == {
                "cluster.backends.upstream_rq_total": 55
            }
            pid = proxy.pid
        assert proxy.popen is not None and proxy.popen.returncode is not None
        assert not proxy.alive() and not Path(f"/proc/{pid}").exists()
    finally:
        for s in sims:
            s.terminate()
    assert set(served) == {"b1", "b2"}, served
    assert sum(served.values()) == 55
