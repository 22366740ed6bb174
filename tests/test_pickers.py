"""Pickers, driven directly with a fake clock and seeded rngs (no I/O, no sleeping)."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aimesh.mesh.balance import (
    ALGORITHMS,
    Endpoint,
    Latency,
    LeastConnections,
    LoadAware,
    NoEndpointError,
    Picker,
    Random,
    RoundRobin,
    WeightedRoundRobin,
    make_picker,
)
from aimesh.mesh.orca import ACTIVE, QUEUE_DEPTH, SLOTS, LoadReport

# Deterministic: the same examples every run, like the seeded rngs below.
PROPERTY = settings(max_examples=60, derandomize=True, deadline=None)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def endpoints(*weights: int) -> list[Endpoint]:
    return [Endpoint(f"10.0.0.{i}:9000", w) for i, w in enumerate(weights)]


def picker(algorithm: str, clock: FakeClock | None = None, seed: int = 7) -> Picker:
    return make_picker(algorithm, clock=clock or FakeClock(), rng=random.Random(seed))


def report(active: float = 0, queue: float = 0, slots: float = 4) -> LoadReport:
    return LoadReport(
        application_utilization=active / slots,
        named={ACTIVE: active, QUEUE_DEPTH: queue, SLOTS: slots},
    )


def set_load(p: Picker, ep: Endpoint, load: LoadReport, latency: float = 0.5) -> None:
    """Delivers `load` the way it arrives: in the trailers of a finished call."""
    p.started(ep)
    p.finished(ep, latency=latency, ok=True, load=load)


# Endpoint lists: (weight, inflight, queue depth or None for no report) per endpoint.
endpoint_specs = st.lists(
    st.tuples(st.integers(1, 5), st.integers(0, 6), st.none() | st.integers(0, 10)),
    min_size=1,
    max_size=12,
)


def build(specs: Sequence[tuple[int, int, int | None]], p: Picker) -> list[Endpoint]:
    eps = endpoints(*(w for w, _, _ in specs))
    for ep, (_, inflight, queue) in zip(eps, specs, strict=True):
        if queue is not None:
            set_load(p, ep, report(active=min(4, queue), queue=queue))
        for _ in range(inflight):
            p.started(ep)
    return eps


# -- properties of every picker ---------------------------------------------------------


@PROPERTY
@given(st.sampled_from(ALGORITHMS), endpoint_specs, st.data())
def test_picks_a_member_and_honours_exclude(
    algorithm: str, specs: list[tuple[int, int, int | None]], data: st.DataObject
) -> None:
    p = picker(algorithm)
    eps = build(specs, p)
    addresses = [ep.address for ep in eps]
    exclude = data.draw(st.sets(st.sampled_from(addresses)))
    for _ in range(20):
        ep = p.pick(eps, exclude)
        assert any(ep is e for e in eps)
        if len(exclude) < len(eps):
            assert ep.address not in exclude
        ep = p.pick(eps)
        assert any(ep is e for e in eps)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_exclude_covering_everything_is_ignored(algorithm: str) -> None:
    p = picker(algorithm)
    eps = endpoints(1, 2, 3)
    picked = {p.pick(eps, {e.address for e in eps}).address for _ in range(200)}
    assert picked <= {e.address for e in eps}
    assert picked  # and never raises


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_no_endpoints_raises(algorithm: str) -> None:
    p = picker(algorithm)
    with pytest.raises(NoEndpointError, match="no healthy endpoint"):
        p.pick([])
    with pytest.raises(NoEndpointError):
        p.pick([], {"10.0.0.1:9000"})


@PROPERTY
@given(
    st.sampled_from(ALGORITHMS),
    st.lists(st.tuples(st.booleans(), st.integers(0, 2)), max_size=60),
)
def test_inflight_never_negative(algorithm: str, ops: list[tuple[bool, int]]) -> None:
    p = picker(algorithm)
    eps = endpoints(1, 2, 3)
    expected = [0, 0, 0]
    for start, i in ops:
        if start:
            p.started(eps[i])
            expected[i] += 1
        else:  # including finishes with no matching start
            p.finished(eps[i], latency=0.01, ok=bool(i % 2))
            expected[i] = max(0, expected[i] - 1)
        assert [e.inflight for e in eps] == expected


def test_finished_records_load_and_time() -> None:
    clock = FakeClock(50.0)
    p = picker("round_robin", clock)
    ep = Endpoint("10.0.0.1:9000")
    p.started(ep)
    p.started(ep)
    load = report(active=2, queue=1)
    p.finished(ep, latency=0.2, ok=True, load=load)
    assert (ep.inflight, ep.load, ep.load_at, ep.load_inflight) == (1, load, 50.0, 1)
    p.finished(ep, latency=0.2, ok=True)  # no report: the last one stays
    assert (ep.inflight, ep.load, ep.load_at) == (0, load, 50.0)


# -- round robin and weighted round robin -------------------------------------------------


@PROPERTY
@given(st.integers(1, 10), st.integers(1, 5))
def test_round_robin_is_even(n: int, rounds: int) -> None:
    p = picker("round_robin")
    eps = endpoints(*[1] * n)
    counts = Counter(p.pick(eps).address for _ in range(n * rounds))
    assert set(counts.values()) == {rounds} and len(counts) == n


def test_round_robin_cycles_in_order_and_survives_the_list_changing() -> None:
    p = RoundRobin(rng=random.Random(3))
    eps = endpoints(1, 1, 1, 1)
    first = p.pick(eps)
    start = eps.index(first)
    seq = [eps.index(p.pick(eps)) for _ in range(7)]
    assert seq == [(start + k) % 4 for k in range(1, 8)]
    assert p.pick(eps[:1]) is eps[0]  # shrank below the position
    grown = [*eps, Endpoint("10.0.1.1:9000"), Endpoint("10.0.1.2:9000")]
    counts = Counter(p.pick(grown).address for _ in range(60))
    assert len(counts) == 6 and set(counts.values()) == {10}
    assert repr(p).startswith("<RoundRobin next=")


def test_round_robin_skips_excluded_in_order() -> None:
    p = RoundRobin(rng=random.Random(3))
    eps = endpoints(1, 1, 1)
    skip = {eps[1].address}
    picks = [eps.index(p.pick(eps, skip)) for _ in range(6)]
    assert 1 not in picks and Counter(picks) == {0: 3, 2: 3}


@PROPERTY
@given(st.lists(st.integers(1, 10), min_size=1, max_size=7), st.integers(1, 3))
def test_weighted_round_robin_is_exact_and_smooth(weights: list[int], k: int) -> None:
    p = picker("weighted_round_robin")
    eps = endpoints(*weights)
    total = sum(weights)
    seq = [p.pick(eps).address for _ in range(k * total)]
    counts = Counter(seq)
    assert all(counts[e.address] == k * e.weight for e in eps)
    # Smooth: in every window, no endpoint runs ahead of its share by more than one.
    for window in {1, 2, max(1, total // 2), total}:
        for start in range(len(seq) - window + 1):
            got = Counter(seq[start : start + window])
            for e in eps:
                assert got[e.address] <= math.ceil(e.weight / total * window) + 1


def test_weighted_round_robin_interleaves() -> None:
    p = picker("weighted_round_robin")
    a, b, c = endpoints(5, 1, 1)
    assert "".join("abc"[[a, b, c].index(p.pick([a, b, c]))] for _ in range(7)) == "aabacaa"


def test_weighted_round_robin_drops_state_of_gone_endpoints() -> None:
    p = WeightedRoundRobin(rng=random.Random(1))
    eps = endpoints(3, 2, 1)
    for _ in range(4):
        p.pick(eps)
    rest = [eps[0], eps[2], Endpoint("10.0.0.9:9000", 2)]
    counts = Counter(p.pick(rest).address for _ in range(600))
    assert counts == {rest[0].address: 300, rest[1].address: 100, rest[2].address: 200}
    assert repr(p) == "<WeightedRoundRobin 3 endpoints>"


# -- random -------------------------------------------------------------------------------


def test_random_follows_weights() -> None:
    p = Random(rng=random.Random(11))
    eps = endpoints(1, 2, 3, 4)
    picks = 10_000
    counts = Counter(p.pick(eps).address for _ in range(picks))
    for e in eps:
        assert counts[e.address] == pytest.approx(picks * e.weight / 10, rel=0.08)
    uniform = endpoints(1, 1, 1, 1)
    counts = Counter(p.pick(uniform).address for _ in range(picks))
    assert all(c == pytest.approx(picks / 4, rel=0.08) for c in counts.values())


# -- least connections ------------------------------------------------------------------


def test_least_connections_prefers_the_less_loaded() -> None:
    p = LeastConnections(rng=random.Random(5))
    idle, busy = endpoints(1, 1)
    for _ in range(10):
        p.started(busy)
    assert Counter(p.pick([idle, busy]).address for _ in range(1000))[busy.address] == 0
    assert p.pick([busy]) is busy


def test_least_connections_compares_inflight_per_weight() -> None:
    p = LeastConnections(rng=random.Random(5))
    big, small = endpoints(4, 1)
    for _ in range(6):
        p.started(big)  # 6 / 4 = 1.5 per unit of weight
    for _ in range(2):
        p.started(small)  # 2 / 1 = 2
    assert all(p.pick([big, small]) is big for _ in range(100))


def test_least_connections_spreads_across_many() -> None:
    p = LeastConnections(rng=random.Random(5))
    eps = endpoints(*[1] * 8)
    for _ in range(800):
        p.started(p.pick(eps))
    assert max(e.inflight for e in eps) - min(e.inflight for e in eps) <= 2


# -- latency (peak EWMA) ----------------------------------------------------------------


def drive(
    p: Picker,
    eps: Sequence[Endpoint],
    clock: FakeClock,
    latency: dict[str, float],
    picks: int,
    dt: float = 0.01,
) -> Counter[str]:
    counts: Counter[str] = Counter()
    for _ in range(picks):
        ep = p.pick(eps)
        p.started(ep)
        clock.advance(dt)
        p.finished(ep, latency=latency[ep.address], ok=True)
        counts[ep.address] += 1
    return counts


def test_peak_ewma_jumps_up_and_decays_down() -> None:
    clock = FakeClock()
    p = Latency(clock=clock, rng=random.Random(1), decay=10.0)
    ep = Endpoint("10.0.0.1:9000")
    p.finished(ep, latency=0.1, ok=True)
    assert ep.ewma == pytest.approx(0.1)
    clock.advance(1.0)
    p.finished(ep, latency=2.0, ok=True)
    assert ep.ewma == pytest.approx(2.0)  # peak: at once
    clock.advance(10.0)
    p.finished(ep, latency=0.1, ok=True)
    w = math.exp(-1.0)
    assert ep.ewma == pytest.approx(2.0 * w + 0.1 * (1 - w))
    before = ep.ewma
    p.finished(ep, latency=0.001, ok=False)  # a fast failure does not look fast
    assert ep.ewma == pytest.approx(before)


def test_latency_avoids_a_slow_endpoint_and_recovers_after_decay() -> None:
    clock = FakeClock()
    p = Latency(clock=clock, rng=random.Random(2))
    eps = endpoints(1, 1, 1)
    slow = eps[0].address
    latency = {e.address: 0.1 for e in eps} | {slow: 1.0}
    counts = drive(p, eps, clock, latency, 2000)  # 20 s of traffic
    assert counts[slow] < 0.02 * 2000
    latency[slow] = 0.1  # it got better, but nothing tells the picker until it probes
    drive(p, eps, clock, latency, 6000)  # 60 s: the old estimate decays, probes follow
    counts = drive(p, eps, clock, latency, 3000)
    assert counts[slow] > 0.25 * 3000


def test_latency_new_endpoint_gets_one_probe_until_it_answers() -> None:
    clock = FakeClock()
    p = Latency(clock=clock, rng=random.Random(2))
    old, new = endpoints(1, 1)
    p.finished(old, latency=0.2, ok=True)
    first = p.pick([old, new])
    assert first is new  # cost 0: tried
    p.started(new)
    assert all(p.pick([old, new]) is old for _ in range(50))
    assert repr(p) == "<Latency decay=10s default_rtt=0s>"


# -- load aware ---------------------------------------------------------------------------


class FakeBackend:
    """A model server with `slots`; `busy`/`queued` are other clients' calls."""

    def __init__(self, slots: int = 4, busy: int = 0, queued: int = 0) -> None:
        self.slots, self.busy, self.queued, self.ours = slots, busy, queued, 0

    def report(self) -> LoadReport:
        total = self.busy + self.ours
        return report(
            active=min(self.slots, total),
            queue=self.queued + max(0, total - self.slots),
            slots=self.slots,
        )

    def latency(self) -> float:
        waiting = self.queued + max(0, self.busy + self.ours - self.slots)
        return 1.0 + waiting / self.slots


