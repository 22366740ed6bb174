"""The cost of security: proxy CPU per call and latency with mTLS, authorization and API
keys against plaintext, and the handshake cost of a new connection.

    python -m bench security           (also rewrites its section of docs/benchmarks.md)
    python -m bench.security [--duration SECONDS] [--rounds N] [--connections N] [--write]

Processes, all on 127.0.0.1, started once: a control plane with the mesh CA
(`aimesh control-plane --ca-dir DIR`), two unpaced plaintext sim backends and two unpaced
STRICT mTLS sim backends (`--identity spiffe://aimesh.local/ns/default/sa/llm`, a join
token each, registered as service `llm`). This process is the client; under mTLS it holds
its own workload certificate (`WorkloadIdentity`, spiffe://.../sa/bench-client). For each
configuration in turn a fresh `aimesh proxy` process (round robin over two sims):

    a  plaintext           client -> proxy -> sims, no TLS
    b  mTLS STRICT         --identity .../sa/gateway: client -> proxy and proxy -> sims mTLS
    c  b + authorization   20 rules; the call is allowed by the last one, an ALLOW on the
                           client's SPIFFE ID (19 DENY / ALLOW rules before it do not match)
    d  plaintext + API key --api-keys STORE: the client sends a valid `x-api-key`

Each proxy gets the same closed-loop load from this process (8 unary Generate calls of 4
tokens in flight on one channel): a warm-up, then `duration` seconds measured. Its CPU
time (/proc/PID/stat, user + system, all threads) over the load, divided by the calls it
served, is its CPU per call. Then, for (a) and (b), `connections` new connections one
after another, each a new channel doing one call and closing: the client's wall time per
connection, the client's own CPU, and the proxy's CPU, each divided by the connections.
The proxy's upstream connections to the sims stay open, so this is the client -> proxy
handshake (plus the one call, the same in both). Configurations run a, b, c, d, a, b, ...
for `rounds` rounds; each figure is the median over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from aimesh.inference.v1 import inference_pb2 as pb
from aimesh.inference.v1 import inference_pb2_grpc as pb_grpc
from aimesh.mesh import procs, runtime

from . import loadgen
from .control_plane import machine_busy, self_cpu
from .proxy import CONFIG

TD = "aimesh.local"
CONCURRENCY = 8
MAX_TOKENS = 4
DURATION = 8.0  # seconds of load, per configuration, per round
ROUNDS = 3
WARMUP = 1.0
CONNECTIONS = 200  # new connections per handshake measurement
RULES = 20
OTHERS_LIMIT = 0.1  # cores other processes may use before the figures are called disturbed
GENERATE = "/aimesh.inference.v1.Inference/Generate"


def sid(service: str, ns: str = "default") -> str:
    return f"spiffe://{TD}/ns/{ns}/sa/{service}"


CLIENT_ID = sid("bench-client")
GATEWAY_ID = sid("gateway")


def authz_config() -> str:
    """CONFIG with authorization on: 19 rules that do not match the client, then the one
    ALLOW rule that does."""
    lines = ["  security:", "    authorization:", "      enabled: true", "      rules:"]
    for i in range(RULES - 1):
        if i % 4 == 0:
            lines += [
                f"        - name: deny-batch-{i}",
                "          action: DENY",
                f'          sources: ["spiffe://{TD}/ns/batch-{i}/**", "tenant:blocked-{i}"]',
            ]
        else:
            lines += [
                f"        - name: team-{i}",
                "          action: ALLOW",
                f'          sources: ["spiffe://{TD}/ns/team-{i}/sa/*"]',
                "          destinations: [llm]",
            ]
    lines += [
        "        - name: bench-client",
        "          action: ALLOW",
        f'          sources: ["{CLIENT_ID}"]',
        "          destinations: [llm]",
        f'          methods: ["{GENERATE}"]',
    ]
    return CONFIG + "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Setup:
    key: str
    label: str
    mtls: bool = False
    authz: bool = False
    api_key: bool = False
    handshakes: bool = False


SETUPS = (
    Setup("a", "plaintext", handshakes=True),
    Setup("b", "mTLS STRICT (client -> proxy -> sims)", mtls=True, handshakes=True),
    Setup("c", "mTLS STRICT + authorization (20 rules)", mtls=True, authz=True),
    Setup("d", "plaintext + API key at the gateway", api_key=True),
)


Sample = loadgen.CpuSample  # one configuration's one load in one round


@dataclass
class Handshakes:
    """`n` new connections, one call each, one after another."""

    n: int
    wall: float  # seconds, client side, all of them
    client_cpu: float  # this process's CPU seconds
    proxy_cpu: float
    errors: int = 0

    def per(self, what: str) -> float:
        """Milliseconds (wall) or microseconds (CPU) per new connection."""
        if what == "wall":
            return 1e3 * self.wall / self.n
        return 1e6 * (self.client_cpu if what == "client" else self.proxy_cpu) / self.n


@dataclass
class Outcome:
    setup: Setup
    samples: list[Sample] = field(default_factory=list)
    handshakes: list[Handshakes] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)

    def median(self, what: str) -> float:
        s = self.samples
        values = {
            "cpu": [x.per_call_us for x in s],
            "rate": [x.result.rate for x in s],
            "p50": [x.result.p50() * 1e3 for x in s],
            "p99": [x.result.p99() * 1e3 for x in s],
        }[what]
        return statistics.median(values) if values else float("nan")

    def hs(self, what: str) -> float:
        values = [h.per(what) for h in self.handshakes]
        return statistics.median(values) if values else float("nan")

    def errors(self) -> int:
        return sum(x.result.errors for x in self.samples) + sum(h.errors for h in self.handshakes)


@dataclass
class Results:
    outcomes: dict[str, Outcome]
    duration: float
    rounds: int
    connections: int
    measured_seconds: float = 0.0
    other_cpu: float = 0.0
    total_seconds: float = 0.0


# -- the client --------------------------------------------------------------------------


def _request(i: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model="gpt-4",
        messages=[pb.Message(role="user", content=f"benchmark prompt {i % 50}")],
        max_tokens=MAX_TOKENS,
    )


async def _unary(channel: Any, duration: float, md: tuple[tuple[str, str], ...]) -> loadgen.Result:
    """bench/loadgen.py's closed loop, with call metadata (the API key)."""
    result = loadgen.Result(name="unary")
    stub = pb_grpc.InferenceStub(channel)
    stop_at = time.perf_counter() + duration

    async def worker(w: int) -> None:
        i = w
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                await stub.Generate(_request(i), metadata=md, timeout=10)
                result.latencies.append(time.perf_counter() - t0)
                result.calls += 1
            except grpc.aio.AioRpcError:
                result.errors += 1
            i += CONCURRENCY

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(CONCURRENCY)))
    result.elapsed = time.perf_counter() - t0
    return result


