"""Security core (mesh/security): SPIFFE IDs, the CA and chain checks, join tokens,
authorization, API keys and JWT, all with fake clocks; one test runs real mTLS over gRPC.

RSA keys are slow to make: one per session (`_rsa_key`); everything else uses EC P-256.
"""

from __future__ import annotations

import base64
import datetime as dt
import fnmatch
import functools
import hashlib
import hmac
import json
import stat
import timeit
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aimesh.mesh.errors import ConfigError
from aimesh.mesh.security import PermissionDenied, TenantIdentity, Unauthenticated, spiffe
from aimesh.mesh.security.apikeys import MIN_ITERATIONS, ApiKeyRecord, KeyStore
from aimesh.mesh.security.authz import Authorizer, Decision, Rule, parse_rules
from aimesh.mesh.security.ca import (
    CLOCK_SKEW,
    DAY,
    HOUR,
    MINUTE,
    CertificateAuthority,
    CertificateRejected,
    CsrRejected,
    generate_key,
    make_csr,
    private_key_pem,
    verify_chain,
)
from aimesh.mesh.security.jwt import InvalidToken, JwtKey, JwtVerifier, load_keys, sign_jwt
from aimesh.mesh.security.spiffe import (
    PatternSet,
    compile_pattern,
    parse,
    peer_spiffe_id,
    spiffe_id,
)
from aimesh.mesh.security.tokens import (
    IdentityNotGranted,
    InvalidJoinToken,
    issue_join_token,
    read_join_token,
    verify_join_token,
)

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z
TD = "prod.mesh"
GPT4 = f"spiffe://{TD}/ns/prod/sa/gpt4-gateway"
APP = f"spiffe://{TD}/ns/prod/sa/app"
GENERATE = "/aimesh.inference.v1.Inference/Generate"
PROPERTY = settings(
    max_examples=60, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@functools.cache
def _rsa_key() -> rsa.RSAPrivateKey:
    key = generate_key("rsa-2048")
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    return key


@functools.cache
def _ca() -> CertificateAuthority:
    """A CA shared by read-only tests (its clock stays at T0)."""
    return CertificateAuthority.create(TD, clock=FakeClock())


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _leaf(ca: CertificateAuthority, identity: str = GPT4, **kwargs: Any) -> tuple[str, str, str]:
    """(key PEM, leaf PEM, chain PEM) for `identity`, signed by `ca`."""
    key_pem, csr = make_csr(identity, dns_names=kwargs.pop("csr_dns", ()))
    leaf, chain = ca.sign_csr(csr, identity, **kwargs)
    return key_pem, leaf, chain


def _cert(
    subject_key: Any,
    issuer_key: Any,
    *,
    cn: str,
    issuer_cn: str | None = None,
    uris: Sequence[str] = (),
    ca: bool = False,
    path_length: int | None = None,
    not_before: float = T0 - MINUTE,
    not_after: float = T0 + DAY,
    extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
    key_usage_cert_sign: bool = True,
) -> x509.Certificate:
    """A hand-made certificate, for the chains the CA would never make."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_cn or cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(subject_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime.fromtimestamp(not_before, dt.UTC))
        .not_valid_after(dt.datetime.fromtimestamp(not_after, dt.UTC))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=key_usage_cert_sign,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(*certs: x509.Certificate) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)


# --- SPIFFE IDs ----------------------------------------------------------------------------


def test_spiffe_id_builds_and_parses() -> None:
    assert spiffe_id(TD, "prod", "gpt4-gateway") == GPT4
    parsed = parse(GPT4)
    assert (parsed.trust_domain, parsed.path) == (TD, "/ns/prod/sa/gpt4-gateway")
    assert parsed.segments == ("ns", "prod", "sa", "gpt4-gateway")
    assert (parsed.namespace, parsed.service) == ("prod", "gpt4-gateway")
    assert str(parsed) == GPT4
    assert parse("spiffe://td").segments == ()
    assert parse("spiffe://td/a/b").namespace is None
    assert spiffe.trust_domain_id(TD) == "spiffe://prod.mesh"
    with pytest.raises(ValueError, match="must be lowercase"):
        spiffe_id("Prod.mesh", "prod", "x")
    with pytest.raises(ValueError, match="not allowed"):
        spiffe_id(TD, "prod", "a/b/..")


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("", "is empty"),
        ("http://td/x", "must start with spiffe://"),
        ("SPIFFE://td/x", "scheme must be lowercase"),
        ("spiffe://", "trust domain .* is empty"),
        ("spiffe:///ns/x", "is empty"),
        ("spiffe://Td/x", "must be lowercase"),
        ("spiffe://td:8080/x", "a port is not allowed"),
        ("spiffe://user@td/x", "user info is not allowed"),
        ("spiffe://t d/x", "' ' is not allowed"),
        ("spiffe://td/x/", "empty path segment"),
        ("spiffe://td/", "empty path segment"),
        ("spiffe://td//x", "empty path segment"),
        ("spiffe://td/./x", "dot segment '.'"),
        ("spiffe://td/x/..", "dot segment '..'"),
        ("spiffe://td/x?y=1", "a query is not allowed"),
        ("spiffe://td/x#frag", "a fragment is not allowed"),
        ("spiffe://td/a%20b", "percent-encoding"),
        ("spiffe://td/a:b", "':' in path segment"),
        ("spiffe://td/" + "a" * 2040, "the maximum is 2048"),
        ("spiffe://" + "a" * 256 + "/x", "the maximum is 255"),
    ],
)
def test_spiffe_parse_rejects(value: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse(value)
    assert not spiffe.is_valid(value)


_TD_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.-_"
_SEG_CHARS = _TD_CHARS + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
trust_domains = st.text(_TD_CHARS, min_size=1, max_size=40)
segments = st.text(_SEG_CHARS, min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))


@PROPERTY
@given(trust_domains, st.lists(segments, max_size=6))
def test_spiffe_round_trip(trust_domain: str, path: list[str]) -> None:
    value = f"spiffe://{trust_domain}" + "".join(f"/{s}" for s in path)
    parsed = parse(value)
    assert str(parsed) == value
    assert parsed.trust_domain == trust_domain
    assert parsed.segments == tuple(path)
    assert compile_pattern(value).matches(value)


@PROPERTY
@given(
    trust_domains,
    st.lists(segments, min_size=1, max_size=4),
    st.sampled_from(" %:@?#/\\é+*!"),
    st.data(),
)
def test_spiffe_one_bad_character_is_rejected(
    trust_domain: str, path: list[str], bad: str, data: st.DataObject
) -> None:
    value = f"spiffe://{trust_domain}" + "".join(f"/{s}" for s in path)
    at = data.draw(st.integers(len("spiffe://") + len(trust_domain) + 1, len(value) - 1))
    if bad == "/" and (value[at - 1] != "/" and value[at] != "/"):
        return  # a slash inside a segment just splits it, which is valid
    with pytest.raises(ValueError):
        parse(value[:at] + bad + value[at:])


@pytest.mark.parametrize(
    ("pattern", "value", "matches"),
    [
        (GPT4, GPT4, True),
        (GPT4, APP, False),
        ("*", GPT4, True),
        ("*", "spiffe://other/x", True),
        (f"spiffe://{TD}/ns/prod/sa/*", GPT4, True),
        (f"spiffe://{TD}/ns/prod/sa/*", f"spiffe://{TD}/ns/dev/sa/app", False),
        (f"spiffe://{TD}/ns/prod/sa/*", f"spiffe://{TD}/ns/prod/sa/a/b", False),
        (f"spiffe://{TD}/ns/*/sa/gpt4-*", GPT4, True),
        (f"spiffe://{TD}/ns/*/sa/gpt4-*", APP, False),
        (f"spiffe://{TD}/ns/*/sa/*-gateway", GPT4, True),
        (f"spiffe://{TD}/ns/prod/**", GPT4, True),
        (f"spiffe://{TD}/ns/prod/**", f"spiffe://{TD}/ns/prod", False),
        (f"spiffe://{TD}/ns/prod/**", f"spiffe://{TD}/ns/production/sa/x", False),
        (f"spiffe://{TD}/**/sa/app", APP, True),
        (f"spiffe://{TD}/**", GPT4, True),
        (f"spiffe://{TD}/**", "spiffe://other.mesh/ns/prod/sa/x", False),
        ("spiffe://*/ns/prod/sa/app", APP, True),
        ("spiffe://*.mesh/ns/prod/sa/app", APP, True),
        ("spiffe://*.mesh/ns/prod/sa/app", "spiffe://prod.other/ns/prod/sa/app", False),
    ],
)
def test_patterns(pattern: str, value: str, matches: bool) -> None:
    assert compile_pattern(pattern).matches(value) is matches
    assert PatternSet([pattern, "spiffe://x/never"]).matches(value) is matches


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("spiffe://td/a**", "whole path segment"),
        ("spiffe://**/x", "whole path segment"),
        ("spiffe://td/a b*", "' '"),
        ("spiffe://td/./*", "dot segment"),
        ("spiffe://td/x/", "empty path segment"),
        ("spiffe:///x*", "trust domain is empty"),
        ("http://td/*", "must start with spiffe://"),
        ("spiffe://td/x?q=*", "query"),
    ],
)
def test_bad_patterns(pattern: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        compile_pattern(pattern)


def test_peer_spiffe_id() -> None:
    _, leaf, _ = _leaf(_ca())
    assert peer_spiffe_id(leaf) == GPT4
    assert peer_spiffe_id(leaf.encode()) == GPT4
    der = x509.load_pem_x509_certificate(leaf.encode()).public_bytes(serialization.Encoding.DER)
    assert peer_spiffe_id(der) == GPT4
    key = generate_key()
    with pytest.raises(ValueError, match=r"exactly one URI .* has 0: none"):
        peer_spiffe_id(_cert(key, key, cn="plain"))
    with pytest.raises(ValueError, match="has 2"):
        peer_spiffe_id(_cert(key, key, cn="two", uris=[GPT4, APP]))
    with pytest.raises(ValueError, match="query"):
        peer_spiffe_id(_cert(key, key, cn="bad", uris=["spiffe://td/x?y"]))
    with pytest.raises(ValueError, match=r"not a readable X.509"):
        peer_spiffe_id(b"garbage")


# --- the CA: issuance and verification -----------------------------------------------------


def test_issue_and_verify(clock: FakeClock) -> None:
    ca = CertificateAuthority.create(TD, clock=clock)
    key_pem, csr = make_csr(GPT4, dns_names=["gpt4.local"])
    clock.advance(10)
    leaf_pem, chain_pem = ca.sign_csr(csr, GPT4, lifetime=6 * HOUR, dns_names=["gpt4.local"])
    bundle = ca.trust_bundle()
    assert verify_chain(leaf_pem, chain_pem, bundle, now=clock.now) == GPT4
    assert verify_chain(leaf_pem, chain_pem, bundle, now=clock.now, expected_id=GPT4) == GPT4
    assert chain_pem == ca.intermediate_pem and bundle == ca.root_pem

    leaf = x509.load_pem_x509_certificate(leaf_pem.encode())
    # The workload's key is in the leaf; the CA never saw the private half.
    workload_key = serialization.load_pem_private_key(key_pem.encode(), None)
    assert leaf.public_key() == workload_key.public_key()
    ext = leaf.extensions
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = ext.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment and not usage.key_cert_sign
    assert set(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    }
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [GPT4]
    assert san.get_values_for_type(x509.DNSName) == ["gpt4.local"]
    assert leaf.not_valid_before_utc.timestamp() == clock.now - CLOCK_SKEW
    assert leaf.not_valid_after_utc.timestamp() == clock.now + 6 * HOUR
    assert 0 < leaf.serial_number < 2**128

    root = x509.load_pem_x509_certificate(bundle.encode())
    inter = x509.load_pem_x509_certificate(chain_pem.encode())
    for cert, path_length in ((root, 1), (inter, 0)):
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        assert bc.critical and bc.value.ca and bc.value.path_length == path_length
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert ku.key_cert_sign and ku.crl_sign
    assert root.subject == root.issuer and inter.issuer == root.subject

    # An independent verifier (cryptography's WebPKI profile) accepts the chain too.
    verifier = (
        PolicyBuilder()
        .store(Store([root]))
        .time(dt.datetime.fromtimestamp(clock.now, dt.UTC))
        .build_client_verifier()
    )
    verified = verifier.verify(leaf, [inter])
    assert x509.UniformResourceIdentifier(GPT4) in (verified.subjects or [])


def test_leaf_lifetime_bounds_and_clamp(clock: FakeClock) -> None:
    ca = _ca()
    _, csr = make_csr(GPT4)
    for lifetime in (59.0, 30 * DAY + 1):
        with pytest.raises(ValueError, match=r"between 60s .* and 2592000s"):
            ca.sign_csr(csr, GPT4, lifetime=lifetime)
    for lifetime in (MINUTE, 30 * DAY):
        leaf, _ = ca.sign_csr(csr, GPT4, lifetime=lifetime)
        cert = x509.load_pem_x509_certificate(leaf.encode())
        assert cert.not_valid_after_utc.timestamp() == T0 + lifetime
    # Never past the intermediate's own expiry.
    short = CertificateAuthority.create(TD, clock=clock, intermediate_lifetime=2 * HOUR)
    leaf, chain = short.sign_csr(csr, GPT4, lifetime=DAY)
    end = x509.load_pem_x509_certificate(leaf.encode()).not_valid_after_utc
    assert end == x509.load_pem_x509_certificate(chain.encode()).not_valid_after_utc
    clock.advance(3 * HOUR)
    with pytest.raises(ValueError, match=r"intermediate CA expired .* rotate_intermediate"):
        short.sign_csr(csr, GPT4)
    short.rotate_intermediate()
    leaf, chain = short.sign_csr(csr, GPT4)
    assert verify_chain(leaf, chain, short.trust_bundle(), now=clock.now) == GPT4


def test_grants_must_be_workloads_of_the_trust_domain() -> None:
    _, csr = make_csr("spiffe://other.mesh/ns/prod/sa/x")
    with pytest.raises(ValueError, match=r"signs for trust domain 'prod.mesh', not 'other.mesh'"):
        _ca().sign_csr(csr, "spiffe://other.mesh/ns/prod/sa/x")
    _, csr = make_csr(f"spiffe://{TD}")
    with pytest.raises(ValueError, match="names the trust domain, not a workload"):
        _ca().sign_csr(csr, f"spiffe://{TD}")
    with pytest.raises(ValueError, match="invalid SPIFFE ID"):
        _ca().sign_csr(csr, "spiffe://prod.mesh/ns//x")


def test_csr_for_another_identity_is_rejected() -> None:
    _, csr = make_csr(GPT4)
    with pytest.raises(CsrRejected) as err:
        _ca().sign_csr(csr, APP)
    message = str(err.value)
    assert f"asks for identity {GPT4} but this workload is granted {APP}" in message
    assert f"make a CSR with the URI SAN {APP}" in message


def _raw_csr(key: Any, names: Sequence[x509.GeneralName] = (), cn: str | None = None) -> str:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM).decode()


def test_csr_checks() -> None:
    ca = _ca()
    key = generate_key()
    short_id = f"spiffe://{TD}/ns/a/sa/b"
    # Subject common name instead of a SAN: accepted when it is exactly the grant.
    leaf, _ = ca.sign_csr(_raw_csr(key, cn=short_id), short_id)
    assert peer_spiffe_id(leaf) == short_id
    with pytest.raises(CsrRejected, match="subject common name"):
        ca.sign_csr(_raw_csr(key, cn=f"spiffe://{TD}/ns/a/sa/c"), short_id)
    with pytest.raises(CsrRejected, match="names no identity"):
        ca.sign_csr(_raw_csr(key), short_id)
    dns_only = _raw_csr(key, [x509.DNSName("b.local")], cn=short_id)
    assert peer_spiffe_id(ca.sign_csr(dns_only, short_id, dns_names=["b.local"])[0]) == short_id
    uri = x509.UniformResourceIdentifier
    with pytest.raises(CsrRejected, match="asks for 2 identities"):
        ca.sign_csr(_raw_csr(key, [uri(GPT4), uri(APP)]), GPT4)
    with pytest.raises(CsrRejected, match=r"DNS names evil.example that are not granted"):
        ca.sign_csr(_raw_csr(key, [uri(GPT4), x509.DNSName("evil.example")]), GPT4)
    with pytest.raises(CsrRejected, match="kinds this CA never grants"):
        ca.sign_csr(_raw_csr(key, [uri(GPT4), x509.RFC822Name("a@b.c")]), GPT4)
    ca.sign_csr(_raw_csr(key, [uri(GPT4), x509.DNSName("a.local")]), GPT4, dns_names=["a.local"])
    with pytest.raises(CsrRejected, match="RSA key has 1024 bits"):
        weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        ca.sign_csr(_raw_csr(weak, [uri(GPT4)]), GPT4)
    with pytest.raises(CsrRejected, match="P-256 or P-384"):
        ca.sign_csr(_raw_csr(ec.generate_private_key(ec.SECP521R1()), [uri(GPT4)]), GPT4)
    with pytest.raises(CsrRejected, match="not a readable PEM"):
        ca.sign_csr("not a csr", GPT4)
    # A CSR whose signature does not match its key: altered after signing.
    good = x509.load_pem_x509_csr(_raw_csr(key, [uri(GPT4)]).encode())
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01
    forged = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CsrRejected, match="signature does not verify"):
        ca.sign_csr(forged, GPT4)


def test_verify_rejects_foreign_ca_expired_and_wrong_identity(clock: FakeClock) -> None:
    ca = _ca()
    _, leaf, chain = _leaf(ca, lifetime=HOUR)
    other = CertificateAuthority.create(TD, clock=clock)
    with pytest.raises(CertificateRejected, match=f"certificate of {GPT4} is signed by a foreign"):
        verify_chain(leaf, chain, other.trust_bundle(), now=T0)
    with pytest.raises(CertificateRejected, match="foreign CA"):
        verify_chain(leaf, "", ca.trust_bundle(), now=T0)  # the intermediate is missing
    with pytest.raises(CertificateRejected, match="expired at 2027-01-15T09:00:00Z"):
        verify_chain(leaf, chain, ca.trust_bundle(), now=T0 + HOUR + 1)
    with pytest.raises(CertificateRejected, match="not valid yet: valid from 2027-01-15T07:59"):
        verify_chain(leaf, chain, ca.trust_bundle(), now=T0 - 2 * MINUTE)
    assert verify_chain(leaf, chain, ca.trust_bundle(), now=T0 - MINUTE) == GPT4  # the skew
    with pytest.raises(CertificateRejected, match=f"wrong identity: got {GPT4}, expected {APP}"):
        verify_chain(leaf, chain, ca.trust_bundle(), now=T0, expected_id=APP)
    with pytest.raises(CertificateRejected, match="is a CA; it cannot be a workload"):
        verify_chain(chain, "", ca.trust_bundle(), now=T0)
    with pytest.raises(CertificateRejected, match="no certificate"):
        verify_chain(leaf, chain, "", now=T0)
    with pytest.raises(CertificateRejected, match="not a readable"):
        verify_chain("junk", chain, ca.trust_bundle(), now=T0)
    when = dt.datetime.fromtimestamp(T0, dt.UTC)
    assert verify_chain(leaf, chain, ca.trust_bundle(), now=when) == GPT4


def test_verify_checks_ca_constraints() -> None:
    root_key, inter_key, leaf_key = generate_key(), generate_key(), generate_key()
    bundle = _pem(_cert(root_key, root_key, cn="root", ca=True, path_length=0))

    def chain(**inter: Any) -> str:
        return _pem(_cert(inter_key, root_key, cn="inter", issuer_cn="root", **inter))

    leaf = _pem(_cert(leaf_key, inter_key, cn="leaf", issuer_cn="inter", uris=[GPT4]))
    with pytest.raises(CertificateRejected, match="allows 0 intermediate"):
        verify_chain(leaf, chain(ca=True), bundle, now=T0)
    open_root = _pem(_cert(root_key, root_key, cn="root", ca=True))
    assert verify_chain(leaf, chain(ca=True), open_root, now=T0) == GPT4
    with pytest.raises(CertificateRejected, match="intermediate CA 'CN=inter' is not a CA"):
        verify_chain(leaf, chain(ca=False), open_root, now=T0)
    with pytest.raises(CertificateRejected, match="not allowed to sign certificates"):
        verify_chain(leaf, chain(ca=True, key_usage_cert_sign=False), open_root, now=T0)
    with pytest.raises(CertificateRejected, match="intermediate CA 'CN=inter' expired at"):
        verify_chain(leaf, chain(ca=True, not_after=T0 - 1), open_root, now=T0)
    unknown = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00")
    with pytest.raises(
        CertificateRejected, match=r"unknown critical extension 1.3.6.1.4.1.99999.1"
    ):
        verify_chain(leaf, chain(ca=True, extensions=[(unknown, True)]), open_root, now=T0)
    constrained = x509.NameConstraints(
        permitted_subtrees=[x509.UniformResourceIdentifier("other.mesh")], excluded_subtrees=None
    )
    with pytest.raises(CertificateRejected, match="outside the name constraints"):
        verify_chain(leaf, chain(ca=True, extensions=[(constrained, True)]), open_root, now=T0)
    allowed = x509.NameConstraints(
        permitted_subtrees=[x509.UniformResourceIdentifier(TD)], excluded_subtrees=None
    )
    assert verify_chain(leaf, chain(ca=True, extensions=[(allowed, True)]), open_root, now=T0)
    # A leaf that is a TLS certificate of neither kind.
    eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING])
    signing = _pem(
        _cert(
            leaf_key, inter_key, cn="l", issuer_cn="inter", uris=[GPT4], extensions=[(eku, False)]
        )
    )
    with pytest.raises(CertificateRejected, match="neither serverAuth nor clientAuth"):
        verify_chain(signing, chain(ca=True), open_root, now=T0)


def test_trust_domain_must_match_the_anchor() -> None:
    # An aimesh CA of other.mesh signing (by hand) a leaf that claims prod.mesh.
    other = CertificateAuthority.create("other.mesh", clock=FakeClock())
    inter_key = other._current.intermediate_key
    inter = x509.load_pem_x509_certificate(other.intermediate_pem.encode())
    leaf_key = generate_key()
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(inter.subject)
        .public_key(leaf_key.public_key())
        .serial_number(7)
        .not_valid_before(dt.datetime.fromtimestamp(T0 - 60, dt.UTC))
        .not_valid_after(dt.datetime.fromtimestamp(T0 + 60, dt.UTC))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(GPT4)]), critical=True
        )
        .sign(inter_key, hashes.SHA256())
    )
    with pytest.raises(CertificateRejected, match="does not issue identities in trust domain"):
        verify_chain(_pem(leaf), other.intermediate_pem, other.trust_bundle(), now=T0)
    # Federation: a bundle with both roots accepts each domain's own leaves.
    _, leaf_pem, chain = _leaf(other, "spiffe://other.mesh/ns/x/sa/y")
    bundle = _ca().trust_bundle() + other.trust_bundle()
    assert verify_chain(leaf_pem, chain, bundle, now=T0) == "spiffe://other.mesh/ns/x/sa/y"


# --- root rotation, intermediates, operator roots ------------------------------------------


def test_root_rotation_with_overlap(clock: FakeClock) -> None:
    ca = CertificateAuthority.create(TD, clock=clock)
    _, old_leaf, old_chain = _leaf(ca, lifetime=30 * DAY)
    old_root = ca.root_pem

    # Step 1: the next root joins the bundle; signing does not change yet.
    bundle = ca.prepare_root_rotation()
    assert ca.rotation_prepared and bundle.count("BEGIN CERTIFICATE") == 2
    assert bundle.startswith(old_root)
    with pytest.raises(ValueError, match="already prepared"):
        ca.prepare_root_rotation()
    _, _, chain = _leaf(ca)
    assert chain == old_chain

    # Step 3: switch; the old root stays trusted for the overlap.
    clock.advance(HOUR)
    ca.rotate_root(overlap=2 * DAY)
    assert not ca.rotation_prepared and ca.root_pem != old_root
    _, new_leaf, new_chain = _leaf(ca)
    assert new_chain != old_chain
    bundle = ca.trust_bundle()
    assert bundle.count("BEGIN CERTIFICATE") == 2 and old_root in bundle
    assert [r.trusted_until for r in ca.retired_roots] == [T0 + HOUR + 2 * DAY]
    clock.advance(DAY)
    assert verify_chain(old_leaf, old_chain, ca.trust_bundle(), now=clock.now) == GPT4
    assert verify_chain(new_leaf, new_chain, ca.trust_bundle(), now=clock.now) == GPT4
    # A verifier still on the old bundle alone cannot check new leaves (hence step 2).
    with pytest.raises(CertificateRejected, match="foreign CA"):
        verify_chain(new_leaf, new_chain, old_root, now=clock.now)

    # After the overlap the old root is gone, and so are its leaves (still unexpired).
    clock.advance(DAY + 1)
    bundle = ca.trust_bundle()
    assert old_root not in bundle and bundle == ca.root_pem and ca.retired_roots == ()
    with pytest.raises(CertificateRejected, match="signed by a foreign CA"):
        verify_chain(old_leaf, old_chain, bundle, now=clock.now)
    _, renewed, renewed_chain = _leaf(ca)
    assert verify_chain(renewed, renewed_chain, bundle, now=clock.now) == GPT4


def test_rotate_root_default_overlap_and_drop(clock: FakeClock) -> None:
    ca = CertificateAuthority.create(TD, clock=clock)
    _leaf(ca, lifetime=3 * DAY)
    _leaf(ca, lifetime=HOUR)
    ca.rotate_root()  # unprepared: new root and intermediate at once
    # The old root is trusted until the longest-lived leaf it signed expires, plus the skew.
    assert [r.trusted_until for r in ca.retired_roots] == [T0 + 3 * DAY + CLOCK_SKEW]
    ca.drop_retired_roots()
    assert ca.trust_bundle() == ca.root_pem
    ca.rotate_root()  # no leaf signed since: only the skew
    assert [r.trusted_until for r in ca.retired_roots] == [T0 + CLOCK_SKEW]
    with pytest.raises(ValueError, match="0 or more"):
        ca.rotate_root(overlap=-1)


def test_rotate_intermediate_keeps_the_bundle(clock: FakeClock) -> None:
    ca = CertificateAuthority.create(TD, clock=clock)
    _, old_leaf, old_chain = _leaf(ca)
    bundle = ca.trust_bundle()
    ca.rotate_intermediate()
    _, new_leaf, new_chain = _leaf(ca)
    assert new_chain != old_chain and ca.trust_bundle() == bundle
    assert verify_chain(old_leaf, old_chain, bundle, now=T0) == GPT4
    assert verify_chain(new_leaf, new_chain, bundle, now=T0) == GPT4


def _operator_root(clock: FakeClock, **kwargs: Any) -> tuple[str, str, Any]:
    key = generate_key()
    kwargs.setdefault("ca", True)
    cert = _cert(key, key, cn="Operator Root", not_after=clock.now + 3650 * DAY, **kwargs)
    return _pem(cert), private_key_pem(key), key


def test_operator_root(clock: FakeClock, tmp_path: Path) -> None:
    root_pem, key_pem, _ = _operator_root(clock, path_length=1)
    ca = CertificateAuthority.from_operator_root(root_pem, key_pem, trust_domain=TD, clock=clock)
    assert ca.operator_root and ca.trust_bundle() == root_pem
    _, leaf, chain = _leaf(ca)
    assert verify_chain(leaf, chain, root_pem, now=T0) == GPT4
    # The operator's key is not kept: no root.key on disk, and rotations need it again.
    ca.to_pem_files(tmp_path)
    assert not (tmp_path / "root.key").exists()
    with pytest.raises(ValueError, match="pass the new root's root_cert_pem and root_key_pem"):
        ca.rotate_root()
    with pytest.raises(ValueError, match="pass root_key_pem"):
        ca.rotate_intermediate()
    ca.rotate_intermediate(root_key_pem=key_pem)
    ca.rotate_root(root_cert_pem=root_pem, root_key_pem=key_pem)  # same root: nothing retires
    assert ca.retired_roots == () and ca.trust_bundle() == root_pem
    _, leaf2, chain2 = _leaf(ca)
    assert verify_chain(leaf2, chain2, root_pem, now=T0) == GPT4
    # Rotating to a new operator root keeps the old one during the overlap.
    new_root, new_key, _ = _operator_root(clock)
    ca.rotate_root(overlap=HOUR, root_cert_pem=new_root, root_key_pem=new_key)
    assert ca.trust_bundle() == new_root + root_pem
    loaded = CertificateAuthority.load(tmp_path, clock=clock)
    assert loaded.operator_root and loaded.trust_bundle() == root_pem

    with pytest.raises(ValueError, match="is not a CA"):
        bad, bad_key, _ = _operator_root(clock, ca=False)
        CertificateAuthority.from_operator_root(bad, bad_key, trust_domain=TD, clock=clock)
    with pytest.raises(ValueError, match="has path length 0"):
        bad, bad_key, _ = _operator_root(clock, path_length=0)
        CertificateAuthority.from_operator_root(bad, bad_key, trust_domain=TD, clock=clock)
    with pytest.raises(ValueError, match="does not belong"):
        CertificateAuthority.from_operator_root(root_pem, new_key, trust_domain=TD, clock=clock)


def test_create_checks_its_arguments(clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="unknown key type 'dsa'"):
        CertificateAuthority.create(TD, clock=clock, key_type="dsa")
    with pytest.raises(ValueError, match="must be lowercase"):
        CertificateAuthority.create("Prod", clock=clock)
    ca = CertificateAuthority.create(TD, clock=clock, key_type="ec-p384")
    _, leaf, chain = _leaf(ca)
    assert verify_chain(leaf, chain, ca.trust_bundle(), now=T0) == GPT4


def test_persistence(clock: FakeClock, tmp_path: Path) -> None:
    ca = CertificateAuthority.create(TD, clock=clock)
    _, old_leaf, old_chain = _leaf(ca, lifetime=DAY)
    ca.rotate_root(overlap=DAY)
    ca.prepare_root_rotation()
    out = tmp_path / "ca"
    ca.to_pem_files(out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for name in ("root.key", "intermediate.key", "next-root.key", "token.secret"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name
    assert (out / "bundle.pem").read_text() == ca.trust_bundle()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    loaded = CertificateAuthority.load(out, clock=clock)
    assert loaded.trust_domain == TD and loaded.token_secret == ca.token_secret
    assert loaded.trust_bundle() == ca.trust_bundle()  # current + prepared + retired
    assert loaded.rotation_prepared and loaded.root_pem == ca.root_pem
    _, leaf, chain = _leaf(loaded)
    assert verify_chain(leaf, chain, ca.trust_bundle(), now=T0) == GPT4
    assert verify_chain(old_leaf, old_chain, loaded.trust_bundle(), now=T0) == GPT4
    loaded.rotate_root(overlap=0)
    loaded.to_pem_files(out)
    assert not (out / "next-root.pem").exists()

    (out / "intermediate.key").chmod(0o644)
    with pytest.raises(ValueError, match="must not be readable by group or others"):
        CertificateAuthority.load(out, clock=clock)
    with pytest.raises(ValueError, match="cannot read the CA state"):
        CertificateAuthority.load(tmp_path / "missing", clock=clock)
    (out / "intermediate.key").chmod(0o600)
    state = json.loads((out / "ca.json").read_text())
    (out / "ca.json").write_text(json.dumps({**state, "keyType": "dsa"}))
    with pytest.raises(ValueError, match="trustDomain or keyType is missing or invalid"):
        CertificateAuthority.load(out, clock=clock)
    (out / "ca.json").write_text(json.dumps({**state, "retiredRoots": [{"x": 1}]}))
    with pytest.raises(ValueError, match="malformed CA state"):
        CertificateAuthority.load(out, clock=clock)


def test_persistence_with_a_passphrase(clock: FakeClock, tmp_path: Path) -> None:
    ca = CertificateAuthority.create(TD, clock=clock)
    ca.to_pem_files(tmp_path, passphrase=b"correct horse")
    assert "ENCRYPTED PRIVATE KEY" in (tmp_path / "root.key").read_text()
    with pytest.raises(ValueError, match="not a readable PEM private key"):
        CertificateAuthority.load(tmp_path, clock=clock)
    loaded = CertificateAuthority.load(tmp_path, clock=clock, passphrase=b"correct horse")
    assert loaded.root_pem == ca.root_pem


# --- gRPC accepts these certificates (real mTLS, real time) --------------------------------


async def test_grpc_mtls_with_issued_certificates() -> None:
    ca = CertificateAuthority.create(TD)
    server_key, server_leaf, server_chain = _leaf(
        ca, GPT4, dns_names=["gpt4.mesh.local"], csr_dns=["gpt4.mesh.local"]
    )
    client_key, client_leaf, client_chain = _leaf(ca, APP)
    bundle = ca.trust_bundle().encode()
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    creds = grpc.ssl_server_credentials(
        [(server_key.encode(), (server_leaf + server_chain).encode())],
        root_certificates=bundle,
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    options = [("grpc.ssl_target_name_override", "gpt4.mesh.local")]
    try:
        good = grpc.ssl_channel_credentials(
            bundle, client_key.encode(), (client_leaf + client_chain).encode()
        )
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", good, options) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # A client certificate from another CA does not get in.
        other = CertificateAuthority.create(TD)
        key, leaf, chain = _leaf(other, APP)
        foreign = grpc.ssl_channel_credentials(bundle, key.encode(), (leaf + chain).encode())
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", foreign, options) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)


# --- join tokens ---------------------------------------------------------------------------

SECRET = b"s" * 32


def test_join_token_exact_grant(clock: FakeClock) -> None:
    token = issue_join_token(SECRET, GPT4, 600, clock=clock, nonce="token-0001")
    assert token.startswith("amjt1.")
    assert all(c.isalnum() or c in "._-" for c in token)  # URL-safe
    claims = verify_join_token(SECRET, token, GPT4, clock=clock)
    assert (claims.sub, claims.exp, claims.jti) == (GPT4, int(T0) + 600, "token-0001")
    with pytest.raises(IdentityNotGranted, match=f"grants {GPT4}, not {APP}") as err:
        verify_join_token(SECRET, token, APP, clock=clock)
    assert isinstance(err.value, PermissionDenied)
    with pytest.raises(ValueError, match="invalid SPIFFE ID"):
        verify_join_token(SECRET, token, "spiffe://x/../y", clock=clock)
    random_jti = read_join_token(SECRET, issue_join_token(SECRET, GPT4, 60, clock=clock))
    assert len(random_jti.jti) >= 16


def test_join_token_wildcard_grants(clock: FakeClock) -> None:
    token = issue_join_token(SECRET, f"spiffe://{TD}/ns/prod/sa/*", 600, clock=clock)
    assert verify_join_token(SECRET, token, GPT4, clock=clock).sub.endswith("/sa/*")
    assert verify_join_token(SECRET, token, APP, clock=clock)
    for denied in (f"spiffe://{TD}/ns/dev/sa/app", f"spiffe://{TD}/ns/prod/sa/a/b"):
        with pytest.raises(IdentityNotGranted):
            verify_join_token(SECRET, token, denied, clock=clock)
    deep = issue_join_token(SECRET, f"spiffe://{TD}/ns/prod/**", 600, clock=clock)
    assert verify_join_token(SECRET, deep, f"spiffe://{TD}/ns/prod/sa/a/b", clock=clock)


def test_join_token_wildcards_never_reach_the_system_namespace(clock: FakeClock) -> None:
    operator = f"spiffe://{TD}/ns/aimesh-system/sa/alice"
    control_plane = f"spiffe://{TD}/ns/aimesh-system/sa/control-plane"
    for pattern in ("*", f"spiffe://{TD}/**", f"spiffe://{TD}/ns/*/sa/alice"):
        token = issue_join_token(SECRET, pattern, 600, clock=clock)
        with pytest.raises(IdentityNotGranted, match="does not name namespace aimesh-system"):
            verify_join_token(SECRET, token, operator, clock=clock)
    named = issue_join_token(SECRET, f"spiffe://{TD}/ns/aimesh-system/sa/*", 600, clock=clock)
    assert verify_join_token(SECRET, named, operator, clock=clock)
    with pytest.raises(IdentityNotGranted, match="the control plane's own identity"):
        verify_join_token(SECRET, named, control_plane, clock=clock)


def test_join_token_expiry(clock: FakeClock) -> None:
    token = issue_join_token(SECRET, GPT4, 600, clock=clock, nonce="expiring")
    clock.advance(599)
    verify_join_token(SECRET, token, GPT4, clock=clock)
    clock.advance(1)
    with pytest.raises(InvalidJoinToken, match="expiring expired at 2027-01-15T08:10:00Z"):
        verify_join_token(SECRET, token, GPT4, clock=clock)


def test_join_token_rejections(clock: FakeClock) -> None:
    token = issue_join_token(SECRET, GPT4, 600, clock=clock)
    with pytest.raises(InvalidJoinToken, match="does not verify"):
        verify_join_token(b"t" * 32, token, GPT4, clock=clock)
    for bad in ("", "abc", "amjt1.", "amjt1.abc", "amjt1.a=b.c", "x" * 5000):
        with pytest.raises(InvalidJoinToken, match="malformed"):
            read_join_token(SECRET, bad, clock=clock)
    # A correctly signed payload that is not ours is still refused.
    payload = base64.urlsafe_b64encode(b'{"sub":1}').rstrip(b"=").decode()
    mac = hmac.new(SECRET, f"amjt1.{payload}".encode(), hashlib.sha256).digest()
    forged = f"amjt1.{payload}." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    with pytest.raises(InvalidJoinToken, match="malformed join token payload"):
        read_join_token(SECRET, forged, clock=clock)
    with pytest.raises(ValueError, match="at least 16 bytes"):
        issue_join_token(b"short", GPT4, 60, clock=clock)
    with pytest.raises(ValueError, match="ttl"):
        issue_join_token(SECRET, GPT4, 0, clock=clock)
    with pytest.raises(ValueError, match="ttl"):
        issue_join_token(SECRET, GPT4, 31 * DAY, clock=clock)
    with pytest.raises(ValueError, match="nonce"):
        issue_join_token(SECRET, GPT4, 60, clock=clock, nonce="a b")
    with pytest.raises(ValueError, match="whole path segment"):
        issue_join_token(SECRET, "spiffe://td/a**", 60, clock=clock)


_TOKEN = issue_join_token(SECRET, GPT4, 600, clock=FakeClock(), nonce="tamper-test")


@PROPERTY
@given(st.integers(0, len(_TOKEN) - 1), st.characters())
def test_join_token_any_single_byte_tamper_is_rejected(index: int, char: str) -> None:
    if _TOKEN[index] == char:
        return
    tampered = _TOKEN[:index] + char + _TOKEN[index + 1 :]
    with pytest.raises(InvalidJoinToken):
        verify_join_token(SECRET, tampered, GPT4, clock=FakeClock())


# --- authorization -------------------------------------------------------------------------

BATCH = f"spiffe://{TD}/ns/batch/sa/nightly"
RULES = (
    Rule(
        "no-batch-to-gpt4",
        "DENY",
        sources=(f"spiffe://{TD}/ns/batch/**",),
        destinations=("gpt4-gateway",),
    ),
    Rule("batch-anything-else", sources=(f"spiffe://{TD}/ns/batch/**",)),
    Rule(
        "prod-apps-infer",
        sources=(f"spiffe://{TD}/ns/prod/sa/*",),
        destinations=("gpt4-*", "claude-gateway"),
        methods=("/aimesh.inference.v1.Inference/*",),
    ),
    Rule("health-for-all", methods=("/grpc.health.v1.Health/Check",)),
    Rule(
        "no-admin-method",
        "DENY",
        sources=("*",),
        methods=("/aimesh.inference.v1.Inference/Admin",),
    ),
)


@pytest.mark.parametrize(
    ("source", "dest", "method", "allowed", "rule"),
    [
        (BATCH, "gpt4-gateway", GENERATE, False, "no-batch-to-gpt4"),  # deny beats allow
        (BATCH, "claude-gateway", GENERATE, True, "batch-anything-else"),
        (APP, "gpt4-gateway", GENERATE, True, "prod-apps-infer"),
        (APP, "gpt4-gateway-v2", GENERATE, True, "prod-apps-infer"),  # destination wildcard
        (APP, "custom-llm", GENERATE, False, None),  # default deny
        (APP, "gpt4-gateway", "/other.Svc/Call", False, None),
        (APP, "gpt4-gateway", "/aimesh.inference.v1.Inference/Admin", False, "no-admin-method"),
        (f"spiffe://{TD}/ns/dev/sa/app", "gpt4-gateway", GENERATE, False, None),
        (None, "gpt4-gateway", "/grpc.health.v1.Health/Check", True, "health-for-all"),
        (None, "gpt4-gateway", GENERATE, False, None),  # no identity: no listed source matches
        (None, "x", "/aimesh.inference.v1.Inference/Admin", False, None),
    ],
)
def test_authorization_table(
    source: str | None, dest: str, method: str, allowed: bool, rule: str | None
) -> None:
    decision = Authorizer(RULES, enabled=True).decide(source, dest, method)
    assert (decision.allowed, decision.rule_name) == (allowed, rule)


def test_authorization_messages() -> None:
    authz = Authorizer(RULES, enabled=True)
    assert authz.decide(BATCH, "gpt4-gateway", GENERATE).reason == (
        f"denied by rule 'no-batch-to-gpt4': {BATCH} -> gpt4-gateway {GENERATE}"
    )
    assert authz.decide(APP, "gpt4-gateway", GENERATE).reason == "allowed by rule 'prod-apps-infer'"
    assert authz.decide(APP, "custom-llm", GENERATE).reason == (
        f"no rule allows {APP} to call custom-llm {GENERATE} (default deny)"
    )
    assert "an unauthenticated caller" in authz.decide(None, "custom-llm", GENERATE).reason


def test_authorization_disabled_allows_everything() -> None:
    authz = Authorizer(RULES, enabled=False)
    decision = authz.decide(BATCH, "gpt4-gateway", GENERATE)
    assert decision == Decision(True, None, "authorization is disabled: every call is allowed")
    assert Authorizer([], enabled=True).decide(APP, "x", GENERATE).allowed is False


def test_authorization_cache_is_bounded() -> None:
    authz = Authorizer(RULES, cache_size=2)
    first = authz.decide(APP, "gpt4-gateway", GENERATE)
    assert authz.decide(APP, "gpt4-gateway", GENERATE) is first
    for i in range(5):
        authz.decide(APP, f"svc-{i}", GENERATE)
        assert len(authz._cache) <= 2


def test_authorization_rejects_bad_rules() -> None:
    with pytest.raises(ValueError, match="duplicate rule name 'a'"):
        Authorizer([Rule("a"), Rule("a")])
    with pytest.raises(ValueError, match=r"rules\[0\].methods\[0\]: 'Generate' must be"):
        Authorizer([Rule("a", methods=("Generate",))])
    with pytest.raises(ValueError, match="an empty list matches nothing"):
        Authorizer([Rule("a", sources=())])
    with pytest.raises(ValueError, match=r"rules\[0\].sources\[0\]: invalid SPIFFE ID"):
        Authorizer([Rule("a", sources=("spiffe://td/a**",))])
    with pytest.raises(ValueError, match="not a service name"):
        Authorizer([Rule("a", destinations=("GPT4",))])
    with pytest.raises(ValueError, match="action: must be ALLOW or DENY"):
        Authorizer([Rule("a", "MAYBE")])  # type: ignore[arg-type]


def test_rules_from_yaml() -> None:
    doc = yaml.safe_load(
        f"""
        rules:
          - name: no-batch-to-gpt4
            action: DENY
            sources: ["spiffe://{TD}/ns/batch/**"]
            destinations: [gpt4-gateway]
          - name: prod
            sources: "spiffe://{TD}/ns/prod/sa/*"
            methods: ["/aimesh.inference.v1.Inference/*"]
          - from: {{namespaces: [dev], principals: ["{APP}"]}}
            to: {{services: [custom-llm], methods: ["{GENERATE}"]}}
        """
    )

    @dataclass
    class Spec:
        enabled: bool
        rules: Sequence[Any] = field(default_factory=list)

    authz = Authorizer.from_config(Spec(True, doc["rules"]), trust_domain=TD)
    assert [r.name for r in authz.rules] == ["no-batch-to-gpt4", "prod", "rule-2"]
    assert authz.rules[2].sources == (APP, f"spiffe://{TD}/ns/dev/**")
    assert authz.decide(BATCH, "gpt4-gateway", GENERATE).rule_name == "no-batch-to-gpt4"
    assert authz.decide(APP, "anything", GENERATE).rule_name == "prod"
    dev = f"spiffe://{TD}/ns/dev/sa/tool"
    assert authz.decide(dev, "custom-llm", GENERATE).rule_name == "rule-2"
    assert not authz.decide(dev, "gpt4-gateway", GENERATE).allowed
    # Without a trust domain, namespaces match in any trust domain.
    assert Authorizer.from_config(Spec(False, doc["rules"])).rules[2].sources == (
        APP,
        "spiffe://*/ns/dev/**",
    )

    # The rules in the repository's own example load.
    local = yaml.safe_load(
        (Path(__file__).parent.parent / "deploy/examples/local.yaml").read_text()
    )
    parse_rules(local["spec"]["security"]["authorization"].get("rules", []))


def test_rule_errors_name_their_paths() -> None:
    with pytest.raises(ConfigError) as err:
        parse_rules(
            [
                {"name": "a", "action": "PERMIT"},
                {"name": "b", "sorces": ["*"]},
                {"name": "c", "methods": "Generate"},
                {"name": "d", "from": {"namespaces": ["x"]}, "sources": ["*"]},
                {"name": "e", "from": {"teams": ["x"]}},
                {"name": "a"},
                {"name": "a"},
                "not a mapping",  # type: ignore[list-item]
                {"name": 3},
            ]
        )
    errors = err.value.errors
    prefix = "spec.security.authorization.rules"
    assert f"{prefix}[0].action: must be ALLOW or DENY, got 'PERMIT'" in errors
    assert any(e.startswith(f"{prefix}[1].sorces: unknown field; allowed: name") for e in errors)
    assert any(e.startswith(f"{prefix}[2].methods[0]: 'Generate' must be") for e in errors)
    assert f"{prefix}[3].from: use either from or sources, not both" in errors
    assert any(e.startswith(f"{prefix}[4].from.teams: unknown field") for e in errors)
    assert f"{prefix}[6].name: duplicate rule name 'a'" in errors
    assert f"{prefix}[7]: must be a mapping" in errors
    assert f"{prefix}[8].name: must be a string" in errors


_SOURCES = [
    "*",
    f"spiffe://{TD}/ns/prod/sa/*",
    f"spiffe://{TD}/ns/batch/**",
    APP,
    f"spiffe://{TD}/ns/*/sa/gpt4-*",
]
_IDS = [None, APP, GPT4, BATCH, f"spiffe://{TD}/ns/dev/sa/app", "spiffe://other/ns/prod/sa/x"]
_DESTS = ["*", "gpt4-gateway", "gpt4-*", "claude-gateway"]
_SERVICES = ["gpt4-gateway", "gpt4-gateway-v2", "claude-gateway", "custom-llm"]
_METHOD_PATTERNS = ["*", GENERATE, "/aimesh.inference.v1.Inference/*", "/grpc.health.v1.Health/*"]
_METHODS = [GENERATE, "/aimesh.inference.v1.Inference/Embed", "/grpc.health.v1.Health/Check"]

rules_strategy = st.lists(
    st.tuples(
        st.sampled_from(["ALLOW", "DENY"]),
        st.none() | st.lists(st.sampled_from(_SOURCES), min_size=1, max_size=2),
        st.lists(st.sampled_from(_DESTS), min_size=1, max_size=2),
        st.lists(st.sampled_from(_METHOD_PATTERNS), min_size=1, max_size=2),
    ),
    max_size=6,
)


def _naive(rules: Sequence[Rule], source: str | None, dest: str, method: str) -> Decision:
    def matches(rule: Rule) -> bool:
        src_ok = rule.sources is None or (
            source is not None and any(compile_pattern(p).matches(source) for p in rule.sources)
        )
        dest_ok = any(fnmatch.fnmatchcase(dest, d) for d in rule.destinations)
        method_ok = any(
            m == "*" or m == method or (m.endswith("/*") and method.startswith(m[:-1]))
            for m in rule.methods
        )
        return src_ok and dest_ok and method_ok

    for action in ("DENY", "ALLOW"):
        for rule in rules:
            if rule.action == action and matches(rule):
                return Decision(action == "ALLOW", rule.name, "")
    return Decision(False, None, "")


@PROPERTY
@given(rules_strategy, st.sampled_from(_IDS), st.sampled_from(_SERVICES), st.sampled_from(_METHODS))
def test_authorizer_agrees_with_a_naive_evaluation(
    raw: list[tuple[Any, Any, Any, Any]], source: str | None, dest: str, method: str
) -> None:
    rules = [
        Rule(f"r{i}", action, tuple(s) if s is not None else None, tuple(d), tuple(m))
        for i, (action, s, d, m) in enumerate(raw)
    ]
    got = Authorizer(rules).decide(source, dest, method)
    want = _naive(rules, source, dest, method)
    assert (got.allowed, got.rule_name) == (want.allowed, want.rule_name)
    assert Authorizer(rules, enabled=False).decide(source, dest, method).allowed


def test_authorizer_speed_with_50_rules() -> None:
    """Reported in authz.py's docstring; only a loose bound here (CI machines vary)."""
    rules = [
        Rule(
            f"deny-{i}",
            "DENY",
            sources=(f"spiffe://{TD}/ns/team-{i}/**",),
            destinations=(f"svc-{i}",),
        )
        for i in range(25)
    ] + [
        Rule(
            f"allow-{i}",
            sources=(f"spiffe://{TD}/ns/team-{i}/sa/*", f"spiffe://{TD}/ns/ops/sa/admin-{i}"),
            destinations=(f"svc-{i}", f"gpt4-{i}-*"),
            methods=("/aimesh.inference.v1.Inference/*",),
        )
        for i in range(25)
    ]
    authz = Authorizer(rules)
    caller = f"spiffe://{TD}/ns/team-24/sa/app"
    assert authz.decide(caller, "gpt4-24-x", GENERATE).rule_name == "allow-24"
    n = 2000
    uncached = timeit.timeit(lambda: authz._decide(caller, "gpt4-24-x", GENERATE), number=n) / n
    cached = timeit.timeit(lambda: authz.decide(caller, "gpt4-24-x", GENERATE), number=n) / n
    print(f"authz, 50 rules: {uncached * 1e6:.1f} us uncached, {cached * 1e6:.2f} us cached")
    assert uncached < 1e-3 and cached < 1e-4


# --- API keys ------------------------------------------------------------------------------


@pytest.fixture
def keys(clock: FakeClock) -> KeyStore:
    return KeyStore(clock=clock, iterations=MIN_ITERATIONS)


def test_api_key_create_and_verify(keys: KeyStore) -> None:
    plain, record = keys.create("acme")
    prefix, key_id, secret = plain.split("_", 2)
    assert prefix == "amk" and key_id == record.key_id and len(key_id) == 16 and len(secret) == 43
    assert keys.verify(plain) == TenantIdentity("acme", "api-key", key_id)
    assert keys.verify(plain).tenant == "acme"  # the cached path
    other, _ = keys.create("globex")
    assert keys.verify(other).tenant == "globex"


def _reject(keys: KeyStore, plain: str, match: str) -> None:
    with pytest.raises(Unauthenticated, match=match) as err:
        keys.verify(plain)
    secret = plain.split("_", 2)[-1]
    if len(secret) >= 8:  # the message never quotes the secret, nor the key
        assert secret not in str(err.value) and plain not in str(err.value)


def test_api_key_rejections(keys: KeyStore, clock: FakeClock) -> None:
    plain, record = keys.create("acme", expires_in=HOUR)
    wrong = plain[:-1] + ("A" if plain[-1] != "A" else "B")
    _reject(keys, wrong, f"invalid API key {record.key_id}: unknown id or wrong secret")
    unknown = f"amk_{'0' * 16}_{plain.split('_', 2)[2]}"
    _reject(keys, unknown, "unknown id or wrong secret")
    for malformed in ("", "amk_", "sk_live_abc", f"amk_{record.key_id}_short", plain + "x"):
        _reject(keys, malformed, "malformed API key")
    keys.verify(plain)
    keys.disable(record.key_id)
    _reject(keys, plain, f"API key {record.key_id} is disabled")  # cached, still re-checked
    keys.disable(record.key_id, False)
    keys.verify(plain)
    clock.advance(HOUR)
    _reject(keys, plain, f"API key {record.key_id} expired at 2027-01-15T09:00:00Z")
    keys.delete(record.key_id)
    _reject(keys, plain, "unknown id or wrong secret")
    with pytest.raises(KeyError, match="no API key"):
        keys.disable(record.key_id)
    with pytest.raises(ValueError, match="invalid tenant"):
        keys.create("bad tenant")


def test_api_keys_are_hashed_at_rest(keys: KeyStore, clock: FakeClock) -> None:
    plain, record = keys.create("acme", expires_in=DAY)
    secret = plain.split("_", 2)[2]
    saved = keys.to_dict()
    text = json.dumps(saved) + yaml.safe_dump(saved)
    assert secret not in text and plain not in text
    assert record.key_id in text and record.hash != secret.encode()
    entry = saved["keys"][record.key_id]
    assert entry["algorithm"] == "pbkdf2-sha256" and entry["iterations"] == MIN_ITERATIONS
    assert entry["created"] == "2027-01-15T08:00:00Z" and entry["expires"] == "2027-01-16T08:00:00Z"
    assert len(base64.b64decode(entry["salt"])) == 16
    for restored in (json.loads(json.dumps(saved)), yaml.safe_load(yaml.safe_dump(saved))):
        store = KeyStore.from_dict(restored, clock=clock)
        assert store.verify(plain).tenant == "acme"
        assert store.records[record.key_id] == record
    # Two keys never share a salt, so equal secrets would not hash alike.
    _, second = keys.create("acme")
    assert second.salt != record.salt


def test_api_key_records_are_validated() -> None:
    good = KeyStore(iterations=MIN_ITERATIONS)
    _, record = good.create("acme")
    entry = record.to_dict()
    with pytest.raises(ValueError, match="not an aimesh API key file"):
        KeyStore.from_dict({"keys": {}})
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("zz", entry, "16 lowercase hex"),
        (record.key_id, {**entry, "tenant": ""}, "tenant: must be a tenant name"),
        (record.key_id, {**entry, "iterations": 10}, "iterations: must be an integer >= 1000"),
        (record.key_id, {**entry, "algorithm": "md5"}, "only pbkdf2-sha256"),
        (record.key_id, {**entry, "salt": "@@"}, "salt: must be base64"),
        (record.key_id, {**entry, "created": "yesterday"}, "created: must be a time"),
        (record.key_id, {**entry, "extra": 1}, "unknown field"),
        (record.key_id, {k: v for k, v in entry.items() if k != "hash"}, r"\.hash: required"),
    ]
    for key_id, data, problem in cases:
        with pytest.raises(ValueError, match=problem):
            ApiKeyRecord.from_dict(key_id, data)
    with pytest.raises(ValueError, match="iterations must be at least"):
        KeyStore(iterations=1)


