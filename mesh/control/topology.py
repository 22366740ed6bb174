"""The topology view: what the product page's panel shows, from the catalog and proxies'
reports (pure; the clock comes in as a parameter).

Proxies report cumulative counters per endpoint; rates come from the difference between
the newest report and the oldest one still inside the window, summed over proxies. A
service's uptime is the share of the time since it first appeared during which at least
one of its instances was healthy, integrated piecewise as the state is observed.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from aimesh.control.v1 import control_plane_pb2 as pb

from .catalog import Instance, Snapshot

WINDOW = 60.0  # seconds of reports that rates are computed over
REPORT_INTERVAL = 2.0  # what the control plane asks proxies for
PROXY_STALE = 3 * REPORT_INTERVAL + 5.0  # a proxy silent this long no longer counts


@dataclass(slots=True)
class _Sample:
    at: float
    requests: int
    errors: int
    latency: float  # seconds, summed


@dataclass(slots=True)
class _Series:
    samples: deque[_Sample] = field(default_factory=deque)
    healthy: bool = True

    def add(self, sample: _Sample, window: float) -> None:
        if self.samples and sample.requests < self.samples[-1].requests:
            self.samples.clear()  # the proxy restarted: its counters began again
        self.samples.append(sample)
        # Keep one sample older than the window, so the rate covers the whole window.
        while len(self.samples) > 2 and self.samples[1].at <= sample.at - window:
            self.samples.popleft()

    def delta(self) -> tuple[float, int, int, float]:
        """(seconds, requests, errors, latency) between the oldest and newest samples."""
        if len(self.samples) < 2:
            return 0.0, 0, 0, 0.0
        a, b = self.samples[0], self.samples[-1]
        return b.at - a.at, b.requests - a.requests, b.errors - a.errors, b.latency - a.latency


@dataclass(slots=True)
class _Uptime:
    first_seen: float
    last_at: float
    up: float = 0.0
    was_up: bool = False


@dataclass(slots=True)
class _Rate:
    seconds: float = 0.0
    requests: int = 0
    errors: int = 0
    latency: float = 0.0

    def add(self, seconds: float, requests: int, errors: int, latency: float) -> None:
        # Proxies' windows overlap; requests add up, and the window is the widest seen.
        self.seconds = max(self.seconds, seconds)
        self.requests += requests
        self.errors += errors
        self.latency += latency

    @property
    def per_minute(self) -> float:
        return self.requests / self.seconds * 60 if self.seconds > 0 else 0.0

    @property
    def avg_latency_ms(self) -> float:
        return self.latency / self.requests * 1000 if self.requests else 0.0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


class Topology:
    def __init__(
        self,
        clock: Callable[[], float],
        window: float = WINDOW,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._wall = wall
        self._window = window
        # (proxy, service, address) -> counters
        self._series: dict[tuple[str, str, str], _Series] = {}
        self._proxies: dict[str, float] = {}  # proxy id -> last report time
        self._uptime: dict[str, _Uptime] = {}

    def report(self, report: pb.ProxyReport) -> None:
        now = self._clock()
        self._proxies[report.proxy_id] = now
        for ep in report.endpoints:
            key = (report.proxy_id, ep.service, ep.address)
            series = self._series.setdefault(key, _Series())
            series.add(_Sample(now, ep.requests, ep.errors, ep.latency_seconds_total), self._window)
            series.healthy = ep.healthy

    def _live_series(self, now: float) -> Iterable[tuple[str, str, _Series]]:
        for (proxy, service, address), series in list(self._series.items()):
            if now - self._proxies.get(proxy, 0.0) > PROXY_STALE:
                del self._series[(proxy, service, address)]
                continue
            yield service, address, series

    def healthy(self, inst: Instance, verdicts: dict[tuple[str, str], list[bool]]) -> bool:
        """Serving by its own account, and not marked unhealthy by every proxy that sees it."""
        seen = verdicts.get((inst.service, inst.address))
        return inst.serving and (not seen or any(seen))

    def observe(self, snapshot: Snapshot) -> None:
        """Integrates uptime up to now with the state as it was; call on every change."""
        now = self._clock()
        verdicts = self._verdicts(now)
        up_now: dict[str, bool] = {}
        for service, instances in snapshot.services().items():
            up_now[service] = any(self.healthy(i, verdicts) for i in instances)
        for service in set(up_now) | set(self._uptime):
            u = self._uptime.get(service)
            if u is None:
                u = self._uptime[service] = _Uptime(first_seen=now, last_at=now)
            if u.was_up:
                u.up += now - u.last_at
            u.last_at = now
            u.was_up = up_now.get(service, False)

    def _verdicts(self, now: float) -> dict[tuple[str, str], list[bool]]:
        out: dict[tuple[str, str], list[bool]] = {}
        for service, address, series in self._live_series(now):
            out.setdefault((service, address), []).append(series.healthy)
        return out

    def view(self, snapshot: Snapshot, config_version: int = 0) -> pb.Topology:
        self.observe(snapshot)
        now = self._clock()
        wall_now = self._wall()
        verdicts = self._verdicts(now)
        rates: dict[tuple[str, str], _Rate] = {}
        for service, address, series in self._live_series(now):
            rates.setdefault((service, address), _Rate()).add(*series.delta())
        out = pb.Topology(
            catalog_version=snapshot.version,
            config_version=config_version,
            proxies=sum(1 for t in self._proxies.values() if now - t <= PROXY_STALE),
        )
        total_rpm, total_requests, total_latency = 0.0, 0, 0.0
        uptimes: list[float] = []
        services = snapshot.services()
        for name in sorted(set(services) | {s for s, _ in rates}):
            instances = services.get(name, [])
            svc = _Rate()
            status = pb.ServiceStatus(
                name=name,
                models=sorted({m for i in instances for m in i.models}),
                total=len(instances),
            )
            for inst in instances:
                r = rates.get((name, inst.address), _Rate())
                ok = self.healthy(inst, verdicts)
                status.healthy += ok
                status.instances.append(
                    pb.InstanceStatus(
                        instance_id=inst.instance_id,
                        address=inst.address,
                        healthy=ok,
                        requests_per_minute=r.per_minute,
                        avg_latency_ms=r.avg_latency_ms,
                        version=inst.version,
                        zone=inst.zone,
                        models=inst.models,
                        age_seconds=max(0.0, wall_now - inst.registered_at)
                        if inst.registered_at
                        else 0.0,
                    )
                )
            for (service, _), r in rates.items():
                if service == name:
                    svc.add(r.seconds, r.requests, r.errors, r.latency)
            status.requests_per_minute = svc.per_minute
            status.avg_latency_ms = svc.avg_latency_ms
            status.error_rate = svc.error_rate
            u = self._uptime.get(name)
            if u is not None:
                span = now - u.first_seen
                status.age_seconds = span
                status.uptime = u.up / span if span > 0 else (1.0 if u.was_up else 0.0)
                uptimes.append(status.uptime)
            total_rpm += svc.per_minute
            total_requests += svc.requests
            total_latency += svc.latency
            out.healthy += status.healthy
            out.total += status.total
            out.services.append(status)
        out.requests_per_minute = total_rpm
        out.avg_latency_ms = total_latency / total_requests * 1000 if total_requests else 0.0
        out.uptime = min(uptimes) if uptimes else 0.0
        return out
