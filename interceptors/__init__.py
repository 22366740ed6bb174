"""The mesh's per-call policies, one concern per module.

Pure decisions (no I/O; clock and rng injected), used by the proxy's call path
(`aimesh.mesh.proxy.forward`) and so by the proxyless `MeshChannel` too:

- `backoff`: gRFC A6 exponential backoff with full jitter, and server pushback parsing.
- `budget`: the retry budget (20% extra load plus 10 retries/s over 10 s, as Linkerd).
- `breaker`: circuit breakers (error rate or consecutive errors; growing, jittered open
  periods; half-open probes).
- `limits`: concurrency limits, as Envoy's thresholds (1024 / 1024 / 3).
- `retry_policy`: a route's retry policy and the retry-or-stop decision.

grpc.aio interceptors:

- `base`: `Stack`, the inbound policies (`around(call, call_next)`) as one server
  interceptor; `deadline_intake`, `request_id`, `identity`, `events` are such policies.
- `client`: `propagation()`, outbound client interceptors passing on the served call's
  deadline and request id.

- `decode`: a request that does not parse gets INTERNAL with a message naming the type,
  instead of grpc's UNKNOWN with a Python exception name.
"""

from .decode import DecodeErrorInterceptor

__all__ = ["DecodeErrorInterceptor"]
