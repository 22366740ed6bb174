"""A provider adapter as an Inference backend: the gRPC servicer, the HTTP transport,
and the serving glue (health, reflection, SIGTERM drain, registration) shared with the sim.

An adapter (`Provider`) is mostly pure functions: a request to JSON, a streamed event or
a response body to `Delta`s, an error body to a status. Everything that does I/O is here:
`Http` (one httpx.AsyncClient per backend: HTTP/1.1, a keep-alive pool, timeouts bounded
by the gRPC deadline, transport failures as statuses) and `ProviderBackend`, which runs a
call end to end and keeps the instance's state (in-flight calls, drain, counters).

Cancellation: when the gRPC call ends early (the caller cancels, or its deadline passes),
grpc cancels the handler; the `async with` around the HTTP response then closes it, and
an unfinished HTTP/1.1 response cannot go back to the pool, so the connection closes and
the provider stops generating.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import httpx

from aimesh.inference.v1 import inference_pb2 as pb
from aimesh.inference.v1 import inference_pb2_grpc as pb_grpc
from aimesh.interceptors import DecodeErrorInterceptor

from ..errors import MeshError
from ..orca import ACTIVE, LOAD_TRAILERS, SLOTS, LoadReport
from ..security.mtls import bind_ports, start_workload_identity
from ..serving import Health, enable_reflection, server_options, stop_on_signals
from ..sim.server import Registration
from .common import (
    ChunkAssembler,
    Delta,
    Plan,
    exhausted_chunk,
    validate_embed,
    validate_generate,
)
from .errors import http_error, redact
from .sse import Event, SSEParser

if TYPE_CHECKING:
    from ..security.cli import MtlsFlags
    from ..security.workload import WorkloadIdentity

log = logging.getLogger("aimesh.providers")

INFERENCE = pb.DESCRIPTOR.services_by_name["Inference"].full_name
INSTANCE_TRAILER = "aimesh-instance"
PUSHBACK_TRAILER = "grpc-retry-pushback-ms"
MAX_ERROR_BODY = 64 * 1024  # bytes of an error response read for its message
DRAIN_AFTER_DONE = 1.0  # seconds to read the rest of a finished stream (keeps the connection)


class ApiKey:
    """A secret that never shows in a repr, a log line or an error message."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value.strip()

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "ApiKey(***)" if self._value else "ApiKey(none)"

    __str__ = __repr__


# -- the adapter interface ----------------------------------------------------------------


class Provider(ABC):
    """One provider's HTTP API, as pure translations."""

    name: str  # "openai", "anthropic": the prefix of every error message
    supports_embed: bool = False
    # Request fields the adapter sets; `extensions` may not override them.
    reserved: tuple[str, ...] = ("model", "messages", "stream")

    def __init__(self, api_key: ApiKey) -> None:
        self.api_key = api_key

    @abstractmethod
    def headers(self) -> dict[str, str]:
        """Headers on every request (authentication, API version)."""

    @abstractmethod
    def plan_generate(self, r: pb.GenerateRequest, provider_model: str, stream: bool) -> Plan:
        """The HTTP request for a Generate call (raises MeshError for what cannot map)."""

    @abstractmethod
    def stream_deltas(self, event: Event) -> list[Delta]:
        """What one server-sent event means (raises MeshError for an error event)."""

    @abstractmethod
    def response_delta(self, doc: Any) -> Delta:
        """A whole (unary) response as one Delta."""

    def plan_embed(self, r: pb.EmbedRequest, provider_model: str) -> tuple[str, dict[str, Any]]:
        raise MeshError(
            grpc.StatusCode.UNIMPLEMENTED, f"{self.name}: this provider has no embeddings API"
        )

    def embed_response(self, doc: Any, r: pb.EmbedRequest, provider_model: str) -> pb.EmbedResponse:
        raise NotImplementedError

    models_path: str | None = None

    def models_response(self, doc: Any) -> list[pb.ModelInfo]:
        return []

    def secrets(self) -> tuple[str, ...]:
        key = self.api_key.reveal()
        return (key,) if key else ()