class _Env:
    """What every configuration shares: CA, control plane, sims, client identities."""

    def __init__(self, workdir: Path) -> None:
        from aimesh.mesh.control.identity import load_or_create_ca

        self.workdir = workdir
        self.ca_dir = workdir / "ca"
        self.ca, _ = load_or_create_ca(str(self.ca_dir), TD)
        # Proxies and sims keep their caches and state under the work directory.
        self.env = {"XDG_CACHE_HOME": str(workdir / "cache"), "XDG_STATE_HOME": str(workdir)}
        self.procs: list[procs.Proc] = []
        self.identities: list[Any] = []
        self.api_key = ""

    def token(self, spiffe_id: str) -> str:
        from aimesh.mesh.security.tokens import issue_join_token

        return issue_join_token(self.ca.token_secret, spiffe_id, 600.0)

    async def start(self) -> None:
        from aimesh.mesh.security.workload import WorkloadIdentity

        print("  starting the control plane (mesh CA) and 4 sims", flush=True)
        self.cp = procs.start_control_plane(
            "--ca-dir",
            str(self.ca_dir),
            "--trust-domain",
            TD,
            name="sec-control-plane",
            admin=False,
            env=self.env,
        )
        self.procs.append(self.cp)
        fast = ("--ttft", "0", "--tps", "0", "--slots", "256", "--max-queue", "1024")
        self.plain = [
            procs.start_sim(f"sec-sim-{i}", ["gpt-4"], *fast, env=self.env) for i in range(2)
        ]
        self.procs += self.plain
        self.tls = []
        for i in range(2):
            sim = procs.start_sim(
                f"sec-tls-sim-{i}",
                ["gpt-4"],
                *fast,
                "--service",
                "llm",
                "--control-plane",
                self.cp.address,
                "--identity",
                sid("llm"),
                env={**self.env, "AIMESH_JOIN_TOKEN": self.token(sid("llm"))},
            )
            self.tls.append(sim)
            self.procs.append(sim)
        self.client = WorkloadIdentity(self.cp.address, CLIENT_ID, self.token(CLIENT_ID))
        await self.client.start()
        self.intruder = WorkloadIdentity(
            self.cp.address, sid("intruder"), self.token(sid("intruder"))
        )
        await self.intruder.start()
        self.identities += [self.client, self.intruder]
        store = self.workdir / "keys.json"
        out = await asyncio.to_thread(
            _output,
            procs.aimesh_command(
                "apikey", "create", "--store", str(store), "--tenant", "bench", "--expires", "1d"
            ),
        )
        self.api_key = next(w for w in out.split() if w.startswith("amk_"))
        self.key_store = store

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    async def stop(self) -> None:
        for w in self.identities:
            await w.stop()
        for p in reversed(self.procs):
            p.terminate()

    def start_proxy(self, setup: Setup, n: int) -> procs.Proc:
        cfg = self.workdir / f"mesh-{n}.yaml"
        cfg.write_text(authz_config() if setup.authz else CONFIG)
        sims = self.tls if setup.mtls else self.plain
        argv = [
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--config",
            str(cfg),
            "--grace",
            "2",
            *(a for s in sims for a in ("--endpoint", f"llm={s.address}")),
        ]
        env = dict(self.env)
        if setup.mtls:
            argv += ["--control-plane", self.cp.address, "--identity", GATEWAY_ID]
            argv += ["--cache", str(self.workdir / f"cache-{n}.json")]
            env["AIMESH_JOIN_TOKEN"] = self.token(GATEWAY_ID)
        if setup.api_key:
            argv += ["--api-keys", str(self.key_store)]
        return procs.start(f"sec-proxy-{setup.key}", procs.aimesh_command(*argv), env=env)

    def channel(self, setup: Setup, address: str, intruder: bool = False) -> grpc.aio.Channel:
        if setup.mtls:
            who = self.intruder if intruder else self.client
            return who.secure_channel(address, GATEWAY_ID)  # type: ignore[no-any-return]
        return grpc.aio.insecure_channel(address)

    def metadata(self, setup: Setup) -> tuple[tuple[str, str], ...]:
        return (("x-api-key", self.api_key),) if setup.api_key else ()


