"""Routing by availability and cost: the model catalog's prices, `balance: cost` with a
latency objective, cross-provider failover with a model rewrite, cooling down on a
pushback, the cost of each call, and experiment arms."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import grpc
import grpc.aio
import pytest
import yaml

from aimesh.inference.v1 import inference_pb2_grpc as pb_grpc
from aimesh.interceptors.events import CallEnded
from aimesh.mesh import procs
from aimesh.mesh.config import load_dict
from aimesh.mesh.errors import ConfigError
from aimesh.mesh.proxy.cluster import EndpointAddr
from aimesh.mesh.proxy.router import Router
from aimesh.mesh.proxy.server import Proxy, ProxySettings
from aimesh.mesh.sim.faults import Faults

from .support import SimFactory, endpoint, mesh_doc, prompt

CATALOG = [
    {
        "name": "gpt-4",
        "provider": "openai",
        "price": {"inputPerMillion": 30, "outputPerMillion": 60},
    },
    {
        "name": "claude-3-5-sonnet",
        "provider": "anthropic",
        "price": {"inputPerMillion": 3, "outputPerMillion": 15},
    },
    {"name": "llama-3-8b", "provider": "self-hosted", "price": {"inputPerMillion": "$0.2"}},
]


def cost_doc(objective: str | None = None, experiment: str | None = None) -> dict[str, object]:
    policy: dict[str, object] = {
        "name": "cheapest-gpt4",
        "match": {"models": ["gpt-4"]},
        "balance": "cost",
        "routes": [
            {"destination": "gpt4-gateway", "weight": 1, "arm": "openai"},
            {
                "destination": "claude-gateway",
                "weight": 1,
                "model": "claude-3-5-sonnet",
                "arm": "anthropic",
            },
        ],
    }
    if objective:
        policy["latencyObjective"] = objective
    if experiment:
        policy["experiment"] = experiment
    doc = mesh_doc(
        [
            {"name": "gpt4-gateway", "loadBalancer": {"algorithm": "round_robin"}},
            {"name": "claude-gateway", "loadBalancer": {"algorithm": "round_robin"}},
        ],
        [policy],
    )
    doc["spec"]["models"] = CATALOG  # type: ignore[index]
    return doc


def test_catalog_and_policy_fields_load() -> None:
    cfg = load_dict(cost_doc("500ms", "providers"))
    assert [(m.name, m.provider, m.input_price, m.output_price) for m in cfg.models] == [
        ("gpt-4", "openai", 30.0, 60.0),
        ("claude-3-5-sonnet", "anthropic", 3.0, 15.0),
        ("llama-3-8b", "self-hosted", 0.2, 0.0),
    ]
    assert cfg.model("gpt-4") is not None and cfg.model("gpt-4").cost(1000, 500) == pytest.approx(
        0.06
    )  # type: ignore[union-attr]
    policy = cfg.traffic_policies[0]
    assert (policy.balance, policy.latency_objective, policy.experiment) == (
        "cost",
        0.5,
        "providers",
    )
    assert [(r.model, r.arm_name) for r in policy.routes] == [
        (None, "openai"),
        ("claude-3-5-sonnet", "anthropic"),
    ]


def test_bad_catalog_and_balance_are_named_by_path() -> None:
    doc = cost_doc()
    doc["spec"]["models"] = [  # type: ignore[index]
        {"name": "gpt-4", "price": {"inputPerMillion": -1}},
        {"name": "gpt-4"},
    ]
    doc["spec"]["trafficPolicies"][0]["balance"] = "cheap"  # type: ignore[index]
    with pytest.raises(ConfigError) as info:
        load_dict(doc)
    errors = info.value.errors
    assert any(
        e.startswith("spec.models[0].price.inputPerMillion: -1 is not a price") for e in errors
    )
    assert any(e.startswith("spec.models[1].name") and "duplicate" in e for e in errors)
    assert any(
        e.startswith("spec.trafficPolicies[0].balance: must be one of weighted, cost")
        for e in errors
    )


def test_order_by_cost_is_cheapest_meeting_the_objective_then_fastest() -> None:
    decision = Router(load_dict(cost_doc("200ms"))).route(
        "aimesh.inference.v1.Inference", "Generate", {}, "gpt-4"
    )
    assert decision is not None
    price = {"gpt4-gateway": 90.0, "claude-gateway": 18.0}.__getitem__
    up = {"gpt4-gateway": True, "claude-gateway": True}

    def order(latency: dict[str, float]) -> list[str]:
        return decision.order_by_cost(up.__getitem__, price, latency.__getitem__)

    # Unknown latency counts as meeting it: the cheaper one first.
    assert order({"gpt4-gateway": 0.0, "claude-gateway": 0.0}) == ["claude-gateway", "gpt4-gateway"]
    # Claude too slow for the objective: GPT-4 first although dearer.
    assert order({"gpt4-gateway": 0.05, "claude-gateway": 0.9}) == [
        "gpt4-gateway",
        "claude-gateway",
    ]
    # Both too slow: the faster first.
    assert order({"gpt4-gateway": 0.5, "claude-gateway": 0.3}) == ["claude-gateway", "gpt4-gateway"]
    up["claude-gateway"] = False  # down or rate limited: not offered
    assert order({"gpt4-gateway": 0.0, "claude-gateway": 0.0}) == ["gpt4-gateway"]
    assert decision.model_for("claude-gateway") == "claude-3-5-sonnet"
    assert decision.model_for("gpt4-gateway") is None


async def proxied(
    doc: dict[str, object], extra: dict[str, list[EndpointAddr]], events: list[CallEnded]
) -> Proxy:
    proxy = Proxy(ProxySettings(listen="127.0.0.1:0", seed=5, extra_endpoints=extra))
    proxy.sinks.append(events.append)
    await proxy.start(load_dict(doc, source="test"))
    return proxy


async def test_cheapest_provider_serves_with_its_own_model_and_the_cost_is_recorded(
    make_sim: SimFactory,
) -> None:
    gpt4 = await make_sim(instance_id="gpt4", models=("gpt-4",))
    claude = await make_sim(instance_id="claude", models=("claude-3-5-sonnet",))
    events: list[CallEnded] = []
    extra = {"gpt4-gateway": [endpoint(gpt4)], "claude-gateway": [endpoint(claude)]}
    proxy = await proxied(cost_doc(experiment="providers"), extra, events)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.ports['listen']}") as ch:
            stub = pb_grpc.InferenceStub(ch)
            call = stub.Generate(prompt(), timeout=10)
            response = await call
            trailers = dict(await call.trailing_metadata() or ())
            chunks = [c async for c in stub.GenerateStream(prompt("again"), timeout=10)]
        # The gpt-4 call was served by the cheaper Claude, asked for its own model.
        assert trailers["aimesh-instance"] == "claude"
        assert response.model == "claude-3-5-sonnet"
        assert chunks[-1].usage.completion_tokens > 0
        unary, stream = events
        assert stream.facts.tokens_out == sum(c.token_count for c in chunks)
        for event in events:
            f = event.facts
            assert (f.model, f.served_model, f.service) == (
                "gpt-4",
                "claude-3-5-sonnet",
                "claude-gateway",
            )
            assert (f.experiment, f.arm) == ("providers", "anthropic")
            assert f.cost_usd == pytest.approx((f.tokens_in * 3 + f.tokens_out * 15) / 1e6)
            assert f.cost_usd > 0
        assert unary.facts.tokens_out == response.usage.completion_tokens
    finally:
        await proxy.stop(0.5)


async def test_latency_objective_moves_traffic_to_the_provider_that_meets_it(
    make_sim: SimFactory,
) -> None:
    gpt4 = await make_sim(instance_id="gpt4", models=("gpt-4",))
    slow = await make_sim(
        instance_id="claude", models=("claude-3-5-sonnet",), faults=Faults(extra_latency=0.3)
    )
    events: list[CallEnded] = []
    extra = {"gpt4-gateway": [endpoint(gpt4)], "claude-gateway": [endpoint(slow)]}
    proxy = await proxied(cost_doc("100ms"), extra, events)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.ports['listen']}") as ch:
            stub = pb_grpc.InferenceStub(ch)
            for _ in range(6):
                await stub.Generate(prompt(), timeout=10)
        served = [e.facts.service for e in events]
        # The first call learns Claude is too slow for 100 ms; the rest go to GPT-4.
        assert served[0] == "claude-gateway"
        assert served[1:] == ["gpt4-gateway"] * 5
    finally:
        await proxy.stop(0.5)


async def test_rate_limited_provider_fails_over_and_comes_back_after_the_pushback(
    make_sim: SimFactory,
) -> None:
    """gpt4-gateway is the OpenAI adapter in front of a fake OpenAI that answers 429
    (retry-after-ms 1500) once; claude-gateway is a sim. GPT-4 is priced cheaper here, so
    it is preferred: the 429'd call is retried on Claude at once, calls during the pushback
    go to Claude without touching OpenAI, and after it traffic returns to GPT-4."""
    from aimesh.mesh.providers import openai
    from aimesh.mesh.providers.base import ApiKey, BackendConfig, start_provider

    from .provider_fake import running

    claude = await make_sim(instance_id="claude", models=("claude-3-5-sonnet",))
    doc = cost_doc()
    doc["spec"]["models"][0]["price"] = {"inputPerMillion": 1, "outputPerMillion": 2}  # type: ignore[index]
    doc["spec"]["trafficPolicies"][0]["retry"] = {  # type: ignore[index]
        "attempts": 2,
        "retryOn": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
    }
    with running() as fake:
        fake.reply("/v1/chat/completions", "openai_error_429.http")
        fake.reply("/v1/chat/completions", "openai_chat_unary.http", always=True)
        adapter = await start_provider(
            openai.OpenAIProvider(ApiKey("sk-test-not-a-real-key")),
            fake.base + "/v1",
            BackendConfig(instance_id="openai", model_map={"gpt-4": "gpt-4o-mini"}),
        )
        events: list[CallEnded] = []
        extra = {
            "gpt4-gateway": [EndpointAddr(f"127.0.0.1:{adapter.port}")],
            "claude-gateway": [endpoint(claude)],
        }
        proxy = await proxied(doc, extra, events)
        try:
            loop = asyncio.get_running_loop()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.ports['listen']}") as ch:
                stub = pb_grpc.InferenceStub(ch)
                await stub.Generate(prompt(), timeout=10)
                limited_at = loop.time()
                first = events[0].facts
                assert [(a.service, a.code) for a in first.attempts] == [
                    ("gpt4-gateway", grpc.StatusCode.RESOURCE_EXHAUSTED),
                    ("claude-gateway", grpc.StatusCode.OK),
                ]
                # Retried on Claude at once, not after the 1.5 s pushback.
                assert (first.attempts[1].started_ns - first.attempts[0].ended_ns) / 1e9 < 0.5
                # While OpenAI cools down, calls go to Claude and OpenAI hears nothing.
                await stub.Generate(prompt(), timeout=10)
                assert events[-1].facts.service == "claude-gateway"
                assert len(fake.requests("/v1/chat/completions")) == 1
                # After the pushback, traffic comes back to the cheaper GPT-4.
                while loop.time() - limited_at < 5:
                    await stub.Generate(prompt(), timeout=10)
                    if events[-1].facts.service == "gpt4-gateway":
                        break
                back_after = loop.time() - limited_at
        finally:
            await proxy.stop(0.5)
            await adapter.server.stop(None)
            await adapter.backend.http.aclose()
    assert 1.4 <= back_after < 3.0, back_after
    back = events[-1].facts
    assert (back.service, back.served_model, back.attempts[-1].code) == (
        "gpt4-gateway",
        "gpt-4",
        grpc.StatusCode.OK,
    )
    # Each call's cost at the price of the model that served it.
    assert back.cost_usd == pytest.approx((back.tokens_in * 1 + back.tokens_out * 2) / 1e6)
    on_claude = events[1].facts
    assert on_claude.cost_usd == pytest.approx(
        (on_claude.tokens_in * 3 + on_claude.tokens_out * 15) / 1e6
    )


def test_make_run_adds_a_provider_only_when_its_key_is_set() -> None:
    from aimesh.mesh.demo import provider_commands

    assert provider_commands({}, "127.0.0.1:15010", "127.0.0.1") == []
    [(name, argv)] = provider_commands(
        {"ANTHROPIC_API_KEY": "x", "ANTHROPIC_BASE_URL": "http://127.0.0.1:9/"},
        "127.0.0.1:15010",
        "127.0.0.1",
    )
    assert name == "anthropic-gateway-1"
    joined = " ".join(argv)
    assert "backend anthropic" in joined and "--api-key-env ANTHROPIC_API_KEY" in joined
    assert "--service anthropic-gateway" in joined and "--base-url http://127.0.0.1:9/" in joined
    assert "x" not in argv  # the key itself is never on a command line


async def test_experiment_end_to_end_through_a_proxy_process(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    """A real `aimesh proxy --audit-log` with an experiment policy; `aimesh experiments
    report` over what it wrote compares the arms."""
    control = await make_sim(instance_id="control")
    treatment = await make_sim(instance_id="treatment", faults=Faults(error_rate=0.5), seed=4)
    doc = mesh_doc(
        [{"name": "svc-a"}, {"name": "svc-b"}],
        [
            {
                "name": "prompt-test",
                "match": {"models": ["gpt-4"]},
                "experiment": "prompt-v2",
                "routes": [
                    {"destination": "svc-a", "weight": 50, "arm": "control"},
                    {"destination": "svc-b", "weight": 50, "arm": "treatment"},
                ],
            }
        ],
    )
    doc["spec"]["models"] = CATALOG  # type: ignore[index]
    config = tmp_path / "mesh.yaml"
    config.write_text(yaml.safe_dump(doc))
    audit = tmp_path / "audit.jsonl"
    proxy = procs.start(
        "proxy",
        procs.aimesh_command(
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--config",
            str(config),
            "--endpoint",
            f"svc-a={endpoint(control).address}",
            "--endpoint",
            f"svc-b={endpoint(treatment).address}",
            "--audit-log",
            str(audit),
            "--seed",
            "1",
        ),
    )
    try:
        async with grpc.aio.insecure_channel(proxy.address) as ch:
            stub = pb_grpc.InferenceStub(ch)
            for i in range(80):
                try:
                    await stub.Generate(prompt(f"q{i}"), timeout=10)
                except grpc.aio.AioRpcError:
                    pass
    finally:
        proxy.terminate()  # SIGTERM: the audit trail is flushed on the way out
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert len(records) == 80
    assert {r["arm"] for r in records} == {"control", "treatment"}
    assert all(
        r["experiment"] == "prompt-v2" and r["cost_usd"] for r in records if r["status"] == "OK"
    )
    out = await asyncio.to_thread(
        subprocess.run,
        procs.aimesh_command(
            "experiments",
            "report",
            "prompt-v2",
            "--file",
            str(audit),
            "-o",
            "json",
            "--control",
            "control",
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    text = json.dumps(report)
    assert "control" in text and "treatment" in text
    arms = {a["arm"]: a for a in report["arms"]}
    assert arms["control"]["error_rate"] == 0
    assert arms["treatment"]["error_rate"] > 0.2
