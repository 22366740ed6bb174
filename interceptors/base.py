"""One shape for every inbound policy: `async def around(call, call_next)`.

A policy is written once, against `InboundCall` (method, metadata, deadline, peer, and
attributes earlier layers set), and runs for all four call types: `Stack` is a single
grpc.aio server interceptor that wraps each method handler in a thin adapter per call
type and runs the policies around it, outermost first. `call_next()` runs the rest of
the stack and the handler (for a streaming response, the whole stream).

The call a handler is serving is available to it (and to code it calls, such as the
proxy's forwarder) through `current_call()`, so a policy can hand on what it learned:
the request id to propagate, the caller's identity.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import grpc.aio


@dataclass(slots=True)
class AttemptFact:
    """One upstream try of a call, as the forwarder made it."""

    service: str
    endpoint: str
    kind: str  # "first", "retry", "hedge" or "resume"
    started_ns: int  # wall clock (time.time_ns()): traces and audit records use it
    ended_ns: int = 0
    code: grpc.StatusCode | None = None  # None while running; OK when it succeeded
    span: Any = None  # the tracing sink's span for this try, when tracing is on


@dataclass(slots=True)
class CallFacts:
    """What the proxy learned while forwarding a call, for metrics, traces and audit:
    filled by the forwarder, read by the sinks when the call ends."""

    route: str = ""  # the traffic policy's name, or "model:<name>"
    model: str = ""  # the request's model, for Inference calls
    attempts: list[AttemptFact] = field(default_factory=list)
    tokens_in: int = 0  # usage.prompt_tokens, as the backend reported it
    tokens_out: int = 0  # completion tokens delivered to the caller
    first_token_ns: int = 0  # wall clock of the first token written to the caller
    resumed: int = 0  # times a broken token stream was resumed elsewhere
    tenant: str = ""  # the caller's tenant, when the gateway knows it
    trace_id: str = ""  # W3C trace id (32 hex digits), set by the tracing policy when on
    served_model: str = ""  # the model the backend was asked for (a route may rewrite it)
    cost_usd: float = 0.0  # tokens x the model's price in spec.models, when it has one
    experiment: str = ""  # the traffic policy's experiment, when it names one
    arm: str = ""  # the experiment arm this call went to (the route's arm name)
    denied_by: str = ""  # the authorization rule that denied the call ("default-deny")
    # The prompt and the answer, only when an audit setting asks for content: the
    # forwarder keeps the request bytes and the streamed text (see Forwarder.capture).
    request: bytes | None = None
    completion: str = ""

    @property
    def service(self) -> str:
        return self.attempts[-1].service if self.attempts else ""

    @property
    def endpoint(self) -> str:
        return self.attempts[-1].endpoint if self.attempts else ""


@dataclass(slots=True)
class InboundCall:
    method: str  # "/pkg.Service/Method"
    metadata: tuple[tuple[str, Any], ...]
    context: Any  # the grpc.aio ServicerContext
    started: float = field(default_factory=time.monotonic)
    request_id: str = ""
    identity: str = ""  # who is calling (a SPIFFE ID once mTLS is on; else the peer)
    # Headers to add when the call is forwarded upstream (e.g. a generated request id).
    forward_headers: list[tuple[str, str]] = field(default_factory=list)
    # Headers not to forward upstream (a credential the gateway consumed).
    drop_headers: frozenset[str] = frozenset()
    facts: CallFacts = field(default_factory=CallFacts)
    started_ns: int = field(default_factory=time.time_ns)

    def header(self, key: str) -> str | None:
        for k, v in self.metadata:
            if k == key and isinstance(v, str):
                return v
        return None

    def time_remaining(self) -> float | None:
        remaining: float | None = self.context.time_remaining()
        return remaining

    def details(self) -> str:
        getter = getattr(self.context, "details", None)
        details = getter() if getter is not None else None
        if isinstance(details, bytes):
            return details.decode("utf-8", "replace")
        return details if isinstance(details, str) else ""

    def code(self) -> grpc.StatusCode:
        """The status the call ended (or is ending) with, as far as grpc knows."""
        code = self.context.code()
        if isinstance(code, grpc.StatusCode):
            return code
        if isinstance(code, int):
            for c in grpc.StatusCode:
                if c.value[0] == code:
                    return c
        return grpc.StatusCode.OK


Next = Callable[[], Awaitable[None]]


class Policy(Protocol):
    """An inbound policy. `around` must call `call_next()` at most once, or end the call
    itself with `await call.context.abort(...)`."""

    async def around(self, call: InboundCall, call_next: Next) -> None: ...


_current: contextvars.ContextVar[InboundCall | None] = contextvars.ContextVar(
    "aimesh_inbound_call", default=None
)


def current_call() -> InboundCall | None:
    return _current.get()


def _chain(policies: Sequence[Policy], call: InboundCall, innermost: Next) -> Next:
    step = innermost
    for policy in reversed(policies):
        step = _bind(policy, call, step)
    return step


def _bind(policy: Policy, call: InboundCall, nxt: Next) -> Next:
    async def run() -> None:
        await policy.around(call, nxt)

    return run


class Stack(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """The inbound policies, as one grpc.aio server interceptor."""

    def __init__(self, policies: Sequence[Policy]) -> None:
        self.policies = tuple(policies)
        self._wrapped: dict[tuple[str, int], Any] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or not self.policies:
            return handler
        key = (handler_call_details.method, id(handler))
        wrapped = self._wrapped.get(key)
        if wrapped is None:
            wrapped = self._wrap(handler_call_details.method, handler)
            if len(self._wrapped) < 10_000:  # handlers are cached per method upstream too
                self._wrapped[key] = wrapped
        return wrapped

    def _call(self, method: str, context: Any) -> InboundCall:
        call = InboundCall(method, tuple(context.invocation_metadata() or ()), context)
        _current.set(call)
        return call

    def _wrap(self, method: str, h: Any) -> Any:
        policies = self.policies
        des, ser = h.request_deserializer, h.response_serializer
        if h.unary_unary:
            inner_uu = h.unary_unary

            async def uu(request: Any, context: Any) -> Any:
                call = self._call(method, context)
                result: list[Any] = []

                async def innermost() -> None:
                    result.append(await inner_uu(request, context))

                await _chain(policies, call, innermost)()
                return result[0] if result else None

            return grpc.unary_unary_rpc_method_handler(uu, des, ser)
        if h.stream_unary:
            inner_su = h.stream_unary

            async def su(requests: Any, context: Any) -> Any:
                call = self._call(method, context)
                result: list[Any] = []

                async def innermost() -> None:
                    result.append(await inner_su(requests, context))

                await _chain(policies, call, innermost)()
                return result[0] if result else None

            return grpc.stream_unary_rpc_method_handler(su, des, ser)
        streaming = h.unary_stream or h.stream_stream
        make = (
            grpc.unary_stream_rpc_method_handler
            if h.unary_stream
            else grpc.stream_stream_rpc_method_handler
        )

        async def stream(request: Any, context: Any) -> None:
            call = self._call(method, context)

            async def innermost() -> None:
                # Handlers either write through the context or are async generators.
                out = streaming(request, context)
                if hasattr(out, "__aiter__"):
                    async for message in _aiter(out):
                        await context.write(message)
                else:
                    await out

            await _chain(policies, call, innermost)()

        return make(stream, des, ser)


async def _aiter(out: Any) -> AsyncIterator[Any]:
    async for item in out:
        yield item
