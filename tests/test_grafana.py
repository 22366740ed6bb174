"""deploy/grafana/aimesh.json: a dashboard Grafana can import, whose queries name only the
metrics aimesh exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "aimesh.json"

# What the proxies and the control plane export (docs/observability.md).
COUNTERS_AND_GAUGES = {
    "aimesh_requests_total",
    "aimesh_upstream_attempts_total",
    "aimesh_requests_in_flight",
    "aimesh_retries_total",
    "aimesh_retry_budget_exhausted_total",
    "aimesh_circuit_breaker_state",
    "aimesh_endpoint_ejections_total",
    "aimesh_endpoint_healthy",
    "aimesh_limit_rejections_total",
    "aimesh_input_tokens_total",
    "aimesh_output_tokens_total",
    "aimesh_streams_resumed_total",
    "aimesh_controlplane_instances",
    "aimesh_controlplane_proxies_reporting",
}
HISTOGRAMS = {
    "aimesh_request_duration_seconds",
    "aimesh_upstream_duration_seconds",
    "aimesh_time_to_first_token_seconds",
    "aimesh_time_per_output_token_seconds",
    "aimesh_output_tokens_per_second",
}
KNOWN = COUNTERS_AND_GAUGES | {
    f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")
}
METRIC = re.compile(r"\baimesh_[a-z0-9_]+")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in dashboard["panels"]:
        out.append(p)
        out += p.get("panels", [])  # a collapsed row keeps its panels inside
    return out


def test_top_level(dashboard: dict[str, Any]) -> None:
    for key in ("title", "uid", "schemaVersion", "panels", "templating", "time"):
        assert key in dashboard, key
    assert dashboard["schemaVersion"] >= 39
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dashboard["uid"])
    assert dashboard["title"] and dashboard["time"]["from"] and dashboard["time"]["to"]


def test_variables(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = variables["datasource"]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
    service = variables["service"]
    assert service["type"] == "query"
    query = service["query"]
    text = query["query"] if isinstance(query, dict) else query
    assert text == "label_values(aimesh_requests_total, service)"
    assert service["datasource"]["uid"] == "${datasource}"


def test_panels_are_complete_and_laid_out(dashboard: dict[str, Any]) -> None:
    all_panels = panels(dashboard)
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: dict[tuple[int, int], str] = {}
    for p in all_panels:
        assert p.get("type") and p.get("title"), p
        g = p["gridPos"]
        x, y, w, h = g["x"], g["y"], g["w"], g["h"]
        assert all(isinstance(v, int) for v in (x, y, w, h)), p["title"]
        assert 0 <= x and w >= 1 and h >= 1 and y >= 0 and x + w <= 24, p["title"]
        for cx in range(x, x + w):
            for cy in range(y, y + h):
                other = cells.setdefault((cx, cy), p["title"])
                assert other == p["title"], f"{p['title']!r} overlaps {other!r}"
        if p["type"] == "row":
            assert (w, h, x) == (24, 1, 0) and not p.get("targets")
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip(), p["title"]
            assert t["datasource"]["uid"] == "${datasource}", p["title"]


def test_queries_name_only_exported_metrics(dashboard: dict[str, Any]) -> None:
    used: set[str] = set()
    for p in panels(dashboard):
        for t in p.get("targets", []):
            names = set(METRIC.findall(t["expr"]))
            unknown = names - KNOWN
            assert not unknown, f"{p['title']!r} queries unknown metrics {sorted(unknown)}"
            used |= names
            assert "$service" in t["expr"] or "proxies_reporting" in t["expr"], p["title"]
    for v in dashboard["templating"]["list"]:
        query = v.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query)
        assert set(METRIC.findall(text)) <= KNOWN
    # Every area the dashboard promises has its metric on it.
    for must in (
        "aimesh_endpoint_healthy",
        "aimesh_controlplane_instances",
        "aimesh_requests_total",
        "aimesh_request_duration_seconds_bucket",
        "aimesh_time_to_first_token_seconds_bucket",
        "aimesh_output_tokens_per_second_bucket",
        "aimesh_output_tokens_total",
        "aimesh_circuit_breaker_state",
        "aimesh_retries_total",
        "aimesh_retry_budget_exhausted_total",
        "aimesh_streams_resumed_total",
    ):
        assert must in used, must


def test_red_queries(dashboard: dict[str, Any]) -> None:
    exprs = [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]
    assert any('code!="OK"' in e and "aimesh_requests_total" in e for e in exprs)
    for q in ("0.5", "0.95", "0.99"):
        assert any(
            f"histogram_quantile({q}," in e and "aimesh_request_duration_seconds_bucket" in e
            for e in exprs
        ), q


def test_queries_parse(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """Every expression is valid PromQL, as Prometheus's own parser says (promtool checks
    them as recording rules; skipped where promtool is not installed)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian: prometheus) is not installed")
    rules = []
    for p in panels(dashboard):
        for t in p.get("targets", []):
            expr = t["expr"].replace("$__rate_interval", "1m").replace("$service", ".*")
            rules.append({"record": f"check:panel{p['id']}:{t['refId']}", "expr": expr})
    path = tmp_path / "rules.json"  # JSON is YAML
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout
