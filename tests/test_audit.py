"""The audit trail: one JSON line per call (fields of unary, streamed, failed and retried
calls; no content unless asked), size-based rotation, and `aimesh audit report`."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from aimesh.inference.v1 import inference_pb2 as pb
from aimesh.inference.v1 import inference_pb2_grpc as pb_grpc
from aimesh.interceptors.base import AttemptFact, CallFacts
from aimesh.interceptors.events import CallEnded
from aimesh.mesh import procs
from aimesh.mesh.config import load_dict
from aimesh.mesh.observability.audit import AuditLog, AuditSettings, parse_size, record, rfc3339
from aimesh.mesh.observability.audit_report import build, expand, parse_since, render_table, run
from aimesh.mesh.proxy.cluster import EndpointAddr
from aimesh.mesh.proxy.server import Proxy, ProxySettings
from aimesh.mesh.sim.faults import Faults

from .support import SimFactory, endpoint, llm_mesh, prompt

SECRET = "the launch codes are 0000, please summarise"
RFC3339_MS = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"


async def audited(
    doc: dict[str, object], extra: dict[str, list[EndpointAddr]], settings: AuditSettings
) -> Proxy:
    proxy = Proxy(
        ProxySettings(listen="127.0.0.1:0", seed=3, extra_endpoints=extra, audit=settings)
    )
    await proxy.start(load_dict(doc, source="test"))
    return proxy


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_unary_streamed_and_failed_calls(make_sim: SimFactory, tmp_path: Path) -> None:
    sim = await make_sim(instance_id="a")
    log = tmp_path / "audit.log"
    proxy = await audited(*llm_mesh([sim]), AuditSettings(str(log)))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.ports['listen']}") as ch:
            stub = pb_grpc.InferenceStub(ch)
            unary = await stub.Generate(
                prompt(SECRET), metadata=(("x-request-id", "req-1"),), timeout=10
            )
            chunks = [c async for c in stub.GenerateStream(prompt(SECRET), timeout=10)]
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Generate(pb.GenerateRequest(model="nope"), timeout=10)
    finally:
        await proxy.stop(0.5)  # writes what is still queued
    text = log.read_text()
    u, s, f = lines(log)
    address = endpoint(sim).address

    assert u["time"] <= s["time"] <= f["time"]
    for rec in (u, s, f):
        assert re.match(RFC3339_MS, rec["time"]), rec["time"]
        assert rec["caller"] and rec["caller"].startswith("ipv")
        assert rec["request_id"]
        assert rec["tenant"] is None and rec["trace_id"] is None  # no auth, no tracing here
        assert rec["latency_ms"] > 0
        assert "prompt" not in rec and "completion" not in rec
    assert abs(time.time() - _epoch(u["time"])) < 60

    assert u["request_id"] == "req-1"
    assert (u["service"], u["endpoint"], u["model"], u["route"]) == (
        "llm",
        address,
        "gpt-4",
        "model:gpt-4",
    )
    assert u["method"] == "/aimesh.inference.v1.Inference/Generate"
    assert (u["status"], u["tokens_in"], u["tokens_out"]) == (
        "OK",
        unary.usage.prompt_tokens,
        unary.usage.completion_tokens,
    )
    assert u["attempts"] == 1
    assert u["tries"] == [{"endpoint": address, "kind": "first", "code": "OK"}]
    assert "ttft_ms" not in u and "message" not in u and u["resumed"] == 0

    assert s["method"] == "/aimesh.inference.v1.Inference/GenerateStream"
    assert s["status"] == "OK"
    assert s["tokens_out"] == sum(c.token_count for c in chunks) > 0
    assert s["tokens_in"] == chunks[-1].usage.prompt_tokens
    assert 0 <= s["ttft_ms"] <= s["latency_ms"]

    assert (f["status"], f["model"], f["service"], f["endpoint"]) == (
        "UNIMPLEMENTED",
        "nope",
        None,
        None,
    )
    assert "no route for model 'nope'" in f["message"]
    assert (f["attempts"], f["tries"], f["tokens_in"], f["tokens_out"]) == (0, [], 0, 0)

    # Content is never written unless asked: neither the prompt nor the answer.
    assert SECRET not in text and "launch codes" not in text
    assert unary.text[:40] not in text


async def test_retried_and_resumed_calls(make_sim: SimFactory, tmp_path: Path) -> None:
    bad = await make_sim(instance_id="bad", faults=Faults(error_rate=1.0))
    good = await make_sim(instance_id="good")
    log = tmp_path / "audit.log"
    doc, extra = llm_mesh([bad, good], retry={"attempts": 2, "backoff": {"base": "1ms"}})
    proxy = await audited(doc, extra, AuditSettings(str(log)))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.ports['listen']}") as ch:
            await pb_grpc.InferenceStub(ch).Generate(prompt(), timeout=10)
    finally:
        await proxy.stop(0.5)
    [rec] = lines(log)
    assert rec["status"] == "OK" and rec["route"] == "all"
    assert rec["attempts"] == 2
    assert rec["tries"] == [
        {"endpoint": endpoint(bad).address, "kind": "first", "code": "UNAVAILABLE"},
        {"endpoint": endpoint(good).address, "kind": "retry", "code": "OK"},
    ]
    assert rec["endpoint"] == endpoint(good).address

    breaking = await make_sim(instance_id="breaking", faults=Faults(die_after_tokens=5))
    healthy = await make_sim(instance_id="healthy")
    log2 = tmp_path / "resumed.log"
    proxy = await audited(*llm_mesh([breaking, healthy]), AuditSettings(str(log2)))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.ports['listen']}") as ch:
            chunks = [
                c async for c in pb_grpc.InferenceStub(ch).GenerateStream(prompt(), timeout=10)
            ]
    finally:
        await proxy.stop(0.5)
    [rec] = lines(log2)
    assert rec["status"] == "OK" and rec["resumed"] == 1
    assert [(t["kind"], t["code"]) for t in rec["tries"]] == [
        ("first", "UNAVAILABLE"),
        ("resume", "OK"),
    ]
    assert rec["tokens_out"] == sum(c.token_count for c in chunks)


async def test_content_only_when_asked(make_sim: SimFactory, tmp_path: Path) -> None:
    sim = await make_sim(instance_id="a")
    log = tmp_path / "audit.log"
    proxy = await audited(*llm_mesh([sim]), AuditSettings(str(log), include_content=True))
    try:
        request = pb.GenerateRequest(
            model="gpt-4",
            messages=[
                pb.Message(role="system", content="be brief"),
                pb.Message(role="user", content=SECRET),
            ],
        )
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.ports['listen']}") as ch:
            stub = pb_grpc.InferenceStub(ch)
            unary = await stub.Generate(request, timeout=10)
            chunks = [c async for c in stub.GenerateStream(request, timeout=10)]
    finally:
        await proxy.stop(0.5)
    u, s = lines(log)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": SECRET}]
    assert u["prompt"] == messages and s["prompt"] == messages
    assert u["completion"] == unary.text and unary.text
    assert s["completion"] == "".join(c.text for c in chunks)


async def test_rotation_by_size(make_sim: SimFactory, tmp_path: Path) -> None:
    sim = await make_sim(instance_id="a")
    log = tmp_path / "audit.log"
    proxy = await audited(*llm_mesh([sim]), AuditSettings(str(log), max_bytes=2000, backups=2))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.ports['listen']}") as ch:
            stub = pb_grpc.InferenceStub(ch)
            for i in range(20):  # about 450 bytes a record: 4 a file
                await stub.Generate(prompt(), metadata=(("x-request-id", f"r{i}"),), timeout=10)
                if i % 5 == 0:
                    assert proxy.audit is not None
                    proxy.audit.flush()
    finally:
        await proxy.stop(0.5)
    check_rotated(log)


def check_rotated(log: Path) -> None:
    files = [log, Path(f"{log}.1"), Path(f"{log}.2")]
    assert all(f.exists() for f in files) and not Path(f"{log}.3").exists()
    assert all(0 < f.stat().st_size <= 2000 for f in files)
    kept = [r["request_id"] for f in reversed(files) for r in lines(f)]
    # The newest records, in order, with nothing lost between the files kept.
    assert kept == [f"r{i}" for i in range(20 - len(kept), 20)] and len(kept) >= 6
    # The report reads the rotated files too, oldest first.
    assert expand([str(log)]) == list(reversed(files))
    assert build(expand([str(log)])).total.calls == len(kept)


def _epoch(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text).timestamp()


def _event(
    *,
    at: float,
    tenant: str = "",
    model: str = "gpt-4",
    service: str = "gpt4-gateway",
    code: grpc.StatusCode = grpc.StatusCode.OK,
    tokens: tuple[int, int] = (10, 20),
    latency: float = 0.1,
) -> CallEnded:
    ns = int(at * 1e9)
    facts = CallFacts(route=f"model:{model}", model=model, tokens_in=tokens[0])
    facts.tokens_out = tokens[1]
    facts.tenant = tenant
    facts.attempts.append(AttemptFact(service, "10.0.0.1:1", "first", ns, ns + 1, code))
    return CallEnded(
        "/aimesh.inference.v1.Inference/Generate",
        code,
        latency,
        "rid",
        "ipv4:127.0.0.1:1",
        facts,
        ns,
        "" if code is grpc.StatusCode.OK else "boom",
    )


def test_record_and_helpers() -> None:
    rec = record(_event(at=1_700_000_000.1234, code=grpc.StatusCode.UNAVAILABLE))
    assert rec["time"] == "2023-11-14T22:13:20.123Z"
    assert rec["message"] == "boom" and rec["status"] == "UNAVAILABLE"
    assert list(rec)[:10] == [
        "time",
        "trace_id",
        "request_id",
        "caller",
        "tenant",
        "service",
        "method",
        "model",
        "endpoint",
        "status",
    ]
    assert rfc3339(0) == "1970-01-01T00:00:00.000Z"
    assert parse_size("50MB") == 50_000_000 and parse_size("1MiB") == parse_size("1M") == 2**20
    assert parse_size("1234") == 1234
    with pytest.raises(ValueError):
        parse_size("lots")
    assert parse_since("15m") == 900 and parse_since("1h") == 3600
    assert parse_since("7d") == 7 * 86400 and parse_since("90s") == 90
    with pytest.raises(ValueError):
        parse_since("yesterday")


def add_older_and_malformed(tmp_path: Path, log: Path) -> Path:
    # Older records for another tenant, written the same way (2 hours and 3 days ago),
    # an older rotated file, and lines that are not records.
    now = time.time()
    older = AuditLog(AuditSettings(str(tmp_path / "older.log")))
    for ev in (
        _event(at=now - 2 * 3600, tenant="acme", tokens=(100, 200), latency=0.5),
        _event(at=now - 2 * 3600 + 1, tenant="acme", code=grpc.StatusCode.DEADLINE_EXCEEDED),
        _event(at=now - 3 * 86400, tenant="acme", model="claude", service="claude-gateway"),
    ):
        older(ev)
    older.close()
    rotated = Path(f"{log}.1")
    rotated.write_text(
        (tmp_path / "older.log").read_text() + "not json at all\n" + '{"no": "time"}\n' + "[1]\n"
    )
    with log.open("a") as f:
        f.write('{"time": "2026-13-99T99:99:99Z", "status": "OK"}\n')
        f.write('{"time":"2026-01-01T00:00')  # a partial last line
    return rotated


async def test_report_counts_tokens_errors_and_honours_since(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    # Real records, written by the sink through a proxy: 3 OK calls and 1 failure.
    sim = await make_sim(instance_id="a")
    log = tmp_path / "audit.log"
    proxy = await audited(*llm_mesh([sim]), AuditSettings(str(log)))
    usage = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.ports['listen']}") as ch:
            stub = pb_grpc.InferenceStub(ch)
            for i in range(3):
                usage.append((await stub.Generate(prompt(f"q{i}"), timeout=10)).usage)
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Generate(pb.GenerateRequest(model="nope"), timeout=10)
    finally:
        await proxy.stop(0.5)
    real_in = sum(u.prompt_tokens for u in usage)
    real_out = sum(u.completion_tokens for u in usage)

    rotated = add_older_and_malformed(tmp_path, log)
    now = time.time()
    paths = expand([str(log)])
    assert paths == [rotated, log]

    hour = build(paths, since=3600, now=now + 1)
    assert hour.total.calls == 4 and hour.total.errors == 1
    assert (hour.total.tokens_in, hour.total.tokens_out) == (real_in, real_out)
    assert hour.older == 3 and hour.malformed == 5
    assert hour.malformed_at[:3] == [f"{rotated}:4", f"{rotated}:5", f"{rotated}:6"]
    groups = {k: g for k, g in hour.groups.items()}
    assert groups[("-", "gpt-4", "llm")].calls == 3
    assert groups[("-", "nope", "-")].errors == 1

    week = build(paths, since=7 * 86400, now=now + 1)
    assert week.total.calls == 7 and week.total.errors == 2 and week.older == 0
    assert week.total.tokens_in == real_in + 100 + 10 + 10
    acme = week.groups[("acme", "gpt-4", "gpt4-gateway")].summary()
    assert (acme["calls"], acme["errors"], acme["error_rate"]) == (2, 1, 0.5)
    assert acme["latency_ms"] == {"p50": 100.0, "p95": 500.0}
    assert acme["errors_by_status"] == {"DEADLINE_EXCEEDED": 1}
    assert week.groups[("acme", "claude", "claude-gateway")].calls == 1

    by_tenant = build(paths, by=("tenant",), since=7 * 86400, now=now + 1)
    assert {k: g.calls for k, g in by_tenant.groups.items()} == {("-",): 4, ("acme",): 3}

    # The command: table and JSON.
    out = io.StringIO()
    args = argparse.Namespace(
        file=[str(log)], since="1h", by="tenant,model,service", output="table"
    )
    assert run(args, out, io.StringIO()) == 0
    table = out.getvalue()
    assert "TENANT" in table and "TOTAL" in table and "gpt-4" in table and "acme" not in table
    assert "5 malformed lines skipped" in table and "3 older records" in table
    assert "UNIMPLEMENTED 1" in table
    out = io.StringIO()
    args = argparse.Namespace(file=[str(log)], since="7d", by="tenant", output="json")
    assert run(args, out, io.StringIO()) == 0
    data = json.loads(out.getvalue())
    assert data["total"]["calls"] == 7 and data["malformed"] == 5
    assert data["groups"][0]["key"] == {"tenant": "-"} and data["groups"][0]["calls"] == 4
    err = io.StringIO()
    args = argparse.Namespace(file=[str(log)], since="soon", by="tenant", output="json")
    assert run(args, io.StringIO(), err) == 2 and "--since" in err.getvalue()
    args = argparse.Namespace(file=[str(log)], since=None, by="colour", output="json")
    assert run(args, io.StringIO(), io.StringIO()) == 2
    args = argparse.Namespace(
        file=[str(tmp_path / "none.log")], since=None, by="model", output="json"
    )
    assert run(args, io.StringIO(), io.StringIO()) == 1
    render_table(build([]), io.StringIO())  # an empty report renders too


async def test_the_sink_is_cheap_and_close_loses_nothing(tmp_path: Path) -> None:
    """On the loop a call pays for a queue append; formatting runs after the step."""
    log = tmp_path / "audit.log"
    sink = AuditLog(AuditSettings(str(log), flush_interval=0.05))
    sink.start()
    now = time.time()
    events = [_event(at=now) for _ in range(20_000)]
    spent = 0.0
    for i, ev in enumerate(events):
        t0 = time.perf_counter()
        sink(ev)
        spent += time.perf_counter() - t0
        if i % 100 == 99:
            await asyncio.sleep(0)  # the loop runs the formatting callback
    per_call = spent / len(events)
    await sink.aclose()
    assert count_lines(log) == 20_000 == sink.written
    assert per_call < 5e-6, f"{per_call * 1e6:.2f} µs per call in the sink"


def count_lines(path: Path) -> int:
    return len(path.read_text().splitlines())


@pytest.mark.slow
def test_proxy_process_writes_what_the_report_sums(tmp_path: Path) -> None:
    sim = procs.start_sim("audit-sim", ["gpt-4"], "--ttft", "0", "--tps", "0")
    config = tmp_path / "mesh.yaml"
    config.write_text(
        "apiVersion: mesh.ai/v1\nkind: ServiceMesh\nmetadata:\n  name: audit\n"
        "spec:\n  services:\n    - name: llm\n      models: [gpt-4]\n"
    )
    log = tmp_path / "audit.log"
    proxy = None
    try:
        proxy = procs.start(
            "proxy",
            procs.aimesh_command(
                "proxy",
                "--listen",
                "127.0.0.1:0",
                "--config",
                str(config),
                "--endpoint",
                f"llm={sim.address}",
                "--audit-log",
                str(log),
                "--audit-max-bytes",
                "1MB",
            ),
        )
        tokens_out = 0
        with grpc.insecure_channel(proxy.address) as ch:
            stub = pb_grpc.InferenceStub(ch)
            for i in range(5):
                tokens_out += stub.Generate(prompt(f"q{i}"), timeout=10).usage.completion_tokens
            for c in stub.GenerateStream(prompt("stream"), timeout=10):
                tokens_out += c.token_count
            with pytest.raises(grpc.RpcError):
                stub.Generate(pb.GenerateRequest(model="nope"), timeout=10)
        assert proxy.terminate() == 0  # SIGTERM: the proxy writes what it still holds
    finally:
        if proxy is not None:
            proxy.kill()
        sim.terminate()
    assert len(log.read_text().splitlines()) == 7
    result = subprocess.run(
        procs.aimesh_command(
            "audit", "report", "--file", str(log), "--since", "15m", "--by", "model", "-o", "json"
        ),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["total"]["calls"] == 7 and data["total"]["errors"] == 1
    assert data["total"]["tokens_out"] == tokens_out
    assert {g["key"]["model"]: g["calls"] for g in data["groups"]} == {"gpt-4": 6, "nope": 1}
    table = subprocess.run(
        procs.aimesh_command("audit", "report", "--file", str(log)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert table.returncode == 0 and "TOTAL" in table.stdout, table.stderr
    print(table.stdout)
