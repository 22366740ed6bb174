"""Real processes: the CLI, graceful drain on SIGTERM, crash faults, and the demo."""

from __future__ import annotations

import re
import signal
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aimesh.clients import InferenceClient
from aimesh.inference.v1 import inference_pb2 as pb
from aimesh.inference.v1 import inference_pb2_grpc as pb_grpc
from aimesh.mesh import procs
from aimesh.mesh.sim.tokens import Completion

pytestmark = pytest.mark.slow


def aimesh(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        procs.aimesh_command(*args), capture_output=True, text=True, timeout=timeout
    )


def test_chat_streams_and_reports(sim_process_address: str) -> None:
    out = aimesh(
        "chat",
        "--target",
        sim_process_address,
        "--model",
        "gpt-4",
        "--seed",
        "3",
        "--max-tokens",
        "12",
        "hello there",
    )
    assert out.returncode == 0, out.stderr
    expected = Completion.for_prompt("gpt-4", [("user", "hello there")], 3, (16, 64)).text(12)
    assert out.stdout == expected + "\n"
    assert "12 tokens from sim-proc" in out.stderr


def test_chat_errors_are_readable(sim_process_address: str) -> None:
    out = aimesh("chat", "--target", sim_process_address, "--model", "gpt-9", "hi")
    assert out.returncode == 1
    assert "NOT_FOUND: model 'gpt-9' is not served by sim-proc" in out.stderr
    assert "aimesh models --target" in out.stderr
    out = aimesh("chat", "--target", "127.0.0.1:1", "--model", "gpt-4", "--timeout", "2s", "hi")
    assert out.returncode == 1
    assert "UNAVAILABLE" in out.stderr and "is something serving on 127.0.0.1:1" in out.stderr


def test_bad_flags_exit_2_with_a_message() -> None:
    out = aimesh("backend", "sim", "--model", "m", "--ttft", "soon")
    assert out.returncode == 2
    assert "'soon' is not a duration" in out.stderr
    out = aimesh("backend", "sim", "--model", "m", "--length", "9-3")
    assert out.returncode == 2
    assert "length range must be 1 <= MIN <= MAX" in out.stderr


def test_sigterm_drains_in_flight_streams_and_refuses_new_calls() -> None:
    proc = procs.start_sim(
        "drainer", ["gpt-4"], "--ttft", "0", "--tps", "100", "--length", "60-60", "--grace", "10s"
    )
    try:
        with grpc.insecure_channel(proc.address) as ch:
            stub = pb_grpc.InferenceStub(ch)
            req = pb.GenerateRequest(model="gpt-4", messages=[pb.Message(role="user", content="x")])
            stream = stub.GenerateStream(req, timeout=20)
            first = next(stream)
            watch = health_pb2_grpc.HealthStub(ch).Watch(
                health_pb2.HealthCheckRequest(), timeout=20
            )
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            proc.popen.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as refused:
                stub.Generate(req, timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
            assert "shutting down" in refused.value.details()  # type: ignore[attr-defined]
            rest = list(stream)  # ~0.6 s of tokens still to come
            text = first.text + "".join(c.text for c in rest)
            assert text == Completion.for_prompt("gpt-4", [("user", "x")], None, (16, 64)).text(60)
            assert rest[-1].finish_reason == pb.FINISH_REASON_STOP
        assert proc.popen.wait(timeout=15) == 0
    finally:
        proc.kill()
    assert any("draining (1 active" in line for line in proc.output)


def test_drain_past_grace_cancels_the_rest() -> None:
    proc = procs.start_sim(
        "short-grace",
        ["gpt-4"],
        "--ttft",
        "0",
        "--tps",
        "20",
        "--length",
        "200-200",
        "--grace",
        "300ms",
    )
    try:
        with grpc.insecure_channel(proc.address) as ch:
            client = InferenceClient(ch, model="gpt-4", timeout=20)
            stream = client.stream("x")
            next(stream)
            proc.popen.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError) as info:
                list(stream)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
            assert "resume elsewhere with continuation" in info.value.details()  # type: ignore[attr-defined]
        assert proc.popen.wait(timeout=15) == 0
    finally:
        proc.kill()
    assert any("1 calls cut short" in line for line in proc.output)


def test_die_exits_process_is_a_real_crash() -> None:
    proc = procs.start_sim(
        "crasher",
        ["gpt-4"],
        "--ttft",
        "0",
        "--tps",
        "0",
        "--die-after-tokens",
        "4",
        "--die-exits-process",
    )
    try:
        with grpc.insecure_channel(proc.address) as ch:
            client = InferenceClient(ch, model="gpt-4", timeout=10)
            got = []
            with pytest.raises(grpc.RpcError) as info:
                for chunk in client.stream("x", max_tokens=30):
                    got.append(chunk)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        assert proc.popen.wait(timeout=10) == 17
        assert sum(c.token_count for c in got) <= 4
    finally:
        proc.kill()


def test_sim_control_cli(sim_process_address: str) -> None:
    out = aimesh("sim", "stats", "--target", sim_process_address)
    assert out.returncode == 0 and out.stdout.startswith("sim-proc: ")
    out = aimesh("sim", "faults", "--target", sim_process_address, "--error-rate", "1.5")
    assert out.returncode == 1 and "INVALID_ARGUMENT" in out.stderr


def test_demo_starts_the_fleet_and_streams_an_answer() -> None:
    out = subprocess.run(
        procs.aimesh_command("demo", "--once"), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "9 instances registered" in out.stdout
    assert "reference.yaml: applied as config v" in out.stdout
    assert re.search(r"tokens from gpt4-gateway-(v2-)?\d", out.stderr), out.stderr
    split = re.search(r"over 50 gpt-4 calls: gpt4-gateway (\d+), gpt4-gateway-v2 (\d+)", out.stdout)
    assert split is not None, out.stdout
    assert int(split.group(1)) + int(split.group(2)) == 50 and int(split.group(1)) > 30
    # `aimesh status`: the product page's topology, plus the canary, every one healthy.
    assert "9 Healthy · 4 Services" in out.stdout
    assert re.search(r"gpt4-gateway +3/3 +\d+", out.stdout), out.stdout
    assert "gateway proxy on 127.0.0.1:" in out.stdout
    assert "aimesh demo: stopped" in out.stdout
