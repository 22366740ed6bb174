"""Distributed tracing: one trace per call across the client, the proxy and the backends.

The multi-hop tests run real processes (sims and a proxy, plus `aimesh chat`) exporting
over OTLP/gRPC to a trace receiver in this process, and check the parentage across them:
client span -> proxy server span -> route and attempt spans -> each sim's server span.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import pytest
import pytest_asyncio
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from aimesh.control.v1 import control_plane_pb2 as cp_pb
from aimesh.control.v1 import control_plane_pb2_grpc as cp_grpc
from aimesh.inference.v1 import inference_pb2_grpc as pb_grpc
from aimesh.mesh import procs
from aimesh.mesh.config import TracingSpec, load_dict, load_text
from aimesh.mesh.errors import ConfigError
from aimesh.mesh.observability.tracing import (
    ProxyTracing,
    TracingFlags,
    client_interceptors,
    proxy_tracing,
    resolve,
    setup_tracing,
    shutdown_tracing,
)
from aimesh.mesh.proxy.cluster import EndpointAddr
from aimesh.mesh.proxy.server import Proxy, ProxySettings

from .support import mesh_doc, prompt

SERVER = trace_pb2.Span.SPAN_KIND_SERVER
CLIENT = trace_pb2.Span.SPAN_KIND_CLIENT
INTERNAL = trace_pb2.Span.SPAN_KIND_INTERNAL
ERROR = trace_pb2.Status.STATUS_CODE_ERROR
INFERENCE = "aimesh.inference.v1.Inference"


# --- the OTLP receiver ------------------------------------------------------------------


def _value(v: common_pb2.AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@dataclass
class Span:
    service: str  # resource service.name
    instance: str  # resource service.instance.id
    pid: int
    raw: trace_pb2.Span
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.raw.name

    @property
    def id(self) -> str:
        return self.raw.span_id.hex()

    @property
    def parent(self) -> str:
        return self.raw.parent_span_id.hex()

    @property
    def trace(self) -> str:
        return self.raw.trace_id.hex()

    @property
    def kind(self) -> int:
        return self.raw.kind

    @property
    def error(self) -> bool:
        return self.raw.status.code == ERROR


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Collects what the processes export (OTLP/gRPC TraceService.Export)."""

    def __init__(self) -> None:
        self.spans: list[Span] = []

    async def Export(  # noqa: N802 (gRPC method name)
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for rs in request.resource_spans:
            res = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    attrs = {kv.key: _value(kv.value) for kv in s.attributes}
                    self.spans.append(
                        Span(
                            res.get("service.name", ""),
                            res.get("service.instance.id", ""),
                            res.get("process.pid", 0),
                            s,
                            attrs,
                        )
                    )
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.spans if s.trace == trace_id]

    async def wait(
        self, trace_id: str, done: Callable[[list[Span]], bool], timeout: float = 10.0
    ) -> list[Span]:
        deadline = time.monotonic() + timeout
        while not done(self.trace(trace_id)):
            if time.monotonic() > deadline:
                got = [(s.service, s.name, s.instance) for s in self.trace(trace_id)]
                raise AssertionError(f"trace {trace_id} incomplete after {timeout}s: {got}")
            await asyncio.sleep(0.02)
        return self.trace(trace_id)


def _count(spans: list[Span], service: str, kind: int) -> int:
    return sum(1 for s in spans if s.service == service and s.kind == kind)


def _complete(attempts: int, client: str = "aimesh-test-client") -> Callable[[list[Span]], bool]:
    """Client, proxy server span, route, `attempts` tries and as many sim server spans."""

    def done(spans: list[Span]) -> bool:
        return (
            _count(spans, client, CLIENT) == 1
            and _count(spans, "aimesh-gateway", SERVER) == 1
            and _count(spans, "aimesh-gateway", INTERNAL) == 1
            and _count(spans, "aimesh-gateway", CLIENT) == attempts
            and _count(spans, "aimesh-sim", SERVER) == attempts
        )

    return done


# --- the processes ----------------------------------------------------------------------


@dataclass
class Mesh:
    receiver: Receiver
    collector: str  # HOST:PORT of the receiver
    proxy: procs.Proc
    sims: dict[str, procs.Proc]
    client: TracerProvider
    channel: grpc.aio.Channel
    trace_ids: list[int]

    def stub(self) -> pb_grpc.InferenceStub:
        return pb_grpc.InferenceStub(self.channel)

    async def last_trace(self) -> str:
        await asyncio.to_thread(self.client.force_flush)
        return f"{self.trace_ids[-1]:032x}"


