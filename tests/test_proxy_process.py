"""`aimesh proxy` as a real process: the reference YAML, reload, sidecar mode, reflection."""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from aimesh.clients import InferenceClient, instance_of
from aimesh.inference.v1 import inference_pb2 as pb
from aimesh.inference.v1 import inference_pb2_grpc as pb_grpc
from aimesh.mesh import procs

from .test_reflection import _grpcurl

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "deploy" / "examples" / "reference.yaml"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fleet() -> Iterator[dict[str, procs.Proc]]:
    sims = {
        name: procs.start_sim(name, ["gpt-4"], "--ttft", "0", "--tps", "0")
        for name in ("stable-1", "stable-2", "canary-1")
    }
    try:
        yield sims
    finally:
        for p in sims.values():
            p.terminate()


def start_proxy(config: Path, *flags: str) -> procs.Proc:
    return procs.start(
        "proxy",
        procs.aimesh_command(
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--config",
            str(config),
            "--admin",
            "127.0.0.1:0",
            "--seed",
            "1",
            *flags,
        ),
    )


admin_url = procs.admin_url


def test_reference_yaml_runs_and_splits(fleet: dict[str, procs.Proc]) -> None:
    proxy = start_proxy(
        REFERENCE,
        "--endpoint",
        f"gpt4-gateway={fleet['stable-1'].address}",
        "--endpoint",
        f"gpt4-gateway={fleet['stable-2'].address}",
        "--endpoint",
        f"gpt4-gateway-v2={fleet['canary-1'].address}",
    )
    try:
        assert any("not declared in spec.services" in line for line in proxy.output)
        with grpc.insecure_channel(proxy.address) as ch:
            stub = pb_grpc.InferenceStub(ch)
            counts: Counter[str] = Counter()
            for i in range(300):
                _, call = stub.Generate.with_call(
                    pb.GenerateRequest(
                        model="gpt-4",
                        messages=[pb.Message(role="user", content=str(i))],
                        max_tokens=1,
                    )
                )
                counts[instance_of(call.trailing_metadata())] += 1
            text = "".join(c.text for c in InferenceClient(ch, model="gpt-4").stream("hi"))
        assert text
        assert counts["stable-1"] > 100 and counts["stable-2"] > 100
        assert 10 <= counts["canary-1"] <= 55  # 10% of 300, loosely (the exact test is in-process)
        with urllib.request.urlopen(admin_url(proxy) + "/clusters", timeout=5) as r:
            snap = json.load(r)
        names = {c["name"]: c for c in snap["clusters"]}
        assert names["gpt4-gateway"]["eligible"] == 2
        assert "aimesh.inference.v1.Inference" in snap["services_learned"]
    finally:
        assert proxy.terminate() == 0


def test_broken_reload_keeps_the_previous_config(
    fleet: dict[str, procs.Proc], tmp_path: Path
) -> None:
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text(REFERENCE.read_text())
    proxy = start_proxy(cfg, "--endpoint", f"gpt4-gateway={fleet['stable-1'].address}")
    try:
        cfg.write_text("apiVersion: mesh.ai/v1\nkind: ServiceMesh\nspec:\n  services: 7\n")
        proxy.popen.send_signal(signal.SIGHUP)
        procs.wait_for_output(proxy, "reload rejected, keeping the previous config", timeout=10)
        with grpc.insecure_channel(proxy.address) as ch:
            client = InferenceClient(ch, model="gpt-4", timeout=5)
            for _ in range(5):
                assert client.generate("still routed?", max_tokens=2).text
    finally:
        proxy.terminate()
    assert any("spec.services: must be a list" in line for line in proxy.output), proxy.output


def test_sidecar_inbound_and_outbound(fleet: dict[str, procs.Proc], tmp_path: Path) -> None:
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text(
        "apiVersion: mesh.ai/v1\nkind: ServiceMesh\nmetadata: {name: sc}\n"
        "spec:\n  services:\n    - name: remote\n      models: [gpt-4]\n"
    )
    proxy = start_proxy(
        cfg,
        "--mode",
        "sidecar",
        "--inbound",
        "127.0.0.1:0",
        "--local-app",
        fleet["stable-1"].address,
        "--endpoint",
        f"remote={fleet['stable-2'].address}",
    )
    try:
        line = next(line for line in proxy.output if "inbound on" in line)
        inbound = line.split("inbound on ", 1)[1].split(" ")[0]
        for target, expected in ((inbound, "stable-1"), (proxy.address, "stable-2")):
            with grpc.insecure_channel(target) as ch:
                _, call = pb_grpc.InferenceStub(ch).Generate.with_call(
                    pb.GenerateRequest(
                        model="gpt-4", messages=[pb.Message(role="user", content="x")], max_tokens=1
                    )
                )
                assert instance_of(call.trailing_metadata()) == expected
    finally:
        assert proxy.terminate() == 0


def test_grpcurl_lists_describes_and_calls_through_the_proxy(fleet: dict[str, procs.Proc]) -> None:
    grpcurl = _grpcurl()
    proxy = start_proxy(
        REFERENCE,
        "--endpoint",
        f"gpt4-gateway={fleet['stable-1'].address}",
        "--endpoint",
        f"gpt4-gateway-v2={fleet['canary-1'].address}",
    )
    try:

        def run(*args: str) -> str:
            out = subprocess.run(
                [grpcurl, "-plaintext", *args], capture_output=True, text=True, timeout=30
            )
            assert out.returncode == 0, out.stderr
            return out.stdout

        services = run(proxy.address, "list").split()
        assert "aimesh.inference.v1.Inference" in services
        assert "grpc.health.v1.Health" in services
        assert "rpc Generate" in run(proxy.address, "describe", "aimesh.inference.v1.Inference")
        body = json.dumps(
            {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}], "maxTokens": 3}
        )
        out = run("-d", body, proxy.address, "aimesh.inference.v1.Inference/Generate")
        assert json.loads(out)["usage"]["completion_tokens"] == 3
    finally:
        proxy.terminate()


def test_config_validate_cli() -> None:
    ok = subprocess.run(
        procs.aimesh_command("config", "validate", "-f", str(REFERENCE)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ok.returncode == 0 and "canary-rollout" in ok.stdout
    bad = subprocess.run(
        procs.aimesh_command("config", "validate", "-f", str(ROOT / "nope.yaml")),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2
