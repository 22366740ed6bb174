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
            "      circuitBreaker: {maxRetries: 100}",
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
    url = procs.admin_url(proxy)
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


RETRYING = (
    "  trafficPolicies:\n    - name: all\n      routes: [{destination: llm}]\n"
    "      backups: [llm-backup]\n"
    "      retry: {attempts: 3, retryOn: [UNAVAILABLE], backoff: {base: 5ms, max: 50ms}}\n"
)


async def _steady_unary(
    target: str, seconds: float, during: asyncio.Event | None = None, concurrency: int = 4
) -> tuple[int, list[str]]:
    """Closed-loop unary load; returns (calls, failures as 'CODE: details')."""
    ok = 0
    failures: list[str] = []
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.InferenceStub(ch)

        async def worker(w: int) -> None:
            nonlocal ok
            i = 0
            while loop.time() < end:
                try:
                    await stub.Generate(
                        pb.GenerateRequest(
                            model="gpt-4",
                            max_tokens=2,
                            messages=[pb.Message(role="user", content=f"w{w}-{i}")],
                        ),
                        timeout=10,
                    )
                    ok += 1
                except grpc.aio.AioRpcError as exc:
                    failures.append(f"{exc.code().name}: {exc.details()}")
                i += 1
                if during is not None and ok >= 50:
                    during.set()

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return ok, failures


async def test_unary_load_sees_no_failure_when_a_backend_is_killed(tmp_path: Path) -> None:
    sims = [procs.start_sim(f"u{i}", ["gpt-4"], "--ttft", "0", "--tps", "200") for i in range(3)]
    proxy = _proxy(tmp_path, _yaml({"llm": [s.address for s in sims], "llm-backup": []}, RETRYING))
    try:
        warmed = asyncio.Event()
        load = asyncio.create_task(_steady_unary(proxy.address, 3.0, during=warmed))
        await asyncio.wait_for(warmed.wait(), 10)
        sims[0].kill()  # SIGKILL under load
        ok, failures = await load
        assert failures == []
        assert ok > 100
    finally:
        proxy.terminate()
        for s in sims:
            s.kill()


async def test_primary_down_calls_go_to_the_backup(tmp_path: Path) -> None:
    primary = [procs.start_sim(f"p{i}", ["gpt-4"], "--ttft", "0", "--tps", "0") for i in range(2)]
    backup = procs.start_sim("b0", ["gpt-4"], "--ttft", "0", "--tps", "0")
    proxy = _proxy(
        tmp_path,
        _yaml({"llm": [p.address for p in primary], "llm-backup": [backup.address]}, RETRYING),
    )
    try:
        for p in primary:
            p.kill()
        ok, failures = await _steady_unary(proxy.address, 1.5)
        assert failures == [] and ok > 20
        async with grpc.aio.insecure_channel(proxy.address) as ch:
            call = pb_grpc.InferenceStub(ch).Generate(_req(0), timeout=5)
            await call
            assert dict(await call.trailing_metadata())["aimesh-instance"] == "b0"
    finally:
        proxy.terminate()
        backup.kill()


async def test_breaker_opens_on_a_failing_backend_and_closes_after_recovery(
    tmp_path: Path,
) -> None:
    sims = [procs.start_sim(f"c{i}", ["gpt-4"], "--ttft", "0", "--tps", "0") for i in range(2)]
    flaky = procs.start_sim(
        "flaky", ["gpt-4"], "--ttft", "0", "--tps", "0", "--error-rate", "0.6", "--seed", "1"
    )
    breaker = (
        "      circuitBreaker: {enabled: true, errorThreshold: 50%, minRequests: 10, "
        "window: 5s, openDuration: 500ms, maxOpenDuration: 2s, maxRetries: 100}\n"
    )
    text = _yaml({"llm": [s.address for s in (*sims, flaky)], "llm-backup": []}, RETRYING)
    text = text.replace(
        "        outlierDetection: {consecutiveErrors: 2, maxEjectionPercent: 100%}\n",
        "        outlierDetection: {consecutiveErrors: 1000}\n",
        1,
    ).replace("      circuitBreaker: {maxRetries: 100}\n", breaker, 1)
    proxy = _proxy(tmp_path, text)
    try:
        ok, failures = await _steady_unary(proxy.address, 2.0)
        assert failures == [], failures[:3]
        snap = _admin(proxy, "/clusters")
        llm = next(c for c in snap["clusters"] if c["name"] == "llm")  # type: ignore[index]
        flaky_ep = next(e for e in llm["endpoints"] if e["address"] == flaky.address)
        assert flaky_ep["breaker"]["trips"] >= 1
        procs.wait_for_output(proxy, f"circuit breaker <Breaker llm/{flaky.address}")
        # Retries stayed within the budget: 20% of calls plus 10 per second over 10 s.
        assert llm["retries"] == llm["retry_budget"]["allowed"] <= 0.2 * ok + 100
        heal = await asyncio.create_subprocess_exec(
            *procs.aimesh_command("sim", "faults", "--target", flaky.address, "--error-rate", "0")
        )
        assert await heal.wait() == 0
        loop = asyncio.get_running_loop()
        end = loop.time() + 10
        while True:
            await _steady_unary(proxy.address, 0.5)
            snap = _admin(proxy, "/clusters")
            llm = next(c for c in snap["clusters"] if c["name"] == "llm")  # type: ignore[index]
            state = next(e for e in llm["endpoints"] if e["address"] == flaky.address)
            if state["breaker"]["state"] == "CLOSED":
                break
            assert loop.time() < end, state
    finally:
        proxy.terminate()
        for s in (*sims, flaky):
            s.kill()


async def test_a_200ms_deadline_reaches_the_backend_reduced_through_two_proxy_processes(
    tmp_path: Path,
) -> None:
    from . import echo

    server, port = await echo.start("deep")
    policy = (
        f"  trafficPolicies:\n    - name: echo\n      match: {{service: {echo.SERVICE}}}\n"
        "      routes: [{destination: llm}]\n"
    )
    (tmp_path / "inner").mkdir()
    (tmp_path / "outer").mkdir()
    inner = _proxy(tmp_path / "inner", _yaml({"llm": [f"127.0.0.1:{port}"]}, policy))
    outer = _proxy(tmp_path / "outer", _yaml({"llm": [inner.address]}, policy))
    try:
        async with grpc.aio.insecure_channel(outer.address) as ch:
            call = ch.unary_unary(f"/{echo.SERVICE}/Unary")(b"x", timeout=0.2)
            assert await call == b"u:x"
            seen = int(dict(await call.trailing_metadata())["x-deadline-ms"])
        assert 0 < seen <= 200  # grpc rounds grpc-timeout up to whole ms on each hop
    finally:
        outer.terminate()
        inner.terminate()
        await server.stop(None)
