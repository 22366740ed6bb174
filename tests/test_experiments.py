"""A/B experiments: the statistics (against textbook values and hand computations, plus
properties), the audit fields and metrics of experiment calls and their cost, and
`aimesh experiments report` over files written by the real audit sink, in process and
as a command."""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from aimesh.interceptors.base import AttemptFact, CallFacts
from aimesh.interceptors.events import CallEnded
from aimesh.mesh.observability import experiments as ex
from aimesh.mesh.observability.audit import AuditLog, AuditSettings, record
from aimesh.mesh.observability.audit_report import build as build_audit
from aimesh.mesh.observability.audit_report import render_table as render_audit
from aimesh.mesh.observability.audit_report import run as run_audit
from aimesh.mesh.observability.metrics import ProxyMetrics

OK = grpc.StatusCode.OK
STREAM = "/aimesh.inference.v1.Inference/GenerateStream"

# -- statistics: textbook values ----------------------------------------------------------


def test_two_proportion_z_test_textbook() -> None:
    # OpenIntro Statistics (4th ed., 6.2.3), the mammogram trial: 500 of 44,925 deaths
    # with mammograms, 505 of 44,910 without: no significant difference. Unrounded,
    # Z = -0.1639 and p = 0.8698 (the book rounds along the way: Z about -0.17, p 0.87).
    r = ex.two_proportion_z(500, 44_925, 505, 44_910)
    assert r.statistic == pytest.approx(-0.1639, abs=5e-4)
    assert round(r.statistic, 2) == -0.16 and r.p == pytest.approx(0.8698, abs=5e-4)
    assert not r.significant(0.95)
    # By hand: 30/100 vs 20/100, pooled 0.25, SE = sqrt(0.25 * 0.75 * 0.02) = 0.0612372,
    # z = 0.1 / SE = 1.63299, p = 2 * (1 - Phi(1.63299)) = 0.10247.
    r = ex.two_proportion_z(30, 100, 20, 100)
    assert r.statistic == pytest.approx(1.63299, abs=1e-5)
    assert r.p == pytest.approx(0.10247, abs=1e-5)
    # The same rates over 200 calls each: z = 0.1 / sqrt(0.25 * 0.75 * 0.01) = 2.3094,
    # p = 0.020921: significant at 95%, not at 99%.
    r = ex.two_proportion_z(60, 200, 40, 200)
    assert r.p == pytest.approx(0.020921, abs=1e-6)
    assert r.significant(0.95) and not r.significant(0.99)
    assert ex.two_proportion_z(0, 10, 0, 20).p == 1.0  # nothing failed anywhere
    assert ex.two_proportion_z(10, 10, 20, 20).p == 1.0
    with pytest.raises(ValueError):
        ex.two_proportion_z(1, 0, 1, 2)
    with pytest.raises(ValueError):
        ex.two_proportion_z(3, 2, 1, 2)


def test_mann_whitney_by_hand() -> None:
    # No overlap: ranks of a = 1, 2, 3, R = 6, U = 6 - 3*4/2 = 0; mean 9/2 = 4.5,
    # variance 3*3*7/12 = 5.25, z = (0 - 4.5 + 0.5) / sqrt(5.25) = -1.74574,
    # p = 2 * (1 - Phi(1.74574)) = 0.080856.
    r = ex.mann_whitney_u([1, 2, 3], [4, 5, 6])
    assert r.u == 0.0
    assert r.statistic == pytest.approx(-1.745743, abs=1e-6)
    assert r.p == pytest.approx(0.080856, abs=1e-6)
    # Interleaved: a = 1, 3, 5 against b = 2, 4, 6, 8: a beats b in (3,2), (5,2), (5,4),
    # U = 3; ranks of a 1, 3, 5, R = 9, U = 9 - 6 = 3.
    assert ex.mann_whitney_u([1, 3, 5], [2, 4, 6, 8]).u == 3.0
    # Ties: a = 1, 2, 2 and b = 2, 3. Ranks 1, (2, 3, 4 -> 3, 3, 3), 5: R = 1 + 3 + 3 = 7,
    # U = 7 - 6 = 1 (the pairs: (2,2) twice a half each). One tie group of 3:
    # sum(t^3 - t) = 24; variance 3*2/12 * (6 - 24 / (5*4)) = 2.4; mean 3;
    # z = (1 - 3 + 0.5) / sqrt(2.4) = -0.968246, p = 0.332922.
    r = ex.mann_whitney_u([1, 2, 2], [2, 3])
    assert r.u == 1.0
    assert r.statistic == pytest.approx(-0.968246, abs=1e-6)
    assert r.p == pytest.approx(0.332922, abs=1e-6)
    # Every value the same: nothing to tell them apart.
    assert ex.mann_whitney_u([5, 5], [5, 5, 5]).p == 1.0
    with pytest.raises(ValueError):
        ex.mann_whitney_u([], [1.0])