# -- HTTP ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Upper bounds per phase; each is cut to the call's remaining deadline."""

    connect: float = 5.0
    read: float = 60.0  # the longest silence between two reads of a response
    write: float = 10.0
    pool: float = 5.0  # waiting for a free connection of the pool

    def bounded(self, remaining: float | None) -> httpx.Timeout:
        def cap(limit: float) -> float:
            return limit if remaining is None else max(0.001, min(limit, remaining))

        return httpx.Timeout(
            connect=cap(self.connect),
            read=cap(self.read),
            write=cap(self.write),
            pool=cap(self.pool),
        )


class Http:
    """The backend's HTTP client: one pool of keep-alive HTTP/1.1 connections."""

    def __init__(
        self,
        provider: Provider,
        base_url: str,
        *,
        timeouts: Timeouts = Timeouts(),
        max_connections: int = 100,
        max_keepalive: int = 20,
        keepalive_expiry: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.provider = provider
        self.base_url = base_url.rstrip("/")
        self.timeouts = timeouts
        self.max_connections = max_connections
        self.client = httpx.AsyncClient(
            base_url=self.base_url,
            headers={
                "user-agent": "aimesh/0.1",
                "accept-encoding": "identity",
                **provider.headers(),
            },
            limits=httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=max_keepalive,
                keepalive_expiry=keepalive_expiry,
            ),
            timeout=timeouts.bounded(None),
            http1=True,
            http2=False,
            follow_redirects=False,
            transport=transport,
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    def _url(self, path: str) -> str:
        return self.base_url + path

    def _failure(self, exc: Exception, path: str, deadline: float | None) -> MeshError:
        """A transport failure as a status, its message free of secrets."""
        p = self.provider.name
        where = f"{self.base_url}{path}"
        now = time.monotonic()
        if isinstance(exc, httpx.PoolTimeout):
            return MeshError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{p}: all {self.max_connections} connections to the provider are busy; "
                "retry later or elsewhere",
            )
        if isinstance(exc, httpx.TimeoutException) and deadline is not None and now >= deadline:
            return MeshError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"{p}: the call's deadline passed while waiting for {where}",
            )
        if isinstance(exc, httpx.ConnectTimeout):
            msg = f"could not connect to {where} within {self.timeouts.connect:g}s"
        elif isinstance(exc, httpx.ReadTimeout):
            msg = f"{where} sent nothing for {self.timeouts.read:g}s"
        elif isinstance(exc, httpx.ConnectError):
            msg = f"cannot connect to {where}: {exc or type(exc).__name__}"
        else:
            msg = f"connection to {where} failed: {exc or type(exc).__name__}"
        return MeshError(
            grpc.StatusCode.UNAVAILABLE, redact(f"{p}: {msg}", self.provider.secrets())
        )

    @staticmethod
    def _deadline(remaining: float | None) -> float | None:
        if remaining is None:
            return None
        if remaining <= 0:
            raise MeshError(grpc.StatusCode.DEADLINE_EXCEEDED, "the call's deadline has passed")
        return time.monotonic() + remaining

    async def _raise_for_status(self, response: httpx.Response) -> None:
        if response.status_code < 300:
            return
        body = b""
        with contextlib.suppress(httpx.HTTPError):
            async for piece in response.aiter_bytes():
                body += piece
                if len(body) >= MAX_ERROR_BODY:
                    break
        raise http_error(
            self.provider.name,
            response.status_code,
            dict(response.headers),
            body[:MAX_ERROR_BODY],
            now=time.time(),
            secrets=self.provider.secrets(),
        )

    async def request_json(
        self, method: str, path: str, body: Mapping[str, Any] | None, remaining: float | None
    ) -> Any:
        deadline = self._deadline(remaining)
        try:
            request = self.client.build_request(
                method,
                self._url(path),
                json=body,
                timeout=self.timeouts.bounded(remaining),
            )
            response = await self.client.send(request, stream=True)
            try:
                await self._raise_for_status(response)
                raw = await response.aread()
            finally:
                await response.aclose()
        except httpx.TransportError as exc:
            raise self._failure(exc, path, deadline) from None
        try:
            return json.loads(raw)
        except ValueError:
            raise MeshError(
                grpc.StatusCode.UNAVAILABLE,
                f"{self.provider.name}: {path} answered 2xx with a body that is not JSON",
            ) from None

    @contextlib.asynccontextmanager
    async def stream(
        self, path: str, body: Mapping[str, Any], remaining: float | None
    ) -> AsyncIterator[tuple[str, AsyncGenerator[bytes, None]]]:
        """POSTs `body`; yields the response's content type and its body's bytes as they
        arrive. Failures, before or during the body, are MeshErrors."""
        deadline = self._deadline(remaining)
        request = self.client.build_request(
            "POST",
            self._url(path),
            json=body,
            headers={"accept": "text/event-stream"},
            timeout=self.timeouts.bounded(remaining),
        )
        try:
            response = await self.client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise self._failure(exc, path, deadline) from None
        try:
            try:
                await self._raise_for_status(response)
            except httpx.TransportError as exc:
                raise self._failure(exc, path, deadline) from None

            async def pieces() -> AsyncGenerator[bytes, None]:
                try:
                    async for piece in response.aiter_bytes():
                        yield piece
                except httpx.TransportError as exc:
                    raise self._failure(exc, path, deadline) from None

            chunks = pieces()
            try:
                yield response.headers.get("content-type", ""), chunks
            finally:
                await chunks.aclose()
        finally:
            await response.aclose()


