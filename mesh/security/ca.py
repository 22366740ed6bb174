"""The mesh CA: X.509-SVIDs for workloads, from their CSRs, and the chain checks peers run.

A `CertificateAuthority` holds a root and an intermediate for one SPIFFE trust domain. The
root is either its own (`create`: self-signed, CA, path length 1) or the operator's
(`from_operator_root`: the operator's CA certificate and key sign our intermediate once;
the operator's key is not kept on disk). The intermediate (CA, path length 0) signs the
leaves. Keys are EC P-256 by default (`KEY_TYPES`).

Workloads keep their private key: they send a CSR (`make_csr` builds one), and
`sign_csr(csr, granted_id)` returns a leaf for exactly the identity the caller was granted
(an authenticated join, a platform attestation: deciding that is the caller's job), never
more: a CSR that asks for another identity is refused with `CsrRejected`, naming both.

Leaves (X.509-SVIDs): CA false; key usage digitalSignature + keyEncipherment; extended key
usage serverAuth + clientAuth; the SPIFFE ID as the only URI SAN, DNS SANs only if granted;
valid from now - 1 minute (clock skew) for `lifetime` (1 minute to 30 days, 24 hours by
default, and never past the intermediate's own expiry); a random 128-bit serial.

`verify_chain(leaf, chain, bundle, now=...)` is the check a peer runs on the certificates
presented in a handshake: signatures up to a root in the trust bundle, validity periods,
CA constraints, and the SPIFFE ID; every failure says which (`CertificateRejected`).

Root rotation, step by step (no peer ever sees a certificate it cannot verify):

1. `prepare_root_rotation()` makes the next root and intermediate and adds the next root to
   `trust_bundle()`; leaves are still signed by the current intermediate.
2. Distribute the new bundle to every workload and proxy, and wait until all have it.
3. `rotate_root(overlap=...)` switches signing to the new intermediate. The old root stays
   in `trust_bundle()` for `overlap` seconds (by default: until the last leaf the old
   intermediate signed expires, plus the clock skew), so old leaves keep verifying.
4. Workloads renew their leaves as usual and get ones under the new root.
5. After the overlap, `trust_bundle()` no longer contains the old root (or call
   `drop_retired_roots()` to end it early); leaves still under the old root are then
   rejected as signed by a foreign CA. Distribute that bundle too.

`rotate_root()` without step 1 does 1 and 3 at once: fine when every verifier fetches the
bundle before any new leaf reaches it, as with a single control plane. With an operator
root, pass the new root's certificate and key to `prepare_root_rotation` or `rotate_root`.
`rotate_intermediate()` replaces only the intermediate (same root, bundle unchanged).

On disk (`to_pem_files` / `load`), one directory: `root.pem`, `root.key` (not for an
operator root), `intermediate.pem`, `intermediate.key`, `token.secret` (the join-token HMAC
key), `next-*.pem` / `next-*.key` while a rotation is prepared, `bundle.pem` (the trust
bundle, for distribution; not read back) and `ca.json` (trust domain, key type, retired
roots and until when they are trusted). Keys are PKCS#8 PEM with mode 0600 (encrypted when
a passphrase is given); `load` refuses key files readable by group or others.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import SecurityError, Unauthenticated
from .spiffe import (
    load_certificate,
    load_certificates,
    parse,
    peer_spiffe_id,
    trust_domain_id,
    uri_sans,
    validate_trust_domain,
)

Clock = Callable[[], float]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

MINUTE = 60.0
HOUR = 3600.0
DAY = 86400.0
KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072")
DEFAULT_ROOT_LIFETIME = 10 * 365 * DAY
DEFAULT_INTERMEDIATE_LIFETIME = 365 * DAY
DEFAULT_LEAF_LIFETIME = DAY
MIN_LEAF_LIFETIME = MINUTE
MAX_LEAF_LIFETIME = 30 * DAY
CLOCK_SKEW = MINUTE  # leaves are valid from this long before they were signed
MAX_CHAIN_DEPTH = 5  # leaf + intermediates; the root comes from the bundle
MIN_RSA_BITS = 2048
_STATE_VERSION = 1


class CsrRejected(SecurityError):
    """A CSR that cannot be signed: unreadable, badly signed, or asking for the wrong name."""


class CertificateRejected(Unauthenticated):
    """A presented certificate chain that does not verify; the message names the reason."""


# --- keys and CSRs (the workload side) -----------------------------------------------------


def generate_key(key_type: str = "ec-p256") -> PrivateKey:
    """A new private key of one of `KEY_TYPES`."""
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type in ("rsa-2048", "rsa-3072"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    raise ValueError(f"unknown key type {key_type!r}; use one of {', '.join(KEY_TYPES)}")


def private_key_pem(key: PrivateKey, passphrase: bytes | None = None) -> str:
    """PKCS#8 PEM, encrypted with `passphrase` if given."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    ).decode()


