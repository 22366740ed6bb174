"""A workload's mesh identity: its key, its X.509-SVID from the control plane, renewal, and
the gRPC credentials built on them.

    WorkloadIdentity(control_plane, spiffe_id, join_token)
        start():  key (generated here, never sent) -> CSR -> Identity.SignCertificate
                  with the join token -> leaf + chain + trust bundle, in memory
        renews at half the lifetime (+-10% jitter) with a new key, proving the current
        identity with the current key (no token needed), retrying with backoff on failure

Servers: `server_credentials()` is `grpc.dynamic_ssl_server_credentials` requiring a client
certificate signed under the trust bundle (STRICT). grpc calls its fetcher at every new
handshake; it returns the newest certificate (and bundle) when they changed since it last
answered, so a rotation reaches new connections at once and open ones carry on.

Clients: `channel_credentials()` holds the current certificate; grpc cannot swap a
channel's credentials, so channel owners subscribe with `on_rotate` and make new channels,
letting the old ones drain (the proxy does, `Cluster.rechannel`).

Checking the peer's SPIFFE ID. grpcio (1.85) has no hook to verify the server's
certificate in Python and grpc.aio calls do not expose the client side's auth context, so
the expected identity is checked by name: every leaf the mesh CA signs also carries a DNS
SAN derived from its SPIFFE ID (`dns_name_for`: `spiffe://td/ns/N/sa/S` ->
`S.N.svc.td`), and a client channel sets `grpc.ssl_target_name_override` to the name of
the identity it expects. TLS hostname verification then fails the handshake for any other
identity (UNAVAILABLE, "Peer name ... is not in peer certificate"). The CA grants that DNS
SAN only with its SPIFFE ID, so the name stands for the ID. On the server side, the
client's SPIFFE ID is read from the auth context (`peer_spiffe_id_of(context)`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from .ca import (
    PrivateKey,
    _check_key_matches,
    _read,
    _write,
    generate_key,
    load_private_key,
    make_csr,
)
from .spiffe import (
    CONTROL_PLANE_SA,
    SYSTEM_NAMESPACE,
    load_certificate,
    load_certificates,
    parse,
    peer_spiffe_id,
)

log = logging.getLogger("aimesh.security.workload")

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def dns_name_for(spiffe_id: str) -> str:
    """The DNS SAN that stands for `spiffe_id` in hostname verification.

    `spiffe://td/ns/N/sa/S` -> `S.N.svc.td` when S and N are DNS labels (they are for
    aimesh services); any other ID -> `id-<sha256, 32 hex>.svc.td`.
    """
    sid = parse(spiffe_id)
    segments = sid.path.strip("/").split("/") if sid.path else []
    if (
        len(segments) == 4
        and segments[0] == "ns"
        and segments[2] == "sa"
        and _LABEL.fullmatch(segments[1])
        and _LABEL.fullmatch(segments[3])
    ):
        name = f"{segments[3]}.{segments[1]}.svc.{sid.trust_domain}"
    else:
        name = f"id-{hashlib.sha256(spiffe_id.encode()).hexdigest()[:32]}.svc.{sid.trust_domain}"
    return name.lower()


def sign_for_renewal(key: PrivateKey, csr_pem: str) -> bytes:
    """The current key's signature over a CSR's DER bytes (SignCertificateRequest)."""
    der = x509.load_pem_x509_csr(csr_pem.encode()).public_bytes(serialization.Encoding.DER)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(der, ec.ECDSA(hashes.SHA256()))
    return key.sign(der, padding.PKCS1v15(), hashes.SHA256())


def verify_renewal_signature(leaf: x509.Certificate, csr_der: bytes, signature: bytes) -> bool:
    public = leaf.public_key()
    try:
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, csr_der, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public, rsa.RSAPublicKey):
            public.verify(signature, csr_der, padding.PKCS1v15(), hashes.SHA256())
        else:
            return False
    except Exception:  # InvalidSignature, or a malformed one
        return False
    return True


def peer_spiffe_id_of(context: Any) -> str | None:
    """The SPIFFE ID of a server call's TLS client certificate; None over plaintext."""
    try:
        certs = context.auth_context().get("x509_pem_cert")
    except Exception:
        return None
    if not certs:
        return None
    try:
        return peer_spiffe_id(certs[0])
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Svid:
    """One issued identity: the key stays here; PEM texts as grpc wants them."""

    spiffe_id: str
    key_pem: str
    chain_pem: str  # leaf first, then the intermediate
    bundle_pem: str
    not_before: float
    not_after: float
    issued_at: float  # our clock when it arrived
    version: int

    @property
    def lifetime(self) -> float:
        return self.not_after - self.issued_at