def test_welch_textbook() -> None:
    # Wikipedia, "Welch's t-test", examples 1 to 3 (t, df, p as printed there).
    a1 = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
    a2 = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]
    r = ex.welch_t(a1, a2)
    assert (round(r.statistic, 2), round(r.df or 0, 1), round(r.p, 3)) == (-2.46, 25.0, 0.021)
    b1 = [17.2, 20.9, 22.6, 18.1, 21.7, 21.4, 23.5, 24.2, 14.7, 21.8]
    b2 = [21.5, 22.8, 21.0, 23.0, 21.6, 23.6, 22.5, 20.7, 23.4, 21.8]
    b2 += [20.7, 21.7, 21.5, 22.5, 23.6, 21.5, 22.5, 23.5, 21.5, 21.8]
    r = ex.welch_t(b1, b2)
    assert (round(r.statistic, 2), round(r.df or 0, 1), round(r.p, 3)) == (-1.57, 9.9, 0.149)
    c1 = [19.8, 20.4, 19.6, 17.8, 18.5, 18.9, 18.3, 18.9, 19.5, 22.0]
    c2 = [28.2, 26.6, 20.1, 23.3, 25.2, 22.1, 17.7, 27.6, 20.6, 13.7]
    c2 += [23.2, 17.5, 20.6, 18.0, 23.9, 21.6, 24.3, 20.4, 23.9, 13.3]
    r = ex.welch_t(c1, c2)
    # (t = -2.2255: printed there as -2.22)
    assert r.statistic == pytest.approx(-2.22, abs=0.01)
    assert (round(r.df or 0, 1), round(r.p, 3)) == (24.5, 0.035)
    # No spread at all.
    assert ex.welch_t([1, 1], [1, 1, 1]).p == 1.0
    same = ex.welch_t([1, 1], [2, 2])
    assert same.p == 0.0 and same.statistic == -math.inf
    with pytest.raises(ValueError):
        ex.welch_t([1.0], [1.0, 2.0])


def test_t_distribution_tails() -> None:
    # Closed forms: df=1 is Cauchy (P(|T| >= 1) = 1/2); df=2: P(|T| >= t) = 1 - t/sqrt(2+t^2).
    assert ex.t_two_sided(1.0, 1) == pytest.approx(0.5, abs=1e-12)
    assert ex.t_two_sided(2.0, 2) == pytest.approx(1 - 2 / math.sqrt(6), abs=1e-12)
    assert ex.t_two_sided(0.0, 7) == 1.0
    # Tables: the two-sided 5% critical values.
    assert ex.t_two_sided(12.706, 1) == pytest.approx(0.05, abs=1e-4)
    assert ex.t_two_sided(2.228, 10) == pytest.approx(0.05, abs=1e-4)
    assert ex.t_two_sided(2.042, 30) == pytest.approx(0.05, abs=1e-4)
    # Large df: the normal's tail (and still converging quickly).
    for df in (1e4, 1e6, 1e9):
        assert ex.t_two_sided(1.96, df) == pytest.approx(ex.normal_two_sided(1.96), abs=2e-4)
    assert ex.normal_two_sided(1.959964) == pytest.approx(0.05, abs=1e-6)
    assert ex.normal_two_sided(0.0) == 1.0
    # I_x(a, b) = 1 - I_{1-x}(b, a); I_x(1, 1) = x; I_x(a, 1) = x^a.
    assert ex.betainc(2.5, 4.0, 0.3) == pytest.approx(1 - ex.betainc(4.0, 2.5, 0.7), abs=1e-13)
    assert ex.betainc(1, 1, 0.37) == pytest.approx(0.37, abs=1e-13)
    assert ex.betainc(3, 1, 0.5) == pytest.approx(0.125, abs=1e-13)


