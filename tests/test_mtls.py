"""Mesh identities and STRICT mTLS, with real TLS handshakes on 127.0.0.1.

The control plane's Identity service issues certificates from the mesh CA; sims and the
proxy serve mTLS with them; every rejection below is what a real client sees."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
import grpc.aio
import pytest
from cryptography import x509

from aimesh.control.v1 import control_plane_pb2 as cp_pb
from aimesh.control.v1 import control_plane_pb2_grpc as cp_grpc
from aimesh.inference.v1 import inference_pb2_grpc as inf_grpc
from aimesh.mesh.control.identity import IdentityService
from aimesh.mesh.control.server import ControlPlane, ControlPlaneServer
from aimesh.mesh.control.store import EmbeddedStore
from aimesh.mesh.proxy.cluster import EndpointAddr
from aimesh.mesh.proxy.server import Proxy
from aimesh.mesh.security.ca import CertificateAuthority, make_csr, verify_chain
from aimesh.mesh.security.cli import MtlsFlags
from aimesh.mesh.security.mtls import stats
from aimesh.mesh.security.spiffe import load_certificates
from aimesh.mesh.security.tokens import issue_join_token
from aimesh.mesh.security.workload import WorkloadIdentity, dns_name_for, sign_for_renewal
from aimesh.mesh.sim.server import RunningSim, start_sim

from .support import FAST, llm_mesh, prompt

TD = "aimesh.local"


def sid(service: str) -> str:
    return f"spiffe://{TD}/ns/default/sa/{service}"


@dataclass
class Mesh:
    """An in-process control plane with the mesh CA, and helpers to get identities."""

    ca: CertificateAuthority
    identity: IdentityService
    address: str
    offset: list[float]  # added to the CA's clock (an expired certificate, a stale token)
    started: list[WorkloadIdentity] = field(default_factory=list)
    sims: list[RunningSim] = field(default_factory=list)

    def token(self, grant: str, ttl: float = 300.0) -> str:
        return issue_join_token(self.ca.token_secret, grant, ttl, clock=self.ca_clock)

    def ca_clock(self) -> float:
        return time.time() + self.offset[0]

    async def workload(self, service: str, **kwargs: object) -> WorkloadIdentity:
        w = WorkloadIdentity(self.address, sid(service), self.token(sid(service)), **kwargs)  # type: ignore[arg-type]
        await w.start()
        self.started.append(w)
        return w

    async def sim(self, service: str, **kwargs: object) -> RunningSim:
        w = await self.workload(service)
        s = await start_sim(FAST, "127.0.0.1:0", identity=w, seed=1, **kwargs)  # type: ignore[arg-type]
        self.sims.append(s)
        return s


async def _mesh(lifetime: float = 3600.0) -> tuple[Mesh, ControlPlaneServer]:
    offset = [0.0]

    def clock() -> float:
        return time.time() + offset[0]

    ca = CertificateAuthority.create(TD, clock=clock)
    ca.min_leaf_lifetime = 1.0  # tests rotate every few seconds
    identity = IdentityService(ca, lifetime=lifetime, clock=clock)
    server = ControlPlaneServer(ControlPlane(EmbeddedStore(None)), identity=identity)
    port = await server.start("127.0.0.1:0")
    return Mesh(ca, identity, f"127.0.0.1:{port}", offset), server


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    m, server = await _mesh()
    yield m
    await _teardown(m, server)


async def _teardown(m: Mesh, server: ControlPlaneServer) -> None:
    for s in m.sims:
        await s.server.stop(None)
    for w in m.started:
        await w.stop()
    await server.stop(None)


async def _sign(mesh: Mesh, request: cp_pb.SignCertificateRequest) -> cp_pb.SignCertificateResponse:
    async with grpc.aio.insecure_channel(mesh.address) as ch:
        return await cp_grpc.IdentityStub(ch).SignCertificate(request, timeout=10)


async def _rejected(mesh: Mesh, request: cp_pb.SignCertificateRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _sign(mesh, request)
    return info.value


async def _generate(channel: grpc.aio.Channel) -> str:
    reply = await inf_grpc.InferenceStub(channel).Generate(prompt(max_tokens=4), timeout=10)
    return reply.text  # type: ignore[no-any-return]


async def _handshake_fails(channel: grpc.aio.Channel) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _generate(channel)
    await channel.close(None)
    return info.value


# -- issuing ----------------------------------------------------------------------------


async def test_issuance_through_the_control_plane(mesh: Mesh) -> None:
    w = await mesh.workload("llm")
    svid = w.svid
    assert svid is not None and svid.spiffe_id == sid("llm")
    leaf, _ = load_certificates(svid.chain_pem)
    # The chain verifies against the bundle the control plane handed out.
    assert verify_chain(svid.chain_pem, svid.chain_pem, svid.bundle_pem, now=time.time()) == sid(
        "llm"
    )
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["llm.default.svc.aimesh.local"]
    assert 3590 < svid.not_after - time.time() <= 3600
    async with grpc.aio.insecure_channel(mesh.address) as ch:
        bundle = await cp_grpc.IdentityStub(ch).GetTrustBundle(cp_pb.GetTrustBundleRequest())
    assert bundle.trust_bundle_pem == mesh.ca.trust_bundle() and bundle.trust_domain == TD


async def test_renewal_is_proven_by_the_current_certificate(mesh: Mesh) -> None:
    w = await mesh.workload("llm")
    first = w.svid
    second = await w.fetch()  # no token this time: the current key signs the new CSR
    assert first is not None and second.version == 2 and second.key_pem != first.key_pem
    assert w.renewals == 1 and mesh.identity.issued == 2


async def test_a_certificate_renews_only_itself(mesh: Mesh) -> None:
    w = await mesh.workload("llm")
    assert w.svid is not None and w._key is not None
    _, csr = make_csr(sid("billing"))
    err = await _rejected(
        mesh,
        cp_pb.SignCertificateRequest(
            csr_pem=csr,
            current_chain_pem=w.svid.chain_pem,
            csr_signature=sign_for_renewal(w._key, csr),
        ),
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert f"your certificate is {sid('llm')}; it can renew only itself" in (err.details() or "")


async def test_renewal_signature_must_be_the_current_key(mesh: Mesh) -> None:
    w = await mesh.workload("llm")
    assert w.svid is not None
    key, csr = make_csr(sid("llm"))
    from aimesh.mesh.security.ca import load_private_key

    err = await _rejected(
        mesh,
        cp_pb.SignCertificateRequest(
            csr_pem=csr,
            current_chain_pem=w.svid.chain_pem,
            csr_signature=sign_for_renewal(load_private_key(key), csr),  # not the cert's key
        ),
    )
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "csr_signature is not the current certificate's key" in (err.details() or "")


async def test_tampered_join_token(mesh: Mesh) -> None:
    token = mesh.token(sid("llm"))
    head, payload, signature = token.split(".")
    tampered = f"{head}.{payload}.{signature[:-2]}{'AA' if signature[-2:] != 'AA' else 'BB'}"
    _, csr = make_csr(sid("llm"))
    err = await _rejected(mesh, cp_pb.SignCertificateRequest(csr_pem=csr, join_token=tampered))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "signature does not verify (tampered with or forged)" in (err.details() or "")
    assert "aimesh identity token" in (err.details() or "")  # what to do about it


async def test_expired_join_token(mesh: Mesh) -> None:
    token = mesh.token(sid("llm"), ttl=60)
    mesh.offset[0] = 120.0
    _, csr = make_csr(sid("llm"))
    err = await _rejected(mesh, cp_pb.SignCertificateRequest(csr_pem=csr, join_token=token))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "expired at" in (err.details() or "") and "ask for a new one" in (err.details() or "")


async def test_a_join_token_works_once(mesh: Mesh) -> None:
    token = mesh.token(sid("llm"))
    _, csr = make_csr(sid("llm"))
    await _sign(mesh, cp_pb.SignCertificateRequest(csr_pem=csr, join_token=token))
    err = await _rejected(mesh, cp_pb.SignCertificateRequest(csr_pem=csr, join_token=token))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "was already used" in (err.details() or "")


async def test_csr_for_another_identity(mesh: Mesh) -> None:
    token = mesh.token(sid("llm"))
    _, csr = make_csr(sid("billing"))
    err = await _rejected(mesh, cp_pb.SignCertificateRequest(csr_pem=csr, join_token=token))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert f"grants {sid('llm')}, not {sid('billing')}" in (err.details() or "")
    # The token was not spent on the refusal: it still gets the identity it grants.
    _, good = make_csr(sid("llm"))
    await _sign(mesh, cp_pb.SignCertificateRequest(csr_pem=good, join_token=token))


async def test_malformed_csr_and_no_proof(mesh: Mesh) -> None:
    err = await _rejected(
        mesh, cp_pb.SignCertificateRequest(csr_pem="not a csr", join_token=mesh.token(sid("x")))
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "csr_pem is not a readable PEM certificate request" in (err.details() or "")
    _, csr = make_csr(sid("llm"))
    err = await _rejected(mesh, cp_pb.SignCertificateRequest(csr_pem=csr))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "a first certificate needs a join token" in (err.details() or "")


def test_dns_name_for_ids() -> None:
    assert dns_name_for(sid("gpt4-gateway")) == "gpt4-gateway.default.svc.aimesh.local"
    odd = dns_name_for("spiffe://aimesh.local/workloads/Batch_7")
    assert odd.startswith("id-") and odd.endswith(".svc.aimesh.local")


# -- STRICT mTLS: a proxy in front of a sim ---------------------------------------------


async def _proxy(
    make_proxy: Callable[..., object], mesh: Mesh, sim: RunningSim, **settings: object
) -> Proxy:
    doc, _ = llm_mesh([sim])
    gateway = await mesh.workload("gateway")
    proxy: Proxy = await make_proxy(  # type: ignore[operator]
        doc, extra={"llm": [EndpointAddr(f"127.0.0.1:{sim.port}")]}, identity=gateway, **settings
    )
    return proxy


async def test_client_to_proxy_to_sim_over_mtls(mesh: Mesh, make_proxy) -> None:  # type: ignore[no-untyped-def]
    sim = await mesh.sim("llm")
    proxy = await _proxy(make_proxy, mesh, sim)
    client = await mesh.workload("web")
    async with client.secure_channel(
        f"127.0.0.1:{proxy.ports['listen']}", sid("gateway")
    ) as channel:
        assert await _generate(channel)
    assert proxy.mtls_mode == "STRICT"
    assert stats(proxy)["mtls"]["identity"] == sid("gateway")


async def test_no_client_certificate(mesh: Mesh) -> None:
    sim = await mesh.sim("llm")
    bundle = mesh.ca.trust_bundle().encode()
    channel = grpc.aio.secure_channel(
        f"127.0.0.1:{sim.port}",
        grpc.ssl_channel_credentials(root_certificates=bundle),
        options=[("grpc.ssl_target_name_override", dns_name_for(sid("llm")))],
    )
    err = await _handshake_fails(channel)
    assert err.code() == grpc.StatusCode.UNAVAILABLE  # the server ends the handshake


def _client_with(leaf_and_chain: str, key_pem: str, bundle: str, target: str) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(
        target,
        grpc.ssl_channel_credentials(
            root_certificates=bundle.encode(),
            private_key=key_pem.encode(),
            certificate_chain=leaf_and_chain.encode(),
        ),
        options=[("grpc.ssl_target_name_override", dns_name_for(sid("llm")))],
    )


async def test_certificate_from_a_foreign_ca(mesh: Mesh) -> None:
    sim = await mesh.sim("llm")
    foreign = CertificateAuthority.create(TD)  # same trust domain, another root
    key, csr = make_csr(sid("web"))
    leaf, chain = foreign.sign_csr(csr, sid("web"), dns_names=[dns_name_for(sid("web"))])
    channel = _client_with(leaf + chain, key, mesh.ca.trust_bundle(), f"127.0.0.1:{sim.port}")
    err = await _handshake_fails(channel)
    assert err.code() == grpc.StatusCode.UNAVAILABLE


async def test_expired_certificate(mesh: Mesh) -> None:
    sim = await mesh.sim("llm")
    mesh.offset[0] = -3 * 3600.0  # signed three hours ago, for a minute
    key, csr = make_csr(sid("web"))
    leaf, chain = mesh.ca.sign_csr(csr, sid("web"), lifetime=60.0)
    mesh.offset[0] = 0.0
    assert load_certificates(leaf)[0].not_valid_after_utc.timestamp() < time.time() - 3600
    channel = _client_with(leaf + chain, key, mesh.ca.trust_bundle(), f"127.0.0.1:{sim.port}")
    err = await _handshake_fails(channel)
    assert err.code() == grpc.StatusCode.UNAVAILABLE


async def test_wrong_spiffe_id_for_the_destination(mesh: Mesh, make_proxy) -> None:  # type: ignore[no-untyped-def]
    impostor = await mesh.sim("billing")  # a valid mesh certificate, but not llm's
    client = await mesh.workload("web")
    # Directly: the client expects llm and the handshake proves billing.
    err = await _handshake_fails(client.secure_channel(f"127.0.0.1:{impostor.port}", sid("llm")))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "Hostname Verification Check failed" in (err.details() or "")
    # Through the proxy: the llm cluster's only endpoint is the impostor.
    proxy = await _proxy(make_proxy, mesh, impostor)
    async with client.secure_channel(
        f"127.0.0.1:{proxy.ports['listen']}", sid("gateway")
    ) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _generate(channel)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_plaintext_to_a_strict_port(mesh: Mesh) -> None:
    sim = await mesh.sim("llm")
    err = await _handshake_fails(grpc.aio.insecure_channel(f"127.0.0.1:{sim.port}"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE


async def test_permissive_counts_plaintext_calls(mesh: Mesh, make_proxy) -> None:  # type: ignore[no-untyped-def]
    sim = await mesh.sim("llm")
    flags = MtlsFlags(
        mode="PERMISSIVE",
        identity=sid("gateway"),
        join_token="",
        control_plane=mesh.address,
        plaintext_listen="127.0.0.1:0",
    )
    proxy = await _proxy(make_proxy, mesh, sim, mtls=flags)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.ports['plaintext']}") as clear:
        assert await _generate(clear)
        assert await _generate(clear)
    client = await mesh.workload("web")
    async with client.secure_channel(f"127.0.0.1:{proxy.ports['listen']}", sid("gateway")) as tls:
        assert await _generate(tls)
    assert stats(proxy)["mtls"]["plaintext_calls"] == 2
    assert stats(proxy)["mtls"]["mode"] == "PERMISSIVE"
    # ... and in the Prometheus metrics, where migration progress is watched.
    from prometheus_client import generate_latest

    from aimesh.mesh.observability.metrics import ProxyCollector, new_registry

    registry = new_registry()
    registry.register(ProxyCollector(proxy))
    assert "aimesh_mtls_plaintext_calls_total 2.0" in generate_latest(registry).decode()


async def test_client_tls_off_keeps_the_gateway_listener_plaintext(mesh: Mesh, make_proxy) -> None:  # type: ignore[no-untyped-def]
    sim = await mesh.sim("llm")
    flags = MtlsFlags(
        mode="STRICT", identity=sid("gateway"), join_token="", control_plane="", client_tls=False
    )
    proxy = await _proxy(make_proxy, mesh, sim, mtls=flags)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.ports['listen']}") as clear:
        assert await _generate(clear)  # and the proxy -> sim hop is still mTLS


# -- rotation under load ----------------------------------------------------------------


async def test_rotation_under_steady_load_drops_nothing(make_proxy) -> None:  # type: ignore[no-untyped-def]
    mesh, server = await _mesh(lifetime=3.0)  # renewed every ~1.5 s
    try:
        sim = await mesh.sim("llm")
        sim_identity = mesh.started[-1]
        proxy = await _proxy(make_proxy, mesh, sim, rotation_drain=2.0)
        client = await mesh.workload("web")
        first_expiry = min(w.svid.not_after for w in mesh.started if w.svid)
        target = f"127.0.0.1:{proxy.ports['listen']}"
        ok = failed = 0
        errors: list[str] = []
        loop = asyncio.get_running_loop()
        end = loop.time() + 9.0

        async def caller() -> None:
            nonlocal ok, failed
            while loop.time() < end:
                # A new channel (new handshake, the client's current certificate) every
                # half second, so the proxy's listener rotation is exercised too.
                channel = client.secure_channel(target, sid("gateway"))
                batch_end = loop.time() + 0.5
                while loop.time() < min(batch_end, end):
                    try:
                        await _generate(channel)
                        ok += 1
                    except grpc.aio.AioRpcError as exc:
                        failed += 1
                        errors.append(f"{exc.code().name}: {exc.details()}")
                await channel.close(None)

        await asyncio.gather(*(caller() for _ in range(4)))
        assert failed == 0, errors[:5]
        assert ok > 100
        assert time.time() > first_expiry + 1  # every first certificate expired meanwhile
        assert sim_identity.renewals >= 4 and client.renewals >= 4
        assert proxy.rotations >= 4 and proxy.identity.renewals >= 4
        assert sim_identity.failures == 0
    finally:
        await _teardown(mesh, server)


# -- the control plane's mTLS port ------------------------------------------------------


async def test_renewal_over_the_control_planes_mtls_port() -> None:
    offset = [0.0]
    ca = CertificateAuthority.create(TD, clock=lambda: time.time() + offset[0])
    ca.min_leaf_lifetime = 1.0
    identity = IdentityService(ca, lifetime=2.0)
    server = ControlPlaneServer(ControlPlane(EmbeddedStore(None)), identity=identity)
    port = await server.start("127.0.0.1:0", secure_listen="127.0.0.1:0")
    mesh = Mesh(ca, identity, f"127.0.0.1:{port}", offset)
    secure = f"127.0.0.1:{server.secure_port}"
    try:
        w = await mesh.workload("llm", secure_control_plane=secure)
        assert w.svid is not None
        issued = identity.issued
        await w.fetch()  # renewal: the TLS client certificate is the proof
        assert w.renewals >= 1 and identity.issued > issued
        # A certificate renews only itself, also when it is the handshake's.
        _, csr = make_csr(sid("billing"))
        async with w.secure_channel(secure, identity.own_id) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await cp_grpc.IdentityStub(ch).SignCertificate(
                    cp_pb.SignCertificateRequest(csr_pem=csr), timeout=10
                )
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "it can renew only itself" in (info.value.details() or "")
            # Every control plane service is there too.
            snap = await cp_grpc.RegistryStub(ch).List(cp_pb.ListRequest(), timeout=10)
            assert snap.version >= 0
        # The control plane's own 2 s certificate renews through its plaintext port.
        assert identity.own is not None
        await asyncio.sleep(2.5)
        assert identity.own.renewals >= 1
        async with w.secure_channel(secure, identity.own_id) as ch:
            await cp_grpc.IdentityStub(ch).GetTrustBundle(cp_pb.GetTrustBundleRequest())
        # Plaintext to the mTLS port is refused.
        async with grpc.aio.insecure_channel(secure) as clear:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await cp_grpc.IdentityStub(clear).GetTrustBundle(
                    cp_pb.GetTrustBundleRequest(), timeout=5
                )
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await _teardown(mesh, server)


def test_identity_token_cli(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from aimesh.mesh.cli import main
    from aimesh.mesh.control.identity import load_or_create_ca
    from aimesh.mesh.security.tokens import verify_join_token

    ca, created = load_or_create_ca(str(tmp_path / "ca"), TD)
    assert created and load_or_create_ca(str(tmp_path / "ca"), TD)[1] is False
    with pytest.raises(ValueError, match=r"pass --trust-domain aimesh\.local"):
        load_or_create_ca(str(tmp_path / "ca"), "other.mesh")
    argv = ["identity", "token", "--ca-dir", str(tmp_path / "ca"), "--id", sid("llm")]
    assert main([*argv, "--ttl", "10m"]) == 0
    token = capsys.readouterr().out.strip()
    assert verify_join_token(ca.token_secret, token, sid("llm")).sub == sid("llm")
    assert main(["identity", "token", "--ca-dir", str(tmp_path / "ca"), "--id", "nope"]) == 2
    assert "invalid" in capsys.readouterr().err.lower()


# -- authorization over real mTLS ---------------------------------------------------------


async def test_an_identity_policy_does_not_allow(mesh: Mesh, make_proxy) -> None:  # type: ignore[no-untyped-def]
    """Callers with real mesh certificates, through a real handshake: the proxy reads the
    SPIFFE ID from the peer certificate and decides by the YAML's rules."""
    sim = await mesh.sim("llm")
    doc, _ = llm_mesh([sim])
    doc["spec"]["security"] = {  # type: ignore[index]
        "authorization": {
            "enabled": True,
            "rules": [
                {"name": "no-batch", "action": "DENY", "sources": [sid("batch")]},
                {"name": "web-to-llm", "sources": [sid("web")], "destinations": ["llm"]},
            ],
        }
    }
    gateway = await mesh.workload("gateway")
    proxy = await make_proxy(
        doc, extra={"llm": [EndpointAddr(f"127.0.0.1:{sim.port}")]}, identity=gateway
    )
    assert proxy.mtls_mode == "STRICT"
    target = f"127.0.0.1:{proxy.ports['listen']}"
    method = "/aimesh.inference.v1.Inference/Generate"
    web = await mesh.workload("web")
    async with web.secure_channel(target, sid("gateway")) as channel:
        assert await _generate(channel)  # allowed by its SPIFFE ID
    batch = await mesh.workload("batch")
    async with batch.secure_channel(target, sid("gateway")) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _generate(channel)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert info.value.details() == f"denied by rule 'no-batch': {sid('batch')} -> llm {method}"
    other = await mesh.workload("other")
    async with other.secure_channel(target, sid("gateway")) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _generate(channel)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    default_deny = f"no rule allows {sid('other')} to call llm {method} (default deny)"
    assert info.value.details() == default_deny
    assert proxy.counters.calls[(method, "PERMISSION_DENIED")] == 2
    assert proxy.counters.calls[(method, "OK")] == 1


