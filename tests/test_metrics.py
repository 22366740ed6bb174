"""Prometheus metrics: a proxy's /metrics after unary, streaming and failing calls, parsed
as Prometheus parses it; then a real Prometheus server scraping a mesh of processes
(control plane, self-registering sims, a proxy) and answering PromQL about it."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from aimesh.control.v1 import control_plane_pb2 as cp_pb
from aimesh.control.v1 import control_plane_pb2_grpc as cp_grpc
from aimesh.inference.v1 import inference_pb2 as pb
from aimesh.inference.v1 import inference_pb2_grpc as pb_grpc
from aimesh.interceptors.base import AttemptFact, CallFacts
from aimesh.interceptors.events import CallEnded
from aimesh.mesh import procs
from aimesh.mesh.admin import AdminServer
from aimesh.mesh.config import load_dict
from aimesh.mesh.control.server import ControlPlane, ControlPlaneServer
from aimesh.mesh.control.store import EmbeddedStore
from aimesh.mesh.observability import metrics as metrics_module
from aimesh.mesh.observability.metrics import (
    ProxyMetrics,
    control_plane_registry,
    metrics_route,
    proxy_registry,
)
from aimesh.mesh.proxy.cluster import EndpointAddr
from aimesh.mesh.proxy.server import Proxy, ProxySettings
from aimesh.mesh.sim.faults import Faults

from .support import SimFactory, endpoint, installed, llm_mesh, prompt

ROOT = Path(__file__).resolve().parent.parent
GENERATE = "/aimesh.inference.v1.Inference/Generate"
STREAM = "/aimesh.inference.v1.Inference/GenerateStream"
OK = grpc.StatusCode.OK


class Scraped:
    """One scrape, parsed by prometheus_client's own parser."""

    def __init__(self, text: str) -> None:
        self.samples: list[Sample] = [
            s for family in text_string_to_metric_families(text) for s in family.samples
        ]

    def get(self, name: str, **labels: str) -> float:
        """The sum of the samples called `name` whose labels include `labels`."""
        found = [
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        assert found, f"no sample {name}{labels}"
        return sum(found)

    def labels(self, name: str) -> list[dict[str, str]]:
        return [s.labels for s in self.samples if s.name == name]


class MetricsProxy:
    """A proxy with the metrics of `aimesh proxy --admin`, served by the real admin server."""

    def __init__(self, proxy: Proxy, admin: AdminServer) -> None:
        self.proxy, self.admin = proxy, admin
        self.target = f"127.0.0.1:{proxy.ports['listen']}"

    async def scrape(self) -> Scraped:
        def get() -> tuple[str, str]:
            url = f"http://127.0.0.1:{self.admin.port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.headers["Content-Type"], r.read().decode()

        ctype, text = await asyncio.to_thread(get)
        assert ctype == CONTENT_TYPE_LATEST
        return Scraped(text)


async def start_proxy(doc: dict[str, object], extra: dict[str, list[EndpointAddr]]) -> MetricsProxy:
    proxy = Proxy(ProxySettings(listen="127.0.0.1:0", seed=5, extra_endpoints=extra))
    registry = proxy_registry(proxy)
    await proxy.start(load_dict(doc, source="test"))
    admin = AdminServer({"/metrics": metrics_route(registry)})
    await admin.start("127.0.0.1:0")
    return MetricsProxy(proxy, admin)


async def stop_proxy(mp: MetricsProxy) -> None:
    await mp.admin.stop()
    await mp.proxy.stop(0.5)


async def test_proxy_metrics_after_unary_streaming_and_failing_calls(
    make_sim: SimFactory,
) -> None:
    good = await make_sim(instance_id="good")
    bad = await make_sim(instance_id="bad", faults=Faults(error_rate=1.0))
    # Each endpoint's breaker opens after 2 failures in a row; the service's never does.
    breaker = {
        "enabled": True,
        "consecutiveErrors": 2,
        "openDuration": "60s",
        "maxOpenDuration": "60s",
        "minRequests": 1000,
    }
    doc, extra = llm_mesh([good, bad], eject_after=100_000, breaker=breaker)
    mp = await start_proxy(doc, extra)
    good_ep, bad_ep = endpoint(good).address, endpoint(bad).address
    ok_unary = failed = 0
    tokens_in = tokens_out = 0
    try:
        async with grpc.aio.insecure_channel(mp.target) as ch:
            stub = pb_grpc.InferenceStub(ch)
            for i in range(6):  # round robin until the bad endpoint's breaker opens
                try:
                    r = await stub.Generate(prompt(f"q{i}"), timeout=10)
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE
                    failed += 1
                    continue
                ok_unary += 1
                tokens_in += r.usage.prompt_tokens
                tokens_out += r.usage.completion_tokens
            for i in range(3):
                chunks = [c async for c in stub.GenerateStream(prompt(f"s{i}"), timeout=10)]
                tokens_in += chunks[-1].usage.prompt_tokens
                tokens_out += sum(c.token_count for c in chunks)
                assert sum(c.token_count for c in chunks) == chunks[-1].usage.completion_tokens
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Generate(pb.GenerateRequest(model="nope"), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert (ok_unary, failed) == (4, 2)
        m = await mp.scrape()

        # Calls: by service, method, the endpoint that answered, and status.
        assert m.get("aimesh_requests_total") == 10
        ok = {"service": "llm", "endpoint": good_ep, "code": "OK"}
        assert m.get("aimesh_requests_total", method=GENERATE, **ok) == 4
        assert m.get("aimesh_requests_total", method=STREAM, **ok) == 3
        assert m.get("aimesh_requests_total", endpoint=bad_ep, code="UNAVAILABLE") == 2
        unrouted = {"service": "", "endpoint": "", "code": "UNIMPLEMENTED"}
        assert m.get("aimesh_requests_total", method=GENERATE, **unrouted) == 1
        assert m.get("aimesh_request_duration_seconds_count") == 10
        assert m.get("aimesh_request_duration_seconds_count", method=STREAM) == 3
        assert m.get("aimesh_request_duration_seconds_bucket", le="+Inf") == 10
        # Upstream tries: the unrouted call made none.
        assert m.get("aimesh_upstream_attempts_total", kind="first") == 9
        assert m.get("aimesh_upstream_attempts_total", endpoint=bad_ep, code="UNAVAILABLE") == 2
        assert m.get("aimesh_upstream_duration_seconds_count") == 9
        # AI signals: tokens as the responses reported them; TTFT and TPOT for streams.
        model = {"service": "llm", "model": "gpt-4"}
        assert m.get("aimesh_input_tokens_total", **model) == tokens_in > 0
        assert m.get("aimesh_output_tokens_total", **model) == tokens_out > 0
        assert m.get("aimesh_time_to_first_token_seconds_count", **model) == 3
        assert m.get("aimesh_time_per_output_token_seconds_count", **model) == 3
        assert m.get("aimesh_output_tokens_per_second_count", **model) == 7
        assert m.get("aimesh_streams_resumed_total", **model) == 0
        # State read at scrape time: breakers, health, in flight, retries, limits.
        assert m.get("aimesh_circuit_breaker_state", service="llm", endpoint=bad_ep) == 2
        assert m.get("aimesh_circuit_breaker_state", service="llm", endpoint=good_ep) == 0
        assert m.get("aimesh_circuit_breaker_state", service="llm", endpoint="") == 0
        assert m.get("aimesh_endpoint_healthy", service="llm", endpoint=bad_ep) == 0
        assert m.get("aimesh_endpoint_healthy", service="llm", endpoint=good_ep) == 1
        assert m.get("aimesh_requests_in_flight", service="llm") == 0
        assert m.get("aimesh_retries_total", service="llm") == 0
        assert m.get("aimesh_retry_budget_exhausted_total", service="llm") == 0
        assert m.get("aimesh_endpoint_ejections_total", service="llm") == 0
        limits = {x["limit"] for x in m.labels("aimesh_limit_rejections_total")}
        assert limits == {"max_requests", "max_pending", "max_retries"}
        assert m.get("process_resident_memory_bytes") > 0
        assert not [s for s in m.samples if s.name.endswith("_created")]
    finally:
        await stop_proxy(mp)


async def test_retries_resumes_and_calls_in_flight(make_sim: SimFactory) -> None:
    paced = {"tokens_per_second": 200.0, "length_range": (60, 60)}
    breaking = await make_sim(instance_id="breaking", faults=Faults(die_after_tokens=5), **paced)
    healthy = await make_sim(instance_id="healthy", **paced)
    doc, extra = llm_mesh(
        [breaking, healthy], eject_after=100_000, retry={"attempts": 2, "backoff": {"base": "1ms"}}
    )
    mp = await start_proxy(doc, extra)
    try:
        async with grpc.aio.insecure_channel(mp.target) as ch:
            stub = pb_grpc.InferenceStub(ch)
            chunks = [c async for c in stub.GenerateStream(prompt(), timeout=10)]
            for i in range(2):  # one of the two goes to the breaking endpoint first: retried
                await stub.Generate(prompt(f"u{i}", max_tokens=8), timeout=10)
            # A stream in flight shows in the gauge while it runs.
            slow = stub.GenerateStream(prompt("slow"), timeout=10)
            await slow.read()
            during = await mp.scrape()
            while await slow.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
                pass
        after = await mp.scrape()
        model = {"service": "llm", "model": "gpt-4"}
        assert during.get("aimesh_requests_in_flight", service="llm") == 1
        assert after.get("aimesh_requests_in_flight", service="llm") == 0
        # The broken stream was resumed on the healthy endpoint, or it failed before its
        # first token and was retried there (the slow one may have met the breaking one).
        resumed = after.get("aimesh_streams_resumed_total", **model)
        assert resumed >= 1
        assert after.get("aimesh_upstream_attempts_total", kind="resume") == resumed
        retries = after.get("aimesh_retries_total", service="llm")
        assert retries == after.get("aimesh_upstream_attempts_total", kind="retry") >= 1
        assert after.get("aimesh_requests_total", code="OK") == 4
        assert after.get("aimesh_time_to_first_token_seconds_count", **model) == 2
        assert chunks[-1].usage.completion_tokens == sum(c.token_count for c in chunks)
    finally:
        await stop_proxy(mp)


def test_histograms_counters_caps_and_forgotten_endpoints(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(metrics_module, "MAX_METHODS", 3)
    monkeypatch.setattr(metrics_module, "MAX_MODELS", 2)
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry)
    started = time.time_ns()

    def call(method: str, endpoint: str, duration: float, model: str = "") -> CallEnded:
        tried = AttemptFact("svc", endpoint, "first", started, started + 1_000_000, OK)
        facts = CallFacts(model=model, attempts=[tried], tokens_in=3, tokens_out=5)
        return CallEnded(method, OK, duration, "", "", facts, started)

    metrics(call("/a.B/C", "10.0.0.1:1", 0.005))  # on a bucket's bound: in that bucket
    metrics(call("/a.B/C", "10.0.0.1:1", 500.0))  # past the last bound: +Inf only
    m = Scraped(generate_latest(registry).decode())
    bucket = "aimesh_request_duration_seconds_bucket"
    assert m.get(bucket, le="0.005") == 1
    assert m.get(bucket, le="120.0") == 1
    assert m.get(bucket, le="+Inf") == 2
    assert m.get("aimesh_request_duration_seconds_sum") == 500.005
    assert m.get("aimesh_requests_total", method="/a.B/C", code="OK") == 2
    # Caller-chosen label values are capped.
    for i in range(5):  # the first 2 new methods fit under the cap of 3, not the next 3
        metrics(call(f"/x.Y/M{i}", "10.0.0.1:1", 0.01, model=f"m{i}"))
    m = Scraped(generate_latest(registry).decode())
    methods = {x["method"] for x in m.labels("aimesh_requests_total")}
    assert methods == {"/a.B/C", "/x.Y/M0", "/x.Y/M1", "other"}
    assert m.get("aimesh_requests_total", method="other") == 3
    models = {x["model"] for x in m.labels("aimesh_input_tokens_total")}
    assert models == {"m0", "m1", "other"}
    assert m.get("aimesh_input_tokens_total", model="other") == 3 * 3
    # An endpoint that left the mesh: its series go.
    metrics(call("/a.B/C", "10.0.0.2:1", 0.01))
    metrics.forget(["10.0.0.1:1"])
    m = Scraped(generate_latest(registry).decode())
    assert {x["endpoint"] for x in m.labels("aimesh_requests_total")} == {"10.0.0.2:1"}
    assert {x["endpoint"] for x in m.labels("aimesh_upstream_attempts_total")} == {"10.0.0.2:1"}
    metrics(call("/a.B/C", "10.0.0.1:1", 0.01))  # and come back from zero if it returns
    m = Scraped(generate_latest(registry).decode())
    assert m.get("aimesh_requests_total", endpoint="10.0.0.1:1") == 1


MESH = """\
apiVersion: mesh.ai/v1
kind: ServiceMesh
metadata: {name: NAME}
spec:
  services:
    - name: gpt4-gateway
"""


async def test_control_plane_metrics() -> None:
    cp = ControlPlane(EmbeddedStore(None))
    server = ControlPlaneServer(cp)
    registry = control_plane_registry(cp)
    port = await server.start("127.0.0.1:0")

    def scrape() -> Scraped:
        return Scraped(generate_latest(registry).decode())

    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            reg, config = cp_grpc.RegistryStub(ch), cp_grpc.ConfigStub(ch)

            def register(n: int, ttl: float = 30.0) -> cp_pb.RegisterRequest:
                r = cp_pb.RegisterRequest(
                    instance=cp_pb.Instance(service="gpt4-gateway", address=f"10.0.0.{n}:9")
                )
                r.ttl.FromMilliseconds(int(ttl * 1000))
                return r

            watch = reg.Watch(cp_pb.WatchCatalogRequest())
            await watch.read()
            kept = await reg.Register(register(1))
            await reg.Register(register(2, ttl=1))  # left to expire
            gone = await reg.Register(register(3))
            await reg.Deregister(cp_pb.DeregisterRequest(lease_id=gone.lease_id))
            doc = MESH.replace("NAME", "one")
            applied = await config.Apply(cp_pb.ApplyConfigRequest(document=doc))
            await config.Apply(cp_pb.ApplyConfigRequest(document=doc))  # unchanged
            await config.Apply(cp_pb.ApplyConfigRequest(document=doc, dry_run=True))
            for request in (
                cp_pb.ApplyConfigRequest(document="kind: nonsense"),
                cp_pb.ApplyConfigRequest(document=MESH.replace("NAME", "b"), expected_version=99),
            ):
                with pytest.raises(grpc.aio.AioRpcError):
                    await config.Apply(request)
            await cp_grpc.StatusStub(ch).Report(cp_pb.ProxyReport(proxy_id="gw"))
            m = scrape()
            assert m.get("aimesh_controlplane_instances", serving="true") == 2
            assert m.get("aimesh_controlplane_instances", serving="false") == 0
            assert m.get("aimesh_controlplane_catalog_version") == cp.catalog.version
            assert m.get("aimesh_controlplane_config_version") == applied.version > 0
            assert m.get("aimesh_controlplane_watchers", stream="catalog") == 1
            assert m.get("aimesh_controlplane_watchers", stream="config") == 0
            applies = "aimesh_controlplane_config_applies_total"
            for result in ("applied", "unchanged", "dry_run", "rejected", "conflict"):
                assert m.get(applies, result=result) == 1, result
            assert m.get("aimesh_controlplane_registrations_total") == 3
            assert m.get("aimesh_controlplane_deregistrations_total", reason="deregister") == 1
            assert m.get("aimesh_controlplane_proxies_reporting") == 1
            watch.cancel()
            deadline = time.monotonic() + 5
            while True:  # the lease of 10.0.0.2 runs out; the watch's end is seen
                m = scrape()
                expired = m.get("aimesh_controlplane_deregistrations_total", reason="expired")
                watchers = m.get("aimesh_controlplane_watchers", stream="catalog")
                if (expired, watchers) == (1, 0) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert (expired, watchers) == (1, 0)
            assert m.get("aimesh_controlplane_instances", serving="true") == 1
            assert kept.lease_id
    finally:
        await server.stop(0)


# -- a real Prometheus scraping a mesh of processes --------------------------------------------


def _find_prometheus() -> str | None:
    return shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
    )


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    found, output = installed(_find_prometheus, "install-prometheus.sh")
    if not found:
        pytest.skip(
            "prometheus is not installed and scripts/install-prometheus.sh could not "
            f"install it: {output}"
        )
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


_admin_url = procs.admin_url


class Prometheus:
    def __init__(self, binary: str, tmp: Path, targets: dict[str, str]) -> None:
        config = tmp / "prometheus.yml"
        jobs = "".join(
            f"  - job_name: {job}\n    static_configs: [{{targets: ['{target}']}}]\n"
            for job, target in targets.items()
        )
        config.write_text(f"global:\n  scrape_interval: 1s\nscrape_configs:\n{jobs}")
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.popen = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(tmp / "prometheus.log").open("w"),
            start_new_session=True,
        )
        self.log = tmp / "prometheus.log"

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def query(self, promql: str) -> float | None:
        """The value of a single-series query, or None while it has no result."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                body = json.load(r)
        except OSError:
            return None  # not up yet
        result = body["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, promql: str, want: float, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        got = None
        while time.monotonic() < deadline:
            got = self.query(promql)
            if got == want:
                return
            if self.popen.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(
            f"Prometheus: {promql} = {got}, wanted {want}; its log:\n{self.log.read_text()[-3000:]}"
        )


def _endpoints(clusters_url: str) -> int:
    with urllib.request.urlopen(clusters_url, timeout=5) as r:
        snapshot = json.load(r)
    return sum(len(c["endpoints"]) for c in snapshot["clusters"])


def _start_all(starters: list[Callable[[], procs.Proc]]) -> list[procs.Proc]:
    """Starts processes in parallel (each waits for its own `listening on`)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(starters)) as pool:
        return list(pool.map(lambda f: f(), starters))


