"""The control plane's live topology page, driven by headless Chromium: a real control
plane with self-registering sims and a reporting proxy, and a scripted /topology that
changes, then fails, while one page stays open."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest

from aimesh.inference.v1 import inference_pb2_grpc as pb_grpc
from aimesh.mesh import procs
from aimesh.mesh.control.dashboard import page

from .support import installed, prompt

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome-stable", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="session")
def chromium() -> str:
    """Chromium's path; installed by scripts/install-chromium.sh if need be, else skip."""
    found, output = installed(_find_chromium, "install-chromium.sh")
    if not found:
        pytest.skip(
            "headless Chromium is needed for the dashboard test, and "
            f"scripts/install-chromium.sh could not install it: {output.strip()}"
        )
    return found


def dump_dom(chromium: str, url: str, profile: Path, budget_ms: int = 5000) -> str:
    """The page's DOM after `budget_ms` of (virtual) time: its scripts have run."""
    result = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--no-proxy-server",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget_ms}",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "<html" in result.stdout, result.stderr[-2000:]
    return result.stdout


def text_of(dom: str) -> str:
    """The visible text (scripts and styles dropped), whitespace collapsed."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", dom)).split())


def card(dom: str, service: str) -> str:
    m = re.search(rf'<article[^>]*data-service="{re.escape(service)}".*?</article>', dom, re.S)
    assert m, f"no card for {service}"
    return text_of(m.group(0))


def counter(dom: str, name: str) -> int:
    m = re.search(rf'data-{name}="(\d+)"', dom)
    assert m, f"no data-{name} counter"
    return int(m.group(1))


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


class Fleet:
    def __init__(self) -> None:
        self.procs: list[procs.Proc] = []

    def add(self, proc: procs.Proc) -> procs.Proc:
        self.procs.append(proc)
        return proc


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    f = Fleet()
    try:
        yield f
    finally:
        for p in reversed(f.procs):
            p.kill()


def test_dashboard_shows_the_live_mesh(chromium: str, fleet: Fleet, tmp_path: Path) -> None:
    cp = fleet.add(procs.start_control_plane())
    base = procs.admin_url(cp)

    def sim(name: str, model: str, service: str) -> procs.Proc:
        return fleet.add(
            procs.start_sim(
                name,
                [model],
                *("--ttft", "0", "--tps", "0"),
                control_plane=cp.address,
                service=service,
            )
        )

    sims = [
        sim("gpt4-a", "gpt-4", "gpt4-gateway"),
        sim("gpt4-b", "gpt-4", "gpt4-gateway"),
        sim("claude-a", "claude-3-5-sonnet", "claude-gateway"),
    ]
    proxy = fleet.add(
        procs.start(
            "proxy",
            procs.aimesh_command(
                "proxy",
                "--listen",
                "127.0.0.1:0",
                "--control-plane",
                cp.address,
                "--cache",
                str(tmp_path / "cache.json"),
            ),
        )
    )
    wait_for(lambda: get_json(base + "/topology").get("healthy") == 3, 15, "3 healthy instances")

    # Traffic through the proxy, so the cards have requests/min and latency to show: the
    # rates need two of the proxy's reports (every 2 s) with calls between them.
    def gpt4_reported() -> bool:
        services = get_json(base + "/topology")["services"]
        return any(s["name"] == "gpt4-gateway" and s["requestsPerMinute"] > 0 for s in services)

    with grpc.insecure_channel(proxy.address) as ch:
        stub = pb_grpc.InferenceStub(ch)
        wait_for(lambda: _generate(stub) and gpt4_reported(), 20, "gpt-4 calls to be reported")

    with urllib.request.urlopen(base + "/", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/html")
        served = r.read().decode()
    assert "http://" not in served.replace('href="topology"', "")  # nothing external
    assert "<script src" not in served and "<link" not in served

    dom = dump_dom(chromium, base + "/", tmp_path / "profile")
    text = text_of(dom)
    assert "Service Mesh Topology" in text
    assert "3 Healthy" in text and "2 Services" in text
    for s in sims:
        assert s.address in text
    assert "Requests/min" in text and "Avg Latency" in text and "Uptime" in text
    gpt4 = card(dom, "gpt4-gateway")
    assert "2 instances" in gpt4 and "2/2 healthy" in gpt4
    rpm = re.search(r"([\d.]+K?) requests/min", gpt4)
    assert rpm and rpm.group(1) != "0", gpt4
    assert re.search(r"[\d.]+ms avg latency", gpt4) and re.search(r"[\d.]+% uptime", gpt4)
    assert sims[0].address in gpt4 and sims[2].address not in gpt4
    claude = card(dom, "claude-gateway")
    assert "1 instance" in claude and "1/1 healthy" in claude and sims[2].address in claude
    assert "unreachable" not in text_of(dom.split("<footer", 1)[1])
    assert counter(dom, "polls") >= 2  # the page polled /topology, not just loaded it
    assert counter(dom, "fails") == 0

    # Another instance registers: the page shows it.
    new = sim("custom-a", "llama-3", "custom-llm")
    wait_for(lambda: get_json(base + "/topology").get("healthy") == 4, 15, "the new instance")
    dom = dump_dom(chromium, base + "/dashboard", tmp_path / "profile")
    text = text_of(dom)
    assert "4 Healthy" in text and "3 Services" in text
    assert new.address in card(dom, "custom-llm")


def _generate(stub: pb_grpc.InferenceStub) -> bool:
    try:
        stub.Generate(prompt(), timeout=5)
        return True
    except grpc.RpcError:
        return False


# -- one page, a topology that changes and then fails ---------------------------------


def _topology(instances: list[tuple[str, str, bool]]) -> dict[str, Any]:
    services: dict[str, dict[str, Any]] = {}
    for service, address, healthy in instances:
        s = services.setdefault(
            service,
            {
                "name": service,
                "healthy": 0,
                "total": 0,
                "instances": [],
                "requestsPerMinute": 1200.0,
                "avgLatencyMs": 2.3,
                "uptime": 0.9997,
            },
        )
        s["total"] += 1
        s["healthy"] += healthy
        s["instances"].append({"instanceId": address, "address": address, "healthy": healthy})
    return {
        "services": list(services.values()),
        "healthy": sum(s["healthy"] for s in services.values()),
        "total": sum(s["total"] for s in services.values()),
        "requestsPerMinute": 247000.0,
        "avgLatencyMs": 2.3,
        "uptime": 0.9997,
        "catalogVersion": "7",
        "configVersion": "2",
        "proxies": 1,
    }


class Scripted(ThreadingHTTPServer):
    """Serves the dashboard and a /topology that follows a script, one entry a fetch
    (the last entry repeats); None is a failure (HTTP 503)."""

    def __init__(self, script: list[dict[str, Any] | None]) -> None:
        self.script = script
        self.fetches = 0
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: Scripted

    def do_GET(self) -> None:
        if self.path == "/":
            body, ctype, status = page(), "text/html; charset=utf-8", 200
        elif self.path == "/topology":
            s = self.server
            step = s.script[min(s.fetches, len(s.script) - 1)]
            s.fetches += 1
            if step is None:
                body, ctype, status = b"down\n", "text/plain", 503
            else:
                body, ctype, status = json.dumps(step).encode(), "application/json", 200
        else:
            body, ctype, status = b"not found\n", "text/plain", 404
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_one_page_follows_changes_and_shows_an_outage(chromium: str, tmp_path: Path) -> None:
    first = _topology(
        [("gpt4-gateway", "10.0.0.1:50051", True), ("gpt4-gateway", "10.0.0.2:50051", True)]
    )
    second = _topology(
        [
            ("gpt4-gateway", "10.0.0.1:50051", True),
            ("gpt4-gateway", "10.0.0.2:50051", False),
            ("claude-gateway", "10.0.0.9:50051", True),
        ]
    )
    server = Scripted([first, second, None])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        dom = dump_dom(chromium, url, tmp_path / "profile", budget_ms=6000)
    finally:
        server.shutdown()
        server.server_close()
    text = text_of(dom)
    assert server.fetches >= 3
    assert counter(dom, "polls") == server.fetches and counter(dom, "fails") >= 1
    # The second answer was drawn in place (no reload): the new service and the
    # instance that went unhealthy...
    assert "2 Healthy" in text and "2 Services" in text
    assert "10.0.0.9:50051" in card(dom, "claude-gateway")
    gpt4 = card(dom, "gpt4-gateway")
    assert "1/2 healthy" in gpt4 and "10.0.0.2:50051 unhealthy" in gpt4
    assert 'class="card warn"' in dom
    assert "247.0K" in text and "2.3ms" in text and "99.97%" in text
    # ... then the failed fetches: the outage is shown, the last view kept.
    assert re.search(r'<body[^>]*class="down"', dom)
    assert "Control plane unreachable: HTTP 503" in text