CONFIG = """\
apiVersion: mesh.ai/v1
kind: ServiceMesh
metadata: {{name: traced}}
spec:
  services:
    - name: llm
      models: [gpt-4]
      endpoints: [{{address: "{healthy}"}}]
    - name: breaking
      models: [gpt-4-stream]
      endpoints: [{{address: "{breaking}"}}]
    - name: flaky
      models: [gpt-4-retry]
      endpoints: [{{address: "{flaky}"}}]
  trafficPolicies:
    - name: streams
      match: {{models: [gpt-4-stream]}}
      routes: [{{destination: breaking}}]
      backups: [llm]
    - name: retried
      match: {{models: [gpt-4-retry]}}
      routes: [{{destination: flaky}}]
      backups: [llm]
      retry: {{attempts: 2, backoff: {{base: 0s, max: 0s}}}}
  observability:
    tracing: {{enabled: true, samplingRatio: 100%, serviceName: aimesh-gateway}}
"""

# Spans leave each process within 50 ms of ending (the default is every 5 s).
ENV = {"OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_SDK_DISABLED": "false"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    receiver = Receiver()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    collector = f"127.0.0.1:{port}"
    flags = ("--otlp-endpoint", collector, "--trace-sampling", "1")
    fast = ("--ttft", "0", "--tps", "0", "--length", "20-20", *flags)
    specs = {
        "healthy": (["gpt-4", "gpt-4-stream", "gpt-4-retry"], fast),
        "breaking": (["gpt-4-stream"], (*fast, "--die-after-tokens", "5")),
        "flaky": (["gpt-4-retry"], (*fast, "--error-rate", "1")),
    }
    started: list[procs.Proc] = []

    def start(name: str) -> procs.Proc:
        models, extra = specs[name]
        p = procs.start_sim(name, models, *extra, env=ENV)
        started.append(p)
        return p

    client = None
    try:
        sims = dict(
            zip(
                specs,
                await asyncio.gather(*(asyncio.to_thread(start, n) for n in specs)),
                strict=True,
            )
        )
        cfg = tmp_path_factory.mktemp("tracing") / "mesh.yaml"
        cfg.write_text(CONFIG.format(**{n: p.address for n, p in sims.items()}))
        argv = procs.aimesh_command(
            "proxy", "--listen", "127.0.0.1:0", "--config", str(cfg), "--grace", "1", *flags
        )
        proxy = await asyncio.to_thread(procs.start, "proxy", argv, env=ENV)
        started.append(proxy)
        # The test's own client: the SDK in this process, exporting to the same receiver.
        client = setup_tracing(
            "aimesh-test-client",
            None,
            ENV,
            TracingFlags(collector, 1.0),
            instance_id="pytest",
        )
        assert client is not None
        trace_ids: list[int] = []
        async with grpc.aio.insecure_channel(
            proxy.address, interceptors=client_interceptors(client, trace_ids)
        ) as channel:
            await channel.channel_ready()
            yield Mesh(receiver, collector, proxy, sims, client, channel, trace_ids)
    finally:
        if client is not None:
            await asyncio.to_thread(shutdown_tracing, client)
        await asyncio.gather(*(asyncio.to_thread(p.terminate, 5.0) for p in started))
        if os.environ.get("DUMP"):
            for p in started:
                print(p.name, "".join(p.output))
        await server.stop(None)


pytestmark = pytest.mark.slow


def _one(spans: list[Span], pred: Callable[[Span], bool]) -> Span:
    found = [s for s in spans if pred(s)]
    assert len(found) == 1, [(s.service, s.name) for s in found]
    return found[0]


def _hops(spans: list[Span], client: str = "aimesh-test-client") -> tuple[Span, Span, Span]:
    """The client span, the proxy's server span and its route span, checked for parentage."""
    root = _one(spans, lambda s: s.service == client)
    assert root.kind == CLIENT and root.parent == ""
    server = _one(spans, lambda s: s.service == "aimesh-gateway" and s.kind == SERVER)
    assert server.parent == root.id
    route = _one(spans, lambda s: s.name == "route")
    assert route.service == "aimesh-gateway" and route.parent == server.id
    assert route.raw.start_time_unix_nano <= route.raw.end_time_unix_nano
    return root, server, route


def _attempts(spans: list[Span], server: Span) -> list[tuple[Span, Span]]:
    """(attempt span, the sim's server span under it), in the order the tries started."""
    tries = sorted(
        (s for s in spans if s.service == "aimesh-gateway" and s.kind == CLIENT),
        key=lambda s: s.attrs["aimesh.attempt.number"],
    )
    out = []
    for t in tries:
        assert t.parent == server.id
        backend = _one(spans, lambda s, t=t: s.service == "aimesh-sim" and s.parent == t.id)
        assert backend.kind == SERVER
        out.append((t, backend))
    return out


@pytest.mark.asyncio(loop_scope="module")
async def test_unary_call_is_one_trace_across_three_processes(mesh: Mesh) -> None:
    response = await mesh.stub().Generate(prompt(), timeout=10)
    trace_id = await mesh.last_trace()
    spans = await mesh.receiver.wait(trace_id, _complete(1))
    assert len({s.pid for s in spans}) == 3  # client (this process), proxy, sim
    # The proxy's health checks of the sims (Watch streams) make no spans.
    assert not [s for s in mesh.receiver.spans if "grpc.health" in s.name]
    root, server, route = _hops(spans)
    assert root.name == f"/{INFERENCE}/Generate"
    assert server.name == f"{INFERENCE}/Generate"
    usage = response.usage
    assert server.attrs == server.attrs | {
        "rpc.system": "grpc",
        "rpc.service": INFERENCE,
        "rpc.method": "Generate",
        "rpc.grpc.status_code": 0,
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "gpt-4",
        "gen_ai.usage.input_tokens": usage.prompt_tokens,
        "gen_ai.usage.output_tokens": usage.completion_tokens,
        "aimesh.route": "model:gpt-4",
        "aimesh.service": "llm",
        "aimesh.endpoint": mesh.sims["healthy"].address,
        "aimesh.attempts": 1,
        "aimesh.resumed": 0,
    }
    assert not server.error and "aimesh.request_id" in server.attrs
    assert route.attrs["aimesh.route.destination"] == "llm"
    [(attempt, backend)] = _attempts(spans, server)
    assert attempt.name == "attempt llm"
    assert attempt.attrs == attempt.attrs | {
        "aimesh.attempt.kind": "first",
        "aimesh.attempt.status": "OK",
        "aimesh.endpoint": mesh.sims["healthy"].address,
        "server.port": int(mesh.sims["healthy"].address.rpartition(":")[2]),
    }
    assert backend.instance == "healthy" and backend.name == f"/{INFERENCE}/Generate"
    assert backend.attrs == backend.attrs | {
        "rpc.grpc.status_code": 0,
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "gpt-4",
        "gen_ai.usage.input_tokens": usage.prompt_tokens,
        "gen_ai.usage.output_tokens": usage.completion_tokens,
    }
    # The instrumentation hands unary responses to no hook: the model, but no usage here.
    assert root.attrs["gen_ai.request.model"] == "gpt-4"
    # Nested in time as in parentage.
    for outer, inner in ((root, server), (server, attempt), (attempt, backend)):
        if outer.pid != inner.pid:
            continue  # clocks of different processes: same host, but do not insist
        assert outer.raw.start_time_unix_nano <= inner.raw.start_time_unix_nano
        assert inner.raw.end_time_unix_nano <= outer.raw.end_time_unix_nano


@pytest.mark.asyncio(loop_scope="module")
async def test_resumed_stream_has_an_attempt_span_per_backend(mesh: Mesh) -> None:
    request = prompt(model="gpt-4-stream")
    chunks = [c async for c in mesh.stub().GenerateStream(request, timeout=10)]
    trace_id = await mesh.last_trace()
    spans = await mesh.receiver.wait(trace_id, _complete(2))
    assert len({s.pid for s in spans}) == 4  # client, proxy, two sims
    _, server, route = _hops(spans)
    assert route.attrs["aimesh.route"] == "streams"
    assert route.attrs["aimesh.route.destination"] == "breaking"
    tokens = sum(c.token_count for c in chunks)
    assert tokens == 20
    assert server.attrs == server.attrs | {
        "rpc.method": "GenerateStream",
        "gen_ai.request.model": "gpt-4-stream",
        "gen_ai.usage.output_tokens": tokens,
        "gen_ai.usage.input_tokens": chunks[-1].usage.prompt_tokens,
        "aimesh.attempts": 2,
        "aimesh.resumed": 1,
        "aimesh.service": "llm",
        "aimesh.endpoint": mesh.sims["healthy"].address,
    }
    assert server.attrs["aimesh.ttft_ms"] > 0
    assert [e.name for e in server.raw.events] == ["first token"]
    [(first, broke), (resume, finished)] = _attempts(spans, server)
    assert (first.attrs["aimesh.attempt.kind"], first.attrs["aimesh.service"]) == (
        "first",
        "breaking",
    )
    assert first.error and first.attrs["aimesh.attempt.status"] == "UNAVAILABLE"
    assert first.attrs["rpc.grpc.status_code"] == 14
    assert (resume.attrs["aimesh.attempt.kind"], resume.attrs["aimesh.service"]) == (
        "resume",
        "llm",
    )
    assert not resume.error and resume.attrs["aimesh.attempt.status"] == "OK"
    # Each backend's server span is the child of the try that reached it.
    assert broke.instance == "breaking" and finished.instance == "healthy"
    assert broke.error and broke.attrs["rpc.grpc.status_code"] == 14
    assert broke.attrs["gen_ai.usage.output_tokens"] == 5  # died after 5 tokens
    assert not finished.error
    assert finished.attrs["gen_ai.usage.output_tokens"] == tokens - 5  # the remainder


@pytest.mark.asyncio(loop_scope="module")
async def test_retried_call_has_a_retry_attempt_span(mesh: Mesh) -> None:
    response = await mesh.stub().Generate(prompt(model="gpt-4-retry"), timeout=10)
    trace_id = await mesh.last_trace()
    spans = await mesh.receiver.wait(trace_id, _complete(2))
    _, server, route = _hops(spans)
    assert not server.error and server.attrs["rpc.grpc.status_code"] == 0
    assert server.attrs["aimesh.route"] == route.attrs["aimesh.route"] == "retried"
    assert server.attrs["aimesh.attempts"] == 2
    assert server.attrs["gen_ai.usage.output_tokens"] == response.usage.completion_tokens
    [(first, failed), (retry, served)] = _attempts(spans, server)
    assert first.attrs["aimesh.attempt.kind"] == "first" and first.error
    assert first.attrs["aimesh.endpoint"] == mesh.sims["flaky"].address
    assert retry.attrs["aimesh.attempt.kind"] == "retry" and not retry.error
    assert retry.attrs["aimesh.endpoint"] == mesh.sims["healthy"].address
    assert failed.instance == "flaky" and failed.error
    assert failed.attrs["rpc.grpc.status_code"] == 14
    assert served.instance == "healthy" and not served.error


@pytest.mark.asyncio(loop_scope="module")
async def test_aimesh_chat_starts_the_trace(mesh: Mesh) -> None:
    chat = await asyncio.create_subprocess_exec(
        *procs.aimesh_command(
            "chat",
            "--target",
            mesh.proxy.address,
            "--model",
            "gpt-4",
            "-q",
            "--otlp-endpoint",
            mesh.collector,
            "hello",
        ),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **ENV},
    )
    out, err = await asyncio.wait_for(chat.communicate(), 30)
    assert chat.returncode == 0, err.decode()
    assert out.strip()
    [line] = [x for x in err.decode().splitlines() if x.startswith("aimesh-chat: trace ")]
    trace_id = line.rpartition(" ")[2]
    spans = await mesh.receiver.wait(trace_id, _complete(1, client="aimesh-chat"))
    root, server, _ = _hops(spans, client="aimesh-chat")
    assert root.attrs == root.attrs | {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "gpt-4",
        "gen_ai.usage.output_tokens": server.attrs["gen_ai.usage.output_tokens"],
    }
    assert server.attrs["rpc.method"] == "GenerateStream"