# -- registration, watches and reports over the control plane's mTLS port -----------------


async def test_sim_and_proxy_use_the_control_planes_mtls_port(make_proxy) -> None:  # type: ignore[no-untyped-def]
    """A sim's registrar and a proxy's watcher and reporter, given the secure address,
    talk to the control plane over mTLS only, and after their certificates rotated (and
    the first ones expired) they reconnect with the new ones: the control plane is
    restarted, so every connection is a new handshake."""
    from aimesh.mesh.control.client import Registrar, Reporter
    from aimesh.mesh.proxy.main import EMPTY, ControlPlaneSettings, follow

    ca = CertificateAuthority.create(TD)
    ca.min_leaf_lifetime = 1.0

    async def control_plane(listen: str, secure: str) -> ControlPlaneServer:
        server = ControlPlaneServer(
            ControlPlane(EmbeddedStore(None)), identity=IdentityService(ca, lifetime=2.0)
        )
        await server.start(listen, secure_listen=secure)
        return server

    server = await control_plane("127.0.0.1:0", "127.0.0.1:0")
    plain = f"127.0.0.1:{server.port}"
    secure = f"127.0.0.1:{server.secure_port}"
    mesh = Mesh(ca, server.identity, plain, [0.0])
    registrar = watcher = reporter = None
    try:
        sim_id = await mesh.workload("llm", secure_control_plane=secure)
        sim = await start_sim(FAST, "127.0.0.1:0", identity=sim_id, seed=1)
        mesh.sims.append(sim)
        registrar = Registrar(
            plain,
            cp_pb.Instance(
                service="llm",
                address=f"127.0.0.1:{sim.port}",
                instance_id="sim-1",
                models=["gpt-4"],
                serving=True,
            ),
            ttl=2.0,
            identity=sim_id,
        )
        assert registrar.replicas.secure and registrar.replicas.addresses == [secure]
        registrar.start()
        gateway = await mesh.workload("gateway", secure_control_plane=secure)
        proxy = await make_proxy(EMPTY, identity=gateway)
        watcher = follow(proxy, ControlPlaneSettings(plain, None, "gw-1"), proxy.config)
        assert watcher.replicas.secure and watcher.replicas.addresses == [secure]
        watcher.start()
        reporter = Reporter(plain, "gw-1", proxy.endpoint_reports, identity=gateway)
        client = await mesh.workload("web")
        target = f"127.0.0.1:{proxy.ports['listen']}"

        async def routed() -> None:
            """The proxy learned the sim from the catalog and calls it (over mTLS)."""
            for _ in range(100):
                if proxy.catalog_version and "llm" in proxy.clusters:
                    break
                await asyncio.sleep(0.05)
            async with client.secure_channel(target, sid("gateway")) as channel:
                assert await _generate(channel)

        await asyncio.wait_for(registrar.registered.wait(), 5)
        await asyncio.wait_for(watcher.synced.wait(), 5)
        await routed()
        await reporter.report_once()
        seen = server.status.topology()
        assert any(s.name == "llm" for s in seen.services), seen

        # Certificates live 2 s and renew every ~1 s: wait until the first ones expired.
        first_expiry = max(w.svid.not_after for w in (sim_id, gateway) if w.svid)
        await asyncio.sleep(max(0.0, first_expiry - time.time()) + 0.5)
        assert sim_id.renewals >= 1 and gateway.renewals >= 1
        assert registrar.replicas.rotations >= 1 and watcher.replicas.rotations >= 1
        await reporter.report_once()  # a new channel: a handshake with the new certificate

        # Restart the control plane on the same ports: every stream reconnects, and a
        # handshake with an old (expired) certificate would be refused.
        reconnects = watcher.reconnects
        await server.stop(None)
        server = await control_plane(plain, secure)
        assert server.port == int(plain.rpartition(":")[2])
        for _ in range(200):
            if server.cp.catalog.snapshot.instances and watcher.connected.is_set():
                break
            await asyncio.sleep(0.05)
        assert [i.instance_id for i in server.cp.catalog.snapshot.instances.values()] == ["sim-1"]
        assert watcher.reconnects > reconnects and watcher.connected.is_set()
        await routed()
        await reporter.report_once()
        assert server.cp.watchers["catalog"] >= 1 and server.cp.registrations == 1

        # Plaintext to the mTLS port is refused.
        async with grpc.aio.insecure_channel(secure) as clear:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await cp_grpc.RegistryStub(clear).List(cp_pb.ListRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        for part in (reporter, watcher):
            if part is not None:
                await part.stop()
        if registrar is not None:
            await registrar.stop(deregister=False)
        await _teardown(mesh, server)
