"""Who may call what on the control plane, with real TLS handshakes on 127.0.0.1.

STRICT (`--mtls-mode STRICT`): the plaintext port serves only Identity, health and
reflection. Over mTLS: registrations only for the caller's own service (or by an
operator), config only from operators. Operator certificates come from `aimesh identity
issue` and are used with `--tls-dir`. Provider adapters take the sims' identity flags."""

from __future__ import annotations

import io
import os
import stat
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from aimesh.control.v1 import control_plane_pb2 as cp_pb
from aimesh.control.v1 import control_plane_pb2_grpc as cp_grpc
from aimesh.inference.v1 import inference_pb2_grpc as inf_grpc
from aimesh.mesh import procs
from aimesh.mesh.cli import main as aimesh_main
from aimesh.mesh.control.access import PLAINTEXT_SERVICES
from aimesh.mesh.control.cli import main as cli_main
from aimesh.mesh.control.identity import IdentityService
from aimesh.mesh.control.server import ControlPlane, ControlPlaneServer
from aimesh.mesh.control.store import EmbeddedStore
from aimesh.mesh.security.ca import CertificateAuthority
from aimesh.mesh.security.spiffe import load_certificates, uri_sans
from aimesh.mesh.security.tokens import issue_join_token
from aimesh.mesh.security.workload import WorkloadIdentity, dns_name_for, load_tls_dir

from .provider_fake import FakeProvider
from .support import mesh_doc, prompt

TD = "aimesh.local"
OPERATOR = f"spiffe://{TD}/ns/aimesh-system/sa/alice"
CP_ID = f"spiffe://{TD}/ns/aimesh-system/sa/control-plane"
DOC = yaml.safe_dump(mesh_doc([{"name": "llm", "models": ["gpt-4"]}]))


def sid(service: str) -> str:
    return f"spiffe://{TD}/ns/default/sa/{service}"


def issue(ca_dir: Path, spiffe_id: str, out: Path) -> Path:
    """`aimesh identity issue`, in this process (it only signs and writes files)."""
    argv = ["identity", "issue", "--ca-dir", str(ca_dir), "--id", spiffe_id, "--out", str(out)]
    assert aimesh_main(argv) == 0
    return out


def _echo_service(server: grpc.aio.Server) -> None:
    """A service added to the control plane's server from outside (as the xDS ADS service
    is): STRICT must cover it with no list to update."""

    async def echo(request: bytes, context: Any) -> bytes:
        return request

    handler = grpc.unary_unary_rpc_method_handler(echo)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("test.Extra", {"Echo": handler}),)
    )


@dataclass
class Cp:
    server: ControlPlaneServer
    ca: CertificateAuthority
    ca_dir: Path
    plain: str
    secure: str
    started: list[WorkloadIdentity]

    async def workload(self, service: str) -> WorkloadIdentity:
        """A workload's identity, its first certificate from a join token over plaintext."""
        token = issue_join_token(self.ca.token_secret, sid(service), 300.0)
        w = WorkloadIdentity(self.plain, sid(service), token, secure_control_plane=self.secure)
        await w.start()
        self.started.append(w)
        return w

    def operator(self) -> WorkloadIdentity:
        return load_tls_dir(issue(self.ca_dir, OPERATOR, self.ca_dir.parent / "alice"))

    def mtls(self, who: WorkloadIdentity) -> grpc.aio.Channel:
        return who.secure_channel(self.secure, CP_ID)


async def _control_plane(tmp: Path, mode: str) -> Cp:
    ca = CertificateAuthority.create(TD)
    ca.to_pem_files(tmp / "ca")  # for `aimesh identity issue`
    server = ControlPlaneServer(
        ControlPlane(EmbeddedStore(None)), identity=IdentityService(ca), mtls_mode=mode
    )
    _echo_service(server.server)
    port = await server.start("127.0.0.1:0", secure_listen="127.0.0.1:0")
    return Cp(server, ca, tmp / "ca", f"127.0.0.1:{port}", f"127.0.0.1:{server.secure_port}", [])


@pytest.fixture
async def strict(tmp_path: Path) -> AsyncIterator[Cp]:
    cp = await _control_plane(tmp_path, "STRICT")
    yield cp
    for w in cp.started:
        await w.stop()
    await cp.server.stop(None)


