"""`aimesh audit report`: what the audit trail says, summed up for compliance reviews.

Reads audit files (each PATH with its rotations PATH.1 .. PATH.N), keeps the records
since a moment (`--since 1h`), and groups them by any of tenant, model, service, method,
endpoint, caller, route, status, served_model, experiment and arm: calls, errors (count
and rate), tokens in and out, cost (total and per call), p50 and p95 latency. Lines
that are not audit records are counted and reported, never fatal (a file being written
ends with a partial line now and then). `read_records` is the reading, shared with
`aimesh experiments report`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from ..units import parse_duration

DIMENSIONS = (
    "tenant",
    "model",
    "service",
    "method",
    "endpoint",
    "caller",
    "route",
    "status",
    "served_model",
    "experiment",
    "arm",
)
DEFAULT_BY = ("tenant", "model", "service")
NONE = "-"  # how a missing value (no tenant, a call that never reached a service) shows
EXIT_OK, EXIT_NO_DATA, EXIT_USAGE = 0, 1, 2


def parse_since(text: str) -> float:
    """'15m', '1h', '7d', '90s' -> seconds (days on top of the units of parse_duration)."""
    s = text.strip()
    if s.endswith("d"):
        try:
            days = float(s[:-1])
        except ValueError:
            raise ValueError(f"{text!r} is not a duration; write it like 15m, 1h or 7d") from None
        if days < 0:
            raise ValueError(f"{text!r} is negative")
        return days * 86400.0
    try:
        return parse_duration(s)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration; write it like 15m, 1h or 7d") from None


def parse_time(text: str) -> float:
    """RFC 3339 -> POSIX seconds (ValueError if it is not one)."""
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone")
    return dt.timestamp()


def expand(paths: Iterable[str]) -> list[Path]:
    """Each PATH and its rotations that exist, oldest first: PATH.5 .. PATH.1, PATH."""
    out: list[Path] = []
    for p in paths:
        base = Path(p)
        rotated: list[tuple[int, Path]] = []
        if base.parent.is_dir():
            pattern = re.compile(re.escape(base.name) + r"\.(\d+)$")
            for entry in base.parent.iterdir():
                m = pattern.match(entry.name)
                if m and entry.is_file():
                    rotated.append((int(m.group(1)), entry))
        out += [entry for _, entry in sorted(rotated, reverse=True)]
        if base.is_file():
            out.append(base)
    seen: set[Path] = set()
    unique: list[Path] = []
    for path in out:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values (None when there are none)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass
class Group:
    calls: int = 0
    errors: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    priced: int = 0  # calls whose record has a cost
    latencies: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)

    def add(self, rec: dict[str, Any]) -> None:
        self.calls += 1
        status = str(rec.get("status") or "UNKNOWN")
        if status != "OK":
            self.errors += 1
            self.statuses[status] = self.statuses.get(status, 0) + 1
        self.tokens_in += _int(rec.get("tokens_in"))
        self.tokens_out += _int(rec.get("tokens_out"))
        cost = number(rec.get("cost_usd"))
        if cost is not None:
            self.cost_usd += cost
            self.priced += 1
        latency = rec.get("latency_ms")
        if isinstance(latency, int | float) and not isinstance(latency, bool):
            self.latencies.append(float(latency))

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        return {
            "calls": self.calls,
            "errors": self.errors,
            "error_rate": round(self.errors / self.calls, 6) if self.calls else 0.0,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "cost_usd": round(self.cost_usd, 6) if self.priced else None,
            "cost_per_call_usd": round(self.cost_usd / self.calls, 6) if self.priced else None,
            "latency_ms": {"p50": percentile(lat, 0.50), "p95": percentile(lat, 0.95)},
            "errors_by_status": dict(sorted(self.statuses.items(), key=lambda kv: -kv[1])),
        }


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def number(value: Any) -> float | None:
    """A record's numeric field (int or float, not bool), or None."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


