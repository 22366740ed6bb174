"""Authorization and callers' credentials in the proxy, with real calls on 127.0.0.1:
rules by tenant and by SPIFFE ID, deny first, default deny, reloads, API keys, JWTs, the
audit record of a denied call, and the open health checks."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aimesh.inference.v1 import inference_pb2_grpc as pb_grpc
from aimesh.interceptors import identity as identity_mod
from aimesh.interceptors.base import InboundCall, Next
from aimesh.mesh.config import load_dict
from aimesh.mesh.observability.audit import AuditSettings
from aimesh.mesh.proxy.server import Proxy
from aimesh.mesh.security.apikeys import KeyStore
from aimesh.mesh.security.callers import CallerAuth, StoreFile, load_store, run, save_store
from aimesh.mesh.security.jwt import JwtKey, JwtVerifier, sign_jwt

from .support import RunningSim, SimFactory, endpoint, llm_mesh, prompt

MakeProxy = Callable[..., Awaitable[Proxy]]
TD = "prod.mesh"
APP = f"spiffe://{TD}/ns/apps/sa/chat"
BATCH = f"spiffe://{TD}/ns/batch/sa/nightly"
SECRET = b"0123456789abcdef0123456789abcdef-hs256"

RULES: list[dict[str, object]] = [
    {
        "name": "no-blocked",
        "action": "DENY",
        "sources": ["tenant:blocked", f"spiffe://{TD}/ns/batch/**"],
    },
    {"name": "acme-tenants", "sources": ["tenant:acme*"], "destinations": ["llm"]},
    {"name": "apps", "sources": [f"spiffe://{TD}/ns/apps/**"]},
    {"name": "everyone-but", "sources": ["tenant:blocked"]},  # deny first wins over this
]


def authz_doc(sim: RunningSim, rules: list[dict[str, object]] = RULES) -> tuple[Any, Any]:
    doc, extra = llm_mesh([sim])
    doc["spec"]["security"] = {"authorization": {"enabled": True, "rules": rules}}  # type: ignore[index]
    return doc, extra


async def generate(port: int, md: tuple[tuple[str, str], ...] = ()) -> grpc.aio.AioRpcError | None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            await pb_grpc.InferenceStub(ch).Generate(prompt(), metadata=md, timeout=10)
        except grpc.aio.AioRpcError as err:
            return err
    return None


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
def keys() -> tuple[KeyStore, dict[str, str]]:
    store = KeyStore(iterations=1000)
    made = {t: store.create(t)[0] for t in ("acme", "acme-labs", "blocked", "other")}
    return store, made


async def test_tenant_rules_deny_first_and_default_deny(
    make_sim: SimFactory,
    make_proxy: MakeProxy,
    keys: tuple[KeyStore, dict[str, str]],
    tmp_path: Path,
) -> None:
    store, made = keys
    sim = await make_sim()
    doc, extra = authz_doc(sim)
    log = tmp_path / "audit.jsonl"
    proxy = await make_proxy(
        doc, extra=extra, callers=CallerAuth(store, None), audit=AuditSettings(str(log))
    )
    port = proxy.ports["listen"]
    assert await generate(port, bearer(made["acme"])) is None
    assert await generate(port, (("x-api-key", made["acme-labs"]),)) is None
    denied = await generate(port, bearer(made["blocked"]))
    assert denied is not None and denied.code() == grpc.StatusCode.PERMISSION_DENIED
    assert denied.details() == (
        "denied by rule 'no-blocked': tenant:blocked -> llm /aimesh.inference.v1.Inference/Generate"
    )
    default = await generate(port, bearer(made["other"]))
    assert default is not None and default.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "(default deny)" in default.details() and "tenant:other" in default.details()
    assert (
        proxy.counters.calls[("/aimesh.inference.v1.Inference/Generate", "PERMISSION_DENIED")] == 2
    )
    await proxy.stop(0.5)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    by_tenant = {r["tenant"]: r for r in records}
    assert by_tenant["blocked"]["status"] == "PERMISSION_DENIED"
    assert by_tenant["blocked"]["rule"] == "no-blocked"
    assert "no-blocked" in by_tenant["blocked"]["message"]
    assert by_tenant["other"]["rule"] == "default-deny"
    assert by_tenant["acme"]["status"] == "OK" and "rule" not in by_tenant["acme"]
    assert by_tenant["acme"]["caller"] == "tenant:acme"


async def test_policies_reload_without_restart(
    make_sim: SimFactory, make_proxy: MakeProxy, keys: tuple[KeyStore, dict[str, str]]
) -> None:
    store, made = keys
    sim = await make_sim()
    doc, extra = authz_doc(sim)
    proxy = await make_proxy(doc, extra=extra, callers=CallerAuth(store, None))
    port = proxy.ports["listen"]
    assert await generate(port, bearer(made["acme"])) is None
    doc2, _ = authz_doc(sim, [{"name": "only-other", "sources": ["tenant:other"]}])
    proxy.apply(load_dict(doc2, source="reload"))
    err = await generate(port, bearer(made["acme"]))
    assert err is not None and err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await generate(port, bearer(made["other"])) is None
    doc3, _ = llm_mesh([sim])  # authorization off again: everyone with a key
    proxy.apply(load_dict(doc3, source="reload"))
    assert await generate(port, bearer(made["blocked"])) is None


async def test_api_keys_missing_wrong_disabled_never_echoed(
    make_sim: SimFactory, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    sim = await make_sim()
    doc, extra = llm_mesh([sim])
    path = tmp_path / "keys.json"
    store = KeyStore(iterations=1000)
    key, record = store.create("acme")
    save_store(path, store)
    files = StoreFile(path, interval=0.0)
    proxy = await make_proxy(doc, extra=extra, callers=CallerAuth(files, None))
    port = proxy.ports["listen"]
    assert await generate(port, bearer(key)) is None

    missing = await generate(port)
    assert missing is not None and missing.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer" in missing.details()

    wrong = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    cases = {
        wrong: f"invalid API key {record.key_id}: unknown id or wrong secret",
        "amk_nonsense": "",
        "Basic-looking-garbage-token": "unrecognized credential",
    }
    for token, message in cases.items():
        err = await generate(port, bearer(token))
        assert err is not None and err.code() == grpc.StatusCode.UNAUTHENTICATED, token
        assert message in err.details()
        assert token not in err.details() and token[-20:] not in err.details()
    basic = await generate(port, (("authorization", f"Basic {key}"),))
    assert basic is not None and basic.code() == grpc.StatusCode.UNAUTHENTICATED
    assert key not in basic.details() and "Bearer" in basic.details()

    # Disabled in the file (as `aimesh apikey disable` does): the next call is refused.
    store.disable(record.key_id)
    save_store(path, store)
    disabled = await generate(port, bearer(key))
    assert disabled is not None and disabled.code() == grpc.StatusCode.UNAUTHENTICATED
    assert disabled.details() == f"API key {record.key_id} is disabled"
    assert key not in disabled.details()


async def test_jwt_valid_expired_wrong_audience(
    make_sim: SimFactory, make_proxy: MakeProxy
) -> None:
    sim = await make_sim()
    doc, extra = authz_doc(sim)
    verifier = JwtVerifier(
        [JwtKey.from_secret(SECRET)], issuer="https://idp.example", audience="aimesh"
    )
    proxy = await make_proxy(doc, extra=extra, callers=CallerAuth(None, verifier))
    port = proxy.ports["listen"]
    now = int(time.time())
    base = {"iss": "https://idp.example", "aud": "aimesh", "sub": "acme", "exp": now + 300}
    good = sign_jwt(base, SECRET, "HS256")
    assert await generate(port, bearer(good)) is None
    expired = sign_jwt({**base, "exp": now - 3600}, SECRET, "HS256")
    other_aud = sign_jwt({**base, "aud": "someone-else"}, SECRET, "HS256")
    for token, words in ((expired, "expired"), (other_aud, "aud")):
        err = await generate(port, bearer(token))
        assert err is not None and err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert words in err.details() and token not in err.details()
        assert token.split(".")[2] not in err.details()
    # A valid JWT for a tenant the rules do not allow: authenticated, then denied.
    denied = await generate(port, bearer(sign_jwt({**base, "sub": "blocked"}, SECRET, "HS256")))
    assert denied is not None and denied.code() == grpc.StatusCode.PERMISSION_DENIED
    # API keys were not configured: an amk_ key is refused with what to send instead.
    err = await generate(port, bearer("amk_0123456789abcdef_" + "x" * 43))
    assert err is not None and "does not accept API keys" in err.details()


async def test_health_and_reflection_stay_open(
    make_sim: SimFactory, make_proxy: MakeProxy, keys: tuple[KeyStore, dict[str, str]]
) -> None:
    store, _ = keys
    sim = await make_sim()
    doc, extra = authz_doc(sim, [])  # default deny for everything forwarded
    proxy = await make_proxy(doc, extra=extra, callers=CallerAuth(store, None))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.ports['listen']}") as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    err = await generate(proxy.ports["listen"])
    assert err is not None and err.code() == grpc.StatusCode.UNAUTHENTICATED


# --- SPIFFE IDs --------------------------------------------------------------------------


def svid_pem(spiffe_id: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), False
        )
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


class FakeContext:
    def __init__(self, auth: dict[str, list[bytes]]) -> None:
        self.auth = auth

    def auth_context(self) -> dict[str, list[bytes]]:
        return self.auth

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5555"


def test_peer_identity_reads_the_spiffe_id_of_the_peer_certificate() -> None:
    ctx = FakeContext({"x509_pem_cert": [svid_pem(APP)], "transport_security_type": [b"ssl"]})
    assert identity_mod.peer_identity(ctx) == APP
    assert identity_mod.peer_identity(FakeContext({})) == "ipv4:127.0.0.1:5555"
    # A certificate that is no X.509-SVID gives no mesh identity (rules see none).
    no_uri = FakeContext({"x509_pem_cert": [b"-----BEGIN CERTIFICATE-----\nAA==\n"]})
    assert identity_mod.peer_identity(no_uri) == "ipv4:127.0.0.1:5555"


@pytest.fixture
def spiffe_from_header(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stands in for mTLS: the caller's SPIFFE ID from a header, the way Identity would
    read it from the peer certificate (that part is tested above)."""

    async def around(self: Any, call: InboundCall, call_next: Next) -> None:
        call.identity = call.header("x-test-spiffe") or call.context.peer()
        await call_next()

    monkeypatch.setattr(identity_mod.Identity, "around", around)


