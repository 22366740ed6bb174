"""Active health checks with grpc.health.v1, per endpoint.

Each endpoint is watched with `Health.Watch`, so a backend that turns NOT_SERVING (for
example while it drains) leaves rotation the moment it says so. A check that fails
(timeout, connection refused, stream broken) counts toward `threshold`; failed checks are
retried `threshold` times per interval, so a dead endpoint leaves rotation within one
interval. Servers without Watch are polled with `Check` every interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .cluster import Cluster, Upstream

EOF = grpc.aio.EOF  # type: ignore[attr-defined]  # (grpc-stubs predates it)
log = logging.getLogger("aimesh.proxy.health")
SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    interval: float = 10.0
    timeout: float = 1.0
    threshold: int = 3  # consecutive failed checks to mark unhealthy
    healthy_threshold: int = 1
    service: str = ""
    enabled: bool = True


class HealthChecker:
    def __init__(self) -> None:
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.policies: dict[str, HealthPolicy] = {}

    def attach(self, cluster: Cluster, policy: HealthPolicy) -> None:
        self.policies[cluster.name] = policy
        cluster.on_added.append(self._start)
        cluster.on_removed.append(self._stop)
        for up in cluster.upstreams.values():
            self._start(cluster, up)

    def _start(self, cluster: Cluster, up: Upstream) -> None:
        policy = self.policies.get(cluster.name)
        if policy is None or not policy.enabled:
            return
        key = (cluster.name, up.address)
        if key not in self._tasks:
            self._tasks[key] = asyncio.get_running_loop().create_task(
                self._run(cluster, up, policy), name=f"health {cluster.name}/{up.address}"
            )

    def _stop(self, cluster: Cluster, up: Upstream) -> None:
        task = self._tasks.pop((cluster.name, up.address), None)
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def _run(self, cluster: Cluster, up: Upstream, p: HealthPolicy) -> None:
        request = health_pb2.HealthCheckRequest(service=p.service)
        failures = 0
        successes = 0
        use_watch = True
        retry_after_failure = p.interval / p.threshold

        def verdict(ok: bool) -> None:
            nonlocal failures, successes
            if ok:
                failures, successes = 0, successes + 1
                if not up.active_healthy and successes >= p.healthy_threshold:
                    log.info("%s/%s is healthy again", cluster.name, up.address)
                    cluster.set_active_health(up, True)
            else:
                successes, failures = 0, failures + 1
                if up.active_healthy and failures >= p.threshold:
                    log.warning(
                        "%s/%s failed %d health checks: out of rotation",
                        cluster.name,
                        up.address,
                        failures,
                    )
                    cluster.set_active_health(up, False)

        while True:
            # The channel may change under us (a rotated client certificate, see
            # Cluster.rechannel): each check uses the current one.
            channel = up.channel
            stub = health_pb2_grpc.HealthStub(channel)
            if use_watch:
                call = stub.Watch(request)
                try:
                    first = True
                    while True:
                        read = call.read()
                        resp = await (asyncio.wait_for(read, p.timeout) if first else read)
                        if resp is EOF:
                            break
                        first = False
                        if resp.status == SERVING:
                            verdict(True)
                        else:
                            # The endpoint says so itself: no threshold, out at once.
                            successes = 0
                            failures = p.threshold
                            if up.active_healthy:
                                log.warning(
                                    "%s/%s reports %s: out of rotation",
                                    cluster.name,
                                    up.address,
                                    health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status),
                                )
                                cluster.set_active_health(up, False)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                        use_watch = False
                        continue
                    if up.channel is not channel:  # the old channel drained: not a failure
                        continue
                except TimeoutError:
                    pass
                finally:
                    call.cancel()
                verdict(False)
                await asyncio.sleep(retry_after_failure)
            else:
                try:
                    resp = await stub.Check(request, timeout=p.timeout)
                    ok = resp.status == SERVING
                except grpc.aio.AioRpcError:
                    ok = False
                verdict(ok)
                await asyncio.sleep(p.interval if ok else retry_after_failure)