class WorkloadIdentity:
    """Keeps a workload's SVID fresh and hands out credentials built on the current one.

    `control_plane` is HOST:PORT (plaintext channel, first address of a comma list) or a
    callable returning a `grpc.aio.Channel` to reach the Identity service.
    """

    def __init__(
        self,
        control_plane: str | Callable[[], grpc.aio.Channel],
        spiffe_id: str,
        join_token: str = "",
        *,
        key_type: str = "ec-p256",
        clock: Clock = time.time,
        rng: random.Random | None = None,
        sleep: Sleep = asyncio.sleep,
        jitter: float = 0.1,
        renew_fraction: float = 0.5,
        retry_min: float = 0.2,
        retry_max: float = 30.0,
        secure_control_plane: str | None = None,
        control_plane_id: str | None = None,
    ) -> None:
        parse(spiffe_id)
        self.spiffe_id = spiffe_id
        self._control_plane = control_plane
        self._join_token = join_token
        self.key_type = key_type
        self.clock = clock
        self.rng = rng or random.Random()
        self._sleep = sleep
        self.jitter = jitter
        self.renew_fraction = renew_fraction
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.svid: Svid | None = None
        self.renewals = 0  # successful renewals (not counting the first issue)
        self.failures = 0  # failed attempts
        self.on_rotate: list[Callable[[Svid], None]] = []
        self._channel: grpc.aio.Channel | None = None
        self._task: asyncio.Task[None] | None = None
        self._key: PrivateKey | None = None
        # Renewals over the control plane's mTLS port (`--secure-listen`), proven by the
        # current certificate in the handshake; None: over `control_plane` with a signature.
        self.secure_control_plane = secure_control_plane
        self.control_plane_id = control_plane_id or (
            f"spiffe://{parse(spiffe_id).trust_domain}/ns/{SYSTEM_NAMESPACE}/sa/{CONTROL_PLANE_SA}"
        )

    def adopt(self, key_pem: str, chain_pem: str, bundle_pem: str) -> Svid:
        """Makes an SVID obtained otherwise current (the control plane's own, signed
        in-process); start() then only renews."""
        leaf = load_certificates(chain_pem)[0]
        svid = Svid(
            spiffe_id=peer_spiffe_id(leaf),
            key_pem=key_pem,
            chain_pem=chain_pem,
            bundle_pem=bundle_pem,
            not_before=leaf.not_valid_before_utc.timestamp(),
            not_after=leaf.not_valid_after_utc.timestamp(),
            issued_at=self.clock(),
            version=1,
        )
        self._key = load_private_key(key_pem)
        self.svid = svid
        return svid

    # -- issuing ------------------------------------------------------------------------

    def _stub(self) -> Any:
        from aimesh.control.v1 import control_plane_pb2_grpc as pb_grpc

        if self._channel is None:
            if callable(self._control_plane):
                self._channel = self._control_plane()
            else:
                address = self._control_plane.split(",")[0].strip()
                self._channel = grpc.aio.insecure_channel(address)
        return pb_grpc.IdentityStub(self._channel)

    async def fetch(self, timeout: float = 10.0) -> Svid:
        """Asks for a new SVID (new key) and makes it current; raises grpc.aio.AioRpcError."""
        from aimesh.control.v1 import control_plane_pb2 as pb
        from aimesh.control.v1 import control_plane_pb2_grpc as pb_grpc

        key = generate_key(self.key_type)
        key_pem, csr_pem = make_csr(self.spiffe_id, key=key)
        request = pb.SignCertificateRequest(csr_pem=csr_pem)
        current = self.svid
        if current is not None and self._key is not None and current.not_after > self.clock():
            if self.secure_control_plane:
                # The handshake proves the current identity: no token, no signature.
                address = self.secure_control_plane.split(",")[0].strip()
                async with self.secure_channel(address, self.control_plane_id) as channel:
                    response = await pb_grpc.IdentityStub(channel).SignCertificate(
                        request, timeout=timeout
                    )
                return self._install(response, key_pem, current)
            request.current_chain_pem = current.chain_pem
            request.csr_signature = sign_for_renewal(self._key, csr_pem)
        else:
            request.join_token = self._join_token
        response = await self._stub().SignCertificate(request, timeout=timeout)
        return self._install(response, key_pem, current)

    def _install(self, response: Any, key_pem: str, current: Svid | None) -> Svid:
        leaf = load_certificates(response.certificate_chain_pem)[0]
        svid = Svid(
            spiffe_id=response.spiffe_id,
            key_pem=key_pem,
            chain_pem=response.certificate_chain_pem,
            bundle_pem=response.trust_bundle_pem,
            not_before=leaf.not_valid_before_utc.timestamp(),
            not_after=leaf.not_valid_after_utc.timestamp(),
            issued_at=self.clock(),
            version=(current.version + 1) if current else 1,
        )
        self._key = load_private_key(key_pem)
        self.svid = svid
        if current is not None:
            self.renewals += 1
            for cb in list(self.on_rotate):
                try:
                    cb(svid)
                except Exception:  # a subscriber's bug must not stop renewal
                    log.exception("identity rotation callback failed")
        log.info(
            "identity %s v%d valid until %s",
            svid.spiffe_id,
            svid.version,
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(svid.not_after)),
        )
        return svid

    def next_renewal_delay(self) -> float:
        """Seconds from now until the next renewal: half the lifetime, +-`jitter`."""
        svid = self.svid
        if svid is None:
            return 0.0
        spread = 1.0 + self.rng.uniform(-self.jitter, self.jitter)
        due = svid.issued_at + (svid.not_after - svid.issued_at) * self.renew_fraction * spread
        return max(0.0, due - self.clock())

    async def start(self) -> Svid:
        """First issue (raises on failure: a workload without identity cannot serve
        STRICT), then renews in the background."""
        svid = self.svid if self.svid is not None else await self.fetch()
        self._task = asyncio.get_running_loop().create_task(self._renew_loop())
        return svid

    async def _renew_loop(self) -> None:
        while True:
            await self._sleep(self.next_renewal_delay())
            backoff = self.retry_min
            while True:
                try:
                    await self.fetch()
                    break
                except (grpc.aio.AioRpcError, ValueError) as exc:
                    self.failures += 1
                    left = (self.svid.not_after - self.clock()) if self.svid else 0.0
                    log.warning("renewing %s failed (%.0fs left): %s", self.spiffe_id, left, exc)
                    await self._sleep(backoff * (0.5 + self.rng.random()))
                    backoff = min(backoff * 2, self.retry_max)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._channel is not None:
            await self._channel.close(None)
            self._channel = None

    # -- credentials --------------------------------------------------------------------

    def _current(self) -> Svid:
        if self.svid is None:
            raise RuntimeError(f"no certificate yet for {self.spiffe_id}: await start() first")
        return self.svid

    def _server_config(self, svid: Svid) -> Any:
        return grpc.ssl_server_certificate_configuration(
            [(svid.key_pem.encode(), svid.chain_pem.encode())],
            root_certificates=svid.bundle_pem.encode(),
        )

    def server_credentials(self, require_client_cert: bool = True) -> grpc.ServerCredentials:
        """STRICT server credentials that follow rotation (new handshakes get the newest
        certificate and bundle; open connections are not touched)."""
        first = self._current()
        served = {"version": first.version}

        def fetch() -> Any:
            svid = self.svid
            if svid is None or svid.version == served["version"]:
                return None  # unchanged: grpc keeps the configuration it has
            served["version"] = svid.version
            return self._server_config(svid)

        return grpc.dynamic_ssl_server_credentials(
            self._server_config(first),
            fetch,
            require_client_authentication=require_client_cert,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Client credentials with the current certificate (make new channels on_rotate)."""
        svid = self._current()
        return grpc.ssl_channel_credentials(
            root_certificates=svid.bundle_pem.encode(),
            private_key=svid.key_pem.encode(),
            certificate_chain=svid.chain_pem.encode(),
        )

    def channel_options(self, expected_id: str) -> list[tuple[str, Any]]:
        """Options that make the handshake verify the server is `expected_id`."""
        return [("grpc.ssl_target_name_override", dns_name_for(expected_id))]

    def secure_channel(
        self, address: str, expected_id: str, options: list[tuple[str, Any]] | None = None
    ) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(
            address,
            self.channel_credentials(),
            options=[*(options or []), *self.channel_options(expected_id)],
        )

    def expected_id(self, service: str, namespace: str | None = None) -> str:
        """The SPIFFE ID a mesh service's instances carry: same trust domain, and the
        namespace of this workload unless given."""
        sid = parse(self.spiffe_id)
        ns = namespace
        if ns is None:
            segments = sid.path.strip("/").split("/")
            ns = segments[1] if len(segments) >= 2 and segments[0] == "ns" else "default"
        return f"spiffe://{sid.trust_domain}/ns/{ns}/sa/{service}"


def leaf_of(chain_pem: str) -> x509.Certificate:
    return load_certificate(chain_pem)


# A certificate on disk (`aimesh identity issue --out DIR`, read with --tls-dir DIR): the
# private key (0600), the leaf with its chain, and the trust bundle.
TLS_KEY, TLS_CERT, TLS_BUNDLE = "key.pem", "cert.pem", "ca.pem"


def write_tls_dir(directory: str | Path, key_pem: str, chain_pem: str, bundle_pem: str) -> Path:
    """Writes the three files (the directory is created 0700 if missing)."""
    out = Path(directory)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write(out / TLS_KEY, key_pem, 0o600)
    _write(out / TLS_CERT, chain_pem, 0o644)
    _write(out / TLS_BUNDLE, bundle_pem, 0o644)
    return out


def load_tls_dir(directory: str | Path, *, clock: Clock = time.time) -> WorkloadIdentity:
    """The identity in a --tls-dir, ready for `secure_channel` (it does not renew: a
    person's or a tool's certificate is issued again when it expires). ValueError says
    which file is wrong, or that the certificate expired."""
    src = Path(directory)
    key_pem = _read(src / TLS_KEY)  # refuses a key readable by others
    chain_pem = _read(src / TLS_CERT, secret=False)
    bundle_pem = _read(src / TLS_BUNDLE, secret=False)
    try:
        leaf = load_certificates(chain_pem)[0]
        spiffe_id = peer_spiffe_id(leaf)
    except (IndexError, ValueError) as exc:
        raise ValueError(f"{src / TLS_CERT}: not a mesh certificate ({exc or 'empty'})") from None
    if leaf.not_valid_after_utc.timestamp() <= clock():
        raise ValueError(
            f"{src / TLS_CERT}: the certificate for {spiffe_id} expired at "
            f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}; issue a new one with "
            "`aimesh identity issue`"
        )
    try:
        _check_key_matches(leaf, load_private_key(key_pem), "mesh")
    except ValueError as exc:
        raise ValueError(f"{src / TLS_KEY}: {exc}") from None
    identity = WorkloadIdentity("", spiffe_id, clock=clock)
    identity.adopt(key_pem, chain_pem, bundle_pem)
    return identity


__all__ = [
    "Svid",
    "WorkloadIdentity",
    "dns_name_for",
    "load_tls_dir",
    "peer_spiffe_id_of",
    "sign_for_renewal",
    "verify_renewal_signature",
    "write_tls_dir",
]
