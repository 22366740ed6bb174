"""Chaos with real processes: backends killed (SIGKILL) or drained (SIGTERM) under load."""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from aimesh.inference.v1 import inference_pb2 as pb
from aimesh.inference.v1 import inference_pb2_grpc as pb_grpc
from aimesh.mesh import procs
from aimesh.mesh.sim.tokens import Completion

pytestmark = pytest.mark.slow

LENGTH = 60


def _yaml(services: dict[str, list[str]], policies: str = "") -> str:
    lines = [
        "apiVersion: mesh.ai/v1",
        "kind: ServiceMesh",
        "metadata: {name: chaos}",
        "spec:",
        "  services:",
    ]
    for name, addrs in services.items():
        lines += [f"    - name: {name}", "      endpoints:"]
        lines += [f"        - address: {a}" for a in addrs]
        lines += [
            "      loadBalancer:",
            "        algorithm: round_robin",
            "        healthCheck: {interval: 1s, timeout: 300ms}",
            "        outlierDetection: {consecutiveErrors: 2, maxEjectionPercent: 100%}",
        ]
    return "\n".join(lines) + "\n" + policies


@pytest.fixture
def sims() -> Iterator[list[procs.Proc]]:
    started = [
        procs.start_sim(
            f"sim-{i}",
            ["gpt-4"],
            "--ttft",
            "0",
            "--tps",
            "40",
            "--slots",
            "32",
            "--length",
            f"{LENGTH}-{LENGTH}",
        )
        for i in range(3)
    ]
    try:
        yield started
    finally:
        for p in started:
            p.kill()


def _proxy(tmp_path: Path, text: str, *flags: str) -> procs.Proc:
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text(text)
    return procs.start(
        "proxy",
        procs.aimesh_command(
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--config",
            str(cfg),
            "--admin",
            "127.0.0.1:0",
            *flags,
        ),
    )


def _admin(proxy: procs.Proc, path: str) -> object:
    url = procs.wait_for_output(proxy, "admin on").split("admin on ", 1)[1].split("/clusters")[0]
    with urllib.request.urlopen(url + path, timeout=5) as r:
        return json.load(r)


def _req(i: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(model="gpt-4", messages=[pb.Message(role="user", content=f"q{i}")])


def _expected(i: int) -> str:
    return Completion.for_prompt("gpt-4", [("user", f"q{i}")], None, (16, 64)).text(LENGTH)


async def test_streams_survive_their_backend_being_killed(
    sims: list[procs.Proc], tmp_path: Path
) -> None:
    primary, *others = sims
    proxy = _proxy(
        tmp_path,
        _yaml(
            {"llm": [primary.address], "llm-backup": [o.address for o in others]},
            "  trafficPolicies:\n    - name: all\n      routes: [{destination: llm}]\n"
            "      backups: [llm-backup]\n",
        ),
    )
    try:
        async with grpc.aio.insecure_channel(proxy.address) as ch:
            stub = pb_grpc.InferenceStub(ch)
            started = asyncio.Event()
            got_some = [asyncio.Event() for _ in range(20)]

            async def one(i: int) -> list[pb.GenerateChunk]:
                chunks = []
                async for c in stub.GenerateStream(_req(i), timeout=30):
                    chunks.append(c)
                    if len(chunks) == 5:
                        got_some[i].set()
                return chunks

            tasks = [asyncio.create_task(one(i)) for i in range(20)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in got_some)), 10)
            started.set()
            primary.kill()  # SIGKILL mid-stream: ~5 of 60 tokens delivered
            results = await asyncio.gather(*tasks)
        for i, chunks in enumerate(results):
            assert "".join(c.text for c in chunks) == _expected(i)
            index = 0
            for c in chunks:
                assert c.index == index
                index += c.token_count
            assert index == LENGTH
            assert chunks[-1].usage.completion_tokens == LENGTH
        snap = _admin(proxy, "/clusters")
        assert snap["streams_resumed"] >= 20  # type: ignore[index]
    finally:
        proxy.terminate()


async def test_resume_off_reports_tokens_delivered(sims: list[procs.Proc], tmp_path: Path) -> None:
    primary, *others = sims
    proxy = _proxy(
        tmp_path,
        _yaml(
            {"llm": [primary.address], "llm-backup": [o.address for o in others]},
            "  trafficPolicies:\n    - name: no-resume\n      routes: [{destination: llm}]\n"
            "      backups: [llm-backup]\n      resume: false\n",
        ),
    )
    try:
        async with grpc.aio.insecure_channel(proxy.address) as ch:
            call = pb_grpc.InferenceStub(ch).GenerateStream(_req(1), timeout=30)
            got = 0
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for c in call:
                    got += c.token_count
                    if got == 5:
                        primary.kill()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"broke after {got} tokens were delivered" in (info.value.details() or "")
        assert "resume is off for route no-resume" in (info.value.details() or "")
    finally:
        proxy.terminate()


async def test_proxy_drain_finishes_streams_and_refuses_new_calls(
    sims: list[procs.Proc], tmp_path: Path
) -> None:
    proxy = _proxy(
        tmp_path,
        _yaml(
            {"llm": [s.address for s in sims]},
            "  trafficPolicies:\n    - name: all\n      routes: [{destination: llm}]\n",
        ),
        "--grace",
        "10s",
    )
    try:
        async with grpc.aio.insecure_channel(proxy.address) as ch:
            stub = pb_grpc.InferenceStub(ch)
            call = stub.GenerateStream(_req(3), timeout=30)
            first = await call.read()
            proxy.popen.send_signal(signal.SIGTERM)
            procs.wait_for_output(proxy, "draining")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Generate(_req(4), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in (refused.value.details() or "")
            rest = []
            while (c := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
                rest.append(c)
            assert first.text + "".join(c.text for c in rest) == _expected(3)
        assert proxy.popen.wait(timeout=15) == 0
    finally:
        proxy.kill()