@pytest.mark.asyncio(loop_scope="module")
async def test_control_plane_traces_its_unary_calls(mesh: Mesh) -> None:
    cp = await asyncio.to_thread(
        procs.start_control_plane, "--otlp-endpoint", mesh.collector, admin=False, env=ENV
    )
    try:
        async with grpc.aio.insecure_channel(
            cp.address, interceptors=client_interceptors(mesh.client, mesh.trace_ids)
        ) as channel:
            await cp_grpc.StatusStub(channel).GetTopology(cp_pb.TopologyRequest(), timeout=5)
        trace_id = await mesh.last_trace()

        def done(spans: list[Span]) -> bool:
            return any(s.service == "aimesh-control-plane" for s in spans)

        spans = await mesh.receiver.wait(trace_id, done)
        root = _one(spans, lambda s: s.service == "aimesh-test-client")
        server = _one(spans, lambda s: s.service == "aimesh-control-plane")
        assert server.kind == SERVER and server.parent == root.id
        assert server.name == "/aimesh.mesh.v1.Status/GetTopology"
    finally:
        await asyncio.to_thread(cp.terminate, 5.0)


# --- in process: settings, config, and the proxy with tracing off -----------------------


def test_off_without_an_endpoint() -> None:
    assert setup_tracing("aimesh-proxy", None, {}) is None
    assert setup_tracing("aimesh-proxy", TracingSpec(), {}) is None
    # Settings given but not enabled: the config alone does not turn tracing on.
    assert resolve("aimesh-proxy", TracingSpec(endpoint="127.0.0.1:4317"), {}) is None
    disabled = {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}
    assert resolve("p", TracingSpec(enabled=True), disabled) is None
    assert resolve("p", None, disabled, TracingFlags("c:4317")) is None
    none = {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}
    assert resolve("p", None, none) is None


