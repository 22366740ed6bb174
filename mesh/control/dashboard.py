"""The control plane's live web view: the product page's "Service Mesh Topology" panel.

One self-contained page (inline CSS and JavaScript, no external assets) served at `/` and
`/dashboard` on the admin port. It fetches `/topology` (the `Topology` message as JSON,
lowerCamelCase field names) every 1.5 s and redraws in place: a headline "N Healthy · M
Services", a card per service (instances, healthy/total, requests/min, average latency,
uptime, each instance's address and health) and the mesh's totals. When a fetch fails it
says so ("Control plane unreachable") and keeps the last view, dimmed, until the next
fetch succeeds. Names from the catalog are set as text, never parsed as HTML.
"""

from __future__ import annotations

from ..admin import Response

POLL_MS = 1500

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>aimesh · Service Mesh Topology</title>
<style>
  :root {
    --bg: #0b1020; --panel: #121a33; --card: #18223f; --line: #26335c;
    --text: #e7ecff; --muted: #8d98c2; --ok: #34d399; --warn: #fbbf24; --bad: #f87171;
    --accent: #818cf8;
  }
  * { box-sizing: border-box; }
  body {
    margin: 0; padding: 32px 24px; background: var(--bg); color: var(--text);
    font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  }
  main { max-width: 1100px; margin: 0 auto; }
  .panel {
    background: var(--panel); border: 1px solid var(--line); border-radius: 16px;
    padding: 24px; transition: opacity .3s;
  }
  body.down .panel { opacity: .45; }
  header { display: flex; align-items: center; justify-content: space-between;
           flex-wrap: wrap; gap: 12px; margin-bottom: 20px; }
  h1 { font-size: 20px; margin: 0; letter-spacing: .2px; }
  .headline { display: flex; gap: 10px; flex-wrap: wrap; }
  .pill { border-radius: 999px; padding: 4px 12px; font-weight: 600; font-size: 13px;
          border: 1px solid var(--line); background: var(--card); }
  .pill.ok { color: var(--ok); border-color: rgba(52, 211, 153, .35); }
  .pill.warn { color: var(--warn); border-color: rgba(251, 191, 36, .35); }
  .pill.bad { color: var(--bad); border-color: rgba(248, 113, 113, .35); }
  .grid { display: grid; gap: 14px;
          grid-template-columns: repeat(auto-fill, minmax(240px, 1fr)); }
  .card { background: var(--card); border: 1px solid var(--line); border-radius: 12px;
          padding: 16px; border-top: 3px solid var(--ok); }
  .card.warn { border-top-color: var(--warn); }
  .card.bad { border-top-color: var(--bad); }
  .card .top { display: flex; align-items: center; gap: 10px; }
  .icon { font-size: 24px; width: 32px; text-align: center; }
  .name { font-weight: 700; word-break: break-all; }
  .count { color: var(--muted); font-size: 13px; }
  .stats { display: grid; grid-template-columns: repeat(2, 1fr); gap: 6px 12px;
           margin: 12px 0; font-size: 13px; }
  .stats b { display: block; font-size: 15px; color: var(--text); }
  .stats span { color: var(--muted); }
  ul.instances { list-style: none; margin: 0; padding: 10px 0 0;
                 border-top: 1px solid var(--line); font-size: 13px; }
  ul.instances li { display: flex; align-items: center; gap: 8px; padding: 2px 0; }
  .dot { width: 8px; height: 8px; border-radius: 50%; background: var(--ok); flex: none; }
  li.unhealthy .dot { background: var(--bad); }
  li.unhealthy .state { color: var(--bad); }
  .addr { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; }
  .state { margin-left: auto; color: var(--muted); }
  .totals { display: grid; grid-template-columns: repeat(3, 1fr); gap: 14px;
            margin-top: 20px; }
  .total { background: var(--card); border: 1px solid var(--line); border-radius: 12px;
           padding: 16px; text-align: center; }
  .total b { display: block; font-size: 28px; color: var(--accent); }
  .total span { color: var(--muted); font-size: 13px; }
  .empty { color: var(--muted); padding: 24px; text-align: center; }
  .banner { display: none; margin-bottom: 16px; padding: 12px 16px; border-radius: 12px;
            background: rgba(248, 113, 113, .12); border: 1px solid rgba(248, 113, 113, .4);
            color: var(--bad); font-weight: 600; }
  body.down .banner { display: block; }
  footer { margin-top: 16px; color: var(--muted); font-size: 12px; display: flex;
           justify-content: space-between; flex-wrap: wrap; gap: 8px; }
  footer a { color: var(--muted); }
  .live::before { content: ""; display: inline-block; width: 7px; height: 7px;
                  border-radius: 50%; background: var(--ok); margin-right: 6px; }
  body.down .live::before { background: var(--bad); }
</style>
</head>
<body>
<main>
  <div class="banner" id="banner" role="alert">
    Control plane unreachable: <span id="error">no answer</span>. Retrying every
    __POLL_S__ s; the view below is the last one received.
  </div>
  <section class="panel">
    <header>
      <h1>Service Mesh Topology</h1>
      <div class="headline">
        <span class="pill ok" id="healthy">… Healthy</span>
        <span class="pill" id="services">… Services</span>
      </div>
    </header>
    <div class="grid" id="grid"><div class="empty">Loading the topology…</div></div>
    <div class="totals">
      <div class="total"><b id="rpm">–</b><span>Requests/min</span></div>
      <div class="total"><b id="latency">–</b><span>Avg Latency</span></div>
      <div class="total"><b id="uptime">–</b><span>Uptime</span></div>
    </div>
  </section>
  <footer>
    <span class="live" id="status">connecting…</span>
    <span><span id="versions"></span>polls <span id="polls" data-polls="0">0</span>
      (<span id="fails" data-fails="0">0</span> failed) ·
      <a href="topology">topology JSON</a></span>
  </footer>