def _output(argv: list[str]) -> str:
    import subprocess

    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


async def _call(channel: grpc.aio.Channel, md: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
    try:
        await pb_grpc.InferenceStub(channel).Generate(_request(0), metadata=md, timeout=10)
    except grpc.aio.AioRpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


async def _ready(env: _Env, setup: Setup, address: str) -> list[str]:
    """Waits until a call goes through; checks that the security at work does refuse."""
    deadline = time.monotonic() + 20
    md = env.metadata(setup)
    while True:
        async with env.channel(setup, address) as ch:
            code = await _call(ch, md)
        if code == grpc.StatusCode.OK:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"({setup.key}) the proxy never served a call: {code.name}")
        await asyncio.sleep(0.2)
    checks = []
    if setup.authz:
        async with env.channel(setup, address, intruder=True) as ch:
            checks.append(f"another SPIFFE ID: {(await _call(ch, ())).name}")
    if setup.api_key:
        async with grpc.aio.insecure_channel(address) as ch:
            checks.append(f"no key: {(await _call(ch, ())).name}")
            checks.append(f"wrong key: {(await _call(ch, (('x-api-key', 'amk_x.y'),))).name}")
    if setup.mtls:
        async with grpc.aio.insecure_channel(address) as ch:
            checks.append(f"plaintext: {(await _call(ch, ())).name}")
    return checks