def load_private_key(pem: bytes | str, passphrase: bytes | None = None) -> PrivateKey:
    raw = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_private_key(raw, passphrase)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"not a readable PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"unsupported private key type {type(key).__name__}; use EC or RSA")
    return key


def make_csr(
    spiffe_id: str,
    *,
    key: PrivateKey | None = None,
    key_type: str = "ec-p256",
    dns_names: Sequence[str] = (),
) -> tuple[str, str]:
    """(private key PEM, CSR PEM) for `spiffe_id`; the key stays with the workload."""
    parse(spiffe_id)
    key = key or generate_key(key_type)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id)]
    names += [x509.DNSName(d) for d in dns_names]
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "aimesh")]))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(key, _hash_for(key))
    )
    return private_key_pem(key), csr.public_bytes(serialization.Encoding.PEM).decode()


# --- helpers -------------------------------------------------------------------------------


def _utc(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, tz=dt.UTC)


def _when(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _hash_for(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def _spki(key: Any) -> bytes:
    data: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _name(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


def _serial() -> int:
    return secrets.randbits(128) or 1


def _ca_certificate(
    *,
    subject_cn: str,
    trust_domain: str,
    key: PrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: PrivateKey,
    path_length: int,
    not_before: float,
    not_after: float,
) -> x509.Certificate:
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "aimesh"),
            x509.NameAttribute(NameOID.COMMON_NAME, subject_cn),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer is not None else subject)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(_utc(not_before))
        .not_valid_after(_utc(not_after))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(trust_domain_id(trust_domain))]
            ),
            critical=False,
        )
    )
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())
    return builder.add_extension(aki, False).sign(issuer_key, _hash_for(issuer_key))


def _check_key_matches(
    cert: x509.Certificate, key: PrivateKey, what: str, problem: str = ""
) -> None:
    """ValueError(`problem`, by default naming `what`) unless `key` is `cert`'s."""
    if _spki(cert.public_key()) != _spki(key.public_key()):
        raise ValueError(problem or f"the {what} key does not belong to the {what} certificate")


def _is_ca(cert: x509.Certificate) -> tuple[bool, int | None]:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False, None
    return bc.ca, bc.path_length


@dataclass(slots=True)
class _Generation:
    """One root and the intermediate under it."""

    root: x509.Certificate
    root_key: PrivateKey | None  # None: an operator root whose key we do not keep
    intermediate: x509.Certificate
    intermediate_key: PrivateKey

    @property
    def operator_root(self) -> bool:
        return self.root_key is None


@dataclass(frozen=True, slots=True)
class RetiredRoot:
    """A previous root, still in the trust bundle until `trusted_until` (Unix seconds)."""

    certificate: x509.Certificate
    trusted_until: float


def _intermediate(
    trust_domain: str,
    root: x509.Certificate,
    root_key: PrivateKey,
    *,
    key_type: str,
    now: float,
    lifetime: float,
) -> tuple[x509.Certificate, PrivateKey]:
    root_end = root.not_valid_after_utc.timestamp()
    if root_end <= now + MINUTE:
        raise ValueError(f"the root CA {_name(root)} expires at {_when(_utc(root_end))}")
    key = generate_key(key_type)
    cert = _ca_certificate(
        subject_cn=f"aimesh intermediate CA {secrets.token_hex(4)}",
        trust_domain=trust_domain,
        key=key,
        issuer=root,
        issuer_key=root_key,
        path_length=0,
        not_before=now - CLOCK_SKEW,
        not_after=min(now + lifetime, root_end),
    )
    return cert, key


def _new_generation(
    trust_domain: str, *, key_type: str, now: float, lifetime: float, intermediate_lifetime: float
) -> _Generation:
    root_key = generate_key(key_type)
    root = _ca_certificate(
        subject_cn=f"aimesh root CA {secrets.token_hex(4)}",
        trust_domain=trust_domain,
        key=root_key,
        issuer=None,
        issuer_key=root_key,
        path_length=1,
        not_before=now - CLOCK_SKEW,
        not_after=now + lifetime,
    )
    inter, inter_key = _intermediate(
        trust_domain, root, root_key, key_type=key_type, now=now, lifetime=intermediate_lifetime
    )
    return _Generation(root, root_key, inter, inter_key)


