"""Prometheus metrics for proxies and the control plane (`GET /metrics` on the admin port).

Each process has its own `CollectorRegistry` (never prometheus_client's global one), so
what a process serves is exactly what it registered:

    proxy:          ProxyMetrics    a CallEnded sink: per-call counters and histograms
                    ProxyCollector  read at scrape time from the clusters (in flight,
                                    breakers, health, ejections, retries, limits)
    control plane:  ControlPlaneCollector  read at scrape time from its state
    both:           ProcessCollector (CPU, memory, open fds, start time)

The sink runs on the proxy's hot path, once per call: it looks the call's label set up
in a dict of pre-resolved series (one tuple key, no label validation, no lock) and adds
to a few plain counters and histograms, about 1.6 us for a unary call and 3.5 us for a
token stream. Everything that is state rather than an event (gauges, and counters the
clusters keep anyway) costs nothing per call: it is read when scraped. Updates and
scrapes both run on the event loop (the admin server is asyncio), so nothing locks.

Names and labels are documented in docs/observability.md; the Grafana dashboard relies
on them, so change both together.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from itertools import accumulate
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from aimesh.interceptors.breaker import CircuitBreaker, State
from aimesh.interceptors.events import CallEnded

from ..admin import Response, Route, text_response

if TYPE_CHECKING:
    from ..control.server import ControlPlane
    from ..control.xds.ads import Xds
    from ..proxy.cluster import Cluster
    from ..proxy.server import Proxy

# Latency of whole calls and of upstream tries: a cached embedding (a few ms) to a long
# generation (two minutes).
DURATION_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
    120.0,
)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
TOKENS_PER_SECOND_BUCKETS = (1, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000, 2500, 5000)

# Label values that come from callers (method paths, model names) are capped: an unknown
# path or model fails without reaching a service, but a caller could still send a new
# one on every call. Past the cap, new values are counted under "other".
MAX_METHODS = 200
MAX_MODELS = 200
OTHER = "other"

BREAKER_STATE = {State.CLOSED: 0, State.HALF_OPEN: 1, State.OPEN: 2}

_NO_CODE = "UNKNOWN"  # a try that never reported an outcome (should not happen)


def new_registry() -> CollectorRegistry:
    """A process's registry, with the process collector on it."""
    # No `<name>_created` series beside every counter and histogram: they double the
    # series count and nothing here reads them (a process-wide prometheus_client switch;
    # aimesh processes own theirs).
    disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    return registry


def exposition(registry: CollectorRegistry) -> Response:
    return 200, CONTENT_TYPE_LATEST, generate_latest(registry)


def metrics_route(registry: CollectorRegistry | None) -> Route:
    """The admin server's `/metrics` route."""
    if registry is None:
        return lambda: text_response("metrics are not enabled in this process\n", 404)
    return lambda: exposition(registry)


# -- the proxy ------------------------------------------------------------------------------


class _Counter:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0


class _Histogram:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last: +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bound >= value
        self.sum += value


class _Family:
    """One metric's series, by label values; exported as prometheus_client families."""

    def __init__(
        self, name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...] = ()
    ) -> None:
        self.name, self.doc, self.labels, self.buckets = name, doc, labels, buckets
        self.series: dict[tuple[str, ...], Any] = {}

    def counter(self, *values: str) -> _Counter:
        c = self.series.get(values)
        if c is None:
            c = self.series[values] = _Counter()
        assert isinstance(c, _Counter)
        return c

    def histogram(self, *values: str) -> _Histogram:
        h = self.series.get(values)
        if h is None:
            h = self.series[values] = _Histogram(self.buckets)
        assert isinstance(h, _Histogram)
        return h

    def forget(self, label: str, values: set[str]) -> None:
        if label in self.labels:
            i = self.labels.index(label)
            for key in [k for k in self.series if k[i] in values]:
                del self.series[key]

    def export(self) -> Metric:
        labels = list(self.labels)
        if not self.buckets:
            counters = CounterMetricFamily(self.name, self.doc, labels=labels)
            for values, c in self.series.items():
                counters.add_metric(list(values), c.value)
            return counters
        histograms = HistogramMetricFamily(self.name, self.doc, labels=labels)
        les = [floatToGoString(b) for b in self.buckets] + ["+Inf"]  # type: ignore[no-untyped-call]
        for values, h in self.series.items():
            cumulative = list(accumulate(h.counts))
            histograms.add_metric(list(values), list(zip(les, cumulative, strict=True)), h.sum)
        return histograms


