"""Join tokens: short-lived grants that let a new workload ask the CA for an identity.

An operator (or the control plane) issues a token granting one SPIFFE ID, or a pattern of
them (`spiffe://prod.mesh/ns/prod/sa/*`, syntax in `spiffe`); the workload presents it with
its CSR; the CA checks the token and that the identity asked for is granted, then signs.

Format, compact and URL-safe:

    amjt1.<payload>.<signature>

`payload` is the base64url (no padding) of the JSON `{"exp": <Unix seconds>, "jti": "<id>",
"sub": "<SPIFFE ID or pattern>"}`; `signature` is the base64url of
HMAC-SHA256(secret, "amjt1." + payload), with the CA's token secret (32 random bytes,
`CertificateAuthority.token_secret`). Verification compares signatures in constant time
before reading the payload, so nothing of a forged token is parsed.

Single use is a store concern: `verify_join_token` returns the claims with `jti`, and the
caller records it as spent (until `exp`) and refuses it the second time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import PermissionDenied, Unauthenticated
from .spiffe import CONTROL_PLANE_SA, SYSTEM_NAMESPACE, compile_pattern, parse

Clock = Callable[[], float]

PREFIX = "amjt1."
MIN_SECRET_BYTES = 16
MAX_TTL = 30 * 86400.0
MAX_TOKEN_LENGTH = 4096
_B64 = re.compile(r"[A-Za-z0-9_-]+")
_JTI = re.compile(r"[A-Za-z0-9_-]{8,64}")


class InvalidJoinToken(Unauthenticated):
    """The token is malformed, forged, tampered with or expired."""


class IdentityNotGranted(PermissionDenied):
    """The token is genuine but does not grant the identity asked for."""


@dataclass(frozen=True, slots=True)
class JoinClaims:
    sub: str  # the granted SPIFFE ID or pattern
    exp: int  # Unix seconds
    jti: str  # unique token id, for single-use tracking


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _sign(secret: bytes, payload: str) -> str:
    return _b64(hmac.new(secret, (PREFIX + payload).encode(), hashlib.sha256).digest())


def _check_secret(secret: bytes) -> None:
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"a token secret must be at least {MIN_SECRET_BYTES} bytes")


def issue_join_token(
    secret: bytes,
    grant: str,
    ttl: float,
    *,
    clock: Clock = time.time,
    nonce: str | None = None,
) -> str:
    """A token granting `grant` (an exact SPIFFE ID or a pattern) for `ttl` seconds.

    `nonce` becomes the token id (`jti`; 8 to 64 of `A-Z a-z 0-9 _ -`); by default 128
    random bits.
    """
    _check_secret(secret)
    compile_pattern(grant)  # raises ValueError for an invalid ID or pattern
    if not 0 < ttl <= MAX_TTL:
        raise ValueError(f"a join token's ttl must be more than 0 and at most 30 days, got {ttl}")
    jti = nonce if nonce is not None else secrets.token_urlsafe(16)
    if not _JTI.fullmatch(jti):
        raise ValueError("a token nonce must be 8 to 64 of A-Z a-z 0-9 _ -")
    claims = {"exp": math.floor(clock() + ttl), "jti": jti, "sub": grant}
    payload = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    return f"{PREFIX}{payload}.{_sign(secret, payload)}"


def read_join_token(secret: bytes, token: str, *, clock: Clock = time.time) -> JoinClaims:
    """The claims of a genuine, unexpired token; raises InvalidJoinToken otherwise."""
    _check_secret(secret)
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
        raise InvalidJoinToken("malformed join token")
    if not token.startswith(PREFIX):
        raise InvalidJoinToken(f"malformed join token: it must start with {PREFIX}")
    payload, dot, signature = token[len(PREFIX) :].partition(".")
    if not dot or not _B64.fullmatch(payload) or not _B64.fullmatch(signature):
        raise InvalidJoinToken(f"malformed join token: expected {PREFIX}<payload>.<signature>")
    # Constant time, and on the encoded form: a non-canonical encoding never matches.
    if not hmac.compare_digest(_sign(secret, payload), signature):
        raise InvalidJoinToken("join token signature does not verify (tampered with or forged)")
    try:
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, binascii.Error):
        raise InvalidJoinToken("malformed join token payload") from None
    if (
        not isinstance(data, dict)
        or set(data) != {"exp", "jti", "sub"}
        or not isinstance(data["sub"], str)
        or not isinstance(data["jti"], str)
        or type(data["exp"]) is not int
    ):
        raise InvalidJoinToken("malformed join token payload")
    claims = JoinClaims(sub=data["sub"], exp=data["exp"], jti=data["jti"])
    now = clock()
    if now >= claims.exp:
        expired = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(claims.exp))
        raise InvalidJoinToken(f"join token {claims.jti} expired at {expired}; ask for a new one")
    return claims


def verify_join_token(
    secret: bytes, token: str, requested_id: str, *, clock: Clock = time.time
) -> JoinClaims:
    """Checks the token and that it grants `requested_id`; returns its claims.

    Raises InvalidJoinToken (UNAUTHENTICATED) for a bad or expired token, ValueError for an
    invalid `requested_id`, and IdentityNotGranted (PERMISSION_DENIED) when the token is
    good but grants something else.
    """
    claims = read_join_token(secret, token, clock=clock)
    sid = parse(requested_id)
    if sid.namespace == SYSTEM_NAMESPACE:
        # Operators may apply config and manage every registration, and the control
        # plane's ID is what clients trust the control plane by: a wildcard written for
        # workloads (`ns/*/sa/web`, `*`) must not reach them.
        if sid.service == CONTROL_PLANE_SA:
            raise IdentityNotGranted(
                f"{requested_id} is the control plane's own identity; only its CA issues it"
            )
        if f"/ns/{SYSTEM_NAMESPACE}/" not in claims.sub:
            raise IdentityNotGranted(
                f"join token {claims.jti} grants {claims.sub}, which does not name namespace "
                f"{SYSTEM_NAMESPACE}; identities there (operators) need a token that names it, "
                "or `aimesh identity issue`"
            )
    try:
        grant = compile_pattern(claims.sub)
    except ValueError:
        raise InvalidJoinToken("malformed join token payload: invalid grant") from None
    if not grant.matches(requested_id):
        raise IdentityNotGranted(f"join token {claims.jti} grants {claims.sub}, not {requested_id}")
    return claims
