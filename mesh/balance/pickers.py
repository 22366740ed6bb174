"""Load-balancing pickers: pure decisions over a list of endpoints.

A picker chooses one endpoint per call and is told when that call starts and ends. It
does no I/O and never awaits; time and randomness come in as `clock` and `rng`, so tests
drive them with a fake clock and a seeded `random.Random`.

`pick` runs once per call on the proxy's hot path, so every picker is O(1) or one O(n)
pass with small constants, and builds no lists except on the retry path (non-empty `exclude`).
Measured with `python -m timeit -s <setup> "p.pick(eps)"` (CPython 3.11, 4 / 16 endpoints,
empty exclude), per pick: round_robin 0.15 / 0.18 us, least_connections 0.9 / 0.9 us,
random 1.0 / 1.3 us, latency 1.7 / 1.9 us, weighted_round_robin 1.0 / 2.7 us,
load_aware 3.6 us (4, full scan) / 2.6 us (16, P2C).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Collection, Sequence
from typing import Protocol

import grpc

from ..errors import MeshError
from ..orca import ACTIVE, SLOTS, LoadReport
from .endpoint import Endpoint

Clock = Callable[[], float]


class NoEndpointError(MeshError):
    """There is no endpoint to send the call to (none is healthy, or none is known)."""

    def __init__(self, message: str = "no healthy endpoint to send the call to") -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, message)


class Picker(Protocol):
    """Chooses the endpoint for each call; told when calls start and end.

    `pick(endpoints, exclude)`: `endpoints` are the currently eligible (healthy) ones in a
    stable order; the list may change between calls as endpoints come and go. `exclude`
    names addresses to avoid (say, already tried by a retry); when it covers every
    endpoint it is ignored rather than failing the call. Raises NoEndpointError when
    `endpoints` is empty. Never blocks, never does I/O.

    `started(ep)`: a call was sent to `ep`. `finished(ep, latency=, ok=, load=)`: that call
    ended after `latency` seconds, with the ORCA report from its trailers if there was one.
    """

    name: str

    def pick(self, endpoints: Sequence[Endpoint], exclude: Collection[str] = ()) -> Endpoint: ...

    def started(self, ep: Endpoint) -> None: ...

    def finished(
        self, ep: Endpoint, *, latency: float, ok: bool, load: LoadReport | None = None
    ) -> None: ...


def _candidates(endpoints: Sequence[Endpoint], exclude: Collection[str]) -> Sequence[Endpoint]:
    """The endpoints not excluded, or all of them when exclude covers every one."""
    if not endpoints:
        raise NoEndpointError()
    if not exclude:
        return endpoints
    kept = [ep for ep in endpoints if ep.address not in exclude]
    return kept or endpoints


class BasePicker:
    """Shared bookkeeping: in-flight counts, the last load report, peak-EWMA latency.

    Every picker keeps all of it, so an Endpoint reads the same whichever algorithm runs
    and switching algorithms does not start from nothing.
    """

    name = "base"

    def __init__(
        self,
        *,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
        decay: float = 10.0,
    ) -> None:
        if not decay > 0:
            raise ValueError(f"decay must be a positive number of seconds, got {decay}")
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self.decay = decay

    def started(self, ep: Endpoint) -> None:
        ep.inflight += 1

    def finished(
        self, ep: Endpoint, *, latency: float, ok: bool, load: LoadReport | None = None
    ) -> None:
        # A finish without its start (a bug elsewhere) must not drive the count negative
        # and make the endpoint look better than idle.
        if ep.inflight > 0:
            ep.inflight -= 1
        now = self._clock()
        if load is not None:
            ep.load = load
            ep.load_at = now
            # Reports are taken as the call ends, after it left the backend's slots, so
            # the report already lacks this call: count sends from the decremented value.
            ep.load_inflight = ep.inflight
        self._observe(ep, latency if latency > 0.0 else 0.0, ok, now)

    def _observe(self, ep: Endpoint, latency: float, ok: bool, now: float) -> float:
        """Peak-EWMA update (Finagle's PeakEwma, tower's PeakEwma); returns the sample used."""
        if not ok and latency < ep.ewma:
            # A fast failure must not make an endpoint look fast: that would pull more
            # traffic to it the more it fails. Ejecting it is outlier detection's job.
            latency = ep.ewma
        if latency > ep.ewma:
            ep.ewma = latency  # peak: a slow call counts at once
        else:
            elapsed = now - ep.ewma_at
            w = math.exp(-elapsed / self.decay) if elapsed > 0.0 else 1.0
            ep.ewma = ep.ewma * w + latency * (1.0 - w)
        ep.ewma_at = now
        return latency

    def _two(self, cands: Sequence[Endpoint]) -> tuple[Endpoint, Endpoint]:
        """Two distinct endpoints, uniformly (len(cands) >= 2)."""
        n = len(cands)
        # random() rather than randrange(): a third of the cost, stable across versions.
        rand = self._rng.random
        i = int(rand() * n)
        j = int(rand() * (n - 1))
        if j >= i:
            j += 1
        return cands[i], cands[j]

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"


class RoundRobin(BasePicker):
    """Each endpoint in turn, in list order.

    The position is an index into the current list, taken modulo its length, so the list
    growing or shrinking between calls only shifts where the rotation continues. The
    first pick starts at a random index (as gRPC's round_robin does), so many proxies
    started together do not all send their first calls to the same endpoint.
    """

    name = "round_robin"

    def __init__(self, *, clock: Clock = time.monotonic, rng: random.Random | None = None) -> None:
        super().__init__(clock=clock, rng=rng)
        self._next = -1

    def pick(self, endpoints: Sequence[Endpoint], exclude: Collection[str] = ()) -> Endpoint:
        n = len(endpoints)
        if not n:
            raise NoEndpointError()
        if self._next < 0:
            self._next = int(self._rng.random() * n)
        start = self._next % n
        if exclude:
            # Skip excluded endpoints in place, keeping the rotation's order.
            for k in range(n):
                i = (start + k) % n
                if endpoints[i].address not in exclude:
                    self._next = i + 1
                    return endpoints[i]
        self._next = start + 1
        return endpoints[start]

    def __repr__(self) -> str:
        return f"<RoundRobin next={max(self._next, 0)}>"


class WeightedRoundRobin(BasePicker):
    """Smooth weighted round robin (nginx): interleaved, exact over every sum(weights) picks.

    Each pick adds every endpoint's weight to its `current`, picks the largest and takes
    the total weight off it. With weights 5,1,1 that gives a a b a c a a, not a a a a a b c.
    State is keyed by address, so it survives the list being rebuilt; addresses that
    left are dropped.
    """

    name = "weighted_round_robin"

    def __init__(self, *, clock: Clock = time.monotonic, rng: random.Random | None = None) -> None:
        super().__init__(clock=clock, rng=rng)
        self._current: dict[str, int] = {}

    def pick(self, endpoints: Sequence[Endpoint], exclude: Collection[str] = ()) -> Endpoint:
        cands = _candidates(endpoints, exclude)
        current = self._current
        total = 0
        best = cands[0]
        best_value = None
        for ep in cands:
            value = current.get(ep.address, 0) + ep.weight
            current[ep.address] = value
            total += ep.weight
            if best_value is None or value > best_value:
                best, best_value = ep, value
        current[best.address] -= total
        if len(current) > len(endpoints):
            # Some address is gone (every present, non-excluded one was just written).
            present = {ep.address for ep in endpoints}
            self._current = {a: v for a, v in current.items() if a in present}
        return best

    def __repr__(self) -> str:
        return f"<WeightedRoundRobin {len(self._current)} endpoints>"


class LeastConnections(BasePicker):
    """Power of two random choices over in-flight calls (Envoy's least_request, choice 2).

    Two distinct endpoints are sampled and the one with fewer in-flight calls per unit of
    weight wins. Sampling two, rather than scanning for the global minimum, keeps many
    proxies with slightly stale counts from all herding onto the same idle endpoint.
    """

    name = "least_connections"

    def pick(self, endpoints: Sequence[Endpoint], exclude: Collection[str] = ()) -> Endpoint:
        cands = _candidates(endpoints, exclude)
        if len(cands) == 1:
            return cands[0]
        a, b = self._two(cands)
        # a.inflight / a.weight <= b.inflight / b.weight, without division. Ties go to
        # the first sampled, which is itself a random choice.
        return a if a.inflight * b.weight <= b.inflight * a.weight else b


# Finagle's penalty: the cost of an endpoint that has not answered yet while a call to it
# is already in flight. Without it such an endpoint costs 0 * (inflight + 1) = 0 and would
# take every call until its first response; with it, it gets one probe at a time.
_UNKNOWN_BUSY_PENALTY = 1e6


class Latency(BasePicker):
    """Peak-EWMA (Linkerd, Finagle): P2C over cost = latency estimate * (inflight + 1).

    The estimate moves toward each observed latency with time constant `decay`, but a
    latency above it replaces it at once, so a slowing endpoint is avoided quickly and
    trusted again slowly. When costing, the estimate also decays toward zero with the
    time since the endpoint last answered: an endpoint that was avoided for being slow
    gets probed again after a while, instead of being shunned forever on old evidence.
    An endpoint with no estimate yet costs `default_rtt` (0 by default, so it is tried).
    """

    name = "latency"

    def __init__(
        self,
        *,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
        decay: float = 10.0,
        default_rtt: float = 0.0,
    ) -> None:
        super().__init__(clock=clock, rng=rng, decay=decay)
        if default_rtt < 0:
            raise ValueError(f"default_rtt must not be negative, got {default_rtt}")
        self.default_rtt = default_rtt

    def cost(self, ep: Endpoint, now: float) -> float:
        if ep.ewma > 0.0:
            elapsed = now - ep.ewma_at
            estimate = ep.ewma * math.exp(-elapsed / self.decay) if elapsed > 0.0 else ep.ewma
        else:
            estimate = self.default_rtt
        if estimate == 0.0 and ep.inflight:
            return _UNKNOWN_BUSY_PENALTY + ep.inflight
        return estimate * (ep.inflight + 1)

    def pick(self, endpoints: Sequence[Endpoint], exclude: Collection[str] = ()) -> Endpoint:
        cands = _candidates(endpoints, exclude)
        if len(cands) == 1:
            return cands[0]
        a, b = self._two(cands)
        now = self._clock()
        return a if self.cost(a, now) <= self.cost(b, now) else b

    def __repr__(self) -> str:
        return f"<Latency decay={self.decay:g}s default_rtt={self.default_rtt:g}s>"


class Random(BasePicker):
    """Uniform over endpoints, weighted by endpoint weight."""

    name = "random"

    def pick(self, endpoints: Sequence[Endpoint], exclude: Collection[str] = ()) -> Endpoint:
        cands = _candidates(endpoints, exclude)
        total = 0
        for ep in cands:
            total += ep.weight
        r = self._rng.random()
        if total == len(cands):  # all weights 1: the common case, no second pass
            return cands[int(r * total)]
        r *= total
        for ep in cands:
            r -= ep.weight
            if r < 0.0:
                return ep
        return cands[-1]  # only reachable through float rounding


class LoadAware(BasePicker):
    """Least estimated queue wait, from the endpoints' own ORCA reports (LLM serving).

    One slow model server queues up while round robin keeps feeding it; latency alone
    notices late, as a queued call reports its latency only when it ends. Backends report
    `active_generations`, `queue_depth` and `slots` with every response, so:

    occupancy  Calls on the endpoint now, from every client: the report's active + queued,
               plus the calls this picker sent since the report arrived (inflight then vs
               now; negative when some of ours finished since). Never below our own
               inflight, which are surely there. Without a report, or with one older than
               `stale_after` seconds, our inflight alone: a stale queue depth says little
               about now, and trusting it would shun a recovered endpoint.
    slots      From the report (a stale one still says how big the endpoint is), else 1:
               an endpoint that never answered gets one probe at a time until it does.
    score      (occupancy + queue_weight * queued) / slots * latency, where queued =
               max(0, occupancy + 1 - slots) is how many calls, ours included, would wait
               for a slot. An active call only shares a batch; a queued one waits a whole
               generation before its first token, hence `queue_weight` (default 4): an
               endpoint with a queue loses to any endpoint with a free slot, and every
               call we add to a queue costs it more, so a growing queue is avoided hard.
               Idle endpoints score 0 whatever they report, so new endpoints get traffic.
    latency    The endpoint's peak-EWMA latency, or the typical one across endpoints when
               it has none, so a slower instance with the same queue scores worse.

    With up to `scan_limit` (8) endpoints every one is scored: cheap at that size, and
    P2C's random pair would sometimes be two busy endpoints while an idle one sits
    unused. Above that, P2C over the score bounds the work and avoids herding. Ties are
    broken by rng.
    """

    name = "load_aware"

    def __init__(
        self,
        *,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
        decay: float = 10.0,
        stale_after: float = 5.0,
        queue_weight: float = 4.0,
        scan_limit: int = 8,
    ) -> None:
        super().__init__(clock=clock, rng=rng, decay=decay)
        if not stale_after > 0:
            raise ValueError(f"stale_after must be a positive number of seconds, got {stale_after}")
        if queue_weight < 0:
            raise ValueError(f"queue_weight must not be negative, got {queue_weight}")
        if scan_limit < 1:
            raise ValueError(f"scan_limit must be at least 1, got {scan_limit}")
        self.stale_after = stale_after
        self.queue_weight = queue_weight
        self.scan_limit = scan_limit
        # Running mean latency over all endpoints: what an endpoint without its own
        # estimate is assumed to have.
        self._typical = 0.0

    def _observe(self, ep: Endpoint, latency: float, ok: bool, now: float) -> float:
        sample = super()._observe(ep, latency, ok, now)
        typical = self._typical
        self._typical = sample if not typical else typical + 0.05 * (sample - typical)
        return sample

    def score(self, ep: Endpoint, now: float) -> float:
        inflight = ep.inflight
        report = ep.load
        slots = 1.0
        occupancy = float(inflight)
        if report is not None:
            named = report.named
            reported_slots = named.get(SLOTS, 0.0)
            if reported_slots >= 1.0:
                slots = reported_slots
            if now - ep.load_at <= self.stale_after:
                active = named.get(ACTIVE)
                if active is None:  # a backend that reports utilization only
                    active = report.application_utilization * slots
                estimate = active + report.queue_depth + (inflight - ep.load_inflight)
                if estimate > occupancy:
                    occupancy = estimate
        if occupancy <= 0.0:
            return 0.0
        queued = occupancy + 1.0 - slots
        if queued < 0.0:
            queued = 0.0
        latency = ep.ewma or self._typical or 1.0
        return (occupancy + self.queue_weight * queued) / slots * latency

    def pick(self, endpoints: Sequence[Endpoint], exclude: Collection[str] = ()) -> Endpoint:
        cands = _candidates(endpoints, exclude)
        n = len(cands)
        if n == 1:
            return cands[0]
        now = self._clock()
        if n > self.scan_limit:
            a, b = self._two(cands)
            return a if self.score(a, now) <= self.score(b, now) else b
        best = cands[0]
        best_score = self.score(best, now)
        ties = 1
        for i in range(1, n):
            ep = cands[i]
            s = self.score(ep, now)
            if s < best_score:
                best, best_score, ties = ep, s, 1
            elif s == best_score:
                # Reservoir sampling: each of the k tied endpoints ends up chosen with 1/k.
                ties += 1
                if self._rng.random() * ties < 1.0:
                    best = ep
        return best

    def __repr__(self) -> str:
        return (
            f"<LoadAware stale_after={self.stale_after:g}s queue_weight={self.queue_weight:g} "
            f"typical={self._typical * 1000:.0f}ms>"
        )


_PICKERS: dict[str, Callable[..., Picker]] = {
    RoundRobin.name: RoundRobin,
    WeightedRoundRobin.name: WeightedRoundRobin,
    LeastConnections.name: LeastConnections,
    Latency.name: Latency,
    Random.name: Random,
    LoadAware.name: LoadAware,
}
ALGORITHMS: tuple[str, ...] = tuple(_PICKERS)


def make_picker(
    algorithm: str, *, clock: Clock = time.monotonic, rng: random.Random | None = None
) -> Picker:
    """A new picker for `algorithm` (one of ALGORITHMS) with its default settings."""
    try:
        cls = _PICKERS[algorithm]
    except KeyError:
        raise ValueError(
            f"unknown load-balancing algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}"
        ) from None
    return cls(clock=clock, rng=rng)
