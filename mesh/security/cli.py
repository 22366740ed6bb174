"""CLI pieces for mesh identity: `aimesh identity token`, `aimesh identity issue` and
`aimesh identity root status|prepare|rotate` (trust-bundle rotation), the control plane's CA
flags, and the mTLS flags of `aimesh proxy` and the backends (sim and provider adapters)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..units import parse_duration

if TYPE_CHECKING:
    from cryptography import x509

    from .ca import CertificateAuthority

DEFAULT_TRUST_DOMAIN = "aimesh.local"
MODES = ("DISABLE", "PERMISSIVE", "STRICT")


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_control_plane_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mesh CA (workload identities)")
    g.add_argument(
        "--ca-dir",
        default=None,
        metavar="DIR",
        help="run the mesh CA from DIR (created with a new root if empty) and serve the "
        "Identity service",
    )
    g.add_argument(
        "--trust-domain",
        default=DEFAULT_TRUST_DOMAIN,
        help=f"SPIFFE trust domain of a new CA (default {DEFAULT_TRUST_DOMAIN})",
    )
    g.add_argument(
        "--cert-lifetime",
        type=_duration,
        default=86400.0,
        help="lifetime of workload certificates, 1m to 30d (default 24h)",
    )
    g.add_argument(
        "--secure-listen",
        default=None,
        metavar="HOST:PORT",
        help="also serve every service over mTLS here (workloads renew through it with "
        "--secure-control-plane)",
    )
    g.add_argument(
        "--mtls-mode",
        choices=("PERMISSIVE", "STRICT"),
        default="PERMISSIVE",
        help="STRICT: the plaintext --listen port serves only Identity (first certificates), "
        "health and reflection; everything else needs the --secure-listen port and a mesh "
        "certificate (default PERMISSIVE: every service on both ports)",
    )


@dataclass(frozen=True)
class CaFlags:
    ca_dir: str
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    cert_lifetime: float = 86400.0
    secure_listen: str | None = None
    mtls_mode: str = "PERMISSIVE"  # STRICT: plaintext only for Identity, health, reflection


def ca_from_args(args: argparse.Namespace) -> CaFlags | None:
    """The control plane's CA flags; ValueError when STRICT lacks what it needs."""
    mode = getattr(args, "mtls_mode", None) or "PERMISSIVE"
    if mode == "STRICT" and not (getattr(args, "ca_dir", None) and args.secure_listen):
        raise ValueError(
            "--mtls-mode STRICT needs --ca-dir DIR (the mesh CA) and --secure-listen HOST:PORT "
            "(the mTLS port that serves everything but first certificates)"
        )
    if not getattr(args, "ca_dir", None):
        return None
    return CaFlags(args.ca_dir, args.trust_domain, args.cert_lifetime, args.secure_listen, mode)


def add_parsers(sub: Any) -> None:
    identity = sub.add_parser(
        "identity", help="mesh identities: join tokens for workloads, operator certificates"
    )
    isub = identity.add_subparsers(dest="identity_cmd", metavar="ACTION", required=True)
    token = isub.add_parser(
        "token",
        help="print a join token that lets a workload get a certificate for an identity",
    )
    _ca_and_id(token, "spiffe://<trust domain>/ns/<namespace>/sa/<service> (or a pattern with *)")
    token.add_argument("--ttl", type=_duration, default=3600.0, help="validity (default 1h)")
    issue = isub.add_parser(
        "issue",
        help="write a certificate for an identity, signed here from the CA (operators: "
        "spiffe://<trust domain>/ns/aimesh-system/sa/<name>, for --tls-dir)",
    )
    _ca_and_id(issue, "spiffe://<trust domain>/ns/<namespace>/sa/<name>")
    issue.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="write key.pem (0600; generated here), cert.pem and ca.pem there",
    )
    issue.add_argument(
        "--lifetime", type=_duration, default=86400.0, help="1m to 30d (default 24h)"
    )
    root = isub.add_parser(
        "root",
        help="trust-bundle (root) rotation with an overlap: status, prepare, rotate",
        description="Replace the mesh CA's root without any peer seeing a certificate it "
        "cannot verify: `prepare` (the next root joins the trust bundle), wait one "
        "certificate lifetime, `rotate` (signing switches; the old root stays trusted for "
        "the overlap). After each step, SIGHUP the control plane (or restart it).",
    )
    rsub = root.add_subparsers(dest="root_cmd", metavar="STEP", required=True)
    _ca_dir(rsub.add_parser("status", help="the roots in the trust bundle and which one signs"))
    prepare = rsub.add_parser(
        "prepare", help="step 1: the next root joins the trust bundle; signing is unchanged"
    )
    _ca_dir(prepare)
    prepare.add_argument(
        "--root-cert", metavar="PEM", help="the operator's next root CA certificate (file)"
    )
    prepare.add_argument(
        "--root-key", metavar="PEM", help="its private key (file; used once, not kept)"
    )
    rotate = rsub.add_parser(
        "rotate",
        help="step 3: signing switches to the prepared root; the old one stays trusted for "
        "the overlap",
    )
    _ca_dir(rotate)
    rotate.add_argument(
        "--overlap",
        type=_duration,
        default=None,
        help="how long the old root stays in the trust bundle (default "
        f"{_DEFAULT_OVERLAP_TEXT}: a default certificate lifetime plus clock skew; at least "
        "the control plane's --cert-lifetime)",
    )


