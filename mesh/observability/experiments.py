"""`aimesh experiments report NAME`: how the arms of an A/B experiment compare.

A traffic policy that names an `experiment` labels each call it routes with the
experiment and the arm (route) it went to; the audit trail records both. This reads the
audit files as `aimesh audit report` does (rotations, `--since`, malformed lines counted,
never fatal), keeps the experiment's calls and, per arm: calls, errors and their rate,
p50/p95 latency and p50 time to first token (calls that ended OK), mean tokens in and
out per call, cost (total and per call).

Each arm is then compared with the control arm (`--control`, else the arm with the most
calls):

- error rate: two-proportion z-test (pooled), two-sided;
- latency: Mann-Whitney U test (normal approximation, tie and continuity corrections),
  two-sided: latencies are skewed and heavy-tailed, so ranks rather than means;
- cost per call: Welch's t-test (unequal variances), two-sided, when both arms have costs.

The statistics are plain functions on numbers (`two_proportion_z`, `mann_whitney_u`,
`welch_t`, with `normal_two_sided` and `t_two_sided` for p-values: the Student t tail
via the regularized incomplete beta function, a continued fraction), math only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .audit_report import (
    EXIT_NO_DATA,
    EXIT_OK,
    EXIT_USAGE,
    NONE,
    Skipped,
    add_source_flags,
    expand,
    number,
    parse_since,
    percentile,
    read_records,
    usd,
)
from .audit_report import _human as human
from .audit_report import _iso as iso
from .audit_report import _ms as ms

MIN_CALLS = 30  # fewer calls in an arm than this: its comparisons get a warning


# -- statistics ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """A two-sided test's statistic and p-value (plus df for t, U for Mann-Whitney)."""

    name: str
    statistic: float  # z for the z-test and Mann-Whitney, t for Welch
    p: float
    df: float | None = None  # Welch's degrees of freedom
    u: float | None = None  # Mann-Whitney: U of the first sample

    def significant(self, confidence: float) -> bool:
        return self.p < 1.0 - confidence


def normal_two_sided(z: float) -> float:
    """P(|Z| >= |z|) for a standard normal Z."""
    if math.isnan(z):
        return 1.0
    return min(1.0, math.erfc(abs(z) / math.sqrt(2.0)))


def two_proportion_z(x1: int, n1: int, x2: int, n2: int) -> Outcome:
    """Are x1/n1 and x2/n2 the same proportion? Pooled two-proportion z-test, z of
    (x1/n1 - x2/n2). Identical samples of all successes (or none) give z=0, p=1."""
    if n1 <= 0 or n2 <= 0:
        raise ValueError("both samples need at least one observation")
    if not (0 <= x1 <= n1 and 0 <= x2 <= n2):
        raise ValueError("successes must be between 0 and the sample size")
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2))
    diff = x1 / n1 - x2 / n2
    if se == 0.0:  # both 0% or both 100%: no difference to see
        return Outcome("two-proportion z-test", 0.0, 1.0)
    z = diff / se
    return Outcome("two-proportion z-test", z, normal_two_sided(z))