def _instance(service: str, instance_id: str = "i-1") -> cp_pb.Instance:
    return cp_pb.Instance(
        service=service, address="127.0.0.1:9", instance_id=instance_id, serving=True
    )


async def _register(ch: grpc.aio.Channel, service: str, instance_id: str = "i-1") -> int:
    request = cp_pb.RegisterRequest(instance=_instance(service, instance_id))
    request.ttl.FromSeconds(30)
    response = await cp_grpc.RegistryStub(ch).Register(request, timeout=5)
    return int(response.lease_id)


async def _refused(call: Any, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    return info.value.details() or ""


async def _keepalive(ch: grpc.aio.Channel, lease_id: int) -> cp_pb.KeepAliveResponse:
    call = cp_grpc.RegistryStub(ch).KeepAlive(iter([cp_pb.KeepAliveRequest(lease_id=lease_id)]))
    response = await call.read()
    call.cancel()
    if response is grpc.aio.EOF:  # type: ignore[attr-defined]
        await call  # raises the status the stream ended with
    return response  # type: ignore[no-any-return]


# -- STRICT: the plaintext port ------------------------------------------------------------


async def test_strict_plaintext_serves_only_identity_health_and_reflection(strict: Cp) -> None:
    hint = (
        f"this control plane requires mTLS: connect to {strict.secure} with a mesh "
        "certificate (--tls-dir DIR"
    )
    async with grpc.aio.insecure_channel(strict.plain) as ch:
        registry, config = cp_grpc.RegistryStub(ch), cp_grpc.ConfigStub(ch)
        for call in (
            registry.List(cp_pb.ListRequest(), timeout=5),
            registry.Register(cp_pb.RegisterRequest(instance=_instance("llm")), timeout=5),
            config.Apply(cp_pb.ApplyConfigRequest(document=DOC), timeout=5),
            cp_grpc.StatusStub(ch).GetTopology(cp_pb.TopologyRequest(), timeout=5),
            ch.unary_unary("/test.Extra/Echo")(b"hi", timeout=5),  # added from outside
        ):
            assert (await _refused(call, grpc.StatusCode.UNAUTHENTICATED)).startswith(hint)
        watch = registry.Watch(cp_pb.WatchCatalogRequest(), timeout=5)  # a stream too
        assert (await _refused(watch.read(), grpc.StatusCode.UNAUTHENTICATED)).startswith(hint)
        # What a workload needs before it has a certificate is served.
        bundle = await cp_grpc.IdentityStub(ch).GetTrustBundle(cp_pb.GetTrustBundleRequest())
        assert bundle.trust_domain == TD
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        listed = {s.name async for r in reflect for s in r.list_services_response.service}
        assert "aimesh.mesh.v1.Registry" in listed and PLAINTEXT_SERVICES <= listed
    llm = await strict.workload("llm")  # SignCertificate with a join token, over plaintext
    async with strict.mtls(llm) as ch:  # ... and everything over mTLS
        assert (await cp_grpc.RegistryStub(ch).List(cp_pb.ListRequest(), timeout=5)).version >= 0
        assert await ch.unary_unary("/test.Extra/Echo")(b"hi", timeout=5) == b"hi"
    assert strict.server.guard is not None and strict.server.guard.refused == 6


def test_strict_needs_the_ca_and_an_mtls_port(tmp_path: Path, capsys: Any) -> None:
    argv = ["control-plane", "--store", "memory", "--mtls-mode", "STRICT"]
    assert aimesh_main([*argv, "--ca-dir", str(tmp_path / "ca")]) == 2
    assert "--mtls-mode STRICT needs --ca-dir DIR" in capsys.readouterr().err
    with pytest.raises(ValueError, match="needs the mesh CA"):
        ControlPlaneServer(ControlPlane(EmbeddedStore(None)), mtls_mode="STRICT")


# -- over mTLS: registrations by identity, config by operators -----------------------------


async def test_a_workload_manages_only_its_own_service(strict: Cp) -> None:
    llm, web = await strict.workload("llm"), await strict.workload("web")
    operator = strict.operator()
    async with strict.mtls(llm) as as_llm, strict.mtls(web) as as_web:
        lease = await _register(as_llm, "llm")
        assert (await _keepalive(as_llm, lease)).found
        denied = await _refused(_register(as_llm, "billing"), grpc.StatusCode.PERMISSION_DENIED)
        assert denied.startswith(
            f"{sid('llm')} may not register, renew or deregister instances of service 'billing'"
        )
        assert "aimesh identity issue" in denied  # what an operator would do instead
        # Another workload can neither renew, nor flip, nor remove llm's instance.
        registry = cp_grpc.RegistryStub(as_web)
        for call in (
            _keepalive(as_web, lease),
            registry.Deregister(cp_pb.DeregisterRequest(lease_id=lease), timeout=5),
            registry.Deregister(
                cp_pb.DeregisterRequest(
                    instance=cp_pb.InstanceRef(service="llm", instance_id="i-1")
                ),
                timeout=5,
            ),
        ):
            denied = await _refused(call, grpc.StatusCode.PERMISSION_DENIED)
            assert denied.startswith(f"{sid('web')} may not register") and "'llm'" in denied
        assert list(strict.server.cp.catalog.snapshot.instances) == [("llm", "i-1")]
    # An operator manages every service.
    async with strict.mtls(operator) as as_op:
        await _register(as_op, "billing", "b-1")
        registry = cp_grpc.RegistryStub(as_op)
        await registry.Deregister(cp_pb.DeregisterRequest(lease_id=lease), timeout=5)
    assert list(strict.server.cp.catalog.snapshot.instances) == [("billing", "b-1")]


async def test_a_lease_not_granted_yet_is_not_remembered_as_the_callers(strict: Cp) -> None:
    llm, web = await strict.workload("llm"), await strict.workload("web")
    async with strict.mtls(llm) as as_llm, strict.mtls(web) as as_web:
        first = await _register(as_llm, "llm", "i-1")
        # web renews the lease id that comes next, before anyone holds it, on one stream...
        stream = cp_grpc.RegistryStub(as_web).KeepAlive()
        await stream.write(cp_pb.KeepAliveRequest(lease_id=first + 1))
        assert not (await stream.read()).found
        second = await _register(as_llm, "llm", "i-2")
        assert second == first + 1
        # ... and once llm holds it, web may neither renew it nor take it out of rotation.
        await stream.write(cp_pb.KeepAliveRequest(lease_id=second, serving=False))
        denied = await _refused(stream.read(), grpc.StatusCode.PERMISSION_DENIED)
        assert denied.startswith(f"{sid('web')} may not register") and "'llm'" in denied
        # Nor deregister a lease this control plane does not know.
        registry = cp_grpc.RegistryStub(as_web)
        unknown = cp_pb.DeregisterRequest(lease_id=second + 1000)
        await _refused(registry.Deregister(unknown, timeout=5), grpc.StatusCode.NOT_FOUND)
    instances = strict.server.cp.catalog.snapshot.instances
    assert instances[("llm", "i-2")].serving


async def test_config_is_applied_only_by_operators(strict: Cp) -> None:
    llm = await strict.workload("llm")
    apply = cp_pb.ApplyConfigRequest(document=DOC, source="mesh.yaml")
    async with strict.mtls(llm) as ch:
        denied = await _refused(
            cp_grpc.ConfigStub(ch).Apply(apply, timeout=5), grpc.StatusCode.PERMISSION_DENIED
        )
    assert denied.startswith(f"{sid('llm')} may not apply config: only operator identities")
    assert f"aimesh identity issue --ca-dir DIR --id spiffe://{TD}/ns/aimesh-system/sa/" in denied
    async with strict.mtls(strict.operator()) as ch:
        applied = await cp_grpc.ConfigStub(ch).Apply(apply, timeout=5)
    assert applied.changed and strict.server.cp.config is not None


async def test_permissive_plaintext_is_as_before_and_mtls_still_checks(tmp_path: Path) -> None:
    cp = await _control_plane(tmp_path, "PERMISSIVE")
    try:
        async with grpc.aio.insecure_channel(cp.plain) as ch:
            await _register(ch, "anything")  # no identity to check: as before
            await cp_grpc.ConfigStub(ch).Apply(cp_pb.ApplyConfigRequest(document=DOC), timeout=5)
            assert await ch.unary_unary("/test.Extra/Echo")(b"hi", timeout=5) == b"hi"
        async with cp.mtls(await cp.workload("llm")) as ch:
            await _refused(_register(ch, "billing"), grpc.StatusCode.PERMISSION_DENIED)
        assert cp.server.guard is None
    finally:
        for w in cp.started:
            await w.stop()
        await cp.server.stop(None)


# -- operator certificates -------------------------------------------------------------------


def test_identity_issue_writes_a_certificate_for_tls_dir(tmp_path: Path, capsys: Any) -> None:
    CertificateAuthority.create(TD).to_pem_files(tmp_path / "ca")
    out = issue(tmp_path / "ca", OPERATOR, tmp_path / "alice")
    assert "an operator: may apply config" in capsys.readouterr().out
    assert stat.S_IMODE((out / "key.pem").stat().st_mode) == 0o600  # generated here, private
    leaf, _intermediate = load_certificates((out / "cert.pem").read_text())
    assert uri_sans(leaf) == [OPERATOR]
    assert 86390 < leaf.not_valid_after_utc.timestamp() - time.time() <= 86400
    identity = load_tls_dir(out)
    assert identity.spiffe_id == OPERATOR and identity.control_plane_id == CP_ID
    argv = ["identity", "issue", "--ca-dir", str(tmp_path / "ca"), "--out", str(tmp_path / "x")]
    assert aimesh_main([*argv, "--id", f"spiffe://{TD}/alice"]) == 2  # not .../ns/N/sa/S
    assert aimesh_main([*argv, "--id", sid("bot"), "--lifetime", "10m"]) == 0
    assert "not an operator" in capsys.readouterr().out
    # A key others can read, or an expired certificate, is refused before any call.
    os.chmod(out / "key.pem", 0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        load_tls_dir(out)
    err = io.StringIO()
    argv = ["get", "config", "--tls-dir", str(out), "--control-plane", "127.0.0.1:1"]
    assert cli_main(argv, io.StringIO(), err) == 2 and "chmod 600 it" in err.getvalue()
    with pytest.raises(ValueError, match=r"expired at .*aimesh identity issue"):
        load_tls_dir(tmp_path / "x", clock=lambda: time.time() + 3600)


# -- real processes: the operator CLI and a provider adapter against a STRICT control plane --


@dataclass
class CpProcess:
    proc: procs.Proc
    plain: str
    secure: str
    ca_dir: Path


@pytest.fixture(scope="module")
def strict_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CpProcess]:
    ca_dir = tmp_path_factory.mktemp("strict") / "ca"
    proc = procs.start_control_plane(
        "--ca-dir", str(ca_dir), "--secure-listen", "127.0.0.1:0", "--mtls-mode", "STRICT"
    )
    try:
        line = procs.wait_for_output(proc, "mTLS on")
        secure = line.split("mTLS on ", 1)[1].split(";", 1)[0]
        assert "STRICT: plaintext serves only Identity, health and reflection" in line
        yield CpProcess(proc, proc.address, secure, ca_dir)
    finally:
        proc.kill()


def _cli(cp: CpProcess, *argv: str, secure: bool = True) -> tuple[int, str, str]:
    """`aimesh apply|get|...` in this process (the control plane is the process here)."""
    out, err = io.StringIO(), io.StringIO()
    code = cli_main([*argv, "--control-plane", cp.secure if secure else cp.plain], out, err)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.slow
def test_operator_cli_against_a_strict_control_plane(
    strict_process: CpProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cp = strict_process
    (tmp_path / "mesh.yaml").write_text(DOC)
    apply = ("apply", "-f", str(tmp_path / "mesh.yaml"))
    code, _, err = _cli(cp, *apply, secure=False)  # plaintext, no certificate
    assert code == 1
    assert f"UNAUTHENTICATED: this control plane requires mTLS: connect to {cp.secure}" in err
    bot = issue(cp.ca_dir, sid("bot"), tmp_path / "bot")  # a valid certificate, no operator
    code, _, err = _cli(cp, *apply, "--tls-dir", str(bot))
    assert code == 1 and f"PERMISSION_DENIED: {sid('bot')} may not apply config" in err
    alice = issue(cp.ca_dir, OPERATOR, tmp_path / "alice")
    code, out, err = _cli(cp, *apply, "--tls-dir", str(alice))
    assert (code, out.strip()) == (0, "mesh.yaml: applied as config v1"), err
    monkeypatch.setenv("AIMESH_TLS_DIR", str(alice))  # read when the parser is built
    code, out, _ = _cli(cp, "get", "config")
    assert code == 0 and "# config v1 (test) from mesh.yaml" in out
    code, _, err = _cli(cp, "deregister", "llm", "nope")
    assert code == 1 and "NOT_FOUND" in err


def _tls_channel(tls_dir: Path, target: str, expected_id: str) -> grpc.Channel:
    """A synchronous mTLS channel from the files of a --tls-dir."""
    read = [(tls_dir / name).read_bytes() for name in ("ca.pem", "key.pem", "cert.pem")]
    return grpc.secure_channel(
        target,
        grpc.ssl_channel_credentials(*read),
        options=[("grpc.ssl_target_name_override", dns_name_for(expected_id))],
    )


def _catalog_until(channel: grpc.Channel, done: Any) -> list[cp_pb.Instance]:
    """Follows the catalog (Watch) until `done(instances)`; returns them."""
    instances: dict[tuple[str, str], cp_pb.Instance] = {}
    for update in cp_grpc.RegistryStub(channel).Watch(cp_pb.WatchCatalogRequest(), timeout=10):
        if update.full:
            instances.clear()
        instances.update({(i.service, i.instance_id): i for i in update.upserted})
        for gone in update.removed:
            instances.pop((gone.service, gone.instance_id), None)
        if done(list(instances.values())):
            return list(instances.values())
    raise AssertionError("the catalog stream ended")


@pytest.mark.slow
def test_provider_adapter_with_a_join_token_serves_mtls_and_registers_over_mtls(
    strict_process: CpProcess, tmp_path: Path, capsys: Any
) -> None:
    cp = strict_process
    assert aimesh_main(["identity", "token", "--ca-dir", str(cp.ca_dir), "--id", sid("gpt-4")]) == 0
    token = capsys.readouterr().out.strip()
    fake = FakeProvider().start()
    fake.reply("/v1/chat/completions", "openai_chat_unary.http")
    adapter = procs.start(
        "openai-backend",
        procs.aimesh_command(
            "backend",
            "openai",
            "--listen",
            "127.0.0.1:0",
            "--base-url",
            f"{fake.base}/v1",
            "--model-map",
            "gpt-4=gpt-4o-mini",
            "--instance-id",
            "openai-tls",
            "--control-plane",
            cp.plain,  # the first certificate, with the token
            "--secure-control-plane",
            cp.secure,  # registration (STRICT refuses it on plaintext)
            "--identity",
            sid("gpt-4"),
        ),
        env={"AIMESH_JOIN_TOKEN": token},
    )
    try:
        assert f"mTLS as {sid('gpt-4')} (STRICT)" in "".join(adapter.output)
        web = issue(cp.ca_dir, sid("web"), tmp_path / "web")
        with _tls_channel(web, adapter.address, sid("gpt-4")) as ch:  # a mesh client
            reply = inf_grpc.InferenceStub(ch).Generate(prompt(), timeout=10)
        assert reply.text == "Hello! How can I help you today?"
        with grpc.insecure_channel(adapter.address) as clear, pytest.raises(grpc.RpcError) as info:
            inf_grpc.InferenceStub(clear).Generate(prompt(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # plaintext to a STRICT port
        alice = issue(cp.ca_dir, OPERATOR, tmp_path / "alice")
        with _tls_channel(alice, cp.secure, CP_ID) as ch:
            [instance] = _catalog_until(ch, lambda got: got)
            assert (instance.service, instance.address) == ("gpt-4", adapter.address)
            assert adapter.terminate() == 0  # deregisters itself, over mTLS, on SIGTERM
            assert _catalog_until(ch, lambda got: not got) == []
    finally:
        adapter.kill()
        fake.stop()
    assert "stopped" in "".join(adapter.output)