def simulate(
    p: Picker,
    backends: dict[str, FakeBackend],
    eps: Sequence[Endpoint],
    clock: FakeClock,
    ticks: int,
    duration: int = 8,
    reports: bool = True,
) -> Counter[str]:
    """One call per tick, each lasting `duration` ticks; reports ride on the trailers."""
    ending: dict[int, list[Endpoint]] = {}
    counts: Counter[str] = Counter()
    for tick in range(ticks):
        clock.advance(0.05)
        for ep in ending.pop(tick, []):
            b = backends[ep.address]
            b.ours -= 1
            load = b.report() if reports else None
            p.finished(ep, latency=b.latency(), ok=True, load=load)
        ep = p.pick(eps)
        p.started(ep)
        backends[ep.address].ours += 1
        ending.setdefault(tick + duration, []).append(ep)
        counts[ep.address] += 1
    return counts


def test_load_aware_avoids_a_queued_endpoint() -> None:
    clock = FakeClock()
    p = LoadAware(clock=clock, rng=random.Random(4))
    eps = endpoints(1, 1, 1, 1)
    backends = {e.address: FakeBackend() for e in eps}
    backends[eps[0].address] = FakeBackend(busy=4, queued=8)
    for e in eps:
        set_load(p, e, backends[e.address].report())
    counts = simulate(p, backends, eps, clock, 2000)
    assert counts[eps[0].address] < 0.05 * 2000
    assert min(counts[e.address] for e in eps[1:]) > 0.25 * 2000