@dataclass
class Report:
    files: list[str]
    by: tuple[str, ...]
    since: float | None  # seconds before `now`, or None for everything
    now: float
    groups: dict[tuple[str, ...], Group] = field(default_factory=dict)
    total: Group = field(default_factory=Group)
    malformed: int = 0
    malformed_at: list[str] = field(default_factory=list)  # the first few FILE:LINE
    older: int = 0  # records before the window
    first: float | None = None
    last: float | None = None

    def bad(self, where: str) -> None:
        self.malformed += 1
        if len(self.malformed_at) < 5:
            self.malformed_at.append(where)

    def add(self, rec: dict[str, Any], at: float) -> None:
        key = tuple(_label(rec.get(d)) for d in self.by)
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = Group()
        group.add(rec)
        self.total.add(rec)
        self.first = at if self.first is None else min(self.first, at)
        self.last = at if self.last is None else max(self.last, at)

    def as_dict(self) -> dict[str, Any]:
        rows = sorted(self.groups.items(), key=lambda kv: (-kv[1].calls, kv[0]))
        return {
            "files": self.files,
            "since_seconds": self.since,
            "from": _iso(self.first),
            "to": _iso(self.last),
            "by": list(self.by),
            "groups": [{"key": dict(zip(self.by, k, strict=True)), **g.summary()} for k, g in rows],
            "total": self.total.summary(),
            "records": self.total.calls,
            "older_skipped": self.older,
            "malformed": self.malformed,
            "malformed_at": self.malformed_at,
        }


def _label(value: Any) -> str:
    if value is None or value == "":
        return NONE
    return str(value)


def _iso(at: float | None) -> str | None:
    if at is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open("r", encoding="utf-8", errors="replace") as f:
        yield from enumerate(f, 1)


@dataclass
class Skipped:
    """What reading left out: lines that are not records, and records before the window."""

    malformed: int = 0
    malformed_at: list[str] = field(default_factory=list)  # the first few FILE:LINE
    older: int = 0

    def bad(self, where: str) -> None:
        self.malformed += 1
        if len(self.malformed_at) < 5:
            self.malformed_at.append(where)


def read_records(
    paths: Sequence[Path], cutoff: float | None, skipped: Skipped
) -> Iterator[tuple[dict[str, Any], float]]:
    """Each audit record of `paths` (as `expand` lists them) at or after `cutoff` (POSIX
    seconds; None: all), with its time; counts what it skips in `skipped`."""
    for path in paths:
        for lineno, line in _lines(path):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("not an object")
                at = parse_time(str(rec["time"]))
            except (ValueError, KeyError, TypeError):
                skipped.bad(f"{path}:{lineno}")
                continue
            if cutoff is not None and at < cutoff:
                skipped.older += 1
                continue
            yield rec, at


def build(
    paths: Sequence[Path],
    by: Sequence[str] = DEFAULT_BY,
    since: float | None = None,
    now: float | None = None,
) -> Report:
    """Reads `paths` (as `expand` lists them) into a report."""
    now = time.time() if now is None else now
    cutoff = None if since is None else now - since
    report = Report([str(p) for p in paths], tuple(by), since, now)
    skipped = Skipped()
    for rec, at in read_records(paths, cutoff, skipped):
        report.add(rec, at)
    report.malformed, report.malformed_at, report.older = (
        skipped.malformed,
        skipped.malformed_at,
        skipped.older,
    )
    return report


# -- output ------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    if value is None:
        return NONE
    return f"{value:.1f}" if value < 1000 else f"{value:,.0f}"


def usd(value: float | None) -> str:
    """Dollars for a table: 6 decimals below $1 (a call costs fractions of a cent), 4 up
    to $100, cents above."""
    if value is None:
        return NONE
    if value >= 100:
        return f"{value:,.2f}"
    if value >= 1:
        return f"{value:.4f}"
    return f"{value:.6f}"


def _row(key: Sequence[str], g: Group) -> list[str]:
    s = g.summary()
    return [
        *key,
        f"{g.calls:,}",
        f"{g.errors:,}",
        f"{s['error_rate'] * 100:.2f}%",
        f"{g.tokens_in:,}",
        f"{g.tokens_out:,}",
        usd(s["cost_usd"]),
        usd(s["cost_per_call_usd"]),
        _ms(s["latency_ms"]["p50"]),
        _ms(s["latency_ms"]["p95"]),
    ]