def mann_whitney_u(a: Sequence[float], b: Sequence[float]) -> Outcome:
    """Do values of `a` tend to be larger or smaller than those of `b`? Mann-Whitney U
    (Wilcoxon rank-sum), normal approximation with the tie correction of the variance
    and a continuity correction of 0.5; `u` is U of `a` (the pairs (x in a, y in b)
    with x > y, ties counting a half), `statistic` its z (positive: `a` larger)."""
    n1, n2 = len(a), len(b)
    if n1 == 0 or n2 == 0:
        raise ValueError("both samples need at least one observation")
    pooled = sorted([(float(v), 0) for v in a] + [(float(v), 1) for v in b])
    n = n1 + n2
    rank_sum = 0.0  # of `a`
    ties = 0.0  # sum of t^3 - t over groups of tied values
    i = 0
    while i < n:
        j = i
        in_a = 0
        while j < n and pooled[j][0] == pooled[i][0]:
            in_a += pooled[j][1] == 0
            j += 1
        t = j - i
        rank_sum += in_a * (i + 1 + j) / 2.0  # the tied values share the mean rank
        ties += t**3 - t
        i = j
    u = rank_sum - n1 * (n1 + 1) / 2.0
    mean = n1 * n2 / 2.0
    var = n1 * n2 / 12.0 * ((n + 1) - ties / (n * (n - 1))) if n > 1 else 0.0
    if var <= 0.0:  # every value the same
        return Outcome("Mann-Whitney U", 0.0, 1.0, u=u)
    d = u - mean
    z = math.copysign(max(0.0, abs(d) - 0.5), d) / math.sqrt(var)
    return Outcome("Mann-Whitney U", z, normal_two_sided(z), u=u)


def mean_var(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample variance (n - 1)."""
    n = len(values)
    mean = math.fsum(values) / n
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, var


def welch_t(a: Sequence[float], b: Sequence[float]) -> Outcome:
    """Do `a` and `b` have the same mean? Welch's t-test (unequal variances), t of
    mean(a) - mean(b), Welch-Satterthwaite degrees of freedom. Two samples without any
    spread: p=1 if their means are equal, else 0 (t infinite)."""
    n1, n2 = len(a), len(b)
    if n1 < 2 or n2 < 2:
        raise ValueError("both samples need at least two observations")
    m1, v1 = mean_var(a)
    m2, v2 = mean_var(b)
    s1, s2 = v1 / n1, v2 / n2
    se2 = s1 + s2
    if se2 == 0.0:
        if m1 == m2:
            return Outcome("Welch t-test", 0.0, 1.0, df=float(n1 + n2 - 2))
        return Outcome("Welch t-test", math.copysign(math.inf, m1 - m2), 0.0)
    t = (m1 - m2) / math.sqrt(se2)
    df = se2**2 / (s1**2 / (n1 - 1) + s2**2 / (n2 - 1))
    return Outcome("Welch t-test", t, t_two_sided(t, df), df=df)


def t_two_sided(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with `df` degrees of freedom (df > 0, not
    necessarily whole): I_x(df/2, 1/2) with x = df / (df + t^2)."""
    if df <= 0 or math.isnan(df):
        raise ValueError("degrees of freedom must be positive")
    if math.isnan(t):
        return 1.0
    if math.isinf(t):
        return 0.0
    t2 = t * t
    # x and 1 - x both computed directly: for large df, x is within rounding of 1.
    p = betainc(df / 2.0, 0.5, df / (df + t2), t2 / (df + t2))
    return min(1.0, max(0.0, p))


def betainc(a: float, b: float, x: float, y: float | None = None) -> float:
    """The regularized incomplete beta function I_x(a, b), a, b > 0, 0 <= x <= 1, by its
    continued fraction (modified Lentz), on the side of x where it converges fast.
    `y`: 1 - x, when the caller has it more precisely than 1 - x would."""
    if a <= 0 or b <= 0:
        raise ValueError("a and b must be positive")
    y = 1.0 - x if y is None else y
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    log_x = math.log1p(-y) if y < 0.5 else math.log(x)
    log_y = math.log1p(-x) if x < 0.5 else math.log(y)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * log_x + b * log_y)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, y) / b


def _beta_fraction(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 100_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))  # the even step
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))  # the odd step
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta did not converge (a={a}, b={b}, x={x})")


# -- the report -----------------------------------------------------------------------------