def _ca_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ca-dir", required=True, metavar="DIR", help="the control plane's CA")


def _ca_and_id(p: argparse.ArgumentParser, id_help: str) -> None:
    _ca_dir(p)
    p.add_argument("--id", required=True, dest="grant", metavar="SPIFFE_ID", help=id_help)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .ca import CertificateAuthority

    prog = f"aimesh identity {args.identity_cmd} {getattr(args, 'root_cmd', '')}".rstrip()
    if not (Path(args.ca_dir) / "ca.json").is_file():
        print(
            f"{prog}: {args.ca_dir} holds no mesh CA (no ca.json); pass the directory the "
            "control plane runs with --ca-dir (it creates the CA there on first start)",
            file=sys.stderr,
        )
        return 2
    try:
        ca = CertificateAuthority.load(args.ca_dir)
    except (ValueError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    try:
        if args.identity_cmd == "issue":
            _issue(ca, args.grant, args.out, args.lifetime)
        elif args.identity_cmd == "root":
            _root(ca, args)
        else:
            from .tokens import issue_join_token

            print(issue_join_token(ca.token_secret, args.grant, args.ttl))
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    return 0


_DEFAULT_OVERLAP_TEXT = "24h1m"
_RELOAD = (
    "reload the control plane: kill -HUP <its pid> (or restart it); it serves the new "
    "trust bundle at once, and workloads get it at their next renewal"
)


def _root(ca: CertificateAuthority, args: argparse.Namespace) -> None:
    """`aimesh identity root status|prepare|rotate` on the CA loaded from --ca-dir."""
    from .ca import CLOCK_SKEW, DEFAULT_LEAF_LIFETIME

    d = args.ca_dir
    if args.root_cmd == "status":
        _root_status(ca, d)
        return
    if args.root_cmd == "prepare":
        if ca.rotation_prepared:
            raise ValueError(
                f"a root rotation is already prepared (next root {_describe(ca.next_root_pem)});"
                f" finish it with: aimesh identity root rotate --ca-dir {d}"
            )
        if bool(args.root_cert) != bool(args.root_key):
            raise ValueError("pass both --root-cert and --root-key, or neither")
        if ca.operator_root and not args.root_cert:
            raise ValueError(
                "this CA's root is the operator's and its key is not kept: pass the next "
                "root with --root-cert PEM --root-key PEM"
            )
        ca.prepare_root_rotation(
            root_cert_pem=_read_file(args.root_cert, "--root-cert"),
            root_key_pem=_read_file(args.root_key, "--root-key"),
        )
        ca.to_pem_files(d)
        bundle = ca.trust_bundle().count("BEGIN CERTIFICATE")
        print(f"prepared the next root {_describe(ca.next_root_pem)}")
        print(f"the trust bundle now holds {bundle} roots: {d}/bundle.pem")
        print(f"signing is unchanged: root {_describe(ca.root_pem)}")
        print("next:")
        print(f"  1. {_RELOAD}")
        print(
            "  2. wait one certificate lifetime (24h by default: the control plane's "
            "--cert-lifetime), so every workload holds the new root"
        )
        print(f"  3. aimesh identity root rotate --ca-dir {d}")
        return
    if not ca.rotation_prepared:
        raise ValueError(
            "no root rotation is prepared: first aimesh identity root prepare --ca-dir "
            f"{d}, reload the control plane and wait one certificate lifetime, so "
            "workloads trust the next root before any certificate is signed under it"
        )
    prepared = _prepared_at(ca.next_intermediate_pem)
    waited = time.time() - prepared
    if waited < DEFAULT_LEAF_LIFETIME:
        print(
            f"warning: the rotation was prepared only {_ago(waited)} ago; workloads that "
            "have not renewed since then do not trust the new root yet",
            file=sys.stderr,
        )
    old = ca.root_pem
    overlap = args.overlap if args.overlap is not None else DEFAULT_LEAF_LIFETIME + CLOCK_SKEW
    ca.rotate_root(overlap=overlap)
    ca.to_pem_files(d)
    until = max((r.trusted_until for r in ca.retired_roots), default=time.time())
    print(f"signing switched to root {_describe(ca.root_pem)}")
    print(
        f"the old root {_describe(old)} stays trusted until {_at(until)} (overlap {_ago(overlap)})"
    )
    print("next:")
    print(f"  1. {_RELOAD}")
    print(
        "  2. workloads get certificates under the new root at their next renewal (within "
        "one certificate lifetime)"
    )
    print(
        f"  3. at {_at(until)} the old root leaves the trust bundle by itself; a certificate "
        "still under it is then rejected"
    )


def _root_status(ca: CertificateAuthority, d: str) -> None:
    now = time.time()
    bundle = ca.trust_bundle().count("BEGIN CERTIFICATE")
    print(f"mesh CA of trust domain {ca.trust_domain} in {d}: {bundle} root(s) in the trust bundle")
    print(f"current root (signs now): {_describe(ca.root_pem)}")
    print(f"  intermediate: {_describe(ca.intermediate_pem)}")
    if ca.next_root_pem is None:
        print("prepared next root: none")
    else:
        prepared = _prepared_at(ca.next_intermediate_pem)
        print(f"prepared next root (trusted, not signing): {_describe(ca.next_root_pem)}")
        print(f"  prepared at {_at(prepared)} ({_ago(now - prepared)} ago)")
    retired = ca.retired_roots
    if not retired:
        print("retired roots still trusted: none")
    for r in retired:
        pem = _cert_pem(r.certificate)
        print(f"retired root still trusted: {_describe(pem)}")
        print(f"  trusted until {_at(r.trusted_until)} (in {_ago(r.trusted_until - now)})")
    if ca.next_root_pem is not None:
        print(
            "next: once every workload renewed since the prepare (one certificate lifetime): "
            f"aimesh identity root rotate --ca-dir {d}"
        )
    elif not retired:
        print(f"to rotate the root: aimesh identity root prepare --ca-dir {d}")


def _read_file(path: str | None, flag: str) -> str | None:
    if path is None:
        return None
    try:
        with open(path) as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"{flag} {path}: {exc.strerror or exc}") from None