async def test_proxy_adds_no_policy_or_observer_when_tracing_is_off() -> None:
    proxy = Proxy(ProxySettings())
    assert proxy_tracing(proxy, None, {}) is None
    assert proxy_tracing(proxy, TracingSpec(), {"OTEL_SERVICE_NAME": "x"}) is None
    assert proxy.outer_policies == [] and proxy.observer is None
    on = Proxy(ProxySettings(tracing=TracingFlags("127.0.0.1:9")))
    provider = proxy_tracing(on, None, {})
    try:
        assert provider is not None
        [policy] = on.outer_policies
        assert isinstance(policy, ProxyTracing) and on.observer is policy
    finally:
        shutdown_tracing(provider, timeout=1.0)


def test_settings_precedence() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://env:4317",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://traces:4317",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.25",
        "OTEL_SERVICE_NAME": "from-env",
    }
    s = resolve("aimesh-proxy", None, env)
    assert s is not None
    assert (s.endpoint, s.insecure, s.ratio, s.parent_based, s.service_name) == (
        "https://traces:4317",
        False,
        0.25,
        True,
        "from-env",
    )
    cfg = TracingSpec(enabled=True, endpoint="cfg:4317", sampling_ratio=0.1, service_name="gw")
    s = resolve("aimesh-proxy", cfg, env)
    assert s is not None and (s.endpoint, s.insecure, s.ratio, s.service_name) == (
        "cfg:4317",
        True,
        0.1,
        "gw",
    )
    s = resolve("aimesh-proxy", cfg, env, TracingFlags("flag:4317", 0.5))
    assert s is not None and (s.endpoint, s.ratio) == ("flag:4317", 0.5)
    # Enabled without an endpoint anywhere: OTLP's default collector.
    s = resolve("aimesh-sim", TracingSpec(enabled=True), {})
    assert s is not None and (s.endpoint, s.ratio, s.service_name) == (
        "localhost:4317",
        1.0,
        "aimesh-sim",
    )
    s = resolve(
        "p", None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "c:1", "OTEL_TRACES_SAMPLER": "always_off"}
    )
    assert s is not None and (s.ratio, s.parent_based) == (0.0, False)