def test_load_aware_avoids_queued_endpoints_with_p2c_at_scale() -> None:
    clock = FakeClock()
    p = LoadAware(clock=clock, rng=random.Random(4))
    eps = endpoints(*[1] * 12)
    backends = {e.address: FakeBackend() for e in eps}
    for e in eps[:2]:
        backends[e.address] = FakeBackend(busy=4, queued=8)
    for e in eps:
        set_load(p, e, backends[e.address].report())
    counts = simulate(p, backends, eps, clock, 2000, duration=24)
    assert counts[eps[0].address] + counts[eps[1].address] < 0.05 * 2000


def test_load_aware_counts_its_own_sends_since_the_report() -> None:
    clock = FakeClock()
    p = LoadAware(clock=clock, rng=random.Random(4))
    a, b = endpoints(1, 1)
    set_load(p, a, report(active=1, slots=4))
    set_load(p, b, report(active=1, slots=4))
    p.started(a)
    p.started(a)
    p.started(a)  # a: 1 reported + 3 sent since = 4 of 4 slots
    assert p.pick([a, b]) is b
    assert p.score(a, clock()) > p.score(b, clock())


def test_load_aware_falls_back_to_inflight_when_reports_are_stale() -> None:
    clock = FakeClock()
    p = LoadAware(clock=clock, rng=random.Random(4), stale_after=5.0)
    eps = endpoints(1, 1, 1, 1)
    queued, others = eps[0], eps[1:]
    set_load(p, queued, report(active=4, queue=8))
    for e in others:
        set_load(p, e, report(active=0))
        p.started(e)
    assert all(p.pick(eps) is not queued for _ in range(200))  # fresh: believed
    clock.advance(6.0)
    assert all(p.pick(eps) is queued for _ in range(200))  # stale: 0 inflight vs 1
    for _ in range(2):
        p.started(queued)
    assert all(p.pick(eps) is not queued for _ in range(200))  # 2 inflight vs 1