# -- statistics: properties -------------------------------------------------------------------

samples = st.lists(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False),
    min_size=1,
    max_size=40,
)
small_ints = st.lists(st.integers(0, 5).map(float), min_size=1, max_size=30)  # many ties


@given(st.integers(1, 500), st.integers(1, 500), st.data())
def test_z_test_properties(n1: int, n2: int, data: st.DataObject) -> None:
    x1 = data.draw(st.integers(0, n1))
    x2 = data.draw(st.integers(0, n2))
    r = ex.two_proportion_z(x1, n1, x2, n2)
    swapped = ex.two_proportion_z(x2, n2, x1, n1)
    assert 0.0 <= r.p <= 1.0
    assert r.p == pytest.approx(swapped.p) and r.statistic == pytest.approx(-swapped.statistic)
    # Failures and successes are the same question.
    assert r.p == pytest.approx(ex.two_proportion_z(n1 - x1, n1, n2 - x2, n2).p)


@given(st.one_of(samples, small_ints), st.one_of(samples, small_ints))
def test_mann_whitney_properties(a: list[float], b: list[float]) -> None:
    r = ex.mann_whitney_u(a, b)
    swapped = ex.mann_whitney_u(b, a)
    assert 0.0 <= r.p <= 1.0
    assert r.p == pytest.approx(swapped.p) and r.statistic == pytest.approx(-swapped.statistic)
    assert r.u is not None and swapped.u is not None
    assert r.u + swapped.u == len(a) * len(b)
    # U counts the pairs a > b, ties a half.
    pairs = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x in a for y in b)
    assert r.u == pytest.approx(pairs)
    # Ranks only: an order-preserving transformation changes nothing (x 8 is exact in
    # floating point), an order-reversing one flips the sign.
    scaled = ex.mann_whitney_u([x * 8 for x in a], [y * 8 for y in b])
    assert (scaled.u, scaled.p) == (r.u, r.p)
    flipped = ex.mann_whitney_u([-x for x in a], [-y for y in b])
    assert flipped.p == pytest.approx(r.p) and flipped.statistic == pytest.approx(-r.statistic)


@given(
    st.lists(st.floats(0, 1e4, allow_nan=False), min_size=2, max_size=40),
    st.lists(st.floats(0, 1e4, allow_nan=False), min_size=2, max_size=40),
)
def test_welch_properties(a: list[float], b: list[float]) -> None:
    r = ex.welch_t(a, b)
    swapped = ex.welch_t(b, a)
    assert 0.0 <= r.p <= 1.0
    assert r.p == pytest.approx(swapped.p)
    if math.isfinite(r.statistic):
        assert r.statistic == pytest.approx(-swapped.statistic)
    # Shifting both samples alike changes nothing.
    shifted = ex.welch_t([x + 100 for x in a], [y + 100 for y in b])
    assert shifted.p == pytest.approx(r.p, abs=1e-6)


@given(st.floats(0, 50, allow_nan=False), st.floats(0.5, 1e7, allow_nan=False))
def test_t_tail_properties(t: float, df: float) -> None:
    p = ex.t_two_sided(t, df)
    assert 0.0 <= p <= 1.0
    assert ex.t_two_sided(-t, df) == p
    assert ex.t_two_sided(t + 0.5, df) <= p + 1e-12  # further out, less likely
    assert p >= ex.normal_two_sided(t) - 1e-9  # t's tails are heavier than the normal's


