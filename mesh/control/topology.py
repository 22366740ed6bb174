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
from collections.abc import Callable
from dataclasses import dataclass

from aimesh.control.v1 import control_plane_pb2 as pb

from .catalog import Instance, Snapshot

WINDOW = 60.0  # seconds of reports that rates are computed over
REPORT_INTERVAL = 2.0  # what the control plane asks proxies for
PROXY_STALE = 3 * REPORT_INTERVAL + 5.0  # a proxy silent this long no longer counts


Sample = tuple[float, int, int, float]  # (at, requests, errors, latency seconds summed)
Key = tuple[str, str]  # (service, address)


class _Series:
    """One proxy's counters for one endpoint: a few samples, sparse on purpose."""

    __slots__ = ("healthy", "samples")

    def __init__(self) -> None:
        self.samples: deque[Sample] = deque()
        self.healthy = True

    def add(self, sample: Sample, window: float) -> None:
        samples = self.samples
        if samples and sample[1] < samples[-1][1]:
            samples.clear()  # the proxy restarted: its counters began again
        if len(samples) >= 2 and sample[0] - samples[-2][0] < window / 6:
            # A sample per sixth of the window, not one per report: rates need only the
            # ends, and 100 proxies x 1,000 endpoints x a report every 2 s adds up.
            samples[-1] = sample
        else:
            samples.append(sample)
        # Keep one sample older than the window, so the rate covers the whole window.
        while len(samples) > 2 and samples[1][0] <= sample[0] - window:
            samples.popleft()

    def delta(self, now: float) -> tuple[float, int, int, float]:
        """(seconds, requests, errors, latency) from the oldest sample until now. Proxies
        report only endpoints whose counters moved, so a counter unreported since its
        last sample has stood still: its rate decays as time passes."""
        if not self.samples:
            return 0.0, 0, 0, 0.0
        a, b = self.samples[0], self.samples[-1]
        return now - a[0], b[1] - a[1], b[2] - a[2], b[3] - a[3]


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
        on_vote: Callable[[], None] | None = None,
    ) -> None:
        self._clock = clock
        # Called when a health vote changes: a proxy's report flips one, or a proxy that
        # went silent takes its votes away. Either may change what `healthy` answers.
        self._on_vote = on_vote
        self._wall = wall
        self._window = window
        self._series: dict[Key, dict[str, _Series]] = {}  # endpoint -> proxy -> counters
        self._proxies: dict[str, float] = {}  # proxy id -> last report time
        self._keys: dict[str, set[Key]] = {}  # proxy id -> endpoints it reports
        # Health votes kept as reports arrive, so that asking whether an instance is
        # healthy costs O(1), not a walk over every proxy's series.
        self._voters: dict[Key, int] = {}
        self._against: dict[Key, int] = {}
        self._uptime: dict[str, _Uptime] = {}

    def report(self, report: pb.ProxyReport) -> bool:
        """Takes a proxy's report; True when it changed a health vote."""
        now = self._clock()
        voted = False
        proxy = report.proxy_id
        self._proxies[proxy] = now
        keys = self._keys.setdefault(proxy, set())
        window = self._window
        for ep in report.endpoints:
            key = (ep.service, ep.address)
            per = self._series.setdefault(key, {})
            series = per.get(proxy)
            if series is None:
                series = per[proxy] = _Series()
                keys.add(key)
                self._voters[key] = self._voters.get(key, 0) + 1
                voted = True
            elif series.healthy == ep.healthy:
                series.add((now, ep.requests, ep.errors, ep.latency_seconds_total), window)
                continue
            else:
                self._against[key] = self._against.get(key, 0) - (not series.healthy)
            series.healthy = ep.healthy
            self._against[key] = self._against.get(key, 0) + (not ep.healthy)
            series.add((now, ep.requests, ep.errors, ep.latency_seconds_total), window)
            voted = True
        if voted and self._on_vote is not None:
            self._on_vote()
        return voted

    def reporting(self) -> int:
        """Proxies that have reported within PROXY_STALE."""
        now = self._clock()
        return sum(1 for at in self._proxies.values() if now - at <= PROXY_STALE)

    def _expire(self, now: float) -> None:
        """Forgets proxies that stopped reporting: their counters and their votes."""
        voted = False
        for proxy, at in list(self._proxies.items()):
            if now - at <= PROXY_STALE:
                continue
            del self._proxies[proxy]
            for key in self._keys.pop(proxy, ()):
                per = self._series.get(key, {})
                series = per.pop(proxy, None)
                if series is not None:
                    self._voters[key] -= 1
                    self._against[key] = self._against.get(key, 0) - (not series.healthy)
                    voted = True
                if not per:
                    self._series.pop(key, None)
        if voted and self._on_vote is not None:
            self._on_vote()

    def healthy(self, inst: Instance) -> bool:
        """Serving by its own account, and not out of rotation at every proxy that
        reports it."""
        key = (inst.service, inst.address)
        voters = self._voters.get(key, 0)
        return inst.serving and (voters == 0 or self._against.get(key, 0) < voters)

    def observe(self, snapshot: Snapshot) -> None:
        """Integrates uptime up to now with the state as it was; call often (the control
        plane does every second). O(instances)."""
        now = self._clock()
        self._expire(now)
        up_now: dict[str, bool] = {}
        for inst in snapshot.instances.values():
            if not up_now.get(inst.service):
                up_now[inst.service] = self.healthy(inst)
        for service in set(up_now) | set(self._uptime):
            u = self._uptime.get(service)
            if u is None:
                u = self._uptime[service] = _Uptime(first_seen=now, last_at=now)
            if u.was_up:
                u.up += now - u.last_at
            u.last_at = now
            u.was_up = up_now.get(service, False)

    def view(self, snapshot: Snapshot, config_version: int = 0) -> pb.Topology:
        self.observe(snapshot)
        now = self._clock()
        wall_now = self._wall()
        rates: dict[Key, _Rate] = {}
        for key, per in self._series.items():
            r = rates[key] = _Rate()
            for series in per.values():
                r.add(*series.delta(now))
        out = pb.Topology(
            catalog_version=snapshot.version,
            config_version=config_version,
            proxies=len(self._proxies),
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
                ok = self.healthy(inst)
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
