"""Raw-bytes forwarding of any gRPC call to the endpoint the router and balancer choose.

Messages are never deserialized (exceptions: the `model` field of Inference requests is
read off the wire when a route needs it, and Inference token streams are read chunk by
chunk so they can be merged for slow callers and resumed elsewhere). Request headers,
response headers, trailers, status codes, messages and `grpc-status-details-bin` pass
through unchanged; cancellation and deadlines propagate; flow control holds because every
write is awaited.

All four call types share one core (`_forward`); each still gets its own handler type,
because a `stream_stream` handler for a unary method costs about half again as much.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Protocol

import grpc
import grpc.aio

from aimesh.interceptors.base import AttemptFact, CallFacts, current_call
from aimesh.interceptors.limits import LimitExceeded
from aimesh.interceptors.retry_policy import Retry, decide

from ..errors import MeshError
from ..security.authz import Authorizer
from .cluster import SS, SU, US, UU, Cluster, Upstream
from .router import INFERENCE_SERVICE, MODEL_METHODS, RouteDecision, Router, split_path
from .tokenstream import Delivered, pump, resumed_request
from .wire import read_string_field, read_usage, replace_string_field

# Headers grpc manages itself on each hop; everything else is forwarded as is.
_HOP_HEADERS = frozenset(
    {
        "user-agent",
        "te",
        "content-type",
        "grpc-timeout",
        "grpc-encoding",
        "grpc-accept-encoding",
        ":authority",
        "host",
    }
)
EOF = grpc.aio.EOF  # type: ignore[attr-defined]  # (grpc-stubs predates it)
GENERATE = f"/{INFERENCE_SERVICE}/Generate"
GENERATE_STREAM = f"/{INFERENCE_SERVICE}/GenerateStream"
# Unary Inference methods whose response carries `usage` (field 3): tokens for the sinks.
WITH_USAGE = frozenset({f"/{INFERENCE_SERVICE}/Generate", f"/{INFERENCE_SERVICE}/Embed"})
MERGE_STREAMS = os.environ.get("AIMESH_MERGE_STREAMS", "1") != "0"
# Statuses after which a broken token stream is resumed on another endpoint.
RESUMABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
)
MAX_RESUMES = 3
# Identities authorization rules can name; anything else (a peer address) is no identity.
AUTHENTICATED = ("spiffe://", "tenant:")


class AttemptObserver(Protocol):
    """Sees each upstream try as it starts and ends (the tracing sink: a span per try).
    `started` returns headers to add to the upstream call (trace context)."""

    def started(self, facts: CallFacts, attempt: AttemptFact) -> Sequence[tuple[str, str]]: ...

    def ended(self, facts: CallFacts, attempt: AttemptFact) -> None: ...


def _facts() -> CallFacts | None:
    call = current_call()
    return call.facts if call is not None else None


def forwardable(metadata: Any) -> tuple[tuple[str, Any], ...]:
    """The caller's headers minus hop-by-hop ones, plus what the inbound stack adds
    (a request id it generated, for one)."""
    headers = tuple((k, v) for k, v in metadata if k not in _HOP_HEADERS)
    call = current_call()
    if call is not None:
        if call.drop_headers:
            headers = tuple(h for h in headers if h[0] not in call.drop_headers)
        if call.forward_headers:
            headers = (*headers, *call.forward_headers)
    return headers


class Attempt:
    """One upstream try: tracked while in flight, its outcome reported to the cluster
    (picker, breakers, ejection) and its concurrency slot given back, however it ends.
    A caller that goes away cancels it; past the drain grace period that ends the
    downstream call with UNAVAILABLE. The `except AioRpcError` paths set `code` and
    `trailers`; success leaves `code` None."""

    __slots__ = (
        "call",
        "cluster",
        "code",
        "context",
        "fact",
        "facts",
        "fw",
        "retry",
        "started",
        "timed",
        "trailers",
        "up",
    )

    def __init__(
        self,
        fw: Forwarder,
        context: Any,
        cluster: Cluster,
        up: Upstream,
        call: Any,
        *,
        retry: bool = False,
        facts: CallFacts | None = None,
        fact: AttemptFact | None = None,
    ) -> None:
        self.fw, self.context, self.cluster, self.up, self.call = fw, context, cluster, up, call
        self.retry = retry
        self.code: grpc.StatusCode | None = None
        self.trailers: Any = None
        self.started = 0.0
        self.timed = False  # latency already observed (a stream's first token)
        self.facts, self.fact = facts, fact

    async def __aenter__(self) -> Attempt:
        self.fw._track(self.call)
        self.started = time.perf_counter()
        return self

    def failed(self, exc: grpc.aio.AioRpcError) -> None:
        self.code = exc.code()
        self.trailers = exc.trailing_metadata()

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is asyncio.CancelledError:
                self.code = grpc.StatusCode.CANCELLED
                self.call.cancel()
                if self.fw.aborting:
                    await _abort_draining(self.context)
        finally:
            self.fw._untrack(self.call)
            limits = self.cluster.limits
            limits.finish_retry() if self.retry else limits.finish()
            elapsed = time.perf_counter() - self.started
            if self.code is None and not self.timed:
                self.cluster.observe_latency(elapsed)
            self.cluster.finished(self.up, elapsed, self.code, self.trailers)
            if self.fact is not None and self.facts is not None:
                self.fw.attempt_ended(self.facts, self.fact, self.code)


class Forwarder:
    """Holds the routing table and clusters; builds one handler per (method, call type)."""

    def __init__(
        self, router: Router, clusters: Mapping[str, Cluster], rng: random.Random | None = None
    ) -> None:
        self.router = router
        self.clusters = dict(clusters)
        self.rng = rng or random.Random()
        self._handlers: dict[tuple[str, str], Any] = {}
        self.calls: set[Any] = set()  # upstream calls in flight
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False  # refuse new calls
        self.aborting = False  # end the calls still in flight with UNAVAILABLE
        self.resumed = 0  # token streams resumed on another endpoint
        # A call with less time left than this is not sent upstream: it could not finish.
        self.min_deadline = 0.0
        self.observer: AttemptObserver | None = None  # tracing, when on
        # Keep request bytes and streamed text in the call's facts (audit with content).
        self.capture = False
        # Authorization (spec.security.authorization), when enabled: each call is decided
        # once its route is known, against every service the route may send it to.
        self.authorizer: Authorizer | None = None
        # A sidecar's inbound side: the local app's service name, the one destination.
        self.authz_service: str | None = None

    def _track(self, call: Any) -> None:
        self.calls.add(call)
        self._idle.clear()

    def _untrack(self, call: Any) -> None:
        self.calls.discard(call)
        if not self.calls:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Returns once no upstream call is in flight."""
        await self._idle.wait()

    # -- what the sinks learn -------------------------------------------------------------

    def attempt(
        self,
        facts: CallFacts | None,
        cluster: Cluster,
        up: Upstream,
        kind: str,
        headers: tuple[tuple[str, Any], ...],
    ) -> tuple[AttemptFact | None, tuple[tuple[str, Any], ...]]:
        """Records a try about to start; returns it and the headers to send upstream."""
        if facts is None:
            return None, headers
        fact = AttemptFact(cluster.name, up.address, kind, time.time_ns())
        facts.attempts.append(fact)
        if self.observer is not None:
            extra = self.observer.started(facts, fact)
            if extra:
                # The observer's headers replace the caller's of the same name (a trace
                # context: the upstream's parent is this try, not the caller).
                keys = {k for k, _ in extra}
                headers = (*(h for h in headers if h[0] not in keys), *extra)
        return fact, headers

    def attempt_ended(
        self, facts: CallFacts, fact: AttemptFact, code: grpc.StatusCode | None
    ) -> None:
        fact.ended_ns = time.time_ns()
        fact.code = code or grpc.StatusCode.OK
        if self.observer is not None:
            self.observer.ended(facts, fact)

    def usage(self, facts: CallFacts, path: str, response: bytes) -> None:
        """Tokens of a unary Generate or Embed response (and its text, with capture on)."""
        facts.tokens_in, facts.tokens_out = read_usage(response, 3)
        if self.capture and path == GENERATE:
            facts.completion = read_string_field(response, 1) or ""

    def update(self, router: Router, clusters: Mapping[str, Cluster]) -> None:
        """Swaps in a new routing table; calls in flight keep the upstream they have."""
        self.router = router
        self.clusters = dict(clusters)

    # -- routing ------------------------------------------------------------------------

    def _available(self, service: str) -> bool:
        """Usable, and not every endpoint cooling down after a pushback (rate limited)."""
        c = self.clusters.get(service)
        return c is not None and c.usable() and not c.cooling()

    def _usable(self, service: str) -> bool:
        c = self.clusters.get(service)
        return c is not None and c.usable()

    def _order(self, decision: RouteDecision, model: str | None) -> list[str]:
        if decision.balance == "cost":
            prices = self.router.prices

            def price(service: str) -> float:
                spec = prices.get(decision.model_for(service) or model or "")
                return spec.input_price + spec.output_price if spec else float("inf")

            def latency(service: str) -> float:
                return self.clusters[service].latency

            order = decision.order_by_cost(self._available, price, latency)
            # Everything rate limited: the cheapest still beats failing the call.
            return order or decision.order_by_cost(self._usable, price, latency)
        order = decision.order(self._available, self.rng)
        return order or decision.order(self._usable, self.rng)

    def target(
        self, decision: RouteDecision, exclude: tuple[str, ...], request: bytes | None
    ) -> tuple[Cluster, Upstream, bytes | None]:
        """Picks where a try goes, and the request as that destination must get it (a
        route may ask a failover destination for its own model); notes the experiment
        arm and the model served in the call's facts."""
        facts = _facts()
        model = facts.model if facts is not None and facts.model else None
        if model is None and request is not None and decision.balance == "cost":
            model = read_string_field(request, 1)
        cluster, up = self.pick(decision, exclude, model)
        rewrite = decision.model_for(cluster.name) if decision.models else None
        if rewrite is not None and request is not None:
            request = replace_string_field(request, 1, rewrite)
        if facts is not None:
            facts.served_model = rewrite or facts.model
            if decision.experiment is not None:
                facts.experiment = decision.experiment
                facts.arm = decision.arm_for(cluster.name)
        return cluster, up, request

    def settle_cost(self) -> None:
        """The call's cost from its tokens and the model catalog's price, if any."""
        facts = _facts()
        if facts is None or not (facts.tokens_in or facts.tokens_out):
            return
        spec = self.router.prices.get(facts.served_model or facts.model)
        if spec is not None:
            facts.cost_usd = spec.cost(facts.tokens_in, facts.tokens_out)

    def decide(self, path: str, metadata: Any, request: bytes | None) -> RouteDecision:
        if self.draining:
            raise MeshError(
                grpc.StatusCode.UNAVAILABLE,
                "this proxy is shutting down; retry on another instance",
            )
        service, method = split_path(path)
        router = self.router
        model = None
        facts = _facts()
        if (
            (router.uses_model or facts is not None)
            and request is not None
            and service == INFERENCE_SERVICE
            and (method in MODEL_METHODS)
        ):
            model = read_string_field(request, 1)
            if facts is not None and model:
                facts.model = model
        headers = {k: v for k, v in metadata if isinstance(v, str)} if router.uses_headers else {}
        decision = router.route(service, method, headers, model)
        if facts is not None and decision is not None:
            facts.route = decision.policy
            if self.capture:
                facts.request = request
        if decision is None:
            what = f"model {model!r}" if model else path
            raise MeshError(
                grpc.StatusCode.UNIMPLEMENTED,
                f"no route for {what}: no traffic policy matches and no service serves it",
            )
        if self.authorizer is not None:
            self.authorize(self.authorizer, path, decision, facts)
        return decision

    def authorize(
        self, authorizer: Authorizer, path: str, decision: RouteDecision, facts: CallFacts | None
    ) -> None:
        """Deny first, default deny: the call must be allowed to every service its route
        may send it to (split and backups), so where it lands never changes the answer.
        The caller is its SPIFFE ID (mTLS) or `tenant:<name>` (a gateway credential)."""
        call = current_call()
        identity = call.identity if call is not None else ""
        source = identity if identity.startswith(AUTHENTICATED) else None
        services = (self.authz_service,) if self.authz_service else decision.services()
        for service in dict.fromkeys(services):
            verdict = authorizer.decide(source, service, path)
            if not verdict.allowed:
                if facts is not None:
                    facts.denied_by = verdict.rule_name or "default-deny"
                raise MeshError(grpc.StatusCode.PERMISSION_DENIED, verdict.reason)

    def pick(
        self, decision: RouteDecision, exclude: tuple[str, ...] = (), model: str | None = None
    ) -> tuple[Cluster, Upstream]:
        order = self._order(decision, model)
        for name in order:
            cluster = self.clusters[name]
            if exclude and not cluster.has_untried(exclude):
                continue  # a retry goes to an endpoint not tried yet, in the backups if need be
            if cluster.breaker is not None and not cluster.breaker.allow():
                continue  # half-open with its probe out: the backups take this call
            return cluster, cluster.pick(exclude)
        if order:  # every candidate was tried: the first is still better than failing
            cluster = self.clusters[order[0]]
            return cluster, cluster.pick(exclude)
        raise MeshError(
            grpc.StatusCode.UNAVAILABLE,
            f"no healthy endpoint for {', '.join(decision.services())} (route "
            f"{decision.policy}); check the services' health in the proxy's admin endpoint",
        )

    def _timeout(self, context: Any, decision: RouteDecision, cluster: Cluster) -> float | None:
        """The upstream call's timeout: the caller's remaining deadline (so each hop sees
        the true time left), capped by the route's and the service's timeouts."""
        remaining: float | None = context.time_remaining()
        if remaining is not None and remaining < self.min_deadline:
            raise MeshError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"only {remaining * 1000:.1f} ms left of the call's deadline, below the "
                f"proxy's minimum of {self.min_deadline * 1000:.1f} ms; not sent upstream",
            )
        timeout = remaining
        for cap in (decision.timeout, cluster.timeout):
            if cap is not None and (timeout is None or cap < timeout):
                timeout = cap
        return timeout

    # -- handlers -----------------------------------------------------------------------

    def handler(self, path: str, kind: str) -> Any:
        key = (path, kind)
        h = self._handlers.get(key)
        if h is None:
            h = self._make(path, kind)
            self._handlers[key] = h
        return h

    def _make(self, path: str, kind: str) -> Any:
        if kind == UU:

            async def uu(request: bytes, context: Any) -> Any:
                try:
                    return await self._forward(path, UU, context, request)
                finally:
                    self.settle_cost()

            return grpc.unary_unary_rpc_method_handler(uu)
        if kind == US:
            if path == GENERATE_STREAM:

                async def gen(request: bytes, context: Any) -> None:
                    try:
                        await self._generate_stream(path, context, request)
                    finally:
                        self.settle_cost()

                return grpc.unary_stream_rpc_method_handler(gen)

            async def us(request: bytes, context: Any) -> None:
                await self._forward(path, US, context, request)

            return grpc.unary_stream_rpc_method_handler(us)
        if kind == SU:

            async def su(requests: AsyncIterator[bytes], context: Any) -> Any:
                return await self._forward(path, SU, context, None, requests)

            return grpc.stream_unary_rpc_method_handler(su)

        async def ss(requests: AsyncIterator[bytes], context: Any) -> None:
            await self._forward(path, SS, context, None, requests)

        return grpc.stream_stream_rpc_method_handler(ss)

    # -- the core -----------------------------------------------------------------------

    async def _forward(
        self,
        path: str,
        kind: str,
        context: Any,
        request: bytes | None,
        requests: AsyncIterator[bytes] | None = None,
    ) -> Any:
        md = context.invocation_metadata()
        try:
            decision = self.decide(path, md, request)
            if kind == UU and decision.retry is not None:
                return await self._unary_retrying(path, context, request, md, decision)
            if kind == UU and decision.hedge is not None:
                return await self._unary_hedged(path, context, request, md, decision)
            cluster, up, request = self.target(decision, (), request)
            timeout = self._timeout(context, decision, cluster)
            cluster.limits.start()
        except MeshError as err:
            await context.abort(err.code, err.message)
        facts = _facts()
        fact, headers = self.attempt(facts, cluster, up, "first", forwardable(md))
        mc = up.multicallable(path, kind)
        call = mc(request if requests is None else requests, metadata=headers, timeout=timeout)
        response = None
        sent = False
        async with Attempt(self, context, cluster, up, call, facts=facts, fact=fact) as attempt:
            try:
                if kind == UU or kind == SU:
                    response = await call
                    if facts is not None and path in WITH_USAGE:
                        self.usage(facts, path, response)
                initial = await call.initial_metadata()
                if initial:  # an empty send would cost a batch of its own
                    await context.send_initial_metadata(initial)
                    sent = True
                if kind == US or kind == SS:
                    read, write = call.read, context.write
                    while (msg := await read()) is not EOF:
                        await write(msg)
                attempt.trailers = await call.trailing_metadata()
                context.set_trailing_metadata(attempt.trailers)
                return response
            except grpc.aio.AioRpcError as exc:
                attempt.failed(exc)
                await self._relay_error(context, exc, headers_sent=sent)

    async def _unary_retrying(
        self, path: str, context: Any, request: bytes | None, md: Any, decision: RouteDecision
    ) -> Any:
        """A unary call under the route's retry policy (gRFC A6): retryable statuses,
        backoff with full jitter or the server's pushback, `grpc-previous-rpc-attempts`,
        per-try timeout, a retry budget per service, and each retry to an endpoint not
        tried yet."""
        policy = decision.retry
        assert policy is not None
        loop = asyncio.get_running_loop()
        remaining = context.time_remaining()
        end = None if remaining is None else loop.time() + remaining
        fwd_md = forwardable(md)
        facts = _facts()
        tried: list[str] = []
        attempt = 1
        since_pushback = 1  # gRFC A6: the backoff sequence restarts after a pushback retry
        failed: grpc.aio.AioRpcError | None = None  # the last attempt's error
        while True:
            cluster, up, body = self.target(decision, tuple(tried), request)
            if attempt == 1:
                cluster.budget.record_request()
                cluster.limits.start()
            else:
                try:
                    cluster.limits.start_retry()
                except LimitExceeded:
                    # The retry's service has no room for another retry: the caller gets
                    # the error it would have had without retries, not ours.
                    assert failed is not None
                    await self._relay_error(context, failed)
                cluster.retries += 1
            timeout = self._timeout(context, decision, cluster)
            if policy.per_try_timeout is not None and (
                timeout is None or policy.per_try_timeout < timeout
            ):
                timeout = policy.per_try_timeout
            headers = (
                fwd_md
                if attempt == 1
                else (*fwd_md, ("grpc-previous-rpc-attempts", str(attempt - 1)))
            )
            fact, headers = self.attempt(
                facts, cluster, up, "first" if attempt == 1 else "retry", headers
            )
            call = up.multicallable(path, UU)(body, metadata=headers, timeout=timeout)
            async with Attempt(
                self, context, cluster, up, call, retry=attempt > 1, facts=facts, fact=fact
            ) as try_:
                try:
                    response = await call
                    if facts is not None and path in WITH_USAGE:
                        self.usage(facts, path, response)
                    initial = await call.initial_metadata()
                    if initial:
                        await context.send_initial_metadata(initial)
                    try_.trailers = await call.trailing_metadata()
                    context.set_trailing_metadata(try_.trailers)
                    return response
                except grpc.aio.AioRpcError as exc:
                    try_.failed(exc)
                    failed = exc
                    verdict = await self._retry_verdict(
                        context, exc, policy, attempt, since_pushback, end, cluster
                    )
            tried.append(up.address)
            attempt += 1
            since_pushback = 1 if verdict.pushback else since_pushback + 1
            delay = verdict.delay
            if verdict.pushback and self._elsewhere(decision, tried):
                # The pushback is that endpoint's: it cools down for that long and gets no
                # calls meanwhile, so a retry that goes elsewhere need not wait for it.
                delay = 0.0
            await asyncio.sleep(delay)

    def _elsewhere(self, decision: RouteDecision, tried: list[str]) -> bool:
        """Whether a retry can go to an endpoint not tried yet and not cooling down."""
        for service in decision.services():
            c = self.clusters.get(service)
            if c is not None and self._available(service) and c.has_untried(tried):
                return True
        return False

    async def _retry_verdict(
        self,
        context: Any,
        exc: grpc.aio.AioRpcError,
        policy: Any,
        attempt: int,
        since_pushback: int,
        end: float | None,
        cluster: Cluster,
    ) -> Retry:
        """Whether to retry after `exc`; ends the call with `exc` when not."""
        left = None if end is None else end - asyncio.get_running_loop().time()
        # A per-try timeout that fired before the call's own deadline is retryable.
        retry_as = exc.code()
        if retry_as == grpc.StatusCode.DEADLINE_EXCEEDED and (left is None or left > 0):
            retry_as = grpc.StatusCode.UNAVAILABLE
        limits = cluster.limits
        if limits.retries >= limits.max_retries:
            limits.rejected["max_retries"] += 1
            await self._relay_error(context, exc)  # no room for a retry: fail as is
        verdict = decide(
            policy,
            attempt,
            retry_as,
            _pushback(exc.trailing_metadata()),
            left,
            cluster.budget,
            self.rng,
            backoff_attempt=since_pushback,
        )
        if not isinstance(verdict, Retry):
            await self._relay_error(context, exc)
            raise AssertionError("not reached: the relay aborts the call")
        return verdict

    async def _unary_hedged(
        self, path: str, context: Any, request: bytes | None, md: Any, decision: RouteDecision
    ) -> Any:
        """A hedged unary call: if no answer comes within `hedge.delay`, the same call goes
        to another endpoint too (up to `hedge.attempts` in all, each under the retry
        budget); the first answer wins and the others are cancelled. A failure with a
        status that says nothing of the request (UNAVAILABLE, INTERNAL, UNKNOWN) sends the
        next hedge at once; any other status is the answer."""
        hedge = decision.hedge
        assert hedge is not None
        fwd_md = forwardable(md)
        facts = _facts()
        tried: list[str] = []
        running: dict[
            asyncio.Task[Any], tuple[Cluster, Upstream, Any, float, AttemptFact | None]
        ] = {}
        last: grpc.aio.AioRpcError | None = None

        def launch() -> None:
            cluster, up, body = self.target(decision, tuple(tried), request)
            n = len(tried)
            if n == 0:
                cluster.budget.record_request()
            elif not cluster.budget.try_acquire():
                return  # no budget for another hedge: wait for the ones out
            tried.append(up.address)
            cluster.limits.start()
            headers = fwd_md if n == 0 else (*fwd_md, ("grpc-previous-rpc-attempts", str(n)))
            fact, headers = self.attempt(
                facts, cluster, up, "first" if n == 0 else "hedge", headers
            )
            call = up.multicallable(path, UU)(
                body, metadata=headers, timeout=self._timeout(context, decision, cluster)
            )
            self._track(call)
            task = asyncio.ensure_future(_settle(call))
            running[task] = (cluster, up, call, time.perf_counter(), fact)

        def close(task: asyncio.Task[Any], code: grpc.StatusCode | None, trailers: Any) -> None:
            cluster, up, call, started, fact = running.pop(task)
            self._untrack(call)
            cluster.limits.finish()
            cluster.finished(up, time.perf_counter() - started, code, trailers)
            if facts is not None and fact is not None:
                self.attempt_ended(facts, fact, code)

        launch()
        try:
            while running:
                more = len(tried) < hedge.attempts
                done, _ = await asyncio.wait(
                    list(running),
                    timeout=hedge.delay if more else None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for task in done:
                    response, initial, trailers, exc = task.result()
                    close(task, exc.code() if exc else None, trailers)
                    if exc is None:
                        if facts is not None and path in WITH_USAGE:
                            self.usage(facts, path, response)
                        if initial:
                            await context.send_initial_metadata(initial)
                        context.set_trailing_metadata(trailers)
                        return response
                    last = exc
                    if exc.code() not in RESUMABLE:
                        await self._relay_error(context, exc)
                if len(tried) < hedge.attempts and (not done or last is not None):
                    launch()
            assert last is not None
            await self._relay_error(context, last)
        finally:
            for task, (_, _, call, _, _) in list(running.items()):
                call.cancel()  # the losers
                task.cancel()
                close(task, grpc.StatusCode.CANCELLED, None)

    async def _relay_error(
        self, context: Any, exc: grpc.aio.AioRpcError, *, headers_sent: bool = False
    ) -> None:
        if self.aborting and exc.code() == grpc.StatusCode.CANCELLED:
            await _abort_draining(context)
        await relay_error(context, exc, headers_sent=headers_sent)

    async def _generate_stream(self, path: str, context: Any, request: bytes) -> None:
        """GenerateStream: chunks merged for slow callers; a stream that breaks after
        delivering tokens is resumed on another endpoint with `continuation`."""
        md = context.invocation_metadata()
        try:
            decision = self.decide(path, md, request)
        except MeshError as err:
            await context.abort(err.code, err.message)
        fwd_md = forwardable(md)
        facts = _facts()
        delivered = Delivered()
        tried: list[str] = []
        body = request
        write = context.write
        try:
            await self._stream_attempts(
                path, context, request, decision, fwd_md, facts, delivered, tried, body, write
            )
        finally:
            if facts is not None:
                facts.tokens_out = delivered.tokens
                facts.tokens_in = delivered.prompt_tokens
                if self.capture:
                    facts.completion = delivered.text

    async def _stream_attempts(
        self,
        path: str,
        context: Any,
        request: bytes,
        decision: RouteDecision,
        fwd_md: tuple[tuple[str, Any], ...],
        facts: CallFacts | None,
        delivered: Delivered,
        tried: list[str],
        body: bytes,
        write: Any,
    ) -> None:
        kind = "first"
        while True:
            try:
                cluster, up, payload = self.target(decision, tuple(tried), body)
                timeout = self._timeout(context, decision, cluster)
                cluster.limits.start()
            except MeshError as err:
                if delivered.tokens:
                    err = MeshError(
                        err.code,
                        f"{err.message}; {delivered.tokens} tokens were "
                        "delivered before the stream broke",
                    )
                await context.abort(err.code, err.message)
            fact, headers = self.attempt(facts, cluster, up, kind, fwd_md)
            call = up.multicallable(path, US)(payload, metadata=headers, timeout=timeout)
            async with Attempt(self, context, cluster, up, call, facts=facts, fact=fact) as attempt:
                try:
                    # The first chunk is read here, before the pump's reader task exists:
                    # one task switch less on the way to the caller's first token.
                    first = await call.read()
                    if first is not EOF:
                        cluster.observe_latency(time.perf_counter() - attempt.started)
                        attempt.timed = True
                    if facts is not None and not facts.first_token_ns and first is not EOF:
                        facts.first_token_ns = time.time_ns()
                    initial = await call.initial_metadata()
                    if initial and not delivered.headers_sent:
                        await context.send_initial_metadata(initial)
                        delivered.headers_sent = True
                    if first is not EOF:
                        await pump(call, write, delivered, merge=MERGE_STREAMS, first=first)
                    attempt.trailers = await call.trailing_metadata()
                    context.set_trailing_metadata(attempt.trailers)
                    return
                except grpc.aio.AioRpcError as exc:
                    attempt.failed(exc)
                    if delivered.tokens == 0:
                        # Nothing reached the caller yet: retried like a unary call.
                        delay = self._stream_retry_delay(decision, exc, len(tried) + 1, cluster)
                        if delay is None:
                            await self._stream_error(context, exc, delivered, decision, up)
                    elif not self._should_resume(decision, delivered, exc, len(tried)):
                        await self._stream_error(context, exc, delivered, decision, up)
                    else:
                        delay = 0.0
            tried.append(up.address)
            if delivered.tokens:
                self.resumed += 1
                body = resumed_request(request, delivered)
                kind = "resume"
                if facts is not None:
                    facts.resumed += 1
            else:
                cluster.retries += 1
                kind = "retry"
            if delay:
                await asyncio.sleep(delay)

    def _stream_retry_delay(
        self, decision: RouteDecision, exc: grpc.aio.AioRpcError, attempt: int, cluster: Cluster
    ) -> float | None:
        """Seconds to wait before retrying a stream that failed before its first chunk, or
        None to fail it: the route's retry policy and the service's budget decide."""
        policy = decision.retry
        if policy is None or self.aborting:
            return None
        if attempt == 1:
            cluster.budget.record_request()
        verdict = decide(
            policy,
            attempt,
            exc.code(),
            _pushback(exc.trailing_metadata()),
            None,
            cluster.budget,
            self.rng,
        )
        return verdict.delay if isinstance(verdict, Retry) else None

    def _should_resume(
        self, decision: RouteDecision, delivered: Delivered, exc: grpc.aio.AioRpcError, resumes: int
    ) -> bool:
        return (
            decision.resume
            and not self.aborting
            and delivered.tokens > 0
            and not delivered.finished
            and exc.code() in RESUMABLE
            and resumes < MAX_RESUMES
        )

    async def _stream_error(
        self,
        context: Any,
        exc: grpc.aio.AioRpcError,
        delivered: Delivered,
        decision: RouteDecision,
        up: Upstream,
    ) -> None:
        if delivered.tokens and exc.code() in RESUMABLE:
            why = (
                "resume is off for route " + decision.policy
                if not decision.resume
                else ("it could not be resumed")
            )
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"the stream from {up.address} broke after {delivered.tokens} tokens were "
                f"delivered ({exc.code().name}: {exc.details()}); {why}",
            )
        await self._relay_error(context, exc, headers_sent=delivered.headers_sent)