def test_tests_hold_their_level() -> None:
    """Under the null (both arms drawn alike), about 5% of experiments come out
    significant at 95%: not many more (the tests are not too eager)."""
    rng = random.Random(7)
    runs, hits = 300, {"z": 0, "mw": 0, "welch": 0}
    for _ in range(runs):
        a = [rng.lognormvariate(5, 0.6) for _ in range(60)]
        b = [rng.lognormvariate(5, 0.6) for _ in range(80)]
        ea = sum(rng.random() < 0.1 for _ in range(200))
        eb = sum(rng.random() < 0.1 for _ in range(250))
        hits["z"] += ex.two_proportion_z(ea, 200, eb, 250).significant(0.95)
        hits["mw"] += ex.mann_whitney_u(a, b).significant(0.95)
        hits["welch"] += ex.welch_t(a, b).significant(0.95)
    for name, n in hits.items():
        assert 0.01 <= n / runs <= 0.09, (name, n)


# -- what the proxy's sinks record ------------------------------------------------------------


def event(
    *,
    at: float,
    experiment: str = "",
    arm: str = "",
    code: grpc.StatusCode = OK,
    latency: float = 0.4,
    ttft: float | None = None,
    tokens: tuple[int, int] = (12, 60),
    model: str = "gpt-4",
    served_model: str = "",
    cost: float = 0.0,
    service: str = "gpt4-gateway",
) -> CallEnded:
    """A finished call as the proxy hands it to its sinks."""
    ns = int(at * 1e9)
    facts = CallFacts(
        route="ab-prompt" if experiment else f"model:{model}",
        model=model,
        tokens_in=tokens[0],
        tokens_out=tokens[1],
        served_model=served_model or model,
        cost_usd=cost,
        experiment=experiment,
        arm=arm,
    )
    if ttft is not None:
        facts.first_token_ns = ns + int(ttft * 1e9)
    end = ns + int(latency * 1e9)
    facts.attempts.append(AttemptFact(service, "10.0.0.1:50051", "first", ns, end, code))
    return CallEnded(
        STREAM, code, latency, "rid", "ipv4:127.0.0.1:1", facts, ns, "" if code is OK else "boom"
    )


def test_audit_records_model_cost_and_arm() -> None:
    now = time.time()
    plain = record(event(at=now))
    assert plain["served_model"] is None and plain["cost_usd"] is None
    assert plain["experiment"] is None and plain["arm"] is None
    rec = record(
        event(
            at=now,
            experiment="prompt-v2",
            arm="treatment",
            served_model="gpt-4o",
            cost=0.00123456789,
        )
    )
    assert rec["model"] == "gpt-4" and rec["served_model"] == "gpt-4o"
    assert rec["cost_usd"] == 0.001235
    assert (rec["experiment"], rec["arm"]) == ("prompt-v2", "treatment")
    # An arm without an experiment is not one.
    assert record(event(at=now, arm="gpt4-gateway"))["arm"] is None
    # The fields sit after the route, before `resumed`.
    keys = list(rec)
    assert keys.index("route") + 1 == keys.index("served_model")
    assert keys[-5:] == ["served_model", "cost_usd", "experiment", "arm", "resumed"]


def scrape(registry: CollectorRegistry) -> list[Any]:
    text = generate_latest(registry).decode()
    return [s for f in text_string_to_metric_families(text) for s in f.samples]