class ProxyMetrics(Collector):
    """A CallEnded sink: requests, upstream tries and the AI signals of each call.

    prometheus_client's own Counter and Histogram take a lock and validate on every
    update (about 0.5 and 1.5 us each; a streamed call updates nine): these are plain
    numbers instead, updated and scraped on the proxy's event loop, and exported through
    prometheus_client's metric families at scrape time.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        model = ("service", "model")
        self.requests = _Family(
            "aimesh_requests_total",
            "Calls the proxy served, by the service and endpoint that answered (the last "
            "try's; empty when no try was made) and gRPC status.",
            ("service", "method", "endpoint", "code"),
        )
        self.duration = _Family(
            "aimesh_request_duration_seconds",
            "Time from a call's arrival to its end, retries and resumes included.",
            ("service", "method"),
            DURATION_BUCKETS,
        )
        self.attempts = _Family(
            "aimesh_upstream_attempts_total",
            "Upstream tries, by kind (first, retry, hedge, resume) and status.",
            ("service", "endpoint", "kind", "code"),
        )
        self.attempt_duration = _Family(
            "aimesh_upstream_duration_seconds",
            "Time of each upstream try.",
            ("service", "endpoint"),
            DURATION_BUCKETS,
        )
        self.ttft = _Family(
            "aimesh_time_to_first_token_seconds",
            "Token streams: time from the call's arrival to its first token leaving the proxy.",
            model,
            TTFT_BUCKETS,
        )
        self.tpot = _Family(
            "aimesh_time_per_output_token_seconds",
            "Token streams that ended OK with two or more tokens: time after the first "
            "token divided by the tokens after it.",
            model,
            TPOT_BUCKETS,
        )
        self.tokens_in = _Family(
            "aimesh_input_tokens_total",
            "Prompt tokens of Inference calls, as the backends reported them.",
            model,
        )
        self.tokens_out = _Family(
            "aimesh_output_tokens_total",
            "Completion tokens delivered to callers (a broken stream's delivered tokens count).",
            model,
        )
        self.tokens_per_second = _Family(
            "aimesh_output_tokens_per_second",
            "Inference calls that ended OK: completion tokens over the call's whole time.",
            model,
            TOKENS_PER_SECOND_BUCKETS,
        )
        self.resumed = _Family(
            "aimesh_streams_resumed_total",
            "Token streams that broke and were resumed on another endpoint (each resume).",
            model,
        )
        self.cost = _Family(
            "aimesh_cost_usd_total",
            "Dollars spent on Inference calls (tokens x the model's price in spec.models), by "
            "the service that served them and the model it was asked for.",
            model,
        )
        self.experiment_requests = _Family(
            "aimesh_experiment_requests_total",
            "Calls routed by a traffic policy that names an experiment, by arm and status.",
            ("experiment", "arm", "code"),
        )
        self.families = [
            self.requests,
            self.duration,
            self.attempts,
            self.attempt_duration,
            self.ttft,
            self.tpot,
            self.tokens_in,
            self.tokens_out,
            self.tokens_per_second,
            self.resumed,
            self.cost,
            self.experiment_requests,
        ]
        # Each label set's series, resolved once, by the raw values a call brings.
        self._calls: dict[tuple[str, str, str, grpc.StatusCode], tuple[_Counter, _Histogram]] = {}
        self._tries: dict[
            tuple[str, str, str, grpc.StatusCode | None], tuple[_Counter, _Histogram]
        ] = {}
        self._models: dict[tuple[str, str], _ModelSeries] = {}
        self._costs: dict[tuple[str, str], _Counter] = {}
        self._arms: dict[tuple[str, str, grpc.StatusCode], _Counter] = {}
        self._methods: set[str] = set()
        self._model_names: set[str] = set()
        if registry is not None:
            registry.register(self)

    def __call__(self, event: CallEnded) -> None:
        facts = event.facts
        attempts = facts.attempts
        if attempts:
            last = attempts[-1]
            service, endpoint = last.service, last.endpoint
        else:
            service = endpoint = ""
        key = (service, event.method, endpoint, event.code)
        call = self._calls.get(key) or self._call_series(key)
        call[0].value += 1
        call[1].observe(event.duration)
        tries = self._tries
        for a in attempts:
            k = (a.service, a.endpoint, a.kind, a.code)
            t = tries.get(k) or self._try_series(k)
            t[0].value += 1
            if a.ended_ns:
                t[1].observe(max(0, a.ended_ns - a.started_ns) / 1e9)
        if facts.model and service:
            m = self._models.get((service, facts.model)) or self._model_series(service, facts.model)
            m.tokens_in.value += facts.tokens_in
            out = facts.tokens_out
            m.tokens_out.value += out
            first = facts.first_token_ns
            if first:
                m.ttft.observe(max(0, first - event.started_ns) / 1e9)
            if facts.resumed:
                m.resumed.value += facts.resumed
            if out and event.code is grpc.StatusCode.OK:
                if event.duration > 0:
                    m.tokens_per_second.observe(out / event.duration)
                if first and out >= 2:
                    end = event.started_ns + event.duration * 1e9
                    m.tpot.observe(max(0.0, end - first) / 1e9 / (out - 1))
        if facts.cost_usd > 0 and service:
            served = facts.served_model or facts.model
            c = self._costs.get((service, served)) or self._cost_series(service, served)
            c.value += facts.cost_usd
        if facts.experiment:
            akey = (facts.experiment, facts.arm, event.code)
            arm = self._arms.get(akey)
            if arm is None:
                arm = self._arms[akey] = self.experiment_requests.counter(
                    facts.experiment, facts.arm, event.code.name
                )
            arm.value += 1

    def collect(self) -> Iterable[Metric]:
        return [f.export() for f in self.families]

    # -- first sight of a label set ---------------------------------------------------------

    def _call_series(
        self, key: tuple[str, str, str, grpc.StatusCode]
    ) -> tuple[_Counter, _Histogram]:
        service, method, endpoint, code = key
        capped = method not in self._methods and len(self._methods) >= MAX_METHODS
        if capped:
            method = OTHER
        series = (
            self.requests.counter(service, method, endpoint, code.name),
            self.duration.histogram(service, method),
        )
        if not capped:  # (else each new path would be a new cache entry)
            self._methods.add(method)
            self._calls[key] = series
        return series

    def _try_series(
        self, key: tuple[str, str, str, grpc.StatusCode | None]
    ) -> tuple[_Counter, _Histogram]:
        service, endpoint, kind, code = key
        series = (
            self.attempts.counter(service, endpoint, kind, code.name if code else _NO_CODE),
            self.attempt_duration.histogram(service, endpoint),
        )
        self._tries[key] = series
        return series

    def _model_series(self, service: str, model: str) -> _ModelSeries:
        capped = model not in self._model_names and len(self._model_names) >= MAX_MODELS
        series = _ModelSeries(self, service, OTHER if capped else model)
        if not capped:
            self._model_names.add(model)
            self._models[(service, model)] = series
        return series

    def _cost_series(self, service: str, model: str) -> _Counter:
        # Priced models are the config's own, but a caller's model is capped all the same.
        capped = model not in self._model_names and len(self._model_names) >= MAX_MODELS
        series = self.cost.counter(service, OTHER if capped else model)
        if not capped:
            self._model_names.add(model)
            self._costs[(service, model)] = series
        return series

    # -- endpoints that are gone -----------------------------------------------------------

    def endpoints(self) -> set[str]:
        """Endpoints that label some series."""
        return {k[2] for k in self.requests.series} | {k[1] for k in self.attempts.series}

    def forget(self, endpoints: Iterable[str]) -> None:
        """Drops the series of endpoints that left the mesh (so that instances coming and
        going do not add series forever)."""
        gone = set(endpoints) - {""}
        for f in self.families:
            f.forget("endpoint", gone)
        for key in [k for k in self._calls if k[2] in gone]:
            del self._calls[key]
        for tkey in [k for k in self._tries if k[1] in gone]:
            del self._tries[tkey]


class _ModelSeries:
    __slots__ = ("resumed", "tokens_in", "tokens_out", "tokens_per_second", "tpot", "ttft")

    def __init__(self, m: ProxyMetrics, service: str, model: str) -> None:
        self.ttft = m.ttft.histogram(service, model)
        self.tpot = m.tpot.histogram(service, model)
        self.tokens_in = m.tokens_in.counter(service, model)
        self.tokens_out = m.tokens_out.counter(service, model)
        self.tokens_per_second = m.tokens_per_second.histogram(service, model)
        self.resumed = m.resumed.counter(service, model)


class _Monotonic:
    """Keeps scrape-time counters monotonic when the object counting is replaced (a
    cluster rebuilt by a config change starts its counters at zero again): a drop is
    taken as a reset, and what was counted before it is carried over."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, ...], tuple[float, float]] = {}  # key -> (raw, carried)

    def __call__(self, key: tuple[str, ...], raw: float) -> float:
        last, carried = self._seen.get(key, (0.0, 0.0))
        if raw < last:
            carried += last
        self._seen[key] = (raw, carried)
        return raw + carried

    def forget(self, endpoints: set[str]) -> None:
        for key in [k for k in self._seen if k[-1] in endpoints]:
            del self._seen[key]