def test_load_aware_gives_endpoints_without_reports_traffic() -> None:
    clock = FakeClock()
    p = LoadAware(clock=clock, rng=random.Random(4))
    eps = endpoints(1, 1, 1, 1, 1)
    backends = {e.address: FakeBackend(busy=2) for e in eps}
    for e in eps[:3]:
        set_load(p, e, backends[e.address].report())
    new = eps[3:]  # just added: no report yet
    counts = simulate(p, backends, eps, clock, 1000)
    assert all(counts[e.address] > 0.1 * 1000 for e in new)
    # Backends that never send ORCA: inflight alone, so traffic spreads evenly.
    fresh = endpoints(1, 1)
    quiet = LoadAware(clock=clock, rng=random.Random(4))
    silent = {e.address: FakeBackend() for e in fresh}
    counts = simulate(quiet, silent, fresh, clock, 1000, reports=False)
    assert all(c > 400 for c in counts.values())


def test_load_aware_breaks_ties_randomly() -> None:
    p = LoadAware(clock=FakeClock(), rng=random.Random(4))
    eps = endpoints(1, 1, 1, 1)
    counts = Counter(p.pick(eps).address for _ in range(4000))
    assert all(c == pytest.approx(1000, rel=0.1) for c in counts.values())


def test_load_aware_prefers_the_faster_of_equally_loaded() -> None:
    clock = FakeClock()
    p = LoadAware(clock=clock, rng=random.Random(4))
    fast, slow = endpoints(1, 1)
    set_load(p, fast, report(active=2), latency=1.0)
    set_load(p, slow, report(active=2), latency=3.0)
    assert all(p.pick([fast, slow]) is fast for _ in range(50))