# -- the backend --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BackendConfig:
    instance_id: str = ""
    # Mesh model name -> the provider's; a model not in the map is sent as named.
    model_map: Mapping[str, str] = field(default_factory=dict)
    # More mesh model names to advertise (ListModels, registration), sent as named.
    models: tuple[str, ...] = ()
    list_provider_models: bool = False
    owned_by: str = ""
    context_window: int = 0

    def served(self) -> list[str]:
        return sorted({*self.model_map, *self.models})


@dataclass(slots=True)
class Stats:
    calls: int = 0
    tokens: int = 0
    errors: int = 0
    cancelled: int = 0
    _recent: deque[float] = field(default_factory=deque)

    def record_call(self, now: float) -> None:
        self.calls += 1
        self._recent.append(now)

    def rps(self, now: float, window: float = 1.0) -> float:
        while self._recent and self._recent[0] < now - window:
            self._recent.popleft()
        return len(self._recent) / window


class ProviderBackend:
    """One adapter instance: the provider, its HTTP pool, and the state of its calls."""

    def __init__(self, provider: Provider, http: Http, config: BackendConfig) -> None:
        self.provider = provider
        self.http = http
        self.config = config
        self.instance_id = config.instance_id
        self.stats = Stats()
        self.on_serving_change: Callable[[bool], Awaitable[None]] | None = None
        self.draining = False
        self.aborting = False
        self._calls: set[asyncio.Task[Any]] = set()
        self._cut: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        return len(self._calls)

    @contextlib.contextmanager
    def admitted(self) -> Any:
        """Counts the current call as in flight; refuses it while draining."""
        if self.draining:
            raise MeshError(
                grpc.StatusCode.UNAVAILABLE,
                f"{self.instance_id} is shutting down; retry on another instance",
            )
        task = asyncio.current_task()
        assert task is not None
        self._calls.add(task)
        self._idle.clear()
        try:
            yield
        finally:
            self._calls.discard(task)
            if not self._calls:
                self._idle.set()

    def was_cut(self, task: asyncio.Task[Any] | None) -> bool:
        """Whether the drain cancelled `task` (as opposed to its caller or deadline)."""
        if task is None or task not in self._cut:
            return False
        self._cut.discard(task)
        return True

    async def drain(self, grace: float) -> int:
        """Refuses new calls, waits up to `grace` for in-flight ones, then ends the rest
        with UNAVAILABLE. Returns how many were cut short."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
            return 0
        except TimeoutError:
            self.aborting = True
            tasks = list(self._calls)
            for task in tasks:
                self._cut.add(task)
                task.cancel()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), 2.0)
            return len(tasks)

    def trailers(self) -> tuple[tuple[str, str | bytes], ...]:
        slots = float(self.http.max_connections)
        report = LoadReport(
            application_utilization=min(1.0, self.inflight / slots),
            rps=self.stats.rps(time.monotonic()),
            named={ACTIVE: float(self.inflight), SLOTS: slots},
        ).encode()
        return ((INSTANCE_TRAILER, self.instance_id), *((k, report) for k in LOAD_TRAILERS))

    def provider_model(self, model: str) -> str:
        return self.config.model_map.get(model, model)

    # -- calls -------------------------------------------------------------------------

    async def stream(
        self, r: pb.GenerateRequest, remaining: float | None
    ) -> AsyncGenerator[pb.GenerateChunk, None]:
        """The chunks of one streamed completion; failures are MeshErrors."""
        model = self.provider_model(r.model)
        plan = self.provider.plan_generate(r, model, stream=True)
        if plan.exhausted:
            yield exhausted_chunk(plan, model)
            return
        assembler = ChunkAssembler(plan, model)
        async with self.http.stream(plan.path, plan.body, remaining) as (content_type, body):
            if "json" in content_type and "event-stream" not in content_type:
                # A server that ignored stream=true answers with the whole completion.
                raw = b"".join([piece async for piece in body])
                try:
                    doc = json.loads(raw)
                except ValueError:
                    raise MeshError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"{self.provider.name}: a JSON answer to a stream request is not JSON",
                    ) from None
                chunk = assembler.feed(self.provider.response_delta(doc))
                if chunk is not None:
                    yield chunk
                yield assembler.final()
                return
            parser = SSEParser()
            async for piece in body:
                for event in parser.feed(piece):
                    for delta in self.provider.stream_deltas(event):
                        chunk = assembler.feed(delta)
                        if chunk is not None:
                            self.stats.tokens += chunk.token_count
                            yield chunk
                if assembler.done:
                    break
            if assembler.done:
                yield assembler.final()
                # Read the rest (the chunked terminator) so the connection can be reused.
                with contextlib.suppress(MeshError, TimeoutError):
                    async with asyncio.timeout(DRAIN_AFTER_DONE):
                        async for _ in body:
                            pass
                return
            for event in parser.close():
                for delta in self.provider.stream_deltas(event):
                    chunk = assembler.feed(delta)
                    if chunk is not None:
                        yield chunk
        if assembler.finish is None and not assembler.done:
            raise MeshError(
                grpc.StatusCode.UNAVAILABLE,
                f"{self.provider.name}: the stream ended before the provider said it was done",
            )
        yield assembler.final()

    async def generate(self, r: pb.GenerateRequest, remaining: float | None) -> pb.GenerateResponse:
        model = self.provider_model(r.model)
        plan = self.provider.plan_generate(r, model, stream=False)
        request_id = r.request_id
        if plan.exhausted:
            last = exhausted_chunk(plan, model)
            return pb.GenerateResponse(
                finish_reason=last.finish_reason,
                usage=last.usage,
                model=model,
                request_id=request_id or uuid.uuid4().hex,
            )
        doc = await self.http.request_json("POST", plan.path, plan.body, remaining)
        assembler = ChunkAssembler(plan, model)
        chunk = assembler.feed(self.provider.response_delta(doc))
        last = assembler.final()
        return pb.GenerateResponse(
            text=chunk.text if chunk is not None else "",
            finish_reason=last.finish_reason,
            usage=last.usage,
            model=assembler.model or model,
            request_id=request_id or assembler.response_id or uuid.uuid4().hex,
        )

    async def embed(self, r: pb.EmbedRequest, remaining: float | None) -> pb.EmbedResponse:
        model = self.provider_model(r.model)
        path, body = self.provider.plan_embed(r, model)
        doc = await self.http.request_json("POST", path, body, remaining)
        return self.provider.embed_response(doc, r, model)

    async def list_models(self, remaining: float | None) -> list[pb.ModelInfo]:
        c = self.config
        owned_by = c.owned_by or self.provider.name
        models = {
            m: pb.ModelInfo(
                id=m,
                owned_by=owned_by,
                context_window=c.context_window,
                supports_generate=True,
                supports_embed=self.provider.supports_embed,
            )
            for m in c.served()
        }
        if c.list_provider_models and self.provider.models_path:
            try:
                budget = 5.0 if remaining is None else min(5.0, remaining * 0.8)
                doc = await self.http.request_json("GET", self.provider.models_path, None, budget)
                for info in self.provider.models_response(doc):
                    models.setdefault(info.id, info)
            except MeshError as err:
                log.info("listing the provider's models failed: %s", err.message)
        return [models[k] for k in sorted(models)]


class ProviderService(pb_grpc.InferenceServicer):
    """Inference over a provider adapter."""

    def __init__(self, backend: ProviderBackend) -> None:
        self.b = backend

    async def _fail(self, context: grpc.aio.ServicerContext[Any, Any], err: MeshError) -> None:
        self.b.stats.errors += 1
        if err.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL):
            log.warning("%s", err.message)
        trailers = list(self.b.trailers())
        if err.pushback_ms is not None:
            trailers.append((PUSHBACK_TRAILER, str(err.pushback_ms)))
        await context.abort(err.code, err.message, trailing_metadata=tuple(trailers))

    def _cut_short(self, delivered: int) -> MeshError:
        return MeshError(
            grpc.StatusCode.UNAVAILABLE,
            f"{self.b.instance_id} shut down before this stream finished ({delivered} tokens "
            "delivered); resume elsewhere with continuation",
        )

    async def GenerateStream(  # noqa: N802 (gRPC method name)
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.GenerateChunk]:
        b = self.b
        b.stats.record_call(time.monotonic())
        delivered = 0
        try:
            validate_generate(request)
            with b.admitted():
                # aclosing: when grpc closes this generator (a cancel during a write), the
                # provider's stream closes now, not whenever the garbage collector runs.
                async with contextlib.aclosing(b.stream(request, context.time_remaining())) as it:
                    async for chunk in it:
                        delivered += chunk.token_count
                        yield chunk
        except MeshError as err:
            if delivered and err.code == grpc.StatusCode.UNAVAILABLE:
                err = MeshError(
                    err.code,
                    f"{err.message} (after {delivered} tokens delivered; resume elsewhere "
                    "with continuation)",
                    pushback_ms=err.pushback_ms,
                )
            await self._fail(context, err)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if b.was_cut(task) and task is not None:
                task.uncancel()
                await self._fail(context, self._cut_short(delivered))
            b.stats.cancelled += 1
            raise
        except GeneratorExit:
            # A cancel that lands while grpc writes a chunk closes the generator instead.
            b.stats.cancelled += 1
            raise
        context.set_trailing_metadata(b.trailers())

    async def Generate(  # noqa: N802
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GenerateResponse:
        b = self.b
        b.stats.record_call(time.monotonic())
        try:
            validate_generate(request)
            with b.admitted():
                response = await b.generate(request, context.time_remaining())
        except MeshError as err:
            await self._fail(context, err)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if b.was_cut(task) and task is not None:
                task.uncancel()
                await self._fail(context, self._cut_short(0))
            b.stats.cancelled += 1
            raise
        b.stats.tokens += response.usage.completion_tokens
        context.set_trailing_metadata(b.trailers())
        return response

    async def Embed(  # noqa: N802
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.EmbedResponse:
        b = self.b
        b.stats.record_call(time.monotonic())
        try:
            validate_embed(request)
            with b.admitted():
                response = await b.embed(request, context.time_remaining())
        except MeshError as err:
            await self._fail(context, err)
        context.set_trailing_metadata(b.trailers())
        return response

    async def ListModels(  # noqa: N802
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListModelsResponse:
        b = self.b
        b.stats.record_call(time.monotonic())
        models = await b.list_models(context.time_remaining())
        context.set_trailing_metadata(b.trailers())
        return pb.ListModelsResponse(models=models)


# -- serving ------------------------------------------------------------------------------


@dataclass
class RunningProvider:
    server: grpc.aio.Server
    backend: ProviderBackend
    health: Health
    port: int
    plaintext_port: int = 0  # PERMISSIVE: the plaintext port next to the mTLS one

    async def stop(self, grace: float = 5.0) -> int:
        """Graceful stop: NOT_SERVING, refuse new calls, let in-flight ones finish within
        `grace`, end the rest with UNAVAILABLE. Returns how many were cut short."""
        await self.health.shutdown()
        cut = await self.backend.drain(grace)
        await self.server.stop(1.0)
        await self.backend.http.aclose()
        return cut


async def start_provider(
    provider: Provider,
    base_url: str,
    config: BackendConfig,
    listen: str = "127.0.0.1:0",
    *,
    timeouts: Timeouts = Timeouts(),
    max_connections: int = 100,
    transport: httpx.AsyncBaseTransport | None = None,
    identity: WorkloadIdentity | None = None,
    plaintext_listen: str | None = None,
) -> RunningProvider:
    """Starts an adapter's gRPC server in this event loop (tests use it directly). With a
    mesh `identity` the port is STRICT mTLS, as a sim's; PERMISSIVE adds `plaintext_listen`."""
    server = grpc.aio.server(options=server_options(), interceptors=[DecodeErrorInterceptor()])
    port, plaintext_port = bind_ports(server, listen, identity, plaintext_listen)
    host = listen.rpartition(":")[0]
    if not config.instance_id:
        from dataclasses import replace

        config = replace(config, instance_id=f"{host}:{port}")
    http = Http(
        provider,
        base_url,
        timeouts=timeouts,
        max_connections=max_connections,
        max_keepalive=min(max_connections, 100),
        transport=transport,
    )
    backend = ProviderBackend(provider, http, config)
    pb_grpc.add_InferenceServicer_to_server(ProviderService(backend), server)
    health = Health(server, [INFERENCE])
    backend.on_serving_change = health.set_serving
    enable_reflection(server, [INFERENCE])
    await server.start()
    await health.set_serving(True)
    return RunningProvider(
        server=server, backend=backend, health=health, port=port, plaintext_port=plaintext_port
    )