# How long an endpoint may be absent from every cluster before its per-call series go.
FORGET_AFTER = 600.0


class ProxyCollector(Collector):
    """What the proxy's clusters know, read at scrape time."""

    def __init__(
        self,
        proxy: Proxy,
        metrics: ProxyMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.proxy = proxy
        self.metrics = metrics
        self._clock = clock
        self._mono = _Monotonic()
        self._absent: dict[str, float] = {}  # endpoint -> when it was first seen gone

    def _clusters(self) -> Iterator[Cluster]:
        seen: set[str] = set()
        forwarders = (self.proxy.forwarder, self.proxy.inbound)
        sources = [self.proxy.clusters, *(f.clusters for f in forwarders if f is not None)]
        for clusters in sources:
            for cluster in clusters.values():
                if cluster.name not in seen:
                    seen.add(cluster.name)
                    yield cluster

    def collect(self) -> Iterable[Metric]:
        mono = self._mono
        in_flight = GaugeMetricFamily(
            "aimesh_requests_in_flight",
            "Upstream calls in flight (hedges and retries each count), per service.",
            labels=["service"],
        )
        retries = CounterMetricFamily(
            "aimesh_retries_total", "Retries sent (unary and streams).", labels=["service"]
        )
        exhausted = CounterMetricFamily(
            "aimesh_retry_budget_exhausted_total",
            "Retries and hedges not sent because the service's retry budget was spent.",
            labels=["service"],
        )
        breaker = GaugeMetricFamily(
            "aimesh_circuit_breaker_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open (endpoint empty: the "
            "service's own breaker). Only services with circuitBreaker enabled.",
            labels=["service", "endpoint"],
        )
        ejections = CounterMetricFamily(
            "aimesh_endpoint_ejections_total",
            "Outlier-detection ejections of an endpoint.",
            labels=["service", "endpoint"],
        )
        healthy = GaugeMetricFamily(
            "aimesh_endpoint_healthy",
            "1 when an endpoint takes calls (passes health checks, not ejected), else 0.",
            labels=["service", "endpoint"],
        )
        rejections = CounterMetricFamily(
            "aimesh_limit_rejections_total",
            "Calls and retries refused at a concurrency limit (max_requests, max_pending, "
            "max_retries).",
            labels=["service", "limit"],
        )
        live: set[str] = set()
        for c in self._clusters():
            name = c.name
            now = c.clock()
            in_flight.add_metric([name], sum(u.endpoint.inflight for u in c.upstreams.values()))
            retries.add_metric([name], mono(("r", name), c.retries))
            exhausted.add_metric([name], mono(("b", name), c.budget.retries_denied))
            for limit, n in c.limits.rejected.items():
                rejections.add_metric([name, limit], mono(("l", name, limit), n))
            _breaker(breaker, name, "", c.breaker)
            for up in c.upstreams.values():
                address = up.address
                live.add(address)
                _breaker(breaker, name, address, up.breaker)
                ejections.add_metric([name, address], mono(("e", name, address), up.ejections))
                ok = up.active_healthy and up.ejected_until <= now
                healthy.add_metric([name, address], 1 if ok else 0)
        self._forget_absent(live)
        # PERMISSIVE mTLS: calls that came through the plaintext listener (migration
        # progress: this stops growing when every caller uses the mTLS port).
        plaintext = CounterMetricFamily(
            "aimesh_mtls_plaintext_calls_total",
            "Calls received on the plaintext listener of a PERMISSIVE proxy.",
        )
        plaintext.add_metric([], getattr(self.proxy, "plaintext_calls", 0))
        return [in_flight, retries, exhausted, breaker, ejections, healthy, rejections, plaintext]

    def _forget_absent(self, live: set[str]) -> None:
        if self.metrics is None:
            return
        now = self._clock()
        absent = self.metrics.endpoints() - live - {""}
        for ep in list(self._absent):
            if ep not in absent:
                del self._absent[ep]
        for ep in absent:
            self._absent.setdefault(ep, now)
        old = [ep for ep, since in self._absent.items() if now - since >= FORGET_AFTER]
        if old:
            self.metrics.forget(old)
            self._mono.forget(set(old))
            for ep in old:
                del self._absent[ep]


def _breaker(
    family: GaugeMetricFamily, service: str, endpoint: str, b: CircuitBreaker | None
) -> None:
    if b is not None:
        family.add_metric([service, endpoint], BREAKER_STATE[b.state])


def proxy_registry(proxy: Proxy) -> CollectorRegistry:
    """A registry for `proxy`'s process; adds the metrics sink to `proxy.sinks`, so call
    it before `proxy.start()`."""
    registry = new_registry()
    metrics = ProxyMetrics(registry)
    proxy.sinks.append(metrics)
    registry.register(ProxyCollector(proxy, metrics))
    return registry


# -- the control plane ---------------------------------------------------------------------


class ControlPlaneCollector(Collector):
    """The control plane's state and its counters, read at scrape time."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    def collect(self) -> Iterable[Metric]:
        cp = self.cp
        snap = cp.catalog.snapshot
        instances = GaugeMetricFamily(
            "aimesh_controlplane_instances",
            "Registered instances, by service and whether they say they are serving.",
            labels=["service", "serving"],
        )
        counts: dict[str, list[int]] = {}
        for inst in snap.instances.values():
            counts.setdefault(inst.service, [0, 0])[inst.serving] += 1
        for service in sorted(counts):
            not_serving, serving = counts[service]
            instances.add_metric([service, "true"], serving)
            instances.add_metric([service, "false"], not_serving)
        catalog_version = GaugeMetricFamily(
            "aimesh_controlplane_catalog_version", "Version of the catalog being served."
        )
        catalog_version.add_metric([], snap.version)
        config_version = GaugeMetricFamily(
            "aimesh_controlplane_config_version", "Version of the live config (0: none yet)."
        )
        config_version.add_metric([], cp.config.version if cp.config else 0)
        watchers = GaugeMetricFamily(
            "aimesh_controlplane_watchers",
            "Open Watch streams (proxies and clients following the catalog or the config).",
            labels=["stream"],
        )
        for stream, n in sorted(cp.watchers.items()):
            watchers.add_metric([stream], n)
        applies = CounterMetricFamily(
            "aimesh_controlplane_config_applies_total",
            "Config Apply calls, by result: applied, unchanged, rejected (invalid), "
            "conflict (expected_version was not the live one), dry_run.",
            labels=["result"],
        )
        for result, n in sorted(cp.applies.items()):
            applies.add_metric([result], n)
        registrations = CounterMetricFamily(
            "aimesh_controlplane_registrations_total",
            "Instances registered through this replica.",
        )
        registrations.add_metric([], cp.registrations)
        deregistrations = CounterMetricFamily(
            "aimesh_controlplane_deregistrations_total",
            "Instances removed: deregister (a Deregister call to this replica) or expired "
            "(the lease ran out; embedded stores only, etcd expires leases itself).",
            labels=["reason"],
        )
        deregistrations.add_metric(["deregister"], cp.deregistrations)
        expired = getattr(cp.store, "expired", None)
        if isinstance(expired, int):
            deregistrations.add_metric(["expired"], expired)
        proxies = GaugeMetricFamily(
            "aimesh_controlplane_proxies_reporting",
            "Proxies that sent a status report recently.",
        )
        proxies.add_metric([], cp.topology.reporting())
        return [
            instances,
            catalog_version,
            config_version,
            watchers,
            applies,
            registrations,
            deregistrations,
            proxies,
        ]


class XdsCollector(Collector):
    """The xDS server's streams and counters (mesh/control/xds/ads.py), read at scrape time."""

    def __init__(self, xds: Xds) -> None:
        self.xds = xds

    def collect(self) -> Iterable[Metric]:
        streams = GaugeMetricFamily(
            "aimesh_xds_streams",
            "Open ADS streams, by flavor (envoy:<listen address>, or grpc).",
            labels=["flavor"],
        )
        by_flavor: dict[str, int] = {}
        for stream in self.xds.streams:
            by_flavor[stream.flavor.key] = by_flavor.get(stream.flavor.key, 0) + 1
        for flavor in sorted(by_flavor):
            streams.add_metric([flavor], by_flavor[flavor])
        pushes = CounterMetricFamily("aimesh_xds_responses_total", "DiscoveryResponses sent.")
        pushes.add_metric([], self.xds.pushes)
        nacks = CounterMetricFamily(
            "aimesh_xds_nacks_total",
            "Responses a consumer rejected (it keeps its last good version; /xds has why).",
        )
        nacks.add_metric([], self.xds.nacks)
        rejected = CounterMetricFamily(
            "aimesh_xds_inconsistent_total",
            "Resource sets not published because they failed the consistency check.",
        )
        rejected.add_metric([], self.xds.rejected)
        return [streams, pushes, nacks, rejected]


def control_plane_registry(cp: ControlPlane, xds: Xds | None = None) -> CollectorRegistry:
    registry = new_registry()
    registry.register(ControlPlaneCollector(cp))
    if xds is not None:
        registry.register(XdsCollector(xds))
    return registry