@dataclass
class Arm:
    name: str
    calls: int = 0
    errors: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)  # calls that ended OK
    ttfts: list[float] = field(default_factory=list)  # streams that ended OK
    tokens_in: int = 0
    tokens_out: int = 0
    costs: list[float] = field(default_factory=list)  # per call, 0 when it has none
    priced: int = 0  # calls whose record has a cost

    def add(self, rec: dict[str, Any]) -> None:
        self.calls += 1
        status = str(rec.get("status") or "UNKNOWN")
        ok = status == "OK"
        if not ok:
            self.errors += 1
            self.statuses[status] = self.statuses.get(status, 0) + 1
        self.tokens_in += int(number(rec.get("tokens_in")) or 0)
        self.tokens_out += int(number(rec.get("tokens_out")) or 0)
        cost = number(rec.get("cost_usd"))
        if cost is not None:
            self.priced += 1
        self.costs.append(cost or 0.0)
        if ok:
            latency = number(rec.get("latency_ms"))
            if latency is not None:
                self.latencies.append(latency)
            ttft = number(rec.get("ttft_ms"))
            if ttft is not None:
                self.ttfts.append(ttft)

    @property
    def error_rate(self) -> float:
        return self.errors / self.calls if self.calls else 0.0

    @property
    def cost_usd(self) -> float | None:
        return math.fsum(self.costs) if self.priced else None

    @property
    def cost_per_call(self) -> float | None:
        total = self.cost_usd
        return total / self.calls if total is not None and self.calls else None

    def summary(self) -> dict[str, Any]:
        lat, ttft = sorted(self.latencies), sorted(self.ttfts)
        per_call = self.cost_per_call
        total = self.cost_usd
        return {
            "arm": self.name,
            "calls": self.calls,
            "errors": self.errors,
            "error_rate": round(self.error_rate, 6),
            "latency_ms": {"p50": percentile(lat, 0.5), "p95": percentile(lat, 0.95)},
            "ttft_ms": {"p50": percentile(ttft, 0.5)},
            "tokens_in_per_call": round(self.tokens_in / self.calls, 3) if self.calls else None,
            "tokens_out_per_call": round(self.tokens_out / self.calls, 3) if self.calls else None,
            "cost_usd": round(total, 6) if total is not None else None,
            "cost_per_call_usd": round(per_call, 8) if per_call is not None else None,
            "errors_by_status": dict(sorted(self.statuses.items(), key=lambda kv: -kv[1])),
        }


@dataclass
class Comparison:
    arm: Arm
    control: Arm
    error_rate: Outcome
    latency: Outcome | None  # None: an arm without an OK call
    cost: Outcome | None  # None: an arm without costs, or fewer than 2 calls


def compare(arm: Arm, control: Arm) -> Comparison:
    errors = two_proportion_z(arm.errors, arm.calls, control.errors, control.calls)
    latency = None
    if arm.latencies and control.latencies:
        latency = mann_whitney_u(arm.latencies, control.latencies)
    cost = None
    if arm.priced and control.priced and arm.calls >= 2 and control.calls >= 2:
        cost = welch_t(arm.costs, control.costs)
    return Comparison(arm, control, errors, latency, cost)