def test_config_section() -> None:
    doc = mesh_doc([{"name": "llm", "models": ["gpt-4"]}])
    spec = doc["spec"]
    assert isinstance(spec, dict)
    spec["observability"] = {
        "tracing": {
            "enabled": True,
            "endpoint": "127.0.0.1:4317",
            "samplingRatio": "10%",
            "serviceName": "edge-gateway",
        }
    }
    cfg = load_dict(doc)
    assert cfg.observability.tracing == TracingSpec(True, "127.0.0.1:4317", 0.1, "edge-gateway")
    assert load_dict(mesh_doc([])).observability.tracing == TracingSpec()
    spec["observability"] = {
        "tracing": {
            "enabled": "yes",
            "endpoint": "ftp://x:1",
            "samplingRatio": "150%",
            "serviceName": "",
            "exporter": "zipkin",
        }
    }
    with pytest.raises(ConfigError) as err:
        load_dict(doc)
    problems = "\n".join(err.value.errors)
    for path in ("enabled", "endpoint", "samplingRatio", "serviceName", "exporter"):
        assert f"spec.observability.tracing.{path}:" in problems
    spec["observability"] = {"tracing": {"endpoint": "collector:4317"}}
    [warning] = load_dict(doc).warnings
    assert warning.startswith("spec.observability.tracing.enabled: false")
    text = "apiVersion: mesh.ai/v1\nkind: ServiceMesh\nmetadata: {name: m}\nspec:\n"
    text += "  observability: {tracing: {enabled: true, endpoint: 'http://[::1]:4317'}}\n"
    assert load_text(text).observability.tracing.endpoint == "http://[::1]:4317"


