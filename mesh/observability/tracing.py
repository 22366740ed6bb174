"""Distributed tracing with OpenTelemetry: W3C trace context carried through gateways,
sidecars and backends, spans exported over OTLP/gRPC.

One call through a gateway is one trace:

    client  CLIENT  /aimesh.inference.v1.Inference/GenerateStream   (aimesh chat, or yours)
    proxy   SERVER  aimesh.inference.v1.Inference/GenerateStream     (ProxyTracing.around)
              INTERNAL  route                                       the routing decision
              CLIENT    attempt gpt4-gateway   kind=first   ERROR   one per upstream try
                sim   SERVER  /aimesh.inference.v1.Inference/GenerateStream
              CLIENT    attempt gpt4-gateway   kind=resume  OK
                sim   SERVER  /aimesh.inference.v1.Inference/GenerateStream

Tracing is off unless a collector is named (`--otlp-endpoint`, the config's
`observability.tracing`, or OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT). Off, `setup_tracing`
returns None, the proxy gets no policy and no observer, and nothing of OpenTelemetry is
even imported: the call path is exactly what it is without this module. A proxy that
does not trace passes the caller's `traceparent` through unchanged.

Attribute names are in docs/observability.md (Tracing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import logging
import os
import random
import socket
import sys
import threading
import time
import uuid
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from aimesh.interceptors.base import AttemptFact, CallFacts, InboundCall, Next

from ..units import parse_percent

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span

    from ..config.schema import TracingSpec
    from ..proxy.server import Proxy

log = logging.getLogger("aimesh.tracing")

DEFAULT_ENDPOINT = "localhost:4317"  # OTLP/gRPC's default, when tracing is enabled without one
TRACE_HEADERS = ("traceparent", "tracestate")
# Served by every aimesh server; tracing them would bury the calls in health checks.
UNTRACED = ("/grpc.health.v1.Health/", "/grpc.reflection.")
INFERENCE = "/aimesh.inference.v1.Inference/"
# gen_ai.operation.name by method (OpenTelemetry GenAI semantic conventions).
OPERATIONS = {
    INFERENCE + "Generate": "chat",
    INFERENCE + "GenerateStream": "chat",
    INFERENCE + "Embed": "embeddings",
}
_SAMPLERS = {
    # OTEL_TRACES_SAMPLER -> (follows the parent's decision, fixed ratio or None = the arg)
    "always_on": (False, 1.0),
    "always_off": (False, 0.0),
    "traceidratio": (False, None),
    "parentbased_always_on": (True, 1.0),
    "parentbased_always_off": (True, 0.0),
    "parentbased_traceidratio": (True, None),
}


# --- settings ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TracingFlags:
    """The command line's say (`--otlp-endpoint`, `--trace-sampling`): above the config
    and the environment."""

    endpoint: str | None = None
    sampling: float | None = None


@dataclass(frozen=True)
class TracingSettings:
    """What a process traces with, once flags, config and environment are weighed."""

    endpoint: str
    insecure: bool
    ratio: float  # share of new traces sampled
    parent_based: bool  # a call with a sampled (or unsampled) parent follows it
    service_name: str


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def _env_sampler(env: Mapping[str, str]) -> tuple[bool, float]:
    name = env.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if not name:
        return True, 1.0
    if name not in _SAMPLERS:
        log.warning("OTEL_TRACES_SAMPLER=%s is not supported here; sampling every trace", name)
        return True, 1.0
    parent_based, ratio = _SAMPLERS[name]
    if ratio is None:
        arg = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
        try:
            ratio = float(arg) if arg else 1.0
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            log.warning("OTEL_TRACES_SAMPLER_ARG=%r is not a ratio from 0 to 1; using 1", arg)
            ratio = 1.0
    return parent_based, ratio


def resolve(
    service_name: str,
    config: TracingSpec | None,
    env: Mapping[str, str],
    flags: TracingFlags | None = None,
) -> TracingSettings | None:
    """Flags, then the config (when `enabled`), then the OTEL_* environment; None when no
    collector is named anywhere, or OTEL_SDK_DISABLED=true."""
    flags = flags or TracingFlags()
    if _true(env.get("OTEL_SDK_DISABLED")):
        return None
    cfg = config if config is not None and config.enabled else None
    explicit = flags.endpoint or (cfg.endpoint if cfg else None)
    from_env = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    endpoint = explicit or from_env or (DEFAULT_ENDPOINT if cfg else None)
    if not endpoint:
        return None
    exporters = {e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",")}
    if not explicit and cfg is None and exporters == {"none"}:
        return None
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"
    )
    if protocol.strip().lower() != "grpc":
        log.warning(
            "OTLP protocol %s is not supported; exporting over gRPC to %s", protocol, endpoint
        )
    parent_based, ratio = _env_sampler(env)
    if flags.sampling is not None:
        parent_based, ratio = True, flags.sampling
    elif cfg is not None and cfg.sampling_ratio is not None:
        parent_based, ratio = True, cfg.sampling_ratio
    if endpoint.startswith("https://"):
        insecure = False
    elif endpoint.startswith("http://"):
        insecure = True
    else:
        flag = env.get("OTEL_EXPORTER_OTLP_TRACES_INSECURE") or env.get(
            "OTEL_EXPORTER_OTLP_INSECURE", "true"
        )
        insecure = flag.strip().lower() != "false"
    name = (cfg.service_name if cfg else None) or env.get("OTEL_SERVICE_NAME") or service_name
    return TracingSettings(endpoint, insecure, ratio, parent_based, name)


def _bsp_options(env: Mapping[str, str]) -> dict[str, float]:
    """OTEL_BSP_* from `env` (the processor would read os.environ itself)."""
    out: dict[str, float] = {}
    for var, arg in (
        ("OTEL_BSP_SCHEDULE_DELAY", "schedule_delay_millis"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "max_queue_size"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "max_export_batch_size"),
        ("OTEL_BSP_EXPORT_TIMEOUT", "export_timeout_millis"),
    ):
        text = env.get(var)
        if text:
            try:
                value = float(text)
            except ValueError:
                log.warning("%s=%r is not a number; ignored", var, text)
                continue
            out[arg] = int(value) if arg in ("max_queue_size", "max_export_batch_size") else value
    return out


def setup_tracing(
    service_name: str,
    config: TracingSpec | None,
    env: Mapping[str, str],
    flags: TracingFlags | None = None,
    *,
    instance_id: str | None = None,
    sample_roots: bool = True,
) -> TracerProvider | None:
    """A TracerProvider exporting in batches over OTLP/gRPC, sampling with
    ParentBased(TraceIdRatioBased(ratio)); None when tracing is off (see `resolve`).
    `sample_roots=False`: the caller decides for new traces itself (the proxy does, before
    touching the SDK), so the provider keeps every root span it is asked for.

    The provider is not made the global one: pass it to what creates spans. Call
    `shutdown_tracing` on the way out, so the last spans are sent."""
    settings = resolve(service_name, config, env, flags)
    if settings is None:
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import (
        ALWAYS_ON,
        ParentBased,
        Sampler,
        TraceIdRatioBased,
    )

    resource = Resource.create(
        {
            "service.name": settings.service_name,
            "service.namespace": "aimesh",
            "service.instance.id": instance_id or str(uuid.uuid4()),
            "service.version": _version(),
            "host.name": socket.gethostname(),
            "process.pid": os.getpid(),
        }
    )
    root: Sampler = TraceIdRatioBased(settings.ratio) if sample_roots else ALWAYS_ON
    sampler = ParentBased(root) if settings.parent_based else root
    provider = TracerProvider(sampler=sampler, resource=resource)
    exporter = OTLPSpanExporter(endpoint=settings.endpoint, insecure=settings.insecure)
    provider.add_span_processor(BatchSpanProcessor(exporter, **_bsp_options(env)))  # type: ignore[arg-type]
    log.info(
        "tracing as %s to %s, sampling %g of new traces%s",
        settings.service_name,
        settings.endpoint,
        settings.ratio,
        " (callers' decisions followed)" if settings.parent_based else "",
    )
    return provider


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("aimesh")
    except PackageNotFoundError:
        return "0+unknown"


def shutdown_tracing(provider: TracerProvider | None, timeout: float = 5.0) -> None:
    """Sends the spans still queued and closes the exporter, waiting at most `timeout`
    seconds (a collector that is down would otherwise hold the exit for its retries)."""
    if provider is None:
        return
    done = threading.Thread(target=provider.shutdown, name="otel-shutdown", daemon=True)
    done.start()
    done.join(timeout)
    if done.is_alive():
        log.warning("tracing: spans not all sent within %gs; giving up on them", timeout)


# --- command line -----------------------------------------------------------------------


def _endpoint_arg(text: str) -> str:
    from ..config import parse_host_port

    scheme, sep, rest = text.partition("://")
    if sep and scheme not in ("http", "https"):
        raise argparse.ArgumentTypeError(f"{text!r}: the scheme must be http or https, or none")
    try:
        parse_host_port(rest.rstrip("/") if sep else text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _ratio_arg(text: str) -> float:
    """'0.1' or '10%'."""
    try:
        return parse_percent(text if text.strip().endswith("%") else float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a ratio from 0 to 1; write 0.1 or 10%"
        ) from None


def add_tracing_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tracing (OpenTelemetry, OTLP/gRPC)")
    group.add_argument(
        "--otlp-endpoint",
        type=_endpoint_arg,
        default=None,
        metavar="HOST:PORT",
        help="send spans to this OTLP/gRPC collector (default: a proxy's config "
        "observability.tracing, else OTEL_EXPORTER_OTLP_ENDPOINT; without one, no tracing)",
    )
    group.add_argument(
        "--trace-sampling",
        type=_ratio_arg,
        default=None,
        metavar="RATIO",
        help="share of new traces kept, 0.1 or 10%% (default: a proxy's config, else "
        "OTEL_TRACES_SAMPLER[_ARG], else all); calls that carry a trace context follow "
        "their caller's decision",
    )


def flags_from_args(args: argparse.Namespace) -> TracingFlags:
    return TracingFlags(getattr(args, "otlp_endpoint", None), getattr(args, "trace_sampling", None))


# --- attributes -------------------------------------------------------------------------


def genai_attributes(
    method: str, model: str, tokens_in: int, tokens_out: int
) -> dict[str, str | int]:
    """The GenAI semantic-convention attributes of an Inference call ({} for others)."""
    operation = OPERATIONS.get(method)
    if operation is None:
        return {}
    attrs: dict[str, str | int] = {"gen_ai.operation.name": operation}
    if model:
        attrs["gen_ai.request.model"] = model
    if tokens_in:
        attrs["gen_ai.usage.input_tokens"] = tokens_in
    if tokens_out:
        attrs["gen_ai.usage.output_tokens"] = tokens_out
    return attrs


def annotate_current_span(method: str, model: str, tokens_in: int = 0, tokens_out: int = 0) -> None:
    """Adds the GenAI attributes to the span of the call being served (a backend's server
    span, made by the grpc instrumentation); nothing when that span is not recorded."""
    from opentelemetry import trace

    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes(genai_attributes(method, model, tokens_in, tokens_out))


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return service, name


def _server_address(endpoint: str) -> dict[str, str | int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit():
        return {"server.address": endpoint}
    return {"server.address": host.strip("[]"), "server.port": int(port)}


# --- the proxy --------------------------------------------------------------------------


@dataclass(slots=True)
class _CallSpan:
    """The server span of the call being served, for its route and attempt spans."""

    span: Span
    context: Context
    call: InboundCall
    routed_ns: int  # when the call went on to routing: the route span's start
    routed: bool = False  # the route span is out


_active: contextvars.ContextVar[_CallSpan | None] = contextvars.ContextVar(
    "aimesh_call_span", default=None
)
# The trace headers of the call being served when it is not sampled (no spans at all).
_unsampled: contextvars.ContextVar[tuple[tuple[str, str], ...] | None] = contextvars.ContextVar(
    "aimesh_unsampled", default=None
)


class ProxyTracing:
    """The proxy's spans. As an outer policy (`around`), a SERVER span per inbound call,
    child of the caller's `traceparent`; as the forwarders' `AttemptObserver`, a "route"
    span for the routing decision and a CLIENT span per upstream try, whose context goes
    upstream in `traceparent`/`tracestate` (replacing the caller's), so each backend's
    server span is the child of the try that reached it."""

    def __init__(
        self,
        provider: TracerProvider,
        ratio: float = 1.0,
        parent_based: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        """`ratio`, `parent_based`: the sampling decision for calls, taken here before any
        SDK work (the provider must then keep every root: `sample_roots=False`). A call
        not sampled costs a header parse, or a coin and a made-up `traceparent`, instead
        of a span, a sampler run and a context (about 40 us a call in bench/observability)."""
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.tracer = provider.get_tracer("aimesh.proxy", _version())
        self.propagator = TraceContextTextMapPropagator()
        self._in_context = trace.set_span_in_context
        self._server, self._client = SpanKind.SERVER, SpanKind.CLIENT
        self._internal = SpanKind.INTERNAL
        self._status, self._error = Status, StatusCode.ERROR
        self._ratio, self._parent_based = ratio, parent_based
        self._rng = rng or random.Random()

    # -- the server span (outer policy) ------------------------------------------------

    async def around(self, call: InboundCall, call_next: Next) -> None:
        method = call.method
        if method.startswith(UNTRACED):
            await call_next()
            return
        carrier = {k: v for k, v in call.metadata if k in TRACE_HEADERS and isinstance(v, str)}
        unsampled = self._unsampled(carrier)
        if unsampled is not None:
            # Not traced: no spans, but the upstream must hear the decision (and the trace
            # id, for its logs), or it would start a trace of its own.
            token_u = _unsampled.set(unsampled)
            try:
                await call_next()
            finally:
                _unsampled.reset(token_u)
            return
        parent = self.propagator.extract(carrier) if carrier else None
        service, name = _split(method)
        span = self.tracer.start_span(
            f"{service}/{name}",
            context=parent,
            kind=self._server,
            start_time=call.started_ns,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        )
        ctx = span.get_span_context()
        if ctx.trace_flags.sampled:
            call.facts.trace_id = format(ctx.trace_id, "032x")
        state = _CallSpan(span, self._in_context(span), call, time.time_ns())
        token = _active.set(state)
        code = grpc.StatusCode.OK
        try:
            await call_next()
            code = call.code()
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except BaseException:
            code = call.code()  # abort() raises; grpc knows the status it set
            if code is grpc.StatusCode.OK:
                code = grpc.StatusCode.UNKNOWN
            raise
        finally:
            _active.reset(token)
            self._end_server(state, code)

    def _unsampled(self, carrier: dict[str, str]) -> tuple[tuple[str, str], ...] | None:
        """The trace headers to send upstream when this call is not sampled; None when it
        is (or the caller's header is malformed: the SDK then decides as usual)."""
        header = carrier.get("traceparent")
        if header is None or not self._parent_based:
            if self._rng.random() < self._ratio:
                return None
            trace_id = self._rng.getrandbits(128) or 1
            span_id = self._rng.getrandbits(64) or 1
            return (("traceparent", f"00-{trace_id:032x}-{span_id:016x}-00"),)
        if len(header) != 55:
            return None
        try:
            flags = int(header[53:55], 16)
        except ValueError:
            return None
        if flags & 1:
            return None
        return tuple(carrier.items())  # the caller's decision, passed on unchanged

    def _end_server(self, state: _CallSpan, code: grpc.StatusCode) -> None:
        span, call = state.span, state.call
        if span.is_recording():
            facts = call.facts
            attrs: dict[str, Any] = {"rpc.grpc.status_code": code.value[0]}
            attrs.update(
                genai_attributes(call.method, facts.model, facts.tokens_in, facts.tokens_out)
            )
            if facts.route:
                attrs["aimesh.route"] = facts.route
            if facts.attempts:
                attrs["aimesh.service"] = facts.service
                attrs["aimesh.endpoint"] = facts.endpoint
            attrs["aimesh.attempts"] = len(facts.attempts)
            attrs["aimesh.resumed"] = facts.resumed
            if facts.first_token_ns:
                attrs["aimesh.ttft_ms"] = round((facts.first_token_ns - call.started_ns) / 1e6, 3)
                span.add_event("first token", timestamp=facts.first_token_ns)
            if call.request_id:
                attrs["aimesh.request_id"] = call.request_id
            span.set_attributes(attrs)
            if code is not grpc.StatusCode.OK:
                span.set_status(self._status(self._error, f"{code.name}: {call.details()}"))
        span.end()

    # -- route and attempt spans (AttemptObserver) --------------------------------------

    def started(self, facts: CallFacts, attempt: AttemptFact) -> Sequence[tuple[str, str]]:
        headers = _unsampled.get()
        if headers is not None:
            return headers
        state = _active.get()
        if state is not None and state.call.facts is not facts:
            state = None  # not the call this policy wraps (cannot happen through the Stack)
        parent = state.context if state is not None else None
        method = state.call.method if state is not None else ""
        carrier: dict[str, str] = {}
        if state is not None and not state.span.is_recording():
            # Not sampled: no spans to make, but the upstream must hear the decision (and
            # the trace id, for its logs), or it would start a trace of its own.
            self.propagator.inject(carrier, context=parent)
            return tuple(carrier.items())
        if state is not None and not state.routed:
            state.routed = True
            self._route_span(state, facts, attempt)
        service, name = _split(method)
        attrs: dict[str, Any] = {
            "rpc.system": "grpc",
            "aimesh.service": attempt.service,
            "aimesh.endpoint": attempt.endpoint,
            "aimesh.attempt.kind": attempt.kind,
            "aimesh.attempt.number": len(facts.attempts),
            **_server_address(attempt.endpoint),
        }
        if method:
            attrs["rpc.service"], attrs["rpc.method"] = service, name
        span = self.tracer.start_span(
            f"attempt {attempt.service}",
            context=parent,
            kind=self._client,
            start_time=attempt.started_ns,
            attributes=attrs,
        )
        attempt.span = span
        self.propagator.inject(carrier, context=self._in_context(span))
        return tuple(carrier.items())

    def _route_span(self, state: _CallSpan, facts: CallFacts, attempt: AttemptFact) -> None:
        attrs: dict[str, Any] = {
            "aimesh.route": facts.route,
            "aimesh.route.destination": attempt.service,
            "aimesh.endpoint": attempt.endpoint,
        }
        if facts.model:
            attrs["gen_ai.request.model"] = facts.model
        span = self.tracer.start_span(
            "route",
            context=state.context,
            kind=self._internal,
            start_time=min(state.routed_ns, attempt.started_ns),
            attributes=attrs,
        )
        span.end(end_time=attempt.started_ns)

    def ended(self, facts: CallFacts, attempt: AttemptFact) -> None:
        span = attempt.span
        if span is None:
            return
        code = attempt.code or grpc.StatusCode.OK
        if span.is_recording():
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            span.set_attribute("aimesh.attempt.status", code.name)
            # A try cancelled by the proxy (a hedge that lost) or with its caller is not
            # the backend's failure; the server span carries the caller's cancel.
            if code is not grpc.StatusCode.OK and code is not grpc.StatusCode.CANCELLED:
                span.set_status(self._status(self._error, code.name))
        span.end(end_time=attempt.ended_ns or None)


def proxy_tracing(
    proxy: Proxy, config: TracingSpec | None, env: Mapping[str, str]
) -> TracerProvider | None:
    """Turns tracing on for `proxy` (before `start`) when flags, config or environment
    name a collector: its policy goes around every inbound call and it observes every
    upstream try. Returns the provider, to shut down on exit, or None (nothing added)."""
    settings = resolve("aimesh-proxy", config, env, proxy.settings.tracing)
    provider = setup_tracing(
        "aimesh-proxy", config, env, proxy.settings.tracing, sample_roots=False
    )
    if provider is not None and settings is not None:
        tracing = ProxyTracing(provider, settings.ratio, settings.parent_based)
        proxy.outer_policies.append(tracing)
        proxy.observer = tracing
    return provider


# --- backends and the control plane -----------------------------------------------------


def server_interceptor(provider: TracerProvider, skip: Collection[str] = ()) -> Any:
    """A grpc.aio server interceptor (opentelemetry-instrumentation-grpc's) making a SERVER
    span per call, child of the caller's `traceparent`; health, reflection and the
    methods in `skip` (long-lived streams) are left out. Put it first among the server's
    interceptors, so its span covers the others."""
    from opentelemetry.instrumentation.grpc import (  # type: ignore[import-untyped]
        aio_server_interceptor,
    )

    def traced(details: grpc.HandlerCallDetails) -> bool:
        method = details.method
        if isinstance(method, bytes):
            method = method.decode()
        return not method.startswith(UNTRACED) and method not in skip

    return aio_server_interceptor(tracer_provider=provider, filter_=traced)  # type: ignore[no-untyped-call]


def _request_hook(trace_ids: list[int]) -> Any:
    def hook(span: Span, request: Any) -> None:
        ctx = span.get_span_context()
        if ctx.trace_flags.sampled:
            trace_ids.append(ctx.trace_id)
        if not span.is_recording():
            return
        name = type(request).__name__
        operation = {"GenerateRequest": "chat", "EmbedRequest": "embeddings"}.get(name)
        if operation is not None:
            span.set_attributes(
                {"gen_ai.operation.name": operation, "gen_ai.request.model": request.model}
            )

    return hook


def _response_hook(span: Span, response: Any) -> None:
    # Streams: each message; unary calls: the status details (the instrumentation's way).
    usage = getattr(response, "usage", None)
    if usage is not None and response.HasField("usage") and span.is_recording():
        span.set_attributes(
            {
                "gen_ai.usage.input_tokens": usage.prompt_tokens,
                "gen_ai.usage.output_tokens": usage.completion_tokens,
            }
        )


def client_interceptors(provider: TracerProvider, trace_ids: list[int] | None = None) -> list[Any]:
    """grpc.aio client interceptors (the instrumentation's): a CLIENT span per call, its
    context sent in `traceparent`, with the GenAI attributes of Inference calls. The trace
    ids of the calls made are appended to `trace_ids`."""
    from opentelemetry.instrumentation.grpc import (  # type: ignore[import-untyped]
        aio_client_interceptors,
    )

    interceptors: list[Any] = aio_client_interceptors(  # type: ignore[no-untyped-call]
        tracer_provider=provider,
        request_hook=_request_hook(trace_ids if trace_ids is not None else []),
        response_hook=_response_hook,
    )
    return interceptors


@contextlib.contextmanager
def client_tracing(
    service_name: str, flags: TracingFlags | None, env: Mapping[str, str]
) -> Iterator[list[Any]]:
    """For a command that makes calls (`aimesh chat`): the channel interceptors to use
    (none when tracing is off), and on the way out the spans sent and the trace named."""
    provider = setup_tracing(service_name, None, env, flags)
    if provider is None:
        yield []
        return
    trace_ids: list[int] = []
    try:
        yield client_interceptors(provider, trace_ids)
    finally:
        shutdown_tracing(provider)
        for trace_id in dict.fromkeys(trace_ids):
            print(f"{service_name}: trace {trace_id:032x}", file=sys.stderr)


__all__ = [
    "ProxyTracing",
    "TracingFlags",
    "TracingSettings",
    "add_tracing_flags",
    "annotate_current_span",
    "client_interceptors",
    "client_tracing",
    "flags_from_args",
    "genai_attributes",
    "proxy_tracing",
    "resolve",
    "server_interceptor",
    "setup_tracing",
    "shutdown_tracing",
]