@dataclass
class ExperimentReport:
    experiment: str
    files: list[str]
    since: float | None
    confidence: float
    arms: dict[str, Arm] = field(default_factory=dict)
    others: dict[str, int] = field(default_factory=dict)  # calls of other experiments
    skipped: Skipped = field(default_factory=Skipped)
    first: float | None = None
    last: float | None = None
    control_name: str | None = None  # --control; else the arm with the most calls

    def add(self, rec: dict[str, Any], at: float) -> None:
        name = rec.get("experiment")
        if not isinstance(name, str) or not name:
            return
        if name != self.experiment:
            self.others[name] = self.others.get(name, 0) + 1
            return
        label = rec.get("arm")
        arm_name = str(label) if label not in (None, "") else NONE
        arm = self.arms.get(arm_name)
        if arm is None:
            arm = self.arms[arm_name] = Arm(arm_name)
        arm.add(rec)
        self.first = at if self.first is None else min(self.first, at)
        self.last = at if self.last is None else max(self.last, at)

    @property
    def control(self) -> Arm | None:
        if self.control_name is not None:
            return self.arms.get(self.control_name)
        if not self.arms:
            return None
        return min(self.arms.values(), key=lambda a: (-a.calls, a.name))

    def ordered(self) -> list[Arm]:
        """The control first, then the others by calls (most first) and name."""
        control = self.control
        rest = sorted(
            (a for a in self.arms.values() if a is not control), key=lambda a: (-a.calls, a.name)
        )
        return ([control] if control is not None else []) + rest

    def comparisons(self) -> list[Comparison]:
        control = self.control
        if control is None:
            return []
        return [compare(a, control) for a in self.ordered()[1:]]

    def warnings(self) -> list[str]:
        return [
            f"arm {a.name!r} has {a.calls} call{'' if a.calls == 1 else 's'}, fewer than "
            f"{MIN_CALLS}: its comparisons are unreliable"
            for a in self.ordered()
            if a.calls < MIN_CALLS
        ]

    def as_dict(self) -> dict[str, Any]:
        control = self.control
        return {
            "experiment": self.experiment,
            "files": self.files,
            "since_seconds": self.since,
            "from": iso(self.first),
            "to": iso(self.last),
            "confidence": self.confidence,
            "control": control.name if control is not None else None,
            "arms": [a.summary() for a in self.ordered()],
            "comparisons": [self._comparison(c) for c in self.comparisons()],
            "warnings": self.warnings(),
            "records": sum(a.calls for a in self.arms.values()),
            "other_experiments": dict(sorted(self.others.items())),
            "older_skipped": self.skipped.older,
            "malformed": self.skipped.malformed,
            "malformed_at": self.skipped.malformed_at,
        }

    def _comparison(self, c: Comparison) -> dict[str, Any]:
        conf = self.confidence
        out: dict[str, Any] = {"arm": c.arm.name, "control": c.control.name}
        out["error_rate"] = {
            **_test(c.error_rate, conf),
            "difference": round(c.arm.error_rate - c.control.error_rate, 6),
        }
        if c.latency is not None:
            pairs = len(c.arm.latencies) * len(c.control.latencies)
            assert c.latency.u is not None
            out["latency"] = {
                **_test(c.latency, conf),
                "u": c.latency.u,
                # P(a call of the arm is slower than one of the control), ties a half.
                "prob_slower": round(c.latency.u / pairs, 6),
            }
        else:
            out["latency"] = None
        if c.cost is not None:
            per_arm, per_control = c.arm.cost_per_call, c.control.cost_per_call
            assert per_arm is not None and per_control is not None
            out["cost_per_call"] = {
                **_test(c.cost, conf),
                "df": _finite(c.cost.df),
                "difference_usd": round(per_arm - per_control, 8),
            }
        else:
            out["cost_per_call"] = None
        return out


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _test(result: Outcome, confidence: float) -> dict[str, Any]:
    return {
        "test": result.name,
        "statistic": _finite(result.statistic),
        "p": result.p,
        "significant": result.significant(confidence),
    }


def build(
    experiment: str,
    paths: Sequence[Path],
    since: float | None = None,
    now: float | None = None,
    confidence: float = 0.95,
    control: str | None = None,
) -> ExperimentReport:
    """Reads `paths` (as `expand` lists them) into the report of one experiment."""
    now = time.time() if now is None else now
    cutoff = None if since is None else now - since
    report = ExperimentReport(experiment, [str(p) for p in paths], since, confidence)
    report.control_name = control
    for rec, at in read_records(paths, cutoff, report.skipped):
        report.add(rec, at)
    return report


# -- output ---------------------------------------------------------------------------------


def percent(confidence: float) -> str:
    return f"{confidence * 100:g}%"


def verdict(result: Outcome, confidence: float) -> str:
    """'significant at 95% (p=0.0034)' or 'not significant (p=0.31)'."""
    p = _p(result.p)
    if result.significant(confidence):
        return f"significant at {percent(confidence)} (p={p})"
    return f"not significant (p={p})"