# -- factory, validation, repr ------------------------------------------------------------


def test_make_picker_knows_every_algorithm() -> None:
    expected = {
        "round_robin": RoundRobin,
        "weighted_round_robin": WeightedRoundRobin,
        "least_connections": LeastConnections,
        "latency": Latency,
        "random": Random,
        "load_aware": LoadAware,
    }
    assert set(ALGORITHMS) == set(expected)
    for name, cls in expected.items():
        p = make_picker(name)
        assert isinstance(p, cls) and p.name == name
        assert repr(p).startswith(f"<{cls.__name__}") and len(repr(p)) < 80
    with pytest.raises(
        ValueError, match=r"unknown load-balancing algorithm 'fastest'.*round_robin"
    ):
        make_picker("fastest")


def test_bad_values_are_rejected() -> None:
    with pytest.raises(ValueError, match="weight must be at least 1, got 0 for h:1"):
        Endpoint("h:1", 0)
    with pytest.raises(ValueError, match="address must not be empty"):
        Endpoint("")
    with pytest.raises(ValueError, match="decay must be a positive"):
        Latency(decay=0)
    with pytest.raises(ValueError, match="stale_after must be a positive"):
        LoadAware(stale_after=0)


def test_endpoint_repr_is_short() -> None:
    ep = Endpoint("127.0.0.1:9000")
    assert repr(ep) == "<Endpoint 127.0.0.1:9000 w=1 inflight=0>"
    p = picker("load_aware")
    for _ in range(4):
        p.started(ep)
    p.finished(ep, latency=0.12, ok=True, load=report(active=4, queue=2))
    assert repr(ep) == "<Endpoint 127.0.0.1:9000 w=1 inflight=3 q=2 ewma=120ms>"