def _operator_generation(
    trust_domain: str,
    root_cert_pem: bytes | str,
    root_key_pem: bytes | str,
    *,
    passphrase: bytes | None,
    key_type: str,
    now: float,
    intermediate_lifetime: float,
) -> _Generation:
    root = load_certificate(root_cert_pem)
    root_key = load_private_key(root_key_pem, passphrase)
    _check_key_matches(root, root_key, "operator root")
    ca, path_length = _is_ca(root)
    if not ca:
        raise ValueError(f"the operator root {_name(root)} is not a CA (basicConstraints CA:true)")
    if path_length is not None and path_length < 1:
        raise ValueError(
            f"the operator root {_name(root)} has path length {path_length}; it must allow "
            "one intermediate (path length 1 or more, or none)"
        )
    inter, inter_key = _intermediate(
        trust_domain, root, root_key, key_type=key_type, now=now, lifetime=intermediate_lifetime
    )
    return _Generation(root, None, inter, inter_key)


# --- the CA --------------------------------------------------------------------------------


class CertificateAuthority:
    """The CA of one trust domain. Build it with `create`, `from_operator_root` or `load`."""

    def __init__(
        self,
        trust_domain: str,
        current: _Generation,
        *,
        clock: Clock,
        key_type: str,
        token_secret: bytes,
        pending: _Generation | None = None,
        retired: Iterable[RetiredRoot] = (),
        leaf_not_after: float | None = None,
        intermediate_lifetime: float = DEFAULT_INTERMEDIATE_LIFETIME,
    ) -> None:
        self.trust_domain = validate_trust_domain(trust_domain)
        self._current = current
        self._pending = pending
        self._retired = list(retired)
        self._clock = clock
        self.key_type = key_type
        self.token_secret = token_secret
        self._leaf_not_after = leaf_not_after  # latest expiry the current intermediate signed
        self._intermediate_lifetime = intermediate_lifetime
        # Tests lower this to rotate every few seconds; operators keep 1 minute.
        self.min_leaf_lifetime = MIN_LEAF_LIFETIME

    # --- construction ---

    @classmethod
    def create(
        cls,
        trust_domain: str,
        *,
        clock: Clock = time.time,
        key_type: str = "ec-p256",
        lifetime: float = DEFAULT_ROOT_LIFETIME,
        intermediate_lifetime: float = DEFAULT_INTERMEDIATE_LIFETIME,
    ) -> CertificateAuthority:
        """A new self-signed root (`lifetime` seconds) and an intermediate under it."""
        validate_trust_domain(trust_domain)
        if key_type not in KEY_TYPES:
            raise ValueError(f"unknown key type {key_type!r}; use one of {', '.join(KEY_TYPES)}")
        if lifetime <= DAY or intermediate_lifetime <= HOUR:
            raise ValueError("a CA lifetime must be more than a day (an intermediate's an hour)")
        gen = _new_generation(
            trust_domain,
            key_type=key_type,
            now=clock(),
            lifetime=lifetime,
            intermediate_lifetime=intermediate_lifetime,
        )
        return cls(
            trust_domain,
            gen,
            clock=clock,
            key_type=key_type,
            token_secret=secrets.token_bytes(32),
            intermediate_lifetime=intermediate_lifetime,
        )

    @classmethod
    def from_operator_root(
        cls,
        root_cert_pem: bytes | str,
        root_key_pem: bytes | str,
        *,
        trust_domain: str,
        clock: Clock = time.time,
        key_type: str = "ec-p256",
        intermediate_lifetime: float = DEFAULT_INTERMEDIATE_LIFETIME,
        passphrase: bytes | None = None,
    ) -> CertificateAuthority:
        """An intermediate signed by the operator's CA, which becomes the trust anchor.

        The operator's key signs the intermediate and is then dropped: it is not kept in
        memory nor written by `to_pem_files`.
        """
        validate_trust_domain(trust_domain)
        gen = _operator_generation(
            trust_domain,
            root_cert_pem,
            root_key_pem,
            passphrase=passphrase,
            key_type=key_type,
            now=clock(),
            intermediate_lifetime=intermediate_lifetime,
        )
        return cls(
            trust_domain,
            gen,
            clock=clock,
            key_type=key_type,
            token_secret=secrets.token_bytes(32),
            intermediate_lifetime=intermediate_lifetime,
        )

    # --- what it shows ---

    @property
    def root_pem(self) -> str:
        return _pem(self._current.root)

    @property
    def intermediate_pem(self) -> str:
        return _pem(self._current.intermediate)

    @property
    def operator_root(self) -> bool:
        return self._current.operator_root

    @property
    def rotation_prepared(self) -> bool:
        return self._pending is not None

    @property
    def next_root_pem(self) -> str | None:
        """The prepared next root (in the bundle, not signing yet), if any."""
        return _pem(self._pending.root) if self._pending is not None else None

    @property
    def next_intermediate_pem(self) -> str | None:
        return _pem(self._pending.intermediate) if self._pending is not None else None

    @property
    def retired_roots(self) -> tuple[RetiredRoot, ...]:
        now = self._clock()
        return tuple(r for r in self._retired if r.trusted_until > now)

    def trust_bundle(self) -> str:
        """PEM of every root a peer must trust now: current, prepared next, and retired ones
        still in their overlap."""
        roots = [self._current.root]
        if self._pending is not None:
            roots.append(self._pending.root)
        roots += [r.certificate for r in self.retired_roots]
        return "".join(_pem(c) for c in roots)

    # --- signing ---

    def sign_csr(
        self,
        csr_pem: bytes | str,
        spiffe_id: str,
        *,
        lifetime: float = DEFAULT_LEAF_LIFETIME,
        dns_names: Sequence[str] = (),
    ) -> tuple[str, str]:
        """(leaf PEM, chain PEM) for the workload granted `spiffe_id`.

        The chain is the intermediate: a server or client presents leaf + chain and its
        peers verify against `trust_bundle()`. Raises CsrRejected when the CSR cannot be
        signed for that identity; ValueError for a bad grant (`spiffe_id`, `lifetime`,
        `dns_names` are the caller's, not the workload's). The leaf carries exactly the
        granted `dns_names`; the CSR may ask for some of them, never for others.
        """
        granted = parse(spiffe_id)
        if granted.trust_domain != self.trust_domain:
            raise ValueError(
                f"this CA signs for trust domain {self.trust_domain!r}, not "
                f"{granted.trust_domain!r} ({spiffe_id})"
            )
        if not granted.path:
            raise ValueError(f"{spiffe_id} names the trust domain, not a workload")
        if not self.min_leaf_lifetime <= lifetime <= MAX_LEAF_LIFETIME:
            raise ValueError(
                f"a certificate lifetime must be between {self.min_leaf_lifetime:g}s (minimum) "
                f"and {MAX_LEAF_LIFETIME:.0f}s (30 days), got {lifetime:.0f}s"
            )
        granted_dns = [x509.DNSName(d) for d in dns_names]  # validates them
        csr = _load_csr(csr_pem)
        public_key = _check_csr(csr, spiffe_id, set(dns_names))

        now = self._clock()
        issuer = self._current.intermediate
        not_after = min(now + lifetime, issuer.not_valid_after_utc.timestamp())
        if not_after <= now:
            raise ValueError(
                f"the intermediate CA expired at {_when(issuer.not_valid_after_utc)}; "
                "call rotate_intermediate()"
            )
        segments = granted.segments
        cn = (granted.service or segments[-1])[:64]
        leaf = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "aimesh"),
                        x509.NameAttribute(NameOID.COMMON_NAME, cn),
                    ]
                )
            )
            .issuer_name(issuer.subject)
            .public_key(public_key)
            .serial_number(_serial())
            .not_valid_before(_utc(now - CLOCK_SKEW))
            .not_valid_after(_utc(not_after))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(spiffe_id), *granted_dns]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
            .add_extension(_aki(issuer), False)
            .sign(self._current.intermediate_key, _hash_for(self._current.intermediate_key))
        )
        self._leaf_not_after = max(self._leaf_not_after or 0.0, not_after)
        return _pem(leaf), _pem(issuer)

    # --- rotation ---

    def prepare_root_rotation(
        self,
        *,
        root_cert_pem: bytes | str | None = None,
        root_key_pem: bytes | str | None = None,
        passphrase: bytes | None = None,
    ) -> str:
        """Step 1: makes the next root (or takes the operator's) and adds it to the bundle.

        Returns the new trust bundle, to distribute before calling `rotate_root`.
        """
        if self._pending is not None:
            raise ValueError("a root rotation is already prepared; finish it with rotate_root()")
        self._pending = self._next_generation(root_cert_pem, root_key_pem, passphrase)
        return self.trust_bundle()

    def rotate_root(
        self,
        *,
        overlap: float | None = None,
        root_cert_pem: bytes | str | None = None,
        root_key_pem: bytes | str | None = None,
        passphrase: bytes | None = None,
    ) -> None:
        """Step 3: signs with the next root's intermediate from now on (the prepared one, or
        a new one); the old root stays trusted for `overlap` seconds.

        Without `overlap`, the old root is trusted until the last leaf its intermediate
        signed expires (plus the clock skew). An operator root must be given here or to
        `prepare_root_rotation`, since this CA does not keep the operator's key.
        """
        if overlap is not None and overlap < 0:
            raise ValueError(f"overlap must be 0 or more seconds, got {overlap:g}")
        if self._pending is not None:
            if root_cert_pem is not None or root_key_pem is not None:
                raise ValueError(
                    "a rotation is already prepared with its own root; call rotate_root() "
                    "without a root"
                )
            nxt = self._pending
        else:
            nxt = self._next_generation(root_cert_pem, root_key_pem, passphrase)
        now = self._clock()
        old = self._current
        if overlap is None:
            overlap = max((self._leaf_not_after or now) - now, 0.0) + CLOCK_SKEW
        if old.root.public_bytes(serialization.Encoding.DER) != nxt.root.public_bytes(
            serialization.Encoding.DER
        ):
            self._retired.append(RetiredRoot(old.root, now + overlap))
        self._current, self._pending = nxt, None
        self._leaf_not_after = None

    def rotate_intermediate(
        self, *, root_key_pem: bytes | str | None = None, passphrase: bytes | None = None
    ) -> None:
        """A new intermediate under the current root; the trust bundle does not change.

        Leaves signed by the old intermediate keep verifying: they carry it in their chain.
        An operator root's key must be passed, since this CA does not keep it.
        """
        root_key = self._current.root_key
        if root_key is None:
            if root_key_pem is None:
                raise ValueError(
                    "the root is the operator's and its key is not kept; pass root_key_pem"
                )
            root_key = load_private_key(root_key_pem, passphrase)
            _check_key_matches(self._current.root, root_key, "operator root")
        inter, key = _intermediate(
            self.trust_domain,
            self._current.root,
            root_key,
            key_type=self.key_type,
            now=self._clock(),
            lifetime=self._intermediate_lifetime,
        )
        self._current = _Generation(self._current.root, self._current.root_key, inter, key)

    def drop_retired_roots(self) -> None:
        """Ends every overlap now: retired roots leave the trust bundle."""
        self._retired.clear()

    def _next_generation(
        self,
        root_cert_pem: bytes | str | None,
        root_key_pem: bytes | str | None,
        passphrase: bytes | None,
    ) -> _Generation:
        now = self._clock()
        if root_cert_pem is None and root_key_pem is None:
            if self._current.operator_root:
                raise ValueError(
                    "this CA's root is the operator's: pass the new root's root_cert_pem and "
                    "root_key_pem"
                )
            lifetime = (
                self._current.root.not_valid_after_utc - self._current.root.not_valid_before_utc
            ).total_seconds()
            return _new_generation(
                self.trust_domain,
                key_type=self.key_type,
                now=now,
                lifetime=lifetime,
                intermediate_lifetime=self._intermediate_lifetime,
            )
        if root_cert_pem is None or root_key_pem is None:
            raise ValueError("pass both root_cert_pem and root_key_pem, or neither")
        return _operator_generation(
            self.trust_domain,
            root_cert_pem,
            root_key_pem,
            passphrase=passphrase,
            key_type=self.key_type,
            now=now,
            intermediate_lifetime=self._intermediate_lifetime,
        )

    # --- persistence ---

    def to_pem_files(
        self, directory: str | os.PathLike[str], *, passphrase: bytes | None = None
    ) -> None:
        """Writes the CA to `directory` (created 0700 if missing); keys are 0600.

        Each file is replaced atomically (and synced), but a generation is four files,
        and no order makes every crash point loadable: `ca.json` goes first (a root
        retired by `rotate_root` is recorded before it stops being current), a
        generation's `root.pem` last, and stale files (a finished rotation's `next-*`)
        are removed at the end, so after a prepared rotation a crash leaves the next
        generation's keys on disk; `load` ignores a leftover `next-*` equal to the current
        root. A crash while the current generation's files are replaced can leave a pair
        that does not match, which `load` refuses naming the file (docs/security.md says
        how to finish by hand). A rotation without `prepare_root_rotation` (not offered by
        the CLI) has no such copy: back the directory up first.
        """
        out = Path(directory)
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        files: dict[str, tuple[str, bool]] = {}
        stale: list[str] = []

        def generation(prefix: str, gen: _Generation | None) -> None:
            names = [f"{prefix}intermediate.key", f"{prefix}intermediate.pem"]
            names += [f"{prefix}root.key", f"{prefix}root.pem"]
            if gen is None:
                stale.extend(names)
                return
            files[names[0]] = (private_key_pem(gen.intermediate_key, passphrase), True)
            files[names[1]] = (_pem(gen.intermediate), False)
            if gen.root_key is not None:
                files[names[2]] = (private_key_pem(gen.root_key, passphrase), True)
            else:
                stale.append(names[2])
            files[names[3]] = (_pem(gen.root), False)

        state = {
            "version": _STATE_VERSION,
            "trustDomain": self.trust_domain,
            "keyType": self.key_type,
            "intermediateLifetimeSeconds": self._intermediate_lifetime,
            "leafNotAfter": self._leaf_not_after,
            "retiredRoots": [
                {"certificate": _pem(r.certificate), "trustedUntil": r.trusted_until}
                for r in self.retired_roots
            ],
        }
        files["ca.json"] = (json.dumps(state, indent=2) + "\n", False)
        files["token.secret"] = (self.token_secret.hex() + "\n", True)
        generation("next-", self._pending)
        generation("", self._current)
        files["bundle.pem"] = (self.trust_bundle(), False)
        for name, (text, secret) in files.items():
            _write(out / name, text, 0o600 if secret else 0o644)
        for name in reversed(stale):  # a generation's root.pem first: it marks one
            (out / name).unlink(missing_ok=True)

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        *,
        clock: Clock = time.time,
        passphrase: bytes | None = None,
    ) -> CertificateAuthority:
        """Reads a CA written by `to_pem_files`; raises ValueError naming the file at fault."""
        src = Path(directory)
        try:
            state = json.loads((src / "ca.json").read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{src / 'ca.json'}: cannot read the CA state: {exc}") from None
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError(f"{src / 'ca.json'}: not a version {_STATE_VERSION} aimesh CA state")
        trust_domain = state.get("trustDomain")
        if not isinstance(trust_domain, str) or state.get("keyType") not in KEY_TYPES:
            raise ValueError(f"{src / 'ca.json'}: trustDomain or keyType is missing or invalid")

        def key_of(cert: x509.Certificate, key: PrivateKey, stem: str) -> None:
            problem = f"{src / (stem + '.key')} does not belong to {stem}.pem"
            _check_key_matches(cert, key, stem, problem)

        def generation(prefix: str) -> _Generation | None:
            if not (src / f"{prefix}root.pem").exists():
                return None
            root = load_certificate(_read(src / f"{prefix}root.pem", secret=False))
            root_key = None
            if (src / f"{prefix}root.key").exists():
                root_key = load_private_key(_read(src / f"{prefix}root.key"), passphrase)
                key_of(root, root_key, f"{prefix}root")
            inter = load_certificate(_read(src / f"{prefix}intermediate.pem", secret=False))
            inter_key = load_private_key(_read(src / f"{prefix}intermediate.key"), passphrase)
            key_of(inter, inter_key, f"{prefix}intermediate")
            try:
                inter.verify_directly_issued_by(root)
            except (ValueError, TypeError, InvalidSignature):
                raise ValueError(
                    f"{src / (prefix + 'intermediate.pem')} is not signed by "
                    f"{src / (prefix + 'root.pem')}"
                ) from None
            return _Generation(root, root_key, inter, inter_key)

        current = generation("")
        if current is None:
            raise ValueError(f"{src / 'root.pem'}: missing")
        pending = generation("next-")
        if pending is not None and pending.root == current.root:
            pending = None  # a rotation whose write stopped before removing next-*
        try:
            secret = bytes.fromhex(_read(src / "token.secret").strip())
        except ValueError as exc:
            raise ValueError(f"{src / 'token.secret'}: {exc}") from None
        try:
            retired = [
                RetiredRoot(load_certificate(r["certificate"]), float(r["trustedUntil"]))
                for r in state.get("retiredRoots", [])
            ]
            leaf_not_after = state.get("leafNotAfter")
            key_type = str(state["keyType"])
            lifetime = float(
                state.get("intermediateLifetimeSeconds", DEFAULT_INTERMEDIATE_LIFETIME)
            )
            return cls(
                trust_domain,
                current,
                clock=clock,
                key_type=key_type,
                token_secret=secret,
                pending=pending,
                retired=retired,
                leaf_not_after=float(leaf_not_after) if leaf_not_after is not None else None,
                intermediate_lifetime=lifetime,
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{src / 'ca.json'}: malformed CA state ({exc!r})") from None


def _write(path: Path, text: str, mode: int) -> None:
    """Atomically, with `mode` from the start (a key is never briefly world-readable)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read(path: Path, *, secret: bool = True) -> str:
    try:
        if secret and stat.S_IMODE(path.stat().st_mode) & 0o077:
            raise ValueError(
                f"{path}: a key file must not be readable by group or others "
                f"(mode {stat.S_IMODE(path.stat().st_mode):04o}); chmod 600 it"
            )
        return path.read_text()
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from None


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    # The issuer is always our own intermediate, which has a subject key identifier.
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


# --- CSR checks ----------------------------------------------------------------------------

CsrPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey


def _load_csr(csr_pem: bytes | str) -> x509.CertificateSigningRequest:
    raw = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    try:
        csr = x509.load_pem_x509_csr(raw)
    except ValueError as exc:
        raise CsrRejected(f"not a readable PEM certificate signing request: {exc}") from None
    try:
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CsrRejected(f"the CSR's signature cannot be checked: {exc}") from None
    if not valid:
        raise CsrRejected(
            "the CSR's signature does not verify: it was not signed by the key it carries"
        )
    return csr


def _check_csr(
    csr: x509.CertificateSigningRequest, granted: str, granted_dns: set[str]
) -> CsrPublicKey:
    try:
        public_key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CsrRejected(f"the CSR's public key cannot be read: {exc}") from None
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise CsrRejected(
                f"the CSR's RSA key has {public_key.key_size} bits; use {MIN_RSA_BITS} or more "
                "(or an EC P-256 key)"
            )
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, ec.SECP256R1 | ec.SECP384R1):
            raise CsrRejected(f"the CSR's EC key is on {public_key.curve.name}; use P-256 or P-384")
    elif not isinstance(public_key, ed25519.Ed25519PublicKey):
        raise CsrRejected(
            f"the CSR's key type ({type(public_key).__name__}) is not supported; use EC P-256"
        )
    try:
        san: x509.SubjectAlternativeName | None = csr.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
    except x509.ExtensionNotFound:
        san = None
    except ValueError as exc:
        raise CsrRejected(f"the CSR's extensions cannot be read: {exc}") from None
    hint = f"make a CSR with the URI SAN {granted} (its only URI SAN)"
    if san is not None:
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        dns = san.get_values_for_type(x509.DNSName)
        others = [
            n for n in san if not isinstance(n, x509.UniformResourceIdentifier | x509.DNSName)
        ]
        if others:
            kinds = ", ".join(sorted({type(n).__name__ for n in others}))
            raise CsrRejected(f"the CSR asks for names of kinds this CA never grants ({kinds})")
        if len(uris) > 1:
            raise CsrRejected(
                f"the CSR asks for {len(uris)} identities ({', '.join(uris)}); an X.509-SVID "
                f"has exactly one; {hint}"
            )
        not_granted = sorted(set(dns) - granted_dns)
        if not_granted:
            allowed = ", ".join(sorted(granted_dns)) or "none"
            raise CsrRejected(
                f"the CSR asks for DNS names {', '.join(not_granted)} that are not granted "
                f"(granted: {allowed})"
            )
        if uris:
            if uris[0] != granted:
                raise CsrRejected(
                    f"the CSR asks for identity {uris[0]} but this workload is granted "
                    f"{granted}; {hint}"
                )
            return public_key
    cns = [str(a.value) for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if granted in cns and len(cns) == 1:
        return public_key
    if cns:
        raise CsrRejected(
            f"the CSR asks for identity {cns[0]} (subject common name) but this workload is "
            f"granted {granted}; {hint}"
        )
    raise CsrRejected(f"the CSR names no identity; {hint}")


# --- chain verification (the peer's side) --------------------------------------------------

_WEAK_HASHES = (hashes.SHA1, hashes.MD5)


def verify_chain(
    leaf_pem: bytes | str,
    chain_pem: bytes | str,
    bundle_pem: bytes | str,
    *,
    now: float | dt.datetime,
    expected_id: str | None = None,
) -> str:
    """Verifies a presented leaf (+ intermediates) against a trust bundle; returns the
    leaf's SPIFFE ID. Raises CertificateRejected with the reason.

    Checks: the leaf is not a CA, has exactly one valid SPIFFE ID and, if given, the expected
    one; every signature up to a certificate in the bundle (a trust anchor, self-signed or
    not); every certificate's validity at `now`; issuers are CAs allowed to sign
    certificates, within their path length; no SHA-1/MD5 signatures; no unknown critical
    extension; URI and DNS name constraints; the leaf's trust domain matches the anchor's
    when the anchor carries one (a `spiffe://<trust domain>` URI SAN, as aimesh CAs do).
    """
    when = now if isinstance(now, dt.datetime) else _utc(now)
    try:
        leaf = load_certificate(leaf_pem)
        pool = load_certificates(chain_pem) if chain_pem else []
        roots = load_certificates(bundle_pem)
    except ValueError as exc:
        raise CertificateRejected(str(exc)) from None
    if not roots:
        raise CertificateRejected("the trust bundle holds no certificate")
    try:
        peer = peer_spiffe_id(leaf)
    except ValueError as exc:
        raise CertificateRejected(str(exc)) from None
    _check_cert(leaf, when, f"the certificate of {peer}")
    if _is_ca(leaf)[0]:
        raise CertificateRejected(f"the certificate of {peer} is a CA; it cannot be a workload")
    _check_leaf_usage(leaf, peer)

    path = [leaf]
    current = leaf
    while True:
        anchor = _find_issuer(current, roots)
        if anchor is not None:
            _check_issuer(anchor, when, len(path) - 1, "root CA")
            path.append(anchor)
            break
        if len(path) > MAX_CHAIN_DEPTH:
            raise CertificateRejected(
                f"the certificate chain of {peer} is longer than {MAX_CHAIN_DEPTH} certificates"
            )
        issuer = _find_issuer(current, [c for c in pool if not any(c is p for p in path)])
        if issuer is None:
            raise CertificateRejected(
                f"the certificate of {peer} is signed by a foreign CA: "
                f"{_name(current)!r} was issued by {current.issuer.rfc4514_string()!r}, "
                "which is neither in the trust bundle nor in the presented chain"
            )
        _check_issuer(issuer, when, len(path) - 1, "intermediate CA")
        path.append(issuer)
        current = issuer

    uris = [peer]
    dns = _dns_sans(leaf)
    for ca in path[1:]:
        _check_name_constraints(ca, uris, dns, peer)
    anchor_domains = [u for u in uri_sans(path[-1]) if u.startswith("spiffe://")]
    leaf_domain = parse(peer).trust_domain
    if anchor_domains and all(parse(u).trust_domain != leaf_domain for u in anchor_domains):
        raise CertificateRejected(
            f"the certificate of {peer} chains to the CA of {anchor_domains[0]}, which does "
            f"not issue identities in trust domain {leaf_domain!r}"
        )
    if expected_id is not None and peer != expected_id:
        raise CertificateRejected(f"wrong identity: got {peer}, expected {expected_id}")
    return peer


def _find_issuer(
    cert: x509.Certificate, candidates: Sequence[x509.Certificate]
) -> x509.Certificate | None:
    for candidate in candidates:
        if candidate.subject != cert.issuer:
            continue
        try:
            cert.verify_directly_issued_by(candidate)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            continue
        return candidate
    return None


def _check_cert(cert: x509.Certificate, when: dt.datetime, what: str) -> None:
    if when < cert.not_valid_before_utc:
        raise CertificateRejected(
            f"{what} is not valid yet: valid from {_when(cert.not_valid_before_utc)} "
            f"(now {_when(when)})"
        )
    if when > cert.not_valid_after_utc:
        raise CertificateRejected(
            f"{what} expired at {_when(cert.not_valid_after_utc)} (now {_when(when)})"
        )
    try:
        algorithm = cert.signature_hash_algorithm
        extensions = list(cert.extensions)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CertificateRejected(f"{what} cannot be read: {exc}") from None
    if isinstance(algorithm, _WEAK_HASHES):
        raise CertificateRejected(f"{what} is signed with {algorithm.name}, which is too weak")
    for ext in extensions:
        if ext.critical and isinstance(ext.value, x509.UnrecognizedExtension):
            raise CertificateRejected(
                f"{what} has an unknown critical extension {ext.oid.dotted_string}"
            )


def _check_issuer(cert: x509.Certificate, when: dt.datetime, below: int, role: str) -> None:
    what = f"the {role} {_name(cert)!r}"
    _check_cert(cert, when, what)
    ca, path_length = _is_ca(cert)
    if not ca:
        raise CertificateRejected(f"{what} is not a CA (basicConstraints CA:true is missing)")
    if path_length is not None and below > path_length:
        raise CertificateRejected(
            f"{what} allows {path_length} intermediate(s) below it, the chain has {below}"
        )
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not usage.key_cert_sign:
        raise CertificateRejected(f"{what} is not allowed to sign certificates (key usage)")


def _check_leaf_usage(leaf: x509.Certificate, peer: str) -> None:
    try:
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        if not usage.digital_signature:
            raise CertificateRejected(
                f"the certificate of {peer} does not allow digital signatures (key usage)"
            )
    except x509.ExtensionNotFound:
        pass
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return
    allowed = {
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
        ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
    }
    if not allowed & set(eku):
        raise CertificateRejected(
            f"the certificate of {peer} is not for TLS (extended key usage has neither "
            "serverAuth nor clientAuth)"
        )


def _dns_sans(cert: x509.Certificate) -> list[str]:
    # Only called on a leaf that has a SPIFFE ID, hence a SAN extension.
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(san.get_values_for_type(x509.DNSName))


def _host_in(host: str, constraint: str, *, uri: bool) -> bool:
    host, constraint = host.lower(), constraint.lower()
    if constraint.startswith("."):
        return host.endswith(constraint)
    if uri:
        return host == constraint
    return host == constraint or host.endswith("." + constraint)


def _check_name_constraints(
    ca: x509.Certificate, uris: list[str], dns: list[str], peer: str
) -> None:
    try:
        nc = ca.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return
    names = [(parse(u).trust_domain, True, u) for u in uris] + [(d, False, d) for d in dns]
    for host, is_uri, shown in names:
        kind = x509.UniformResourceIdentifier if is_uri else x509.DNSName
        permitted = [c.value for c in nc.permitted_subtrees or () if isinstance(c, kind)]
        excluded = [c.value for c in nc.excluded_subtrees or () if isinstance(c, kind)]
        if any(_host_in(host, c, uri=is_uri) for c in excluded) or (
            permitted and not any(_host_in(host, c, uri=is_uri) for c in permitted)
        ):
            raise CertificateRejected(
                f"the certificate of {peer} names {shown}, outside the name constraints of "
                f"the CA {_name(ca)!r}"
            )
