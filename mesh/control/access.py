"""Who may call what on the control plane.

Two rules, both keyed on the TLS client certificate of the call (`auth_context`):

1. `--mtls-mode STRICT` (`PlaintextGuard`): a call without a verified client certificate
   (the plaintext port) may reach only what a workload needs before it has a certificate:
   Identity (SignCertificate with a join token, GetTrustBundle), grpc.health.v1 and server
   reflection. Everything else gets UNAUTHENTICATED naming the mTLS port.
2. Over mTLS, whatever the mode (`authorize_registration`, `authorize_operator`): a
   workload registers, renews and deregisters only instances of the service its SPIFFE ID
   names (`spiffe://<td>/ns/<ns>/sa/<service>`), and only operators apply config.
   Operators are the identities in namespace `aimesh-system` (OPERATOR_NAMESPACE): the
   control plane's own, and those `aimesh identity issue` writes for people and tools.
   Plaintext calls (PERMISSIVE) are not checked: they carry no identity to check, and
   PERMISSIVE exists for meshes that have not moved to certificates yet.

Why the certificate and not the port: one grpc.aio server serves both ports, so every
service added to it (the xDS ADS service, say) falls under the rule with no list to keep
in step, and health, reflection and the servicers exist once. The mTLS port requires a
client certificate under the trust bundle (mesh/control/identity.py `bind_secure`), so "the
call has a verified client certificate" is exactly "the call came through the mTLS port";
`context.peer()` would only give the remote address, which says nothing about the port.
"""

from __future__ import annotations

from typing import Any

import grpc

from aimesh.control.v1 import control_plane_pb2 as pb
from aimesh.interceptors.base import InboundCall, Next

from ..security.spiffe import SYSTEM_NAMESPACE, parse
from ..security.workload import peer_spiffe_id_of
from ..serving import HEALTH, REFLECTION_V1, REFLECTION_V1ALPHA

OPERATOR_NAMESPACE = SYSTEM_NAMESPACE

# Services a caller without a certificate may use on a STRICT control plane.
PLAINTEXT_SERVICES = frozenset(
    {
        pb.DESCRIPTOR.services_by_name["Identity"].full_name,
        HEALTH,
        REFLECTION_V1ALPHA,
        REFLECTION_V1,
    }
)

_ISSUE_HINT = (
    "aimesh identity issue --ca-dir DIR --id spiffe://{td}/ns/"
    + OPERATOR_NAMESPACE
    + "/sa/NAME --out DIR, then pass --tls-dir DIR"
)


def has_client_certificate(context: Any) -> bool:
    """True when the call came over TLS with a verified client certificate."""
    try:
        return bool(context.auth_context().get("x509_pem_cert"))
    except Exception:  # a context without an auth context: not TLS
        return False


def is_operator(spiffe_id: str) -> bool:
    return parse(spiffe_id).namespace == OPERATOR_NAMESPACE


class PlaintextGuard:
    """STRICT: the inbound policy (interceptors.base.Stack) refusing plaintext calls to
    anything but PLAINTEXT_SERVICES."""

    def __init__(self) -> None:
        self.secure_address = ""  # HOST:PORT of the mTLS port, set once it is bound
        self.refused = 0

    async def around(self, call: InboundCall, call_next: Next) -> None:
        service = call.method.rpartition("/")[0].lstrip("/")
        if service in PLAINTEXT_SERVICES or has_client_certificate(call.context):
            await call_next()
            return
        self.refused += 1
        await call.context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            f"this control plane requires mTLS: connect to {self.secure_address} with a mesh "
            "certificate (--tls-dir DIR from `aimesh identity issue`; workloads: "
            f"--secure-control-plane {self.secure_address}); this plaintext port serves only "
            "Identity, health and reflection",
        )


_NO_ID = "a certificate without a SPIFFE ID"


def registration_refusal(caller: str, service: str) -> str | None:
    """Why `caller` may not register, renew or deregister instances of `service`; None
    when it may."""
    sid = parse(caller)
    if sid.namespace == OPERATOR_NAMESPACE or sid.service == service:
        return None
    return (
        f"{caller} may not register, renew or deregister instances of service {service!r}: "
        f"a workload manages only the service its identity names (.../sa/{service}), and "
        f"operators (namespace {OPERATOR_NAMESPACE}) any; for an operator identity: "
        + _ISSUE_HINT.format(td=sid.trust_domain)
    )


def operator_refusal(caller: str | None, action: str) -> str | None:
    """Why `caller` may not do `action` (an operator's); None when it may."""
    if caller is not None and is_operator(caller):
        return None
    td = parse(caller).trust_domain if caller else "<trust domain>"
    return (
        f"{caller or _NO_ID} may not {action}: only operator identities "
        f"(spiffe://{td}/ns/{OPERATOR_NAMESPACE}/sa/NAME) may; " + _ISSUE_HINT.format(td=td)
    )


async def authorize_registration(context: Any, service: str) -> None:
    """Over mTLS, aborts with PERMISSION_DENIED unless the caller may manage `service`."""
    if has_client_certificate(context):
        caller = peer_spiffe_id_of(context)
        why = registration_refusal(caller, service) if caller else f"{_NO_ID} manages nothing"
        if why is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)


async def authorize_operator(context: Any, action: str) -> None:
    """Over mTLS, aborts with PERMISSION_DENIED unless the caller is an operator."""
    if has_client_certificate(context):
        why = operator_refusal(peer_spiffe_id_of(context), action)
        if why is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