def _cert_pem(cert: x509.Certificate) -> str:
    from cryptography.hazmat.primitives import serialization

    return str(cert.public_bytes(serialization.Encoding.PEM).decode())


def _describe(pem: str | None) -> str:
    """'CN (sha256 AB:..., valid until ...)' of a certificate."""
    from cryptography.hazmat.primitives import hashes

    from .spiffe import load_certificate

    if pem is None:
        return "none"
    cert = load_certificate(pem)
    fingerprint = cert.fingerprint(hashes.SHA256()).hex(":").upper()
    name = cert.subject.rfc4514_string()
    return (
        f"{name} (sha256 {fingerprint}, valid until {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ})"
    )


def _prepared_at(intermediate_pem: str | None) -> float:
    """When a rotation was prepared: its intermediate is valid from then minus clock skew."""
    from .ca import CLOCK_SKEW
    from .spiffe import load_certificate

    assert intermediate_pem is not None
    return load_certificate(intermediate_pem).not_valid_before_utc.timestamp() + CLOCK_SKEW


def _at(t: float) -> str:
    import datetime as dt

    return f"{dt.datetime.fromtimestamp(t, tz=dt.UTC):%Y-%m-%d %H:%M:%SZ}"


def _ago(seconds: float) -> str:
    """A duration as 1h2m3s (whole seconds)."""
    s = max(round(seconds), 0)
    parts = [(s // 3600, "h"), (s % 3600 // 60, "m"), (s % 60, "s")]
    text = "".join(f"{n}{unit}" for n, unit in parts if n)
    return text or "0s"


def _issue(ca: Any, spiffe_id: str, out: str, lifetime: float) -> None:
    """Signs a certificate for `spiffe_id` with a key generated here (it never leaves
    this machine but for `out`) and writes them as --tls-dir reads them."""
    from ..control.access import OPERATOR_NAMESPACE, is_operator
    from .ca import make_csr
    from .spiffe import load_certificate, parse
    from .workload import dns_name_for, write_tls_dir

    if parse(spiffe_id).service is None:
        raise ValueError(f"{spiffe_id} is not spiffe://<trust domain>/ns/<namespace>/sa/<name>")
    key_pem, csr = make_csr(spiffe_id)
    names = [dns_name_for(spiffe_id)]  # what clients verify (workload.py)
    leaf, chain = ca.sign_csr(csr, spiffe_id, lifetime=lifetime, dns_names=names)
    path = write_tls_dir(out, key_pem, leaf + chain, ca.trust_bundle())
    until = load_certificate(leaf).not_valid_after_utc
    role = (
        "an operator: may apply config and manage every service's registrations"
        if is_operator(spiffe_id)
        else f"not an operator (operators are in namespace {OPERATOR_NAMESPACE})"
    )
    print(f"{spiffe_id} ({role}), valid until {until:%Y-%m-%d %H:%M:%SZ}: {path}/")
    print(f"use it with: aimesh apply --tls-dir {path} --control-plane HOST:MTLS_PORT ...")


@dataclass(frozen=True)
class MtlsFlags:
    mode: str  # PERMISSIVE | STRICT | "" (the config's security.mtls.mode, else STRICT)
    identity: str
    join_token: str
    control_plane: str
    client_tls: bool = True  # the proxy's client-facing listener (gateway)
    plaintext_listen: str | None = None  # PERMISSIVE: where plaintext callers still come
    secure_control_plane: str | None = None  # renew over the control plane's mTLS port


def add_mtls_flags(p: argparse.ArgumentParser, *, proxy: bool) -> None:
    g = p.add_argument_group("mTLS (mesh identity from the control plane's CA)")
    g.add_argument(
        "--identity",
        default=None,
        metavar="SPIFFE_ID",
        help="this workload's identity, e.g. spiffe://aimesh.local/ns/default/sa/NAME; "
        "turns mTLS on (STRICT unless --mtls-mode)",
    )
    g.add_argument(
        "--join-token",
        default=os.environ.get("AIMESH_JOIN_TOKEN", ""),
        help="from `aimesh identity token` (default $AIMESH_JOIN_TOKEN)",
    )
    g.add_argument(
        "--mtls-mode",
        choices=MODES,
        default=None,
        help="default: the config's security.mtls.mode, STRICT with --identity",
    )
    g.add_argument(
        "--plaintext-listen",
        default=None,
        metavar="HOST:PORT",
        help="PERMISSIVE: an extra plaintext listener next to the TLS one (calls counted)",
    )
    g.add_argument(
        "--secure-control-plane",
        default=None,
        metavar="HOST:PORT[,HOST:PORT...]",
        help="the control plane's mTLS port (its --secure-listen): renewals, registration, "
        "watches and reports go there, with this workload's certificate, instead of the "
        "plaintext --control-plane (which still serves the first certificate)",
    )
    if proxy:
        g.add_argument(
            "--client-tls",
            choices=["on", "off"],
            default="on",
            help="off: the gateway's client-facing listener stays plaintext (default on)",
        )


def mtls_from_args(args: argparse.Namespace, control_plane: str | None) -> MtlsFlags | None:
    """None when mTLS is off; raises ValueError for inconsistent flags."""
    mode = args.mtls_mode or ""  # "": the config's security.mtls.mode, else STRICT
    if mode == "DISABLE" or (not mode and not args.identity):
        return None
    if not args.identity:
        raise ValueError(f"--mtls-mode {mode} needs --identity SPIFFE_ID")
    if not control_plane:
        raise ValueError("--identity needs --control-plane ADDR (where the mesh CA is)")
    if not args.join_token:
        raise ValueError(
            "--identity needs --join-token (or $AIMESH_JOIN_TOKEN): "
            "aimesh identity token --ca-dir DIR --id " + args.identity
        )
    # A proxy without --mtls-mode takes the config's mode, which may be PERMISSIVE; a
    # backend without it is STRICT, where a plaintext port has no place.
    proxy = hasattr(args, "client_tls")
    if args.plaintext_listen and mode != "PERMISSIVE" and not (proxy and not mode):
        raise ValueError("--plaintext-listen is for --mtls-mode PERMISSIVE")
    return MtlsFlags(
        mode=mode,
        identity=args.identity,
        join_token=args.join_token,
        control_plane=control_plane,
        client_tls=getattr(args, "client_tls", "on") == "on",
        plaintext_listen=args.plaintext_listen,
        secure_control_plane=args.secure_control_plane,
    )