@pytest.fixture
def running(tmp_path: Path) -> Iterator[list[procs.Proc]]:
    started: list[procs.Proc] = []
    yield started
    for p in started:
        p.kill()


@pytest.mark.slow
def test_prometheus_scrapes_the_mesh(
    prometheus_binary: str, tmp_path: Path, running: list[procs.Proc]
) -> None:
    cp = procs.start_control_plane()
    running.append(cp)
    sim_args = ["--control-plane", cp.address, "--service", "gpt4-gateway", "--ttft", "0"]
    sim_args += ["--tps", "2000", "--length", "8-8"]

    def sim(name: str) -> Callable[[], procs.Proc]:
        return lambda: procs.start_sim(name, ["gpt-4"], *sim_args)

    def proxy() -> procs.Proc:
        return procs.start(
            "proxy",
            procs.aimesh_command(
                "proxy",
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
                "--control-plane",
                cp.address,
                "--cache",
                str(tmp_path / "cache.json"),
            ),
        )

    *sims, gateway = _start_all([sim("gpt4-a"), sim("gpt4-b"), proxy])
    running.extend([*sims, gateway])
    prom = Prometheus(
        prometheus_binary,
        tmp_path,
        {
            "aimesh-control-plane": _admin_url(cp).removeprefix("http://"),
            "aimesh-proxy": _admin_url(gateway).removeprefix("http://"),
        },
    )
    try:
        # Calls only once the proxy knows both instances (from the control plane's catalog).
        clusters_url = _admin_url(gateway) + "/clusters"
        deadline = time.monotonic() + 10
        while _endpoints(clusters_url) < 2:
            assert time.monotonic() < deadline, "the proxy did not learn both instances"
            time.sleep(0.05)
        unary, streams, tokens_out = 10, 3, 0
        with grpc.insecure_channel(gateway.address) as ch:
            stub = pb_grpc.InferenceStub(ch)
            for i in range(unary):
                tokens_out += stub.Generate(prompt(f"q{i}"), timeout=5).usage.completion_tokens
            for i in range(streams):
                tokens_out += sum(
                    c.token_count for c in stub.GenerateStream(prompt(f"s{i}"), timeout=5)
                )
        prom.wait_for('sum(up{job=~"aimesh-.*"})', 2)
        prom.wait_for("sum(aimesh_requests_total)", unary + streams)
        prom.wait_for(f'sum(aimesh_requests_total{{method="{STREAM}",code="OK"}})', streams)
        prom.wait_for("sum(aimesh_output_tokens_total)", tokens_out)
        prom.wait_for("sum(aimesh_time_to_first_token_seconds_count)", streams)
        prom.wait_for('count(aimesh_endpoint_healthy{service="gpt4-gateway"} == 1)', 2)
        prom.wait_for('aimesh_controlplane_instances{service="gpt4-gateway",serving="true"}', 2)
        prom.wait_for("aimesh_controlplane_registrations_total", 2)
        prom.wait_for('sum(aimesh_controlplane_watchers{stream="catalog"})', 1)
        prom.wait_for("aimesh_controlplane_proxies_reporting", 1)
        prom.wait_for('count(process_resident_memory_bytes{job=~"aimesh-.*"} > 0)', 2)
    finally:
        prom.stop()