async def serve(
    provider: Provider,
    base_url: str,
    config: BackendConfig,
    listen: str,
    *,
    timeouts: Timeouts = Timeouts(),
    max_connections: int = 100,
    grace: float = 10.0,
    registration: Registration | None = None,
    mtls: MtlsFlags | None = None,
) -> None:
    """Serves until SIGTERM/SIGINT, then drains for up to `grace` seconds; with a
    `registration`, registers once serving and deregisters first thing on SIGTERM. With
    `mtls` (the identity flags), as a sim: a certificate from the join token, STRICT mTLS
    serving, and registration over the control plane's mTLS port when given."""
    prog = f"aimesh backend {provider.name}"
    identity = await start_workload_identity(mtls, prog) if mtls is not None else None
    running = await start_provider(
        provider,
        base_url,
        config,
        listen,
        timeouts=timeouts,
        max_connections=max_connections,
        identity=identity,
        plaintext_listen=mtls.plaintext_listen if mtls else None,
    )
    b = running.backend
    host = listen.rpartition(":")[0]
    registrar = None
    if registration is not None:
        address = f"{host}:{running.port}"
        registrar = registration.registrar(address, b.instance_id, b.config.served(), b, identity)
        registrar.start()
    stop = asyncio.Event()
    stop_on_signals(stop)
    served = ", ".join(
        f"{m}->{b.config.model_map[m]}" if m in b.config.model_map else m for m in b.config.served()
    )
    tls = f"; mTLS as {identity.spiffe_id} ({mtls.mode or 'STRICT'})" if identity and mtls else ""
    print(
        f"aimesh {provider.name} backend {b.instance_id} listening on {host}:{running.port}: "
        f"provider {b.http.base_url}; models {served or '(any, passed through)'}; "
        f"{max_connections} connections{tls}",
        flush=True,
    )
    await stop.wait()
    if registrar is not None:
        await registrar.stop(deregister=True)
    print(
        f"aimesh {provider.name} backend {b.instance_id}: draining ({b.inflight} in flight, "
        f"grace {grace:g}s)",
        file=sys.stderr,
        flush=True,
    )
    cut = await running.stop(grace)
    if identity is not None:
        await identity.stop()
    note = f" ({cut} calls cut short after the grace period)" if cut else ""
    print(
        f"aimesh {provider.name} backend {b.instance_id}: stopped{note}",
        file=sys.stderr,
        flush=True,
    )


def parse_model_map(items: Sequence[str]) -> dict[str, str]:
    """MESH=PROVIDER pairs (from --model-map) as a dict; ValueError naming a bad one."""
    out: dict[str, str] = {}
    for item in items:
        mesh, eq, provider = item.partition("=")
        mesh, provider = mesh.strip(), provider.strip()
        if not eq or not mesh or not provider:
            raise ValueError(f"--model-map {item!r} is not MESH_MODEL=PROVIDER_MODEL")
        if mesh in out and out[mesh] != provider:
            raise ValueError(f"--model-map maps {mesh!r} twice ({out[mesh]!r}, {provider!r})")
        out[mesh] = provider
    return out