def _p(p: float) -> str:
    if p < 0.0001:
        return f"{p:.1e}"
    return f"{p:.4f}" if p < 0.01 else f"{p:.2f}"


def _per_call(total: int, calls: int) -> str:
    return f"{total / calls:,.1f}" if calls else NONE


def render_table(report: ExperimentReport, out: TextIO) -> None:
    window = f"last {human(report.since)}" if report.since is not None else "all records"
    span = f"{iso(report.first)} .. {iso(report.last)}" if report.first is not None else "no calls"
    names = ", ".join(Path(f).name for f in report.files)
    n = len(report.files)
    print(
        f"experiment {report.experiment}, {window}: {span} "
        f"({n} file{'' if n == 1 else 's'}: {names})",
        file=out,
    )
    print("", file=out)
    head = ["ARM", "CALLS", "ERRORS", "ERROR%", "P50 MS", "P95 MS", "P50 TTFT MS"]
    head += ["TOKENS IN/CALL", "TOKENS OUT/CALL", "$/CALL", "COST $"]
    rows = []
    arms = report.ordered()
    for a in arms:
        s = a.summary()
        rows.append(
            [
                a.name,
                f"{a.calls:,}",
                f"{a.errors:,}",
                f"{a.error_rate * 100:.2f}%",
                ms(s["latency_ms"]["p50"]),
                ms(s["latency_ms"]["p95"]),
                ms(s["ttft_ms"]["p50"]),
                _per_call(a.tokens_in, a.calls),
                _per_call(a.tokens_out, a.calls),
                usd(a.cost_per_call),
                usd(a.cost_usd),
            ]
        )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def fmt(r: Sequence[str]) -> str:
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    print(fmt(head), file=out)
    for r in rows:
        print(fmt(r), file=out)
    print("(latency and TTFT: calls that ended OK)", file=out)

    control = report.control
    conf = report.confidence
    if control is not None and len(arms) == 1:
        print("\nonly one arm: nothing to compare", file=out)
    for c in report.comparisons():
        how = "--control" if report.control_name is not None else "the arm with the most calls"
        print(f"\n{c.arm.name} vs {c.control.name} (control: {how}):", file=out)
        a, b = c.arm, c.control
        diff = (a.error_rate - b.error_rate) * 100
        lines = [
            (
                "error rate",
                f"{a.error_rate * 100:.2f}% vs {b.error_rate * 100:.2f}% ({diff:+.2f} pts)",
                f"two-proportion z={c.error_rate.statistic:.2f}",
                verdict(c.error_rate, conf),
            )
        ]
        if c.latency is not None:
            s, t = a.summary(), b.summary()
            pairs = len(a.latencies) * len(b.latencies)
            assert c.latency.u is not None
            lines.append(
                (
                    "latency",
                    f"p50 {ms(s['latency_ms']['p50'])} vs {ms(t['latency_ms']['p50'])} ms",
                    f"Mann-Whitney P(slower)={c.latency.u / pairs:.2f}",
                    verdict(c.latency, conf),
                )
            )
        else:
            lines.append(("latency", "no OK calls in one arm", "", "not tested"))
        if c.cost is not None:
            lines.append(
                (
                    "cost/call",
                    f"${usd(a.cost_per_call)} vs ${usd(b.cost_per_call)}",
                    f"Welch t={c.cost.statistic:.2f}",
                    verdict(c.cost, conf),
                )
            )
        w = [max(len(line[i]) for line in lines) for i in range(3)]
        for line in lines:
            print(
                f"  {line[0].ljust(w[0])}  {line[1].ljust(w[1])}  {line[2].ljust(w[2])}  {line[3]}",
                file=out,
            )
    warnings = report.warnings()
    if warnings:
        print("", file=out)
        for warning in warnings:
            print(f"warning: {warning}", file=out)
    notes = []
    if report.skipped.older:
        notes.append(f"{report.skipped.older:,} older records outside the window")
    if report.skipped.malformed:
        sk = report.skipped
        notes.append(
            f"{sk.malformed:,} malformed lines skipped (at {', '.join(sk.malformed_at)}"
            f"{', ...' if sk.malformed > len(sk.malformed_at) else ''})"
        )
    if notes:
        print("\n" + "; ".join(notes), file=out)