async def relay_error(
    context: Any, exc: grpc.aio.AioRpcError, *, headers_sent: bool = False
) -> None:
    """Ends the downstream call with the upstream's status, message, headers (unless they
    went out already) and trailers."""
    initial = exc.initial_metadata()
    if initial and not headers_sent:
        await context.send_initial_metadata(initial)
    await context.abort(
        exc.code(), exc.details() or "", trailing_metadata=tuple(exc.trailing_metadata() or ())
    )


async def _settle(call: Any) -> tuple[Any, Any, Any, grpc.aio.AioRpcError | None]:
    """(response, headers, trailers, error) of a unary call, never raising its error."""
    try:
        response = await call
        return response, await call.initial_metadata(), await call.trailing_metadata(), None
    except grpc.aio.AioRpcError as exc:
        return None, exc.initial_metadata(), exc.trailing_metadata(), exc


def _pushback(trailers: Any) -> str | None:
    for key, value in trailers or ():
        if key == "grpc-retry-pushback-ms":
            return str(value)
    return None


async def _abort_draining(context: Any) -> None:
    await context.abort(
        grpc.StatusCode.UNAVAILABLE,
        "the proxy shut down before this call finished (grace period over); retry",
    )


class GenericHandler(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """Serves any method: the call type comes from known descriptors, else stream-stream.

    Register it after the proxy's own services (health, reflection): grpc asks generic
    handlers in order, and this one answers every path.
    """

    def __init__(self, forwarder: Forwarder, kinds: Mapping[str, str]) -> None:
        self.forwarder = forwarder
        self.kinds = kinds  # '/pkg.Service/Method' -> UU/US/SU/SS

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        path = handler_call_details.method
        return self.forwarder.handler(path, self.kinds.get(path, SS))


__all__ = ["Forwarder", "GenericHandler", "relay_error"]
