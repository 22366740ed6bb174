"""The control plane's Identity service: the mesh CA signing workloads' CSRs.

Proof that the caller may hold the identity its CSR names, checked in this order:

1. a join token (`aimesh identity token`): genuine, unexpired, never used before, and
   granting the CSR's SPIFFE ID. Its id (`jti`) is remembered until the token expires,
   so each token issues once;
2. the TLS client certificate of the call (an mTLS port of the control plane), when its
   SPIFFE ID is the CSR's;
3. `current_chain_pem` + `csr_signature`: the caller's current certificate (verified
   against the trust bundle, unexpired, for the CSR's SPIFFE ID) and its key's signature
   over this CSR, so renewal works over any channel without a token.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf.timestamp_pb2 import Timestamp

from aimesh.control.v1 import control_plane_pb2 as pb
from aimesh.control.v1 import control_plane_pb2_grpc as pb_grpc

from ..security.ca import (
    DEFAULT_LEAF_LIFETIME,
    CertificateAuthority,
    CertificateRejected,
    CsrRejected,
    make_csr,
    verify_chain,
)
from ..security.spiffe import (
    CONTROL_PLANE_SA,
    SYSTEM_NAMESPACE,
    load_certificates,
    parse,
    uri_sans,
)
from ..security.tokens import IdentityNotGranted, InvalidJoinToken, verify_join_token
from ..security.workload import (
    WorkloadIdentity,
    dns_name_for,
    peer_spiffe_id_of,
    verify_renewal_signature,
)
from ..serving import bind

log = logging.getLogger("aimesh.control.identity")

SERVICE = pb.DESCRIPTOR.services_by_name["Identity"].full_name

_TOKEN_HINT = (
    "ask the operator for one: aimesh identity token --ca-dir DIR --id SPIFFE_ID, and pass "
    "it with --join-token"
)


def _ts(t: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


class IdentityService(pb_grpc.IdentityServicer):
    def __init__(
        self,
        ca: CertificateAuthority,
        *,
        lifetime: float = DEFAULT_LEAF_LIFETIME,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ca = ca
        self.lifetime = lifetime
        self.clock = clock
        self.spent: dict[str, int] = {}  # join token id -> its expiry
        self.issued = 0
        self.rejected = 0
        self.own: WorkloadIdentity | None = None  # the control plane's, for --secure-listen

    @property
    def own_id(self) -> str:
        return f"spiffe://{self.ca.trust_domain}/ns/{SYSTEM_NAMESPACE}/sa/{CONTROL_PLANE_SA}"

    def bind_secure(self, server: grpc.aio.Server, listen: str) -> int:
        """Adds an mTLS port to `server` (before it starts) with the control plane's own
        certificate, signed here; every service is served there too, and SignCertificate
        takes the client certificate as proof for renewals."""
        self.own = WorkloadIdentity("unused", self.own_id, clock=self.clock)
        self._issue_own(self.own)
        return bind(server, listen, self.own.server_credentials())

    def _issue_own(self, own: WorkloadIdentity) -> None:
        """The control plane's own certificate, signed here, made current."""
        key_pem, csr = make_csr(self.own_id)
        leaf, chain = self.ca.sign_csr(
            csr, self.own_id, lifetime=self.lifetime, dns_names=[dns_name_for(self.own_id)]
        )
        own.adopt(key_pem, leaf + chain, self.ca.trust_bundle())

    async def start_own(self, plaintext_address: str) -> None:
        """Renews the control plane's certificate through its own plaintext port."""
        if self.own is not None:
            self.own._control_plane = plaintext_address
            await self.own.start()

    async def stop_own(self) -> None:
        if self.own is not None:
            await self.own.stop()

    def _spend(self, jti: str, exp: int) -> bool:
        now = self.clock()
        for old in [j for j, e in self.spent.items() if e <= now]:
            del self.spent[old]
        if jti in self.spent:
            return False
        self.spent[jti] = exp
        return True

    async def SignCertificate(  # noqa: N802 (gRPC method name)
        self, request: pb.SignCertificateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SignCertificateResponse:
        try:
            return self._sign(request, context)
        except _Abort as exc:
            self.rejected += 1
            log.info("SignCertificate refused (%s): %s", exc.code.name, exc.message)
            await context.abort(exc.code, exc.message)
            raise AssertionError("unreachable") from None

    def _sign(self, request: pb.SignCertificateRequest, context: Any) -> pb.SignCertificateResponse:
        try:
            csr = x509.load_pem_x509_csr(request.csr_pem.encode())
        except ValueError as exc:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"csr_pem is not a readable PEM certificate request ({exc}); build it with "
                "aimesh.mesh.security.ca.make_csr",
            ) from None
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = list(san.get_values_for_type(x509.UniformResourceIdentifier))
        except (x509.ExtensionNotFound, ValueError):
            uris = []
        if len(uris) != 1:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the CSR must name exactly one SPIFFE ID as a URI SAN; it names {len(uris)}",
            )
        requested = uris[0]
        try:
            sid = parse(requested)
        except ValueError as exc:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"the CSR's URI SAN: {exc}") from None
        if sid.trust_domain != self.ca.trust_domain:
            raise _Abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"this CA issues identities in trust domain {self.ca.trust_domain!r}, not "
                f"{sid.trust_domain!r} ({requested})",
            )
        self._authenticate(request, context, requested, csr)
        try:
            leaf_pem, chain_pem = self.ca.sign_csr(
                request.csr_pem,
                requested,
                lifetime=self.lifetime,
                dns_names=[dns_name_for(requested)],
            )
        except CsrRejected as exc:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        except ValueError as exc:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
        leaf = load_certificates(leaf_pem)[0]
        self.issued += 1
        return pb.SignCertificateResponse(
            certificate_chain_pem=leaf_pem + chain_pem,
            trust_bundle_pem=self.ca.trust_bundle(),
            expires_at=_ts(leaf.not_valid_after_utc.timestamp()),
            issued_at=_ts(self.clock()),
            spiffe_id=requested,
        )

    def _authenticate(
        self,
        request: pb.SignCertificateRequest,
        context: Any,
        requested: str,
        csr: x509.CertificateSigningRequest,
    ) -> None:
        if request.join_token:
            try:
                claims = verify_join_token(
                    self.ca.token_secret, request.join_token, requested, clock=self.clock
                )
            except InvalidJoinToken as exc:
                raise _Abort(grpc.StatusCode.UNAUTHENTICATED, f"{exc}; {_TOKEN_HINT}") from None
            except IdentityNotGranted as exc:
                raise _Abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{exc}: ask for a token granting {requested}, or ask for the granted identity",
                ) from None
            if not self._spend(claims.jti, claims.exp):
                raise _Abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"join token {claims.jti} was already used (each token issues one "
                    f"certificate); {_TOKEN_HINT}",
                )
            return
        peer = peer_spiffe_id_of(context)
        if peer is not None:
            if peer != requested:
                raise _Abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"your certificate is {peer}; it can renew only itself, not {requested}",
                )
            return
        if request.current_chain_pem:
            chain = request.current_chain_pem
            certs = load_certificates(chain) if "-----BEGIN" in chain else []
            if not certs:
                raise _Abort(
                    grpc.StatusCode.UNAUTHENTICATED, "current_chain_pem holds no certificate"
                )
            rest = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs[1:])
            try:
                holder = verify_chain(
                    certs[0].public_bytes(serialization.Encoding.PEM),
                    rest,
                    self.ca.trust_bundle(),
                    now=self.clock(),
                )
            except CertificateRejected as exc:
                raise _Abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"the current certificate does not verify ({exc}); join again with a new token",
                ) from None
            if holder != requested:
                raise _Abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"your certificate is {holder}; it can renew only itself, not {requested}",
                )
            der = csr.public_bytes(serialization.Encoding.DER)
            if not verify_renewal_signature(certs[0], der, request.csr_signature):
                raise _Abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "csr_signature is not the current certificate's key signing this CSR",
                )
            return
        raise _Abort(
            grpc.StatusCode.UNAUTHENTICATED,
            f"no proof of identity for {requested}: a first certificate needs a join "
            f"token; {_TOKEN_HINT}",
        )

    def reload_ca(self, directory: str, trust_domain: str) -> str:
        """Replaces the CA with the one now in `directory` (after `aimesh identity root
        prepare|rotate`; the control plane calls this on SIGHUP); returns what changed.
        Raises ValueError, keeping the current CA, when the directory does not load or
        holds another trust domain. The new trust bundle is served at once (GetTrustBundle,
        every SignCertificate) and reaches workloads at their next renewal."""
        ca = load_ca(directory, trust_domain, clock=self.clock)
        ca.min_leaf_lifetime = self.ca.min_leaf_lifetime
        before = self.ca.trust_bundle().count("BEGIN CERTIFICATE")
        switched = ca.root_pem != self.ca.root_pem
        self.ca = ca
        if self.own is not None:
            # The mTLS port's certificate and bundle at once, not at its next renewal:
            # a root that left the bundle must stop being trusted there too.
            self._issue_own(self.own)
        roots = ca.trust_bundle().count("BEGIN CERTIFICATE")
        signer = "a new root signs" if switched else "same signing root"
        return f"{signer}; trust bundle of {roots} root(s) (was {before})"

    async def GetTrustBundle(  # noqa: N802 (gRPC method name)
        self, request: pb.GetTrustBundleRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.TrustBundle:
        return pb.TrustBundle(
            trust_bundle_pem=self.ca.trust_bundle(), trust_domain=self.ca.trust_domain
        )


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def load_or_create_ca(
    directory: str,
    trust_domain: str,
    *,
    clock: Callable[[], float] = time.time,
) -> tuple[CertificateAuthority, bool]:
    """The CA in `directory`, created (and written) if there is none. (ca, created)."""
    from pathlib import Path

    if (Path(directory) / "ca.json").exists():
        return load_ca(directory, trust_domain, clock=clock), False
    ca = CertificateAuthority.create(trust_domain, clock=clock)
    ca.to_pem_files(directory)
    return ca, True


def load_ca(
    directory: str, trust_domain: str, *, clock: Callable[[], float] = time.time
) -> CertificateAuthority:
    """The CA in `directory` (never creates one); ValueError if it is of another trust domain."""
    ca = CertificateAuthority.load(directory, clock=clock)
    if ca.trust_domain != trust_domain:
        raise ValueError(
            f"{directory} holds the CA of trust domain {ca.trust_domain!r}, not "
            f"{trust_domain!r}; pass --trust-domain {ca.trust_domain} or another --ca-dir"
        )
    return ca


__all__ = ["SERVICE", "IdentityService", "load_ca", "load_or_create_ca", "uri_sans"]
