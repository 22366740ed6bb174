"""mTLS in the proxy: which listeners speak TLS, the identity's lifecycle, and what a
certificate rotation does to upstream channels.

Modes (`security.mtls.mode` in the YAML, or `--mtls-mode`; with `--identity` and neither,
STRICT):

- STRICT: mesh-facing listeners take only TLS with a client certificate under the trust
  bundle; upstream channels present this workload's certificate and accept only a server
  proving the destination service's SPIFFE ID. A gateway's client-facing listener is mTLS
  too unless `--client-tls off`; a sidecar's outbound listener (the local app's side, on
  loopback) stays plaintext.
- PERMISSIVE: as STRICT, plus, with `--plaintext-listen`, a plaintext listener beside the
  TLS one for callers not migrated yet. One gRPC port is either TLS or not, so the two
  cannot share a port; calls through the plaintext one are counted (`/stats`:
  `mtls.plaintext_calls`, and the log says when the first one arrives).
- DISABLE: plaintext everywhere (a YAML asking for mTLS without an identity gets a
  warning, and plaintext).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import grpc.aio

from aimesh.interceptors.base import InboundCall, Next

from ..serving import bind

log = logging.getLogger("aimesh.security.mtls")


async def setup_identity(proxy: Any, config: Any) -> None:
    """Decides the proxy's mode and, when mTLS is on, has its identity ready."""
    flags = proxy.settings.mtls
    yaml_mode = config.security.mtls.mode
    if proxy.identity is None and flags is None:
        if yaml_mode != "DISABLE":
            log.warning(
                "security.mtls.mode is %s but this proxy has no identity: serving "
                "plaintext; give it --identity SPIFFE_ID --join-token TOKEN --control-plane ADDR",
                yaml_mode,
            )
        proxy.mtls_mode = "DISABLE"
        return
    mode = flags.mode if flags is not None and flags.mode else ""
    proxy.mtls_mode = mode or (yaml_mode if yaml_mode != "DISABLE" else "STRICT")
    if proxy.identity is None:
        proxy.identity = await start_workload_identity(flags, "aimesh proxy")
    proxy.identity.on_rotate.append(lambda svid: rotated(proxy))


async def start_workload_identity(flags: Any, prog: str) -> Any:
    """The identity `flags` (MtlsFlags) name, with its first certificate (from the join
    token) and renewing; exits with the control plane's reason when it cannot get one."""
    from .workload import WorkloadIdentity

    identity = WorkloadIdentity(
        flags.control_plane,
        flags.identity,
        flags.join_token,
        secure_control_plane=flags.secure_control_plane,
    )
    await start_or_exit(identity, prog)
    return identity


def bind_ports(
    server: grpc.aio.Server, listen: str, identity: Any, plaintext_listen: str | None
) -> tuple[int, int]:
    """A backend's ports: `listen` is mTLS with an identity (STRICT), else plaintext;
    PERMISSIVE adds a plaintext `plaintext_listen`. (port, plaintext port or 0)."""
    port = bind(server, listen, identity.server_credentials() if identity else None)
    return port, bind(server, plaintext_listen) if plaintext_listen else 0


async def start_or_exit(identity: Any, prog: str) -> Any:
    """identity.start(), or exit with what the control plane said (a bad token, ...)."""
    try:
        return await identity.start()
    except grpc.aio.AioRpcError as exc:
        await identity.stop()
        raise SystemExit(
            f"{prog}: cannot get a certificate for {identity.spiffe_id}: "
            f"{exc.code().name}: {exc.details()}"
        ) from None


def listener_credentials(proxy: Any, *, client_facing: bool) -> grpc.ServerCredentials | None:
    """TLS credentials for a listener, or None for plaintext."""
    if proxy.identity is None or proxy.mtls_mode == "DISABLE":
        return None
    if client_facing:
        if proxy.settings.mode == "sidecar":
            return None  # the local app's side, on loopback
        flags = proxy.settings.mtls
        if flags is not None and not flags.client_tls:
            return None  # --client-tls off: the gateway's callers come in plaintext
    creds: grpc.ServerCredentials = proxy.identity.server_credentials()
    return creds


def rotated(proxy: Any) -> None:
    """A new client certificate: every upstream gets a new channel for new calls; the old
    channels finish their calls (up to `rotation_drain` seconds) and close."""
    old: list[Any] = []
    for cluster in proxy.clusters.values():
        old += cluster.rechannel()
    proxy.rotations += 1
    if not old:
        return
    proxy._closing += old

    async def drain() -> None:
        await asyncio.gather(
            *(ch.close(proxy.settings.rotation_drain) for ch in old), return_exceptions=True
        )
        for ch in old:
            if ch in proxy._closing:
                proxy._closing.remove(ch)

    task = asyncio.get_running_loop().create_task(drain(), name="drain rotated channels")
    proxy._tasks.add(task)
    task.add_done_callback(proxy._tasks.discard)


class PlaintextCounter:
    """Inbound policy on PERMISSIVE's plaintext listener: counts the calls."""

    def __init__(self, proxy: Any) -> None:
        self.proxy = proxy

    async def around(self, call: InboundCall, call_next: Next) -> None:
        if self.proxy.plaintext_calls == 0:
            log.warning(
                "a plaintext call (%s) on the PERMISSIVE listener; move callers to mTLS "
                "before switching to STRICT",
                call.method,
            )
        self.proxy.plaintext_calls += 1
        await call_next()


def stats(proxy: Any) -> dict[str, Any]:
    """The proxy's mTLS state for /stats (empty when mTLS is off)."""
    if proxy.identity is None or proxy.mtls_mode == "DISABLE":
        return {}
    svid = proxy.identity.svid
    return {
        "mtls": {
            "mode": proxy.mtls_mode,
            "identity": proxy.identity.spiffe_id,
            "certificate_version": svid.version if svid else 0,
            "certificate_expires": svid.not_after if svid else None,
            "rotations": proxy.rotations,
            "renewal_failures": proxy.identity.failures,
            "plaintext_calls": proxy.plaintext_calls,
        }
    }