async def _handshakes(env: _Env, setup: Setup, proxy: procs.Proc, n: int) -> Handshakes:
    md = env.metadata(setup)
    errors = 0
    cpu0, self0, t0 = loadgen.cpu_seconds(proxy.pid), self_cpu(), time.perf_counter()
    for _ in range(n):
        channel = env.channel(setup, proxy.address)
        if await _call(channel, md) != grpc.StatusCode.OK:
            errors += 1
        await channel.close(None)
    wall = time.perf_counter() - t0
    return Handshakes(
        n, wall, self_cpu() - self0, loadgen.cpu_seconds(proxy.pid) - cpu0, errors=errors
    )


async def _run(duration: float, rounds: int, connections: int) -> Results:
    t_start = time.monotonic()
    tmp = tempfile.TemporaryDirectory(prefix="aimesh-bench-sec-")
    env = _Env(Path(tmp.name))
    res = Results({s.key: Outcome(s) for s in SETUPS}, duration, rounds, connections)
    n = 0
    try:
        await env.start()
        for r in range(rounds):
            for setup in SETUPS:
                n += 1
                out = res.outcomes[setup.key]
                proxy = env.start_proxy(setup, n)
                try:
                    checks = await _ready(env, setup, proxy.address)
                    if r == 0:
                        out.checks = checks
                    md = env.metadata(setup)
                    async with env.channel(setup, proxy.address) as ch:
                        await _unary(ch, WARMUP, md)
                        pids = [proxy.pid, *env.pids()]
                        cpu0, others0 = loadgen.cpu_seconds(proxy.pid), loadgen.cpu_of(pids)
                        self0, busy0, m0 = self_cpu(), machine_busy(), time.monotonic()
                        result = await _unary(ch, duration, md)
                        cpu = loadgen.cpu_seconds(proxy.pid) - cpu0
                        mine = loadgen.cpu_of(pids) - others0 + self_cpu() - self0
                        res.other_cpu += max(0.0, machine_busy() - busy0 - mine)
                        res.measured_seconds += time.monotonic() - m0
                    sample = Sample(result, cpu)
                    out.samples.append(sample)
                    line = (
                        f"{sample.per_call_us:5.0f} µs/call {result.rate:6.0f}/s "
                        f"p50 {result.p50() * 1e3:5.2f} p99 {result.p99() * 1e3:6.2f} ms"
                        + (f" errors {result.errors}" if result.errors else "")
                    )
                    if setup.handshakes:
                        h = await _handshakes(env, setup, proxy, connections)
                        out.handshakes.append(h)
                        line += (
                            f"; {h.n} new connections: {h.per('wall'):.2f} ms each, proxy "
                            f"{h.per('proxy'):.0f} µs, client {h.per('client'):.0f} µs CPU"
                            + (f" errors {h.errors}" if h.errors else "")
                        )
                finally:
                    proxy.terminate()
                print(f"  round {r + 1}/{rounds} {setup.key}: {line}", flush=True)
    finally:
        await env.stop()
        tmp.cleanup()
    res.total_seconds = time.monotonic() - t_start
    return res


# -- the report --------------------------------------------------------------------------


def _extra(value: float, base: float) -> str:
    return f"{(value / base - 1) * 100:+.1f}%" if base else ""