def value(samples: list[Any], name: str, **labels: str) -> float:
    found = [
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert found, f"no sample {name}{labels}"
    return float(sum(found))


def test_metrics_cost_and_experiment_counters() -> None:
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry)
    now = time.time()
    metrics(event(at=now, served_model="gpt-4o", cost=0.25))
    metrics(event(at=now, served_model="gpt-4o", cost=0.5, experiment="p2", arm="treatment"))
    metrics(event(at=now, cost=0.125, experiment="p2", arm="control"))
    failed = event(at=now, code=grpc.StatusCode.UNAVAILABLE, experiment="p2", arm="treatment")
    metrics(failed)
    metrics(event(at=now))  # no price, no experiment: neither counter moves
    samples = scrape(registry)
    cost = "aimesh_cost_usd_total"
    assert value(samples, cost, service="gpt4-gateway", model="gpt-4o") == 0.75
    assert value(samples, cost, service="gpt4-gateway", model="gpt-4") == 0.125
    assert {s.labels["model"] for s in samples if s.name == cost} == {"gpt-4o", "gpt-4"}
    exp = "aimesh_experiment_requests_total"
    assert value(samples, exp, experiment="p2", arm="treatment", code="OK") == 1
    assert value(samples, exp, experiment="p2", arm="treatment", code="UNAVAILABLE") == 1
    assert value(samples, exp, experiment="p2", arm="control", code="OK") == 1
    assert value(samples, exp) == 3


# -- the report over real audit files --------------------------------------------------------

EXPERIMENT = "prompt-v2"


def write_arms(
    path: Path,
    arms: dict[str, tuple[int, float, float, float]],
    seed: int,
    at: float | None = None,
) -> None:
    """Audit records of an experiment, written by the real sink. Each arm: (calls, error
    rate, median latency in seconds, price per output token)."""
    rng = random.Random(seed)
    sink = AuditLog(AuditSettings(str(path)))
    start = time.time() - 600 if at is None else at
    events: list[CallEnded] = []
    for name, (calls, error_rate, median, price) in arms.items():
        for _ in range(calls):
            failed = rng.random() < error_rate
            latency = rng.lognormvariate(math.log(median), 0.4)
            out = rng.randint(40, 80)
            events.append(
                event(
                    at=start + rng.random() * 300,
                    experiment=EXPERIMENT,
                    arm=name,
                    code=grpc.StatusCode.UNAVAILABLE if failed else OK,
                    latency=latency,
                    ttft=latency * 0.2,
                    tokens=(12, out),
                    cost=out * price,
                )
            )
    rng.shuffle(events)  # the arms' calls interleave, as traffic does
    for ev in events:
        sink(ev)
    sink(event(at=start, experiment="other-test", arm="a"))  # another experiment
    sink(event(at=start))  # and a call outside any
    sink.close()


def report_args(path: Path, **kw: Any) -> argparse.Namespace:
    base: dict[str, Any] = dict(
        name=EXPERIMENT, file=[str(path)], since=None, control=None, confidence=0.95
    )
    base.update(output="json")
    base.update(kw)
    return argparse.Namespace(**base)


def run_json(path: Path, **kw: Any) -> dict[str, Any]:
    out, err = io.StringIO(), io.StringIO()
    assert ex.run(report_args(path, **kw), out, err) == 0, err.getvalue()
    data: dict[str, Any] = json.loads(out.getvalue())
    return data