# --- JWT -----------------------------------------------------------------------------------

HMAC_SECRET = b"k" * 32


def _claims(**extra: Any) -> dict[str, Any]:
    return {
        "sub": "acme",
        "iss": "https://issuer.example",
        "aud": "aimesh",
        "exp": T0 + 300,
        **extra,
    }


def _verifier(keys: Sequence[JwtKey], clock: FakeClock, **kwargs: Any) -> JwtVerifier:
    kwargs.setdefault("issuer", "https://issuer.example")
    kwargs.setdefault("audience", "aimesh")
    return JwtVerifier(keys, clock=clock, **kwargs)


def _rsa_public_pem() -> bytes:
    return (
        _rsa_key()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def test_jwt_valid_tokens(clock: FakeClock) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_pem = ec_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    cases = [
        (JwtKey.from_pem(_rsa_public_pem()), _rsa_key(), "RS256"),
        (JwtKey.from_pem(ec_pem), ec_key, "ES256"),
        (JwtKey.from_secret(HMAC_SECRET), HMAC_SECRET, "HS256"),
    ]
    for key, signer, alg in cases:
        token = sign_jwt(_claims(), signer, alg)
        identity = _verifier([key], clock).verify(token)
        assert (identity.tenant, identity.credential, identity.subject) == ("acme", "jwt", "acme")
        assert identity.claims["iss"] == "https://issuer.example"
    # A configured claim names the tenant.
    token = sign_jwt(_claims(org="globex"), HMAC_SECRET, "HS256")
    verifier = _verifier([JwtKey.from_secret(HMAC_SECRET)], clock, tenant_claim="org")
    assert verifier.verify(token).tenant == "globex"
    with pytest.raises(InvalidToken, match="claim 'team' must be a non-empty string"):
        _verifier([JwtKey.from_secret(HMAC_SECRET)], clock, tenant_claim="team").verify(token)
    # Audience lists and several accepted issuers.
    token = sign_jwt(_claims(aud=["x", "aimesh"], iss="b"), HMAC_SECRET, "HS256")
    assert _verifier([JwtKey.from_secret(HMAC_SECRET)], clock, issuer=["a", "b"]).verify(token)


def test_jwt_bad_signature(clock: FakeClock) -> None:
    key = JwtKey.from_secret(HMAC_SECRET)
    token = sign_jwt(_claims(), b"x" * 32, "HS256")
    with pytest.raises(InvalidToken, match="signature does not verify"):
        _verifier([key], clock).verify(token)
    good = sign_jwt(_claims(), HMAC_SECRET, "HS256")
    head, _, sig = good.split(".")
    swapped = f"{head}.{sign_jwt(_claims(sub='evil'), b'x' * 32, 'HS256').split('.')[1]}.{sig}"
    with pytest.raises(InvalidToken, match="signature does not verify"):
        _verifier([key], clock).verify(swapped)
    other_ec = ec.generate_private_key(ec.SECP256R1())
    es_key = JwtKey.from_public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
    with pytest.raises(InvalidToken, match="signature does not verify"):
        _verifier([es_key], clock).verify(sign_jwt(_claims(), other_ec, "ES256"))


def test_jwt_time_claims(clock: FakeClock) -> None:
    key = JwtKey.from_secret(HMAC_SECRET)
    verifier = _verifier([key], clock)
    token = sign_jwt(_claims(exp=T0 - 30), HMAC_SECRET, "HS256")
    assert verifier.verify(token)  # within the 60 s leeway
    clock.advance(30)
    with pytest.raises(InvalidToken, match="expired at 2027-01-15T07:59:30Z"):
        verifier.verify(token)
    with pytest.raises(InvalidToken, match="not valid before"):
        verifier.verify(sign_jwt(_claims(nbf=clock.now + 120), HMAC_SECRET, "HS256"))
    assert verifier.verify(sign_jwt(_claims(nbf=clock.now + 30), HMAC_SECRET, "HS256"))
    with pytest.raises(InvalidToken, match="issued in the future"):
        verifier.verify(sign_jwt(_claims(iat=clock.now + 600), HMAC_SECRET, "HS256"))
    no_exp = {k: v for k, v in _claims().items() if k != "exp"}
    with pytest.raises(InvalidToken, match="has no 'exp'"):
        verifier.verify(sign_jwt(no_exp, HMAC_SECRET, "HS256"))
    assert _verifier([key], clock, require_exp=False).verify(sign_jwt(no_exp, HMAC_SECRET, "HS256"))
    with pytest.raises(InvalidToken, match="'exp' must be a number"):
        verifier.verify(sign_jwt(_claims(exp="tomorrow"), HMAC_SECRET, "HS256"))


def test_jwt_audience_and_issuer(clock: FakeClock) -> None:
    key = JwtKey.from_secret(HMAC_SECRET)
    verifier = _verifier([key], clock)
    with pytest.raises(InvalidToken, match="audience other, expected aimesh"):
        verifier.verify(sign_jwt(_claims(aud="other"), HMAC_SECRET, "HS256"))
    with pytest.raises(InvalidToken, match="has no 'aud'"):
        no_aud = {k: v for k, v in _claims().items() if k != "aud"}
        verifier.verify(sign_jwt(no_aud, HMAC_SECRET, "HS256"))
    with pytest.raises(InvalidToken, match=r"issuer is 'https://evil.example', expected"):
        verifier.verify(sign_jwt(_claims(iss="https://evil.example"), HMAC_SECRET, "HS256"))
    with pytest.raises(InvalidToken, match="issuer is none"):
        no_iss = {k: v for k, v in _claims().items() if k != "iss"}
        verifier.verify(sign_jwt(no_iss, HMAC_SECRET, "HS256"))
    with pytest.raises(InvalidToken, match="no audience configured"):
        JwtVerifier([key], clock=clock).verify(sign_jwt(_claims(), HMAC_SECRET, "HS256"))


def _forge(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    def enc(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    return ".".join(
        [enc(json.dumps(header).encode()), enc(json.dumps(claims).encode()), enc(signature)]
    )


def test_jwt_alg_none_and_confusion(clock: FakeClock) -> None:
    rsa_key = JwtKey.from_pem(_rsa_public_pem())
    for alg in ("none", "None", "NONE"):
        with pytest.raises(InvalidToken, match=r"alg 'none' .* never accepted"):
            _verifier([rsa_key], clock).verify(_forge({"alg": alg}, _claims()))
    # HS256 "signed" with the RSA public key as the HMAC secret: the classic confusion.
    confused = sign_jwt(_claims(), _rsa_public_pem(), "HS256")
    with pytest.raises(InvalidToken, match="signed with HS256 but the configured keys are RS256"):
        _verifier([rsa_key], clock).verify(confused)
    with pytest.raises(InvalidToken, match="'RS512' is not supported"):
        _verifier([rsa_key], clock).verify(_forge({"alg": "RS512"}, _claims(), b"x"))
    # A JWK whose alg disagrees with its key type is refused at configuration time.
    jwk = {"kty": "oct", "k": base64.urlsafe_b64encode(HMAC_SECRET).rstrip(b"=").decode()}
    with pytest.raises(ValueError, match="says alg 'RS256' but a oct key is HS256"):
        JwtKey.from_jwk({**jwk, "alg": "RS256"})


def test_jwt_malformed_tokens(clock: FakeClock) -> None:
    key = JwtKey.from_secret(HMAC_SECRET)
    verifier = _verifier([key], clock)
    token = sign_jwt(_claims(), HMAC_SECRET, "HS256")
    head, body, sig = token.split(".")
    cases = [
        ("", "no JWT"),
        ("a.b", "expected header.payload.signature"),
        ("a.b.c.d.e", "JWE"),
        (f"{head}=.{body}.{sig}", "not unpadded base64url"),
        (f"{head}.{body}.{sig}=", "not unpadded base64url"),
        (_forge({"alg": "HS256", "crit": ["exp"]}, _claims()), "'crit'"),
        ("eyJhbGciOiJIUzI1NiIsImFsZyI6IkhTMjU2In0." + body + "." + sig, "appears twice"),
        (_forge({"typ": "JWT"}, _claims()), "has no 'alg'"),
        (_forge({"alg": "HS256", "kid": 7}, _claims()), "'kid' must be a string"),
        ("x" * 20000, "longer than"),
        (f"{head}.{body}\u00e9.{sig}", "payload is not unpadded base64url"),
        (f"\u00e9{head}.{body}.{sig}", "header is not unpadded base64url"),
    ]
    for bad, problem in cases:
        with pytest.raises(InvalidToken, match=problem):
            verifier.verify(bad)
    # A non-canonical last character (unused low bits set) is refused, not decoded alike.
    last = sig[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twin = alphabet[alphabet.index(last) ^ 1]
    with pytest.raises(InvalidToken, match=r"canonical|signature"):
        verifier.verify(f"{head}.{body}.{sig[:-1]}{twin}")


def test_jwt_key_ids_and_jwks(clock: FakeClock) -> None:
    a, b = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, str]:
        numbers = key.public_key().public_numbers()
        return {
            "kty": "EC",
            "crv": "P-256",
            "kid": kid,
            "use": "sig",
            "x": base64.urlsafe_b64encode(numbers.x.to_bytes(32, "big")).rstrip(b"=").decode(),
            "y": base64.urlsafe_b64encode(numbers.y.to_bytes(32, "big")).rstrip(b"=").decode(),
        }

    n = _rsa_key().public_key().public_numbers()
    rsa_jwk = {
        "kty": "RSA",
        "kid": "r",
        "alg": "RS256",
        "n": base64.urlsafe_b64encode(n.n.to_bytes(256, "big")).rstrip(b"=").decode(),
        "e": "AQAB",
    }
    keys = load_keys({"keys": [jwk(a, "a"), jwk(b, "b"), rsa_jwk]})
    assert [(k.alg, k.kid) for k in keys] == [("ES256", "a"), ("ES256", "b"), ("RS256", "r")]
    verifier = _verifier(keys, clock)
    assert verifier.verify(sign_jwt(_claims(), b, "ES256", kid="b"))
    assert verifier.verify(sign_jwt(_claims(), b, "ES256"))  # no kid: every ES256 key is tried
    assert verifier.verify(sign_jwt(_claims(), _rsa_key(), "RS256", kid="r"))
    with pytest.raises(InvalidToken, match="signature does not verify"):
        verifier.verify(sign_jwt(_claims(), b, "ES256", kid="a"))
    with pytest.raises(InvalidToken, match="names key 'zz', which is not configured"):
        verifier.verify(sign_jwt(_claims(), b, "ES256", kid="zz"))
    assert "k" * 32 not in repr(JwtKey.from_secret(HMAC_SECRET))

    bad_keys: list[tuple[Any, str]] = [
        ({**jwk(a, "p"), "d": "AAAA"}, "private EC key"),
        ({**rsa_jwk, "d": "AAAA"}, "private RSA key"),
        ({**jwk(a, "u"), "use": "enc"}, "not 'sig'"),
        ({**jwk(a, "c"), "crv": "P-384"}, "use P-256"),
        ({"kty": "OKP"}, "unsupported JWK kty"),
        ({"kty": "oct", "k": "c2hvcnQ"}, "at least 32 bytes"),
        ({**jwk(a, "o"), "key_ops": ["sign"]}, "key_ops"),
        ({**jwk(a, "x"), "x": "AAAA"}, "32-byte x and y"),
        (private_key_pem(a), "private key"),
        ("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n", "not a readable"),
    ]
    for item, problem in bad_keys:
        with pytest.raises(ValueError, match=problem):
            load_keys([item])
    with pytest.raises(ValueError, match="2048 bits"):
        JwtKey.from_public_key(rsa.generate_private_key(65537, 1024).public_key())
    with pytest.raises(ValueError, match="needs at least one key"):
        JwtVerifier([])
    # A certificate's key works as well (the CA's leaves are EC P-256).
    _, leaf, _ = _leaf(_ca())
    assert JwtKey.from_pem(leaf).alg == "ES256"


_JWT_KEY = ec.generate_private_key(ec.SECP256R1())
_JWT = sign_jwt(_claims(), _JWT_KEY, "ES256")


@PROPERTY
@given(st.integers(0, len(_JWT) - 1), st.characters())
def test_jwt_any_single_byte_tamper_is_rejected(index: int, char: str) -> None:
    if _JWT[index] == char:
        return
    verifier = _verifier([JwtKey.from_public_key(_JWT_KEY.public_key())], FakeClock())
    with pytest.raises(InvalidToken):
        verifier.verify(_JWT[:index] + char + _JWT[index + 1 :])


# --- edge cases, module by module ----------------------------------------------------------


def test_spiffe_edges() -> None:
    with pytest.raises(ValueError, match="must be a string, got int"):
        parse(7)  # type: ignore[arg-type]
    assert spiffe.is_valid(GPT4)
    assert compile_pattern(GPT4).exact and not compile_pattern("*").exact
    with pytest.raises(ValueError, match="not a readable PEM certificate bundle"):
        spiffe.load_certificates("-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
    assert spiffe.load_certificates("") == []


def test_ca_edges(clock: FakeClock, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown key type 'x'"):
        generate_key("x")
    with pytest.raises(ValueError, match="more than a day"):
        CertificateAuthority.create(TD, clock=clock, lifetime=HOUR)
    with pytest.raises(ValueError, match="unsupported private key type Ed25519PrivateKey"):
        edkey = ed25519.Ed25519PrivateKey.generate()
        CertificateAuthority.from_operator_root(
            _pem(_cert(generate_key(), generate_key(), cn="r", ca=True)),
            edkey.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            trust_domain=TD,
            clock=clock,
        )
    # An Ed25519 workload key is fine (TLS 1.3 supports it).
    leaf, chain = _ca().sign_csr(_raw_csr(edkey, [x509.UniformResourceIdentifier(GPT4)]), GPT4)
    assert verify_chain(leaf, chain, _ca().trust_bundle(), now=T0) == GPT4
    # An operator root about to expire cannot anchor a new intermediate.
    key = generate_key()
    dying = _pem(_cert(key, key, cn="Dying", ca=True, not_after=T0 + 30))
    with pytest.raises(ValueError, match="expires at"):
        CertificateAuthority.from_operator_root(
            dying, private_key_pem(key), trust_domain=TD, clock=clock
        )
    ca = CertificateAuthority.create(TD, clock=clock)
    with pytest.raises(ValueError, match="both root_cert_pem and root_key_pem"):
        ca.rotate_root(root_cert_pem=dying)
    ca.prepare_root_rotation()
    with pytest.raises(ValueError, match="already prepared with its own root"):
        ca.rotate_root(root_cert_pem=dying, root_key_pem=private_key_pem(key))

    # Loading names the file at fault.
    out = tmp_path / "ca"
    ca.to_pem_files(out)
    state = (out / "ca.json").read_text()
    (out / "ca.json").write_text(state.replace('"version": 1', '"version": 9'))
    with pytest.raises(ValueError, match="not a version 1 aimesh CA state"):
        CertificateAuthority.load(out, clock=clock)
    (out / "ca.json").write_text(state)
    (out / "token.secret").write_text("zz")
    with pytest.raises(ValueError, match=r"token.secret"):
        CertificateAuthority.load(out, clock=clock)
    ca.to_pem_files(out)
    other = CertificateAuthority.create(TD, clock=clock)
    (out / "next-intermediate.pem").write_text(other.intermediate_pem)
    (out / "next-intermediate.key").unlink()
    other.to_pem_files(tmp_path / "other")
    (tmp_path / "other" / "intermediate.key").rename(out / "next-intermediate.key")
    with pytest.raises(ValueError, match=r"next-intermediate.pem is not signed by .*next-root.pem"):
        CertificateAuthority.load(out, clock=clock)
    (out / "root.pem").unlink()
    with pytest.raises(ValueError, match=r"root.pem: missing"):
        CertificateAuthority.load(out, clock=clock)
    ca.to_pem_files(out)
    (out / "intermediate.pem").unlink()
    with pytest.raises(ValueError, match=r"intermediate.pem: No such file"):
        CertificateAuthority.load(out, clock=clock)
    # A failed write leaves no temporary file behind.
    ca.to_pem_files(out)
    (out / "bundle.pem").unlink()
    (out / "bundle.pem").mkdir()
    with pytest.raises(OSError):
        ca.to_pem_files(out)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_csr_with_an_unsupported_key_type() -> None:
    key = dsa.generate_private_key(1024)
    with pytest.raises(CsrRejected, match=r"key type .*DSAPublicKey.* is not supported"):
        _ca().sign_csr(_raw_csr(key, [x509.UniformResourceIdentifier(GPT4)]), GPT4)


def test_verify_chain_edges() -> None:
    root_key = generate_key()
    root = _cert(root_key, root_key, cn="root", ca=True)
    leaf_key = generate_key()
    # Two SPIFFE IDs in one leaf.
    two = _cert(leaf_key, root_key, cn="l", issuer_cn="root", uris=[GPT4, APP])
    with pytest.raises(CertificateRejected, match="exactly one URI"):
        verify_chain(_pem(two), "", _pem(root), now=T0)
    # A root with the same name but another key is not the issuer.
    impostor_key = generate_key()
    impostor = _cert(impostor_key, impostor_key, cn="root", ca=True)
    leaf = _cert(leaf_key, root_key, cn="l", issuer_cn="root", uris=[GPT4])
    with pytest.raises(CertificateRejected, match="foreign CA"):
        verify_chain(_pem(leaf), "", _pem(impostor), now=T0)
    assert verify_chain(_pem(leaf), "", _pem(impostor, root), now=T0) == GPT4
    # A CA without key usage may sign; a leaf whose key usage lacks digitalSignature may not.
    usage = x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=True,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    bare_root = (
        x509.CertificateBuilder()
        .subject_name(root.subject)
        .issuer_name(root.subject)
        .public_key(root_key.public_key())
        .serial_number(1)
        .not_valid_before(root.not_valid_before_utc)
        .not_valid_after(root.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    assert verify_chain(_pem(leaf), "", _pem(bare_root), now=T0) == GPT4
    no_sig = _cert(
        leaf_key, root_key, cn="l", issuer_cn="root", uris=[GPT4], extensions=[(usage, True)]
    )
    with pytest.raises(CertificateRejected, match="does not allow digital signatures"):
        verify_chain(_pem(no_sig), "", _pem(root), now=T0)
    # SHA-1 signatures are refused (cryptography no longer signs with SHA-1: this one was
    # made with `openssl req -x509 -sha1`, valid 2026-11-29 to 2126).
    sha1 = (
        "-----BEGIN CERTIFICATE-----\n"
        "MIIBqjCCAVCgAwIBAgIUbqaDilNGHbtwgo6MQtmD1/cPLZEwCQYHKoZIzj0EATAP\n"
        "MQ0wCwYDVQQDDARzaGExMCAXDTI2MTEyOTEyNDQ1OFoYDzIxMjYxMTA1MTI0NDU4\n"
        "WjAPMQ0wCwYDVQQDDARzaGExMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEBdnd\n"
        "R3OA5BaQs4VWmZkrkfSsHVpaWqO57EFdSJIy9si1+1HiLoNGfdiLCNuYw61/H3E6\n"
        "a6489pzvxu7Nuonh4qOBiDCBhTAdBgNVHQ4EFgQUODChdNSaX1EQAp78tabYyegx\n"
        "TYEwHwYDVR0jBBgwFoAUODChdNSaX1EQAp78tabYyegxTYEwNQYDVR0RBC4wLIYq\n"
        "c3BpZmZlOi8vcHJvZC5tZXNoL25zL3Byb2Qvc2EvZ3B0NC1nYXRld2F5MAwGA1Ud\n"
        "EwEB/wQCMAAwCQYHKoZIzj0EAQNJADBGAiEAie8aVdZ1lasIJnvX9tvp8IdiMNmI\n"
        "8NgPdXrXrKwEAUYCIQDd5Wp9hTMGxaxitHEz8SNozTYQSJl1c6vkcdw24hCxbA==\n"
        "-----END CERTIFICATE-----\n"
    )
    with pytest.raises(CertificateRejected, match="signed with sha1, which is too weak"):
        verify_chain(sha1, "", sha1, now=T0)
    # Too long a chain.
    keys = [generate_key() for _ in range(7)]
    certs = [_cert(keys[0], keys[0], cn="c0", ca=True)]
    certs += [
        _cert(keys[i], keys[i - 1], cn=f"c{i}", issuer_cn=f"c{i - 1}", ca=True) for i in range(1, 7)
    ]
    deep = _cert(leaf_key, keys[6], cn="l", issuer_cn="c6", uris=[GPT4])
    with pytest.raises(CertificateRejected, match="longer than 5 certificates"):
        verify_chain(_pem(deep), _pem(*certs[1:]), _pem(certs[0]), now=T0)
    # Name constraints: a leading dot means subdomains; DNS names are constrained too.
    inter_key = generate_key()
    dns_leaf = _cert(
        leaf_key,
        inter_key,
        cn="l",
        issuer_cn="i",
        uris=[GPT4],
        extensions=[],
    )
    for permitted, ok in (
        ([x509.UniformResourceIdentifier(".mesh")], True),
        ([x509.UniformResourceIdentifier(".prod.mesh")], False),
        ([x509.DNSName("mesh.local")], True),
    ):
        nc = x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=None)
        inter = _cert(
            inter_key, root_key, cn="i", issuer_cn="root", ca=True, extensions=[(nc, True)]
        )
        if ok:
            assert verify_chain(_pem(dns_leaf), _pem(inter), _pem(root), now=T0) == GPT4
        else:
            with pytest.raises(CertificateRejected, match="name constraints"):
                verify_chain(_pem(dns_leaf), _pem(inter), _pem(root), now=T0)
    san = x509.SubjectAlternativeName(
        [x509.UniformResourceIdentifier(GPT4), x509.DNSName("a.mesh.local")]
    )
    with_dns = _cert(leaf_key, inter_key, cn="l", issuer_cn="i", extensions=[(san, False)])
    for excluded, ok in (("other.local", True), ("mesh.local", False)):
        nc = x509.NameConstraints(
            permitted_subtrees=None, excluded_subtrees=[x509.DNSName(excluded)]
        )
        inter = _cert(
            inter_key, root_key, cn="i", issuer_cn="root", ca=True, extensions=[(nc, True)]
        )
        if ok:
            assert verify_chain(_pem(with_dns), _pem(inter), _pem(root), now=T0) == GPT4
        else:
            with pytest.raises(CertificateRejected, match=r"names a.mesh.local, outside"):
                verify_chain(_pem(with_dns), _pem(inter), _pem(root), now=T0)


def test_join_token_payload_checks_after_the_signature(clock: FakeClock) -> None:
    def signed(payload: str) -> str:
        mac = hmac.new(SECRET, f"amjt1.{payload}".encode(), hashlib.sha256).digest()
        return f"amjt1.{payload}." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def enc(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    with pytest.raises(InvalidJoinToken, match="malformed join token payload"):
        read_join_token(SECRET, signed(enc(b"not json")), clock=clock)
    bad_grant = enc(
        json.dumps({"sub": "spiffe://td/a**", "exp": int(T0) + 60, "jti": "j" * 8}).encode()
    )
    with pytest.raises(InvalidJoinToken, match="invalid grant"):
        verify_join_token(SECRET, signed(bad_grant), GPT4, clock=clock)


def test_authz_edges() -> None:
    with pytest.raises(ValueError, match="name: '-x' must be letters"):
        Authorizer([Rule("-x")])
    with pytest.raises(ConfigError) as err:
        parse_rules(
            [
                {"name": "a", "sources": [1]},
                {"name": "b", "to": "gpt4-gateway"},
                {"name": "c", "destinations": 5},
                {"name": "d", "from": ["dev"]},
                {"name": "e", "from": {}},
            ]
        )
    at = "spec.security.authorization.rules"
    assert err.value.errors == [
        f"{at}[0].sources: must be a list of strings",
        f"{at}[1].to: must be a mapping with services and/or methods",
        f"{at}[2].destinations: must be a list of strings",
        f"{at}[3].from: must be a mapping with principals and/or namespaces",
        f"{at}[4].from: names no principal or namespace",
    ]


def test_api_key_edges(keys: KeyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    from aimesh.mesh.security import apikeys

    plain, record = keys.create("acme")
    entry = record.to_dict()
    cases: list[tuple[Any, str]] = [
        ("nope", "must be a mapping"),
        ({**entry, "salt": base64.b64encode(b"x").decode()}, "16\\+ byte salt"),
        ({**entry, "disabled": "no"}, "disabled: must be true or false"),
        ({**entry, "created": 5}, "created: must be a time"),
        ({**entry, "hash": 5}, "hash: must be base64"),
    ]
    for data, problem in cases:
        with pytest.raises(ValueError, match=problem):
            ApiKeyRecord.from_dict(record.key_id, data)
    # Times as YAML gives them (datetimes) or without a zone are UTC.
    naive = dt.datetime(2027, 1, 15, 8, 0, 0)
    assert ApiKeyRecord.from_dict(record.key_id, {**entry, "created": naive}).created == T0
    assert (
        ApiKeyRecord.from_dict(record.key_id, {**entry, "created": "2027-01-15T08:00:00"}).created
        == T0
    )
    with pytest.raises(ValueError, match="keys: must be a mapping"):
        KeyStore.from_dict({"version": 1, "keys": ["x"]})
    with pytest.raises(ValueError, match="more than 0 seconds"):
        keys.create("acme", expires_in=0)
    # An id already taken is drawn again.
    ids = iter([record.key_id, "00000000000000aa"])
    monkeypatch.setattr("secrets.token_hex", lambda n: next(ids))
    _, again = keys.create("acme")
    assert again.key_id == "00000000000000aa"
    monkeypatch.undo()
    # The verified-key cache is bounded.
    monkeypatch.setattr(apikeys, "_CACHE_SIZE", 1)
    other, _ = keys.create("globex")
    assert keys.verify(plain).tenant == "acme" and keys.verify(other).tenant == "globex"
    assert len(keys._verified) == 1


def test_jwt_edges(clock: FakeClock) -> None:
    key = JwtKey.from_secret(HMAC_SECRET)
    verifier = _verifier([key], clock)

    def hs(header: dict[str, Any], payload: bytes) -> str:
        def enc(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        signing_input = f"{enc(json.dumps(header).encode())}.{enc(payload)}"
        mac = hmac.new(HMAC_SECRET, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{enc(mac)}"

    with pytest.raises(InvalidToken, match="JWT header is not a JSON object"):
        verifier.verify(_forge([], _claims()))  # type: ignore[arg-type]
    with pytest.raises(InvalidToken, match="JWT payload is not valid JSON"):
        verifier.verify(hs({"alg": "HS256"}, b"{nope"))
    with pytest.raises(InvalidToken, match="'aud' must be a string or a list"):
        verifier.verify(sign_jwt(_claims(aud=5), HMAC_SECRET, "HS256"))
    no_aud = {k: v for k, v in _claims().items() if k != "aud"}
    assert JwtVerifier([key], clock=clock).verify(sign_jwt(no_aud, HMAC_SECRET, "HS256"))
    es = JwtKey.from_public_key(_JWT_KEY.public_key())
    short_sig = (
        _JWT.rsplit(".", 1)[0] + "." + base64.urlsafe_b64encode(b"x" * 63).rstrip(b"=").decode()
    )
    with pytest.raises(InvalidToken, match="signature does not verify"):
        _verifier([es], clock).verify(short_sig)
    with pytest.raises(ValueError, match="must be on P-256 for ES256, not secp384r1"):
        JwtKey.from_public_key(ec.generate_private_key(ec.SECP384R1()).public_key())
    with pytest.raises(ValueError, match="unsupported key type"):
        JwtKey.from_public_key(object())
    with pytest.raises(ValueError, match="kid must be a string"):
        JwtKey.from_jwk({"kty": "oct", "kid": 3, "k": "x"})
    with pytest.raises(ValueError, match="is missing 'k'"):
        JwtKey.from_jwk({"kty": "oct"})
    with pytest.raises(ValueError, match="must have a 'keys' list"):
        load_keys({"keys": "x"})
    with pytest.raises(ValueError, match="leeway"):
        JwtVerifier([key], leeway=-1)
    with pytest.raises(ValueError, match="cannot sign RS256 with bytes"):
        sign_jwt(_claims(), HMAC_SECRET, "RS256")


def test_a_backend_opens_a_plaintext_port_only_when_permissive() -> None:
    import argparse

    from aimesh.mesh.security.cli import mtls_from_args

    flags = {
        "identity": f"spiffe://{TD}/ns/prod/sa/llm",
        "join_token": "token",
        "plaintext_listen": "127.0.0.1:0",
        "secure_control_plane": None,
    }
    backend = argparse.Namespace(mtls_mode=None, **flags)  # no --mtls-mode: STRICT
    with pytest.raises(ValueError, match="--plaintext-listen is for --mtls-mode PERMISSIVE"):
        mtls_from_args(backend, "127.0.0.1:15010")
    backend.mtls_mode = "PERMISSIVE"
    assert mtls_from_args(backend, "127.0.0.1:15010") is not None
    # A proxy without --mtls-mode follows its config, which may say PERMISSIVE.
    proxy = argparse.Namespace(mtls_mode=None, client_tls="on", **flags)
    assert mtls_from_args(proxy, "127.0.0.1:15010") is not None