def report(res: Results) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    machine = f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}"
    base = res.outcomes["a"]
    rows = [
        "| configuration | proxy CPU per call (µs) | extra vs (a) | rounds' range (µs) "
        "| calls/s | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for out in res.outcomes.values():
        cpu = out.median("cpu")
        per = [x.per_call_us for x in out.samples]
        rows.append(
            f"| ({out.setup.key}) {out.setup.label} | {cpu:,.0f} | "
            f"{'' if out.setup.key == 'a' else _extra(cpu, base.median('cpu'))} | "
            f"{min(per):,.0f}-{max(per):,.0f} | {out.median('rate'):,.0f} | "
            f"{out.median('p50'):.2f} | {out.median('p99'):.2f} |"
        )
    plain, tls = res.outcomes["a"], res.outcomes["b"]
    hs_rows = [
        "| client -> proxy | client wall time per new connection (ms) | proxy CPU per new "
        "connection (µs) | client CPU per new connection (µs) |",
        "|---|---|---|---|",
    ]
    for out, label in ((plain, "plaintext"), (tls, "mTLS STRICT")):
        walls = [h.per("wall") for h in out.handshakes]
        hs_rows.append(
            f"| {label} | {out.hs('wall'):.2f} (rounds {min(walls):.2f}-{max(walls):.2f}) | "
            f"{out.hs('proxy'):,.0f} | {out.hs('client'):,.0f} |"
        )
    hs_rows.append(
        f"| **mTLS extra per new connection** | **{tls.hs('wall') - plain.hs('wall'):+.2f}** | "
        f"**{tls.hs('proxy') - plain.hs('proxy'):+,.0f}** | "
        f"**{tls.hs('client') - plain.hs('client'):+,.0f}** |"
    )
    checks = "; ".join(
        f"({o.setup.key}) " + ", ".join(o.checks) for o in res.outcomes.values() if o.checks
    )
    errors = sum(o.errors() for o in res.outcomes.values())
    others = res.other_cpu / max(res.measured_seconds, 1e-9)
    noise = (
        f"Processes outside the benchmark used {others:.2f} cores on average while it measured"
        + (
            ": these figures are disturbed; run it again on a quiet machine."
            if others > OTHERS_LIMIT
            else "."
        )
    )
    return "\n".join(
        [
            f"Measured {stamp} on {machine}, with `python -m bench security` "
            f"({res.total_seconds:.0f} s): {res.rounds} rounds of a, b, c, d, each a fresh "
            f"`aimesh proxy` process (round robin over 2 unpaced sim backends, plaintext or "
            f"STRICT mTLS) given {res.duration:g} s of unary Generate ({MAX_TOKENS} tokens) "
            f"after a {WARMUP:g} s warm-up, closed loop, {CONCURRENCY} calls in flight on one "
            "channel. Figures are medians over the rounds; CPU is the proxy process's user + "
            "system time (all its threads) over the load, per call served. Certificates are "
            "EC P-256 from the mesh CA; the authorization decision is cached per (caller, "
            "service, method), so (c) is mostly the cached path.",
            "",
            *rows,
            "",
            f"New connections (after the load of (a) and (b), each round): {res.connections} "
            "new channels one after another, each doing one call and closing; the proxy's "
            "connections to the sims stay open, so the difference is the client -> proxy "
            "TLS handshake (both sides authenticated) and its connection setup.",
            "",
            *hs_rows,
            "",
            f"Sanity (first round): {checks}. Errors over all measured calls and connections: "
            f"{errors}.",
            "",
            f"{noise} The machine has {os.cpu_count()} cores, shared by the load generator "
            "(this process, the client), the proxy, the four sims and the control plane, and "
            "by processes outside the benchmark: a configuration's rounds differ by the range "
            "shown, so differences smaller than that are noise.",
        ]
    )


def run(duration: float = DURATION, rounds: int = ROUNDS, connections: int = CONNECTIONS) -> str:
    """Runs the benchmark; returns the markdown section for docs/benchmarks.md."""
    res = runtime.run(_run(duration, rounds, connections))
    others = res.other_cpu / max(res.measured_seconds, 1e-9)
    print(f"done in {res.total_seconds:.0f} s; other processes used {others:.2f} cores meanwhile")
    return report(res)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.security")
    parser.add_argument("--duration", type=float, default=DURATION, help="seconds per load")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--connections", type=int, default=CONNECTIONS)
    parser.add_argument(
        "--write", action="store_true", help="also rewrite its section of docs/benchmarks.md"
    )
    args = parser.parse_args()
    section = run(args.duration, args.rounds, args.connections)
    print(section)
    if args.write:
        from .__main__ import _update

        _update("security", section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
