"""Mesh security, the pure core: identities, the CA, join tokens, authorization, API keys, JWT.

Nothing here does network I/O or reads a clock of its own (time comes in as `clock`, a
callable returning Unix seconds, or as `now`); only `CertificateAuthority.to_pem_files` and
`CertificateAuthority.load` touch the file system. The servers wire these in.

- `spiffe`: SPIFFE IDs (`spiffe://<trust domain>/ns/<namespace>/sa/<service>`), their
  validation, the wildcard patterns rules and join tokens use, and the peer ID of a cert.
- `ca`: the mesh CA (root + intermediate, or an intermediate under an operator's root),
  CSR signing into X.509-SVIDs, the trust bundle, root rotation, and chain verification.
- `tokens`: join tokens, HMAC-signed grants that let a new workload ask for an identity.
- `authz`: authorization rules (ALLOW / DENY, deny first, default deny) and their decisions.
- `apikeys`: API keys for callers outside the mesh, stored hashed.
- `jwt`: JWT (JWS compact, RS256 / ES256 / HS256) verification for callers outside the mesh.

The exceptions below are shared so that the servers can map them to gRPC statuses in one
place: `Unauthenticated` -> UNAUTHENTICATED, `PermissionDenied` -> PERMISSION_DENIED.
Their messages are meant for the caller and never contain a secret.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


class SecurityError(Exception):
    """A credential, certificate or request that security rejected; the message says why."""


class Unauthenticated(SecurityError):
    """The caller's credential is missing, malformed, forged, expired or revoked."""


class PermissionDenied(SecurityError):
    """The caller is who it says, but is not allowed what it asked for."""


@dataclass(frozen=True, slots=True)
class TenantIdentity:
    """Who an external caller is, once an API key or a JWT checked out.

    `credential` is "api-key" or "jwt"; `subject` is the key's id or the JWT's `sub` (never
    a secret); `claims` are the JWT's verified claims (empty for API keys).
    """

    tenant: str
    credential: str
    subject: str
    claims: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))


__all__ = ["PermissionDenied", "SecurityError", "TenantIdentity", "Unauthenticated"]