# --- in process: the trace context a backend receives -----------------------------------


@pytest.fixture
def recorder() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


async def _upstream_headers(
    tracing: ProxyTracing | None, caller: tuple[tuple[str, str], ...]
) -> list[tuple[str, str]]:
    """Headers a raw backend sees for one call through an in-process proxy."""
    seen: list[tuple[str, str]] = []

    async def call(request: bytes, context: Any) -> bytes:
        seen.extend((k, v) for k, v in context.invocation_metadata() if k.startswith("trace"))
        return b""

    backend = grpc.aio.server()
    backend.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Traced", {"Call": grpc.unary_unary_rpc_method_handler(call)}
            ),
        )
    )
    port = backend.add_insecure_port("127.0.0.1:0")
    await backend.start()
    doc = mesh_doc(
        [{"name": "echo", "loadBalancer": {"healthCheck": {"enabled": False}}}],
        [{"name": "all", "routes": [{"destination": "echo"}]}],
    )
    proxy = Proxy(
        ProxySettings(extra_endpoints={"echo": [EndpointAddr(f"127.0.0.1:{port}")]}, seed=1)
    )
    if tracing is not None:
        proxy.outer_policies.append(tracing)
        proxy.observer = tracing
    await proxy.start(load_dict(doc))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.ports['listen']}") as ch:
            await ch.unary_unary("/test.Traced/Call")(b"x", metadata=caller, timeout=5)
    finally:
        await proxy.stop(0.5)
        await backend.stop(None)
    return seen


CALLER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def test_the_backend_gets_the_attempt_span_as_parent(
    recorder: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = recorder
    caller = (("traceparent", CALLER), ("tracestate", "vendor=1"))
    seen = await _upstream_headers(ProxyTracing(provider), caller)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"test.Traced/Call", "route", "attempt echo"}
    attempt = spans["attempt echo"]
    ctx = attempt.get_span_context()
    # One traceparent (the caller's replaced), naming the try; the tracestate carried on.
    assert seen == [
        ("traceparent", f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-01"),
        ("tracestate", "vendor=1"),
    ]
    server = spans["test.Traced/Call"]
    assert f"{server.context.trace_id:032x}" == CALLER.split("-")[1]
    assert server.parent is not None and f"{server.parent.span_id:016x}" == CALLER.split("-")[2]
    assert attempt.parent is not None and attempt.parent.span_id == server.context.span_id
    assert spans["route"].parent is not None
    assert spans["route"].parent.span_id == server.context.span_id
    assert "gen_ai.operation.name" not in (server.attributes or {})  # not an Inference call


async def test_without_tracing_the_trace_context_passes_through() -> None:
    caller = (("traceparent", CALLER),)
    assert await _upstream_headers(None, caller) == [("traceparent", CALLER)]


def test_the_proxy_decides_sampling_before_any_span_work() -> None:
    """Calls that are not sampled never reach the SDK: the proxy decides (a coin for new
    traces, the caller's flag otherwise) and only sends the decision upstream."""
    import random

    from opentelemetry.sdk.trace import TracerProvider

    from aimesh.mesh.observability.tracing import ProxyTracing

    tracing = ProxyTracing(TracerProvider(), ratio=0.25, rng=random.Random(7))
    roots = [tracing._unsampled({}) for _ in range(4000)]
    sampled = sum(r is None for r in roots)
    assert 900 < sampled < 1100  # 25% of 4,000, give or take
    header = next(r for r in roots if r is not None)[0]
    assert header[0] == "traceparent" and header[1].startswith("00-") and header[1].endswith("-00")
    assert len(header[1]) == 55
    tid = "4bf92f3577b34da6a3ce929d0e0e4736"
    caller_off = {"traceparent": f"00-{tid}-00f067aa0ba902b7-00", "tracestate": "k=v"}
    assert tracing._unsampled(caller_off) == tuple(caller_off.items())  # passed on as is
    assert tracing._unsampled({"traceparent": f"00-{tid}-00f067aa0ba902b7-01"}) is None
    assert tracing._unsampled({"traceparent": "garbage"}) is None  # the SDK decides
    # Not following callers (OTEL_TRACES_SAMPLER=traceidratio): the coin decides for all.
    own = ProxyTracing(TracerProvider(), ratio=0.0, parent_based=False, rng=random.Random(1))
    assert own._unsampled({"traceparent": f"00-{tid}-00f067aa0ba902b7-01"}) is not None