</main>
<script>
"use strict";
(function () {
  var POLL_MS = __POLL_MS__;
  var polls = 0, fails = 0, loaded = false;
  function $(id) { return document.getElementById(id); }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = String(text);
    return e;
  }
  function count(n) {
    n = Number(n) || 0;
    if (n >= 1e6) return (n / 1e6).toFixed(1) + "M";
    if (n >= 1e3) return (n / 1e3).toFixed(1) + "K";
    return n.toFixed(0);
  }
  function ms(n) { return (Number(n) || 0).toFixed(1) + "ms"; }
  function pct(n) { return ((Number(n) || 0) * 100).toFixed(2) + "%"; }
  function icon(name) {
    var n = name.toLowerCase();
    var table = [["gpt", "🔮"], ["claude", "🤖"], ["custom", "🧠"], ["llm", "🧠"],
                 ["analytic", "📊"], ["auth", "🔒"], ["rate", "⏱️"], ["limit", "⏱️"],
                 ["embed", "🧬"], ["gemini", "✨"]];
    for (var i = 0; i < table.length; i++) if (n.indexOf(table[i][0]) >= 0) return table[i][1];
    return "🛰️";
  }
  function level(healthy, total) {
    return healthy === total ? "ok" : (healthy > 0 ? "warn" : "bad");
  }
  function stat(value, label) {
    var d = el("div");
    d.appendChild(el("b", "", value));
    d.appendChild(el("span", "", label));
    return d;
  }
  function card(s) {
    var healthy = s.healthy || 0, total = s.total || 0;
    var instances = s.instances || [];
    var c = el("article", "card " + level(healthy, total));
    c.setAttribute("data-service", s.name);
    var top = el("div", "top");
    top.appendChild(el("div", "icon", icon(s.name)));
    var title = el("div");
    title.appendChild(el("div", "name", s.name));
    title.appendChild(el("div", "count",
      instances.length + (instances.length === 1 ? " instance" : " instances")));
    top.appendChild(title);
    c.appendChild(top);
    var stats = el("div", "stats");
    stats.appendChild(stat(healthy + "/" + total, "healthy"));
    stats.appendChild(stat(count(s.requestsPerMinute), "requests/min"));
    stats.appendChild(stat(ms(s.avgLatencyMs), "avg latency"));
    stats.appendChild(stat(pct(s.uptime), "uptime"));
    c.appendChild(stats);
    var ul = el("ul", "instances");
    instances.forEach(function (i) {
      var li = el("li", i.healthy ? "healthy" : "unhealthy");
      li.setAttribute("data-instance", i.instanceId || i.address);
      li.title = (i.instanceId || "") + (i.version ? " · " + i.version : "") +
                 (i.zone ? " · " + i.zone : "");
      li.appendChild(el("span", "dot"));
      li.appendChild(el("span", "addr", i.address));
      li.appendChild(el("span", "state", i.healthy ? "healthy" : "unhealthy"));
      ul.appendChild(li);
    });
    c.appendChild(ul);
    return c;
  }
  function render(t) {
    var services = t.services || [];
    var healthy = t.healthy || 0, total = t.total || 0;
    var h = $("healthy");
    h.textContent = healthy + " Healthy";
    h.className = "pill " + level(healthy, total);
    $("services").textContent =
      services.length + (services.length === 1 ? " Service" : " Services");
    var grid = $("grid");
    var cards = services.map(card);
    if (!cards.length) cards = [el("div", "empty", "No services registered yet.")];
    grid.replaceChildren.apply(grid, cards);
    $("rpm").textContent = count(t.requestsPerMinute);
    $("latency").textContent = ms(t.avgLatencyMs);
    $("uptime").textContent = pct(t.uptime);
    var proxies = t.proxies || 0;
    $("versions").textContent = "catalog v" + (t.catalogVersion || 0) + " · config v" +
      (t.configVersion || 0) + " · " + proxies + (proxies === 1 ? " proxy" : " proxies") +
      " reporting · ";
    document.title = healthy + " Healthy · " + services.length + " Services · aimesh";
  }
  function setCounter(id, attr, n) {
    var e = $(id);
    e.textContent = String(n);
    e.setAttribute(attr, String(n));
  }
  function poll() {
    polls += 1;
    setCounter("polls", "data-polls", polls);
    fetch("topology", { cache: "no-store" })
      .then(function (r) {
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json();
      })
      .then(function (t) {
        render(t);
        loaded = true;
        document.body.classList.remove("down");
        $("status").textContent = "live · updated " + new Date().toLocaleTimeString();
      })
      .catch(function (err) {
        fails += 1;
        setCounter("fails", "data-fails", fails);
        document.body.classList.add("down");
        if (!loaded) {
          $("grid").replaceChildren(el("div", "empty", "No answer from the control plane yet."));
        }
        $("error").textContent = String(err && err.message || err);
        $("status").textContent = "control plane unreachable";
      })
      .then(function () { setTimeout(poll, POLL_MS); });
  }
  poll();
})();
</script>
</body>
</html>
"""


def page() -> bytes:
    return (
        PAGE.replace("__POLL_MS__", str(POLL_MS))
        .replace("__POLL_S__", f"{POLL_MS / 1000:g}")
        .encode("utf-8")
    )


_PAGE = page()


def dashboard() -> Response:
    return 200, "text/html; charset=utf-8", _PAGE