def test_report_finds_a_real_difference(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    # control: 2% errors, 400 ms; treatment: 9% errors, 300 ms, a dearer model.
    write_arms(
        log, {"control": (600, 0.02, 0.4, 1e-5), "treatment": (500, 0.09, 0.3, 3e-5)}, seed=1
    )
    data = run_json(log)
    assert data["experiment"] == EXPERIMENT and data["control"] == "control"  # most calls
    assert data["records"] == 1100 and data["other_experiments"] == {"other-test": 1}
    control, treatment = data["arms"]
    assert (control["arm"], control["calls"], treatment["arm"], treatment["calls"]) == (
        "control",
        600,
        "treatment",
        500,
    )
    assert control["error_rate"] < 0.04 < 0.06 < treatment["error_rate"]
    assert treatment["latency_ms"]["p50"] < control["latency_ms"]["p50"]
    assert treatment["ttft_ms"]["p50"] < control["ttft_ms"]["p50"]
    assert control["tokens_in_per_call"] == 12.0
    assert 40 <= control["tokens_out_per_call"] <= 80
    assert treatment["cost_per_call_usd"] > 2 * control["cost_per_call_usd"] > 0
    assert control["cost_usd"] == pytest.approx(control["cost_per_call_usd"] * 600, rel=1e-5)
    [c] = data["comparisons"]
    assert (c["arm"], c["control"]) == ("treatment", "control")
    assert c["error_rate"]["significant"] and c["error_rate"]["p"] < 0.001
    assert c["error_rate"]["difference"] > 0.04
    assert c["latency"]["significant"] and c["latency"]["prob_slower"] < 0.4
    assert c["cost_per_call"]["significant"] and c["cost_per_call"]["difference_usd"] > 0
    assert data["warnings"] == [] and data["malformed"] == 0

    out = io.StringIO()
    assert ex.run(report_args(log, output="table"), out, io.StringIO()) == 0
    table = out.getvalue()
    print(table)
    assert "treatment vs control" in table and "ARM" in table and "$/CALL" in table
    assert table.count("significant at 95%") == 3 and "not significant" not in table

    # --control flips the comparison; --confidence is printed as asked.
    flipped = run_json(log, control="treatment", confidence=0.99)
    assert flipped["control"] == "treatment" and flipped["confidence"] == 0.99
    [c2] = flipped["comparisons"]
    assert c2["arm"] == "control" and c2["error_rate"]["difference"] < 0
    assert c2["error_rate"]["p"] == pytest.approx(c["error_rate"]["p"])
    out = io.StringIO()
    assert ex.run(report_args(log, output="table", confidence=0.99), out, io.StringIO()) == 0
    assert "significant at 99%" in out.getvalue()


def test_report_sees_no_difference_between_like_arms(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    write_arms(log, {"a": (400, 0.05, 0.4, 1e-5), "b": (400, 0.05, 0.4, 1e-5)}, seed=2)
    data = run_json(log, control="a")
    [c] = data["comparisons"]
    for test in ("error_rate", "latency", "cost_per_call"):
        assert not c[test]["significant"], (test, c[test])
        assert 0.05 <= c[test]["p"] <= 1.0
    out = io.StringIO()
    assert ex.run(report_args(log, output="table", control="a"), out, io.StringIO()) == 0
    table = out.getvalue()
    assert table.count("not significant (p=") == 3 and "significant at" not in table


def test_report_warns_about_small_arms_and_reads_rotations(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    old = time.time() - 3 * 3600
    write_arms(Path(f"{log}.1"), {"control": (50, 0.0, 0.4, 0.0)}, seed=3, at=old)
    write_arms(log, {"control": (40, 0.0, 0.4, 0.0), "tiny": (5, 0.0, 0.4, 0.0)}, seed=4)
    with log.open("a") as f:
        f.write("not a record\n")
    data = run_json(log)
    assert [(a["arm"], a["calls"]) for a in data["arms"]] == [("control", 90), ("tiny", 5)]
    assert data["malformed"] == 1 and data["malformed_at"] == [f"{log}:48"]
    assert data["warnings"] == [
        "arm 'tiny' has 5 calls, fewer than 30: its comparisons are unreliable"
    ]
    # No prices: no cost, no cost test.
    assert data["arms"][0]["cost_usd"] is None and data["comparisons"][0]["cost_per_call"] is None
    hour = run_json(log, since="1h")
    assert [(a["arm"], a["calls"]) for a in hour["arms"]] == [("control", 40), ("tiny", 5)]
    assert hour["older_skipped"] == 52  # 50 of the experiment and 2 others
    out = io.StringIO()
    assert ex.run(report_args(log, output="table"), out, io.StringIO()) == 0
    table = out.getvalue()
    assert "warning: arm 'tiny' has 5 calls" in table and "1 malformed lines skipped" in table
    # One arm: a table, nothing to compare.
    out = io.StringIO()
    assert ex.run(report_args(Path(f"{log}.1"), output="table"), out, io.StringIO()) == 0
    assert "only one arm: nothing to compare" in out.getvalue()


def test_audit_report_sums_cost(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    sink = AuditLog(AuditSettings(str(log)))
    now = time.time()
    sink(event(at=now, cost=0.25))
    sink(event(at=now, cost=0.5, served_model="gpt-4o", experiment="p", arm="x"))
    sink(event(at=now, code=grpc.StatusCode.UNAVAILABLE))  # no cost
    sink(event(at=now, model="claude", service="claude-gateway"))  # unpriced
    sink.close()
    report = build_audit([log], by=("model",))
    total = report.total.summary()
    assert total["cost_usd"] == 0.75 and total["cost_per_call_usd"] == 0.1875
    groups = {k[0]: g.summary() for k, g in report.groups.items()}
    assert groups["gpt-4"]["cost_usd"] == 0.75 and groups["gpt-4"]["cost_per_call_usd"] == 0.25
    assert groups["claude"]["cost_usd"] is None and groups["claude"]["cost_per_call_usd"] is None
    by_arm = build_audit([log], by=("experiment", "arm", "served_model"))
    assert {k: g.calls for k, g in by_arm.groups.items()} == {
        ("-", "-", "-"): 3,
        ("p", "x", "gpt-4o"): 1,
    }
    out = io.StringIO()
    render_audit(report, out)
    lines = out.getvalue().splitlines()
    assert "COST $" in lines[2] and "$/CALL" in lines[2]
    assert "0.750000" in lines[-3] and "0.187500" in lines[-3]  # the TOTAL row
    out = io.StringIO()
    args = argparse.Namespace(file=[str(log)], since=None, by="model", output="json")
    assert run_audit(args, out, io.StringIO()) == 0
    assert json.loads(out.getvalue())["total"]["cost_usd"] == 0.75


# -- the command ---------------------------------------------------------------------------


def aimesh(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "AIMESH_AUDIT_LOG"}
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "aimesh.mesh.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=environ,
    )


@pytest.mark.slow
def test_command_and_exit_codes(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    write_arms(
        log, {"control": (300, 0.02, 0.4, 1e-5), "treatment": (300, 0.12, 0.4, 1e-5)}, seed=5
    )
    done = aimesh("experiments", "report", EXPERIMENT, "--file", str(log), "-o", "json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert [a["arm"] for a in data["arms"]] == ["control", "treatment"]
    [c] = data["comparisons"]
    assert c["error_rate"]["significant"] and not c["latency"]["significant"]
    # $AIMESH_AUDIT_LOG is the default file; the table is the default output.
    table = aimesh("experiments", "report", EXPERIMENT, env={"AIMESH_AUDIT_LOG": str(log)})
    assert table.returncode == 0 and "treatment vs control" in table.stdout, table.stderr
    assert "significant at 95%" in table.stdout and "not significant (p=" in table.stdout

    # 1: no records of that experiment; the message names those there are.
    missing = aimesh("experiments", "report", "nope", "--file", str(log))
    assert missing.returncode == 1 and missing.stdout == ""
    assert "no records for experiment 'nope'" in missing.stderr
    assert "experiments found: other-test (1 calls), prompt-v2 (600 calls)" in missing.stderr
    gone = aimesh("experiments", "report", EXPERIMENT, "--file", str(tmp_path / "none.log"))
    assert gone.returncode == 1 and "no audit files" in gone.stderr
    arm = aimesh("experiments", "report", EXPERIMENT, "--file", str(log), "--control", "x")
    assert arm.returncode == 1 and "arms found: control, treatment" in arm.stderr

    # 2: usage.
    for argv in (
        ["experiments", "report"],  # no NAME
        ["experiments", "report", EXPERIMENT],  # no file, no $AIMESH_AUDIT_LOG
        ["experiments", "report", EXPERIMENT, "--file", str(log), "--since", "soon"],
        ["experiments", "report", EXPERIMENT, "--file", str(log), "--confidence", "95"],
        ["experiments", "report", EXPERIMENT, "--file", str(log), "--confidence", "high"],
        ["experiments", "report", EXPERIMENT, "--file", str(log), "-o", "yaml"],
    ):
        bad = aimesh(*argv)
        assert bad.returncode == 2, (argv, bad.stderr)
        assert bad.stderr and bad.stdout == ""
