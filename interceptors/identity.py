"""Caller identity: who is calling, for policies, quotas and audit records."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from aimesh.mesh.security.spiffe import peer_spiffe_id

from .base import InboundCall, Next

Resolver = Callable[[Any], str]
# A peer's certificate is parsed once, not per call (certificates rotate, hence a bound).
_spiffe_id = functools.lru_cache(maxsize=1024)(peer_spiffe_id)


def peer_identity(context: Any) -> str:
    """The SPIFFE ID of an mTLS peer (its URI SAN), else the peer's address."""
    try:
        auth = context.auth_context() or {}
    except Exception:  # grpc raises for calls without a security context on some builds
        auth = {}
    for key in ("x509_subject_alternative_name",):
        for value in auth.get(key, ()):
            text = value.decode() if isinstance(value, bytes) else str(value)
            if text.startswith("spiffe://"):
                return text
    # grpc lists DNS and IP SANs only; the URI SAN is read from the peer's certificate.
    for pem in auth.get("x509_pem_cert", ())[:1]:
        try:
            return _spiffe_id(pem)
        except ValueError:  # not an X.509-SVID: the peer has no mesh identity
            break
    peer: str = context.peer() or ""
    return peer


class Identity:
    """Resolves the caller's identity once per call (`call.identity`). The resolver is the
    hook: the security work plugs in API keys, JWTs and tenant mapping here."""

    def __init__(self, resolver: Resolver = peer_identity) -> None:
        self.resolver = resolver

    async def around(self, call: InboundCall, call_next: Next) -> None:
        call.identity = self.resolver(call.context)
        await call_next()