def render_table(report: Report, out: TextIO) -> None:
    window = f"last {_human(report.since)}" if report.since is not None else "all records"
    span = (
        f"{_iso(report.first)} .. {_iso(report.last)}" if report.first is not None else "no calls"
    )
    names = ", ".join(Path(f).name for f in report.files)
    n = len(report.files)
    print(f"audit report, {window}: {span} ({n} file{'' if n == 1 else 's'}: {names})", file=out)
    print("", file=out)
    head = [d.upper() for d in report.by]
    head += ["CALLS", "ERRORS", "ERROR%", "TOKENS IN", "TOKENS OUT", "COST $", "$/CALL"]
    head += ["P50 MS", "P95 MS"]
    rows = [
        _row(k, g) for k, g in sorted(report.groups.items(), key=lambda kv: (-kv[1].calls, kv[0]))
    ]
    rows.append(_row(["TOTAL", *([""] * (len(report.by) - 1))], report.total))
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    keys = len(report.by)

    def fmt(r: Sequence[str]) -> str:
        cells = [
            c.ljust(w) if i < keys else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    print(fmt(head), file=out)
    for r in rows[:-1]:
        print(fmt(r), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    print(fmt(rows[-1]), file=out)
    if report.total.statuses:
        errs = ", ".join(
            f"{code} {n:,}" for code, n in report.total.summary()["errors_by_status"].items()
        )
        print(f"\nerrors by status: {errs}", file=out)
    notes = []
    if report.older:
        notes.append(f"{report.older:,} older records outside the window")
    if report.malformed:
        notes.append(
            f"{report.malformed:,} malformed lines skipped (at {', '.join(report.malformed_at)}"
            f"{', ...' if report.malformed > len(report.malformed_at) else ''})"
        )
    if notes:
        print("\n" + "; ".join(notes), file=out)


def _human(seconds: float | None) -> str:
    if seconds is None:
        return "all"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


# -- the command -------------------------------------------------------------------------


def add_source_flags(report: argparse.ArgumentParser) -> None:
    """--file and --since: which audit records a report reads (audit and experiments)."""
    report.add_argument(
        "--file",
        action="append",
        default=[],
        metavar="PATH",
        help="an audit file (repeat for more; PATH.1, PATH.2 ... are read too; "
        "default $AIMESH_AUDIT_LOG)",
    )
    report.add_argument(
        "--since", default=None, metavar="DURATION", help="only calls this recent: 15m, 1h, 7d"
    )


def add_parsers(sub: Any) -> None:
    """`aimesh audit report` (sub: the top-level subparsers)."""
    audit = sub.add_parser("audit", help="work with the proxy's audit trail")
    audit_sub = audit.add_subparsers(dest="audit_cmd", metavar="ACTION", required=True)
    report = audit_sub.add_parser(
        "report",
        help="sum up calls, errors, tokens, cost and latency by tenant, model and service",
        description="Summarise audit files (rotated ones too): calls, errors and their "
        "rate, tokens in and out, cost (total and per call), p50/p95 latency, grouped as "
        "--by says.",
    )
    add_source_flags(report)
    report.add_argument(
        "--by",
        default=",".join(DEFAULT_BY),
        help=f"group by these, comma-separated, from {', '.join(DIMENSIONS)} "
        f"(default {','.join(DEFAULT_BY)})",
    )
    report.add_argument("-o", "--output", choices=["table", "json"], default="table")


def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    files = list(args.file) or (
        [os.environ["AIMESH_AUDIT_LOG"]] if os.environ.get("AIMESH_AUDIT_LOG") else []
    )
    if not files:
        print("aimesh audit report: give --file PATH (or set AIMESH_AUDIT_LOG)", file=err)
        return EXIT_USAGE
    by = tuple(d.strip() for d in args.by.split(",") if d.strip())
    unknown = [d for d in by if d not in DIMENSIONS]
    if unknown or not by:
        print(
            f"aimesh audit report: --by {args.by!r}: choose from {', '.join(DIMENSIONS)}",
            file=err,
        )
        return EXIT_USAGE
    since = None
    if args.since is not None:
        try:
            since = parse_since(args.since)
        except ValueError as exc:
            print(f"aimesh audit report: --since: {exc}", file=err)
            return EXIT_USAGE
    paths = expand(files)
    if not paths:
        print(f"aimesh audit report: no audit files at {', '.join(files)}", file=err)
        return EXIT_NO_DATA
    try:
        report = build(paths, by, since)
    except OSError as exc:
        print(f"aimesh audit report: cannot read {exc.filename}: {exc.strerror}", file=err)
        return EXIT_NO_DATA
    if args.output == "json":
        json.dump(report.as_dict(), out, indent=2)
        out.write("\n")
    else:
        render_table(report, out)
    return EXIT_OK
