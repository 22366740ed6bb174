"""JWT verification for callers outside the mesh: compact JWS, RS256 / ES256 / HS256.

Small and strict, on `cryptography` alone:

- Only RS256 (RSA PKCS#1 v1.5 with SHA-256, keys of 2048 bits or more), ES256 (ECDSA P-256
  with SHA-256, the 64-byte r||s signature of RFC 7518) and HS256 (HMAC-SHA-256, secrets of
  32 bytes or more). `alg: none` is always rejected.
- Every key has one algorithm, fixed by its type (RSA -> RS256, EC P-256 -> ES256, a
  secret -> HS256; a JWK's own `alg` must agree), and a token is only checked with keys of
  the algorithm its header names. So a token "signed" with HS256 using an RSA public key
  as the HMAC secret (algorithm confusion) finds no HS256 key and is rejected.
- Keys come from JWK dicts (`kty` RSA / EC / oct; private members are refused), PEM public
  keys or certificates, or raw secrets (`JwtKey.from_jwk`, `from_pem`, `from_secret`;
  `load_keys` takes a mix, or a JWKS `{"keys": [...]}`). With a `kid` in the header, keys
  with that kid are used (or keys without a kid, if none has it).
- Base64url must be unpadded and canonical, JSON objects must not repeat a member, and a
  `crit` header is refused (no extension is understood).
- Claims: `exp` is required unless `require_exp=False`; `exp`, `nbf` and `iat` are checked
  with `leeway` (60 s by default); `iss` must be one of `issuer` when that is set; `aud`
  must contain `audience` when that is set, and a token carrying `aud` is refused when no
  audience is configured (RFC 7519 4.1.3). The tenant is the `tenant_claim` (`sub` by
  default), a non-empty string.

Errors are `InvalidToken` (an `Unauthenticated`), with the reason, never the token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from . import TenantIdentity, Unauthenticated

Clock = Callable[[], float]
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

ALGORITHMS = ("RS256", "ES256", "HS256")
MIN_RSA_BITS = 2048
MIN_HMAC_BYTES = 32
DEFAULT_LEEWAY = 60.0
MAX_TOKEN_BYTES = 16 * 1024
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


class InvalidToken(Unauthenticated):
    """A JWT that is malformed, badly signed, expired or not for us; the message says which."""


def _b64decode(text: str, what: str) -> bytes:
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError(f"{what} is not unpadded base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))  # cannot fail now
    if base64.urlsafe_b64encode(data).rstrip(b"=").decode() != text:
        raise ValueError(f"{what} is not canonical base64url")
    return data


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"member {k!r} appears twice")
        out[k] = v
    return out


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except ValueError as exc:
        raise ValueError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} is not a JSON object")
    return value


# --- keys ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JwtKey:
    """A verification key and the one algorithm it verifies."""

    alg: str
    key: PublicKey | bytes
    kid: str | None = None

    def __repr__(self) -> str:  # never print a secret
        return f"JwtKey(alg={self.alg!r}, kid={self.kid!r})"

    @classmethod
    def from_secret(cls, secret: bytes, *, kid: str | None = None) -> JwtKey:
        if len(secret) < MIN_HMAC_BYTES:
            raise ValueError(f"an HS256 secret must be at least {MIN_HMAC_BYTES} bytes")
        return cls("HS256", bytes(secret), kid)

    @classmethod
    def from_public_key(cls, key: object, *, kid: str | None = None) -> JwtKey:
        if isinstance(key, rsa.RSAPublicKey):
            if key.key_size < MIN_RSA_BITS:
                raise ValueError(f"an RS256 key must have at least {MIN_RSA_BITS} bits")
            return cls("RS256", key, kid)
        if isinstance(key, ec.EllipticCurvePublicKey):
            if not isinstance(key.curve, ec.SECP256R1):
                raise ValueError(f"an EC key must be on P-256 for ES256, not {key.curve.name}")
            return cls("ES256", key, kid)
        raise ValueError(f"unsupported key type {type(key).__name__}; use RSA or EC P-256")

    @classmethod
    def from_pem(cls, pem: str | bytes, *, kid: str | None = None) -> JwtKey:
        """From a PEM public key or certificate (a private key is refused)."""
        raw = pem.encode() if isinstance(pem, str) else pem
        if b"PRIVATE KEY" in raw:
            raise ValueError("this is a private key; configure the public key instead")
        try:
            if b"-----BEGIN CERTIFICATE-----" in raw:
                public: object = x509.load_pem_x509_certificate(raw).public_key()
            else:
                public = serialization.load_pem_public_key(raw)
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise ValueError(f"not a readable PEM public key or certificate: {exc}") from None
        return cls.from_public_key(public, kid=kid)

    @classmethod
    def from_jwk(cls, jwk: Mapping[str, Any]) -> JwtKey:
        """From a JWK (RFC 7517) dict: kty RSA, EC (P-256) or oct."""
        kty = jwk.get("kty")
        kid = jwk.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise ValueError("JWK kid must be a string")
        use = jwk.get("use")
        if use is not None and use != "sig":
            raise ValueError(f"JWK {kid or ''} is for use {use!r}, not 'sig'")
        ops = jwk.get("key_ops")
        if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
            raise ValueError(f"JWK {kid or ''} key_ops does not include 'verify'")

        def field(name: str) -> bytes:
            value = jwk.get(name)
            if not isinstance(value, str):
                raise ValueError(f"JWK ({kty}) is missing {name!r}")
            return _b64decode(value, f"JWK member {name!r}")

        if kty == "RSA":
            if any(k in jwk for k in ("d", "p", "q", "dp", "dq", "qi")):
                raise ValueError("the JWK holds a private RSA key; configure the public key")
            n = int.from_bytes(field("n"), "big")
            e = int.from_bytes(field("e"), "big")
            key: JwtKey = cls.from_public_key(rsa.RSAPublicNumbers(e, n).public_key(), kid=kid)
        elif kty == "EC":
            if "d" in jwk:
                raise ValueError("the JWK holds a private EC key; configure the public key")
            if jwk.get("crv") != "P-256":
                raise ValueError(f"unsupported JWK curve {jwk.get('crv')!r}; use P-256 (ES256)")
            x, y = field("x"), field("y")
            if len(x) != 32 or len(y) != 32:
                raise ValueError("a P-256 JWK has 32-byte x and y")
            numbers = ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
            )
            key = cls.from_public_key(numbers.public_key(), kid=kid)
        elif kty == "oct":
            key = cls.from_secret(field("k"), kid=kid)
        else:
            raise ValueError(f"unsupported JWK kty {kty!r}; use RSA, EC or oct")
        alg = jwk.get("alg")
        if alg is not None and alg != key.alg:
            raise ValueError(f"JWK {kid or ''} says alg {alg!r} but a {kty} key is {key.alg}")
        return key


def load_keys(items: Iterable[Mapping[str, Any] | str | bytes] | Mapping[str, Any]) -> list[JwtKey]:
    """Keys from JWK dicts, PEM strings, or a JWKS mapping `{"keys": [...]}`."""
    if isinstance(items, Mapping):
        listed = items.get("keys")
        if not isinstance(listed, list):
            raise ValueError("a JWKS must have a 'keys' list")
        items = listed
    keys: list[JwtKey] = []
    for i, item in enumerate(items):
        try:
            keys.append(
                JwtKey.from_jwk(item) if isinstance(item, Mapping) else JwtKey.from_pem(item)
            )
        except ValueError as exc:
            raise ValueError(f"keys[{i}]: {exc}") from None
    return keys


def _signature_ok(key: JwtKey, signing_input: bytes, signature: bytes) -> bool:
    k = key.key
    if isinstance(k, bytes):
        expected = hmac.new(k, signing_input, hashlib.sha256).digest()
        return hmac.compare_digest(expected, signature)
    try:
        if isinstance(k, rsa.RSAPublicKey):
            k.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
            return True
        if len(signature) != 64:
            return False
        der = encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
        k.verify(der, signing_input, ec.ECDSA(hashes.SHA256()))
        return True
    except InvalidSignature:
        return False


# --- verification --------------------------------------------------------------------------


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidToken(f"JWT claim {name!r} must be a number (Unix seconds)")
    return float(value)


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class JwtVerifier:
    """Verifies tokens against configured keys and claims; maps a claim to the tenant."""

    def __init__(
        self,
        keys: Iterable[JwtKey],
        *,
        issuer: str | Sequence[str] | None = None,
        audience: str | Sequence[str] | None = None,
        tenant_claim: str = "sub",
        leeway: float = DEFAULT_LEEWAY,
        require_exp: bool = True,
        clock: Clock = time.time,
    ) -> None:
        self.keys = tuple(keys)
        if not self.keys:
            raise ValueError("a JWT verifier needs at least one key")
        self.issuers = frozenset([issuer] if isinstance(issuer, str) else issuer or ())
        self.audiences = frozenset([audience] if isinstance(audience, str) else audience or ())
        if leeway < 0:
            raise ValueError("leeway must be 0 or more seconds")
        self.tenant_claim = tenant_claim
        self.leeway = leeway
        self.require_exp = require_exp
        self._clock = clock

    def verify(self, token: str) -> TenantIdentity:
        """The caller's tenant identity; raises InvalidToken with the reason."""
        claims = self.verify_claims(token)
        tenant = claims.get(self.tenant_claim)
        if not isinstance(tenant, str) or not tenant:
            raise InvalidToken(
                f"JWT has no tenant: claim {self.tenant_claim!r} must be a non-empty string"
            )
        subject = claims.get("sub")
        return TenantIdentity(
            tenant=tenant,
            credential="jwt",
            subject=subject if isinstance(subject, str) else "",
            claims=MappingProxyType(claims),
        )

    def verify_claims(self, token: str) -> dict[str, Any]:
        """The verified claims of `token`; raises InvalidToken with the reason."""
        if not isinstance(token, str) or not token:
            raise InvalidToken("no JWT given")
        if len(token) > MAX_TOKEN_BYTES:
            raise InvalidToken(f"JWT is longer than {MAX_TOKEN_BYTES} bytes")
        parts = token.split(".")
        if len(parts) == 5:
            raise InvalidToken("encrypted JWTs (JWE) are not supported; send a signed JWT")
        if len(parts) != 3:
            raise InvalidToken("malformed JWT: expected header.payload.signature")
        if not _B64URL.fullmatch(parts[1]):
            raise InvalidToken("malformed JWT: JWT payload is not unpadded base64url")
        try:
            header = _json_object(_b64decode(parts[0], "JWT header"), "JWT header")
            signature = _b64decode(parts[2], "JWT signature")
        except ValueError as exc:
            raise InvalidToken(f"malformed JWT: {exc}") from None
        key_candidates = self._keys_for(header)
        signing_input = f"{parts[0]}.{parts[1]}".encode("ascii")
        if not any(_signature_ok(k, signing_input, signature) for k in key_candidates):
            raise InvalidToken("JWT signature does not verify with the configured key(s)")
        try:
            claims = _json_object(_b64decode(parts[1], "JWT payload"), "JWT payload")
        except ValueError as exc:
            raise InvalidToken(f"malformed JWT: {exc}") from None
        self._check_claims(claims)
        return claims

    def _keys_for(self, header: Mapping[str, Any]) -> list[JwtKey]:
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise InvalidToken("malformed JWT: the header has no 'alg'")
        if alg.lower() == "none":
            raise InvalidToken("JWT with alg 'none' (unsigned) is never accepted")
        if alg not in ALGORITHMS:
            raise InvalidToken(f"JWT alg {alg!r} is not supported; use {', '.join(ALGORITHMS)}")
        if "crit" in header:
            raise InvalidToken("JWT header has 'crit' extensions, which are not supported")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise InvalidToken("malformed JWT: 'kid' must be a string")
        candidates = [k for k in self.keys if k.alg == alg]
        if not candidates:
            have = ", ".join(sorted({k.alg for k in self.keys}))
            raise InvalidToken(
                f"JWT is signed with {alg} but the configured keys are {have}; a token's "
                "algorithm must match its key's type"
            )
        if kid is not None:
            named = [k for k in candidates if k.kid == kid]
            unnamed = [k for k in candidates if k.kid is None]
            candidates = named or unnamed
            if not candidates:
                raise InvalidToken(f"JWT names key {kid!r}, which is not configured for {alg}")
        return candidates

    def _check_claims(self, claims: Mapping[str, Any]) -> None:
        now = self._clock()
        exp = _number(claims, "exp")
        if exp is None:
            if self.require_exp:
                raise InvalidToken("JWT has no 'exp' (expiry) claim")
        elif now >= exp + self.leeway:
            raise InvalidToken(f"JWT expired at {_when(exp)}")
        nbf = _number(claims, "nbf")
        if nbf is not None and now + self.leeway < nbf:
            raise InvalidToken(f"JWT is not valid before {_when(nbf)}")
        iat = _number(claims, "iat")
        if iat is not None and now + self.leeway < iat:
            raise InvalidToken(f"JWT was issued in the future ({_when(iat)})")
        if self.issuers:
            iss = claims.get("iss")
            if iss not in self.issuers:
                want = ", ".join(sorted(self.issuers))
                got = repr(iss) if isinstance(iss, str) else "none"
                raise InvalidToken(f"JWT issuer is {got}, expected {want}")
        aud = claims.get("aud")
        if aud is None and not self.audiences:
            return
        audiences = [aud] if isinstance(aud, str) else aud
        if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
            if aud is None:
                raise InvalidToken(
                    f"JWT has no 'aud'; expected {', '.join(sorted(self.audiences))}"
                )
            raise InvalidToken("malformed JWT: 'aud' must be a string or a list of strings")
        if not self.audiences:
            raise InvalidToken(
                f"JWT is for audience {', '.join(audiences)}, but this verifier has no audience "
                "configured"
            )
        if not self.audiences.intersection(audiences):
            raise InvalidToken(
                f"JWT is for audience {', '.join(audiences) or 'none'}, expected "
                f"{', '.join(sorted(self.audiences))}"
            )


def sign_jwt(claims: Mapping[str, Any], key: Any, alg: str, *, kid: str | None = None) -> str:
    """A compact JWS (RS256 / ES256 / HS256) of `claims`, for tests and local tooling.

    `key` is an RSA or EC private key, or HMAC secret bytes.
    """
    header: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    head = _b64encode(json.dumps(header, separators=(",", ":")).encode())
    body = _b64encode(json.dumps(dict(claims), separators=(",", ":")).encode())
    signing_input = f"{head}.{body}".encode("ascii")
    if alg == "HS256" and isinstance(key, bytes):
        sig = hmac.new(key, signing_input, hashlib.sha256).digest()
    elif alg == "RS256" and isinstance(key, rsa.RSAPrivateKey):
        sig = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    elif alg == "ES256" and isinstance(key, ec.EllipticCurvePrivateKey):
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    else:
        raise ValueError(f"cannot sign {alg} with {type(key).__name__}")
    return f"{head}.{body}.{_b64encode(sig)}"