async def test_spiffe_rules_at_a_sidecars_inbound_side(
    make_sim: SimFactory, make_proxy: MakeProxy, spiffe_from_header: None
) -> None:
    sim = await make_sim()
    doc, _ = authz_doc(
        sim,
        [
            *RULES[:1],
            {
                "name": "apps-to-llm",
                "sources": [f"spiffe://{TD}/ns/apps/**"],
                "destinations": ["llm"],
            },
        ],
    )
    proxy = await make_proxy(
        doc,
        mode="sidecar",
        inbound_listen="127.0.0.1:0",
        local_app=endpoint(sim).address,
        service="llm",
    )
    port = proxy.ports["inbound"]
    assert await generate(port, (("x-test-spiffe", APP),)) is None
    batch = await generate(port, (("x-test-spiffe", BATCH),))
    assert batch is not None and batch.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "rule 'no-blocked'" in batch.details()
    anonymous = await generate(port)
    assert anonymous is not None and anonymous.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (
        "an unauthenticated caller" in anonymous.details() and "default deny" in anonymous.details()
    )
    # The sidecar's outbound side serves its own app: not authorized there.
    assert proxy.forwarder is not None and proxy.forwarder.authorizer is None


# --- the aimesh apikey commands --------------------------------------------------------------


def test_apikey_cli_create_list_disable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from aimesh.mesh.cli import main

    path = tmp_path / "keys.json"
    assert (
        main(["apikey", "create", "--store", str(path), "--tenant", "acme", "--expires", "30d"])
        == 0
    )
    out = capsys.readouterr()
    key = out.out.strip()
    assert key.startswith("amk_") and "shown once" in out.err
    assert key not in path.read_text() and key.split("_")[2] not in path.read_text()
    assert path.stat().st_mode & 0o777 == 0o600
    identity = load_store(path).verify(key)
    assert identity.tenant == "acme"
    assert main(["apikey", "list", "--store", str(path)]) == 0
    listed = capsys.readouterr().out
    assert identity.subject in listed and "active" in listed and key not in listed
    assert main(["apikey", "disable", "--store", str(path), identity.subject]) == 0
    assert load_store(path).records[identity.subject].disabled
    assert run_missing(path) == 1


def run_missing(path: Path) -> int:
    import argparse

    return run(argparse.Namespace(apikey_command="disable", store=str(path), key_id="nope"))
