"""The proxy's call path, assembled in one place.

Inbound (a grpc.aio server interceptor per listener), outermost first:

    (outer)         tracing's server span, when on
    CallEvents      every call's outcome, with what the forwarder learned, to the sinks
                    (counters, metrics, audit)
    DeadlineIntake  too little time left: DEADLINE_EXCEEDED before any work
    RequestId       the caller's x-request-id, or a new one sent on upstream
    Identity        who is calling (SPIFFE ID under mTLS, else the peer)
    (inner)         a gateway's callers: API key or JWT -> tenant (security/callers.py)

Then the forwarder (mesh/proxy/forward.py), per call:

    route       traffic policy or model -> split, backups, timeout, retry/hedge/resume
    authorize   spec.security.authorization, when enabled: the caller against every
                service the route may use (deny first, default deny)
    breaker     the service's circuit breaker (open: go to the backups)
    balance     the service's picker over healthy, non-ejected endpoints
    limits      max requests / pending / retries in flight
    deadline    the caller's remaining time, capped by route and service
    attempt     retries (A6, budgeted) or hedges for unary calls; resume for token streams
    report      latency, load report and outcome back to picker, breakers, ejection
"""

from __future__ import annotations

from collections.abc import Sequence

from aimesh.interceptors.base import Policy, Stack
from aimesh.interceptors.deadline_intake import DeadlineIntake
from aimesh.interceptors.events import CallEvents, Sink
from aimesh.interceptors.identity import Identity
from aimesh.interceptors.request_id import RequestId


def inbound_stack(
    min_deadline: float,
    sinks: Sequence[Sink],
    outer: Sequence[Policy] = (),
    inner: Sequence[Policy] = (),
) -> Stack:
    """`outer`: policies that must wrap everything, even the events (a trace's server
    span, so the call's whole time is inside it). `inner`: policies that need the
    caller's identity and whose refusals the events must see (credentials)."""
    return Stack(
        [
            *outer,
            CallEvents(sinks),
            DeadlineIntake(min_deadline),
            RequestId(),
            Identity(),
            *inner,
        ]
    )