# -- the command ----------------------------------------------------------------------------


def add_parsers(sub: Any) -> None:
    """`aimesh experiments report` (sub: the top-level subparsers)."""
    experiments = sub.add_parser("experiments", help="compare the arms of A/B experiments")
    exp_sub = experiments.add_subparsers(dest="experiments_cmd", metavar="ACTION", required=True)
    report = exp_sub.add_parser(
        "report",
        help="compare an experiment's arms: errors, latency, tokens, cost, significance",
        description="Compare the arms of an experiment from audit files (rotated ones too): "
        "calls, error rate, p50/p95 latency, p50 TTFT, tokens and cost per call, and whether "
        "each arm differs from the control significantly (error rate: two-proportion z-test; "
        "latency: Mann-Whitney U; cost per call: Welch's t-test).",
    )
    report.add_argument(
        "name", metavar="NAME", help="the experiment, as its traffic policy names it"
    )
    add_source_flags(report)
    report.add_argument(
        "--control",
        default=None,
        metavar="ARM",
        help="the arm the others are compared with (default: the arm with the most calls)",
    )
    report.add_argument(
        "--confidence",
        type=float,
        default=0.95,
        metavar="LEVEL",
        help="confidence level of the tests, between 0 and 1 (default 0.95)",
    )
    report.add_argument("-o", "--output", choices=["table", "json"], default="table")


def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    me = "aimesh experiments report"
    files = list(args.file) or (
        [os.environ["AIMESH_AUDIT_LOG"]] if os.environ.get("AIMESH_AUDIT_LOG") else []
    )
    if not files:
        print(f"{me}: give --file PATH (or set AIMESH_AUDIT_LOG)", file=err)
        return EXIT_USAGE
    if not args.name:
        print(f"{me}: name the experiment", file=err)
        return EXIT_USAGE
    confidence = args.confidence
    if not 0.0 < confidence < 1.0:
        print(
            f"{me}: --confidence {confidence:g}: give a level between 0 and 1, e.g. 0.95", file=err
        )
        return EXIT_USAGE
    since = None
    if args.since is not None:
        try:
            since = parse_since(args.since)
        except ValueError as exc:
            print(f"{me}: --since: {exc}", file=err)
            return EXIT_USAGE
    paths = expand(files)
    if not paths:
        print(f"{me}: no audit files at {', '.join(files)}", file=err)
        return EXIT_NO_DATA
    try:
        report = build(args.name, paths, since, confidence=confidence, control=args.control)
    except OSError as exc:
        print(f"{me}: cannot read {exc.filename}: {exc.strerror}", file=err)
        return EXIT_NO_DATA
    window = f" in the last {human(since)}" if since is not None else ""
    if not report.arms:
        found = ", ".join(f"{k} ({v:,} calls)" for k, v in sorted(report.others.items()))
        print(
            f"{me}: no records for experiment {args.name!r}{window} in "
            f"{', '.join(str(p) for p in paths)}; "
            + (f"experiments found: {found}" if found else "no experiments found"),
            file=err,
        )
        return EXIT_NO_DATA
    if args.control is not None and report.control is None:
        print(
            f"{me}: no records for control arm {args.control!r} of {args.name!r}{window}; "
            f"arms found: {', '.join(sorted(report.arms))}",
            file=err,
        )
        return EXIT_NO_DATA
    if args.output == "json":
        json.dump(report.as_dict(), out, indent=2)
        out.write("\n")
    else:
        render_table(report, out)
    return EXIT_OK
