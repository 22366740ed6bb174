"""CLI pieces for mesh identity: `aimesh identity token` and `aimesh identity issue`, the
control plane's CA flags, and the mTLS flags of `aimesh proxy` and the backends (sim and
provider adapters)."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Any

from ..units import parse_duration

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


def _ca_and_id(p: argparse.ArgumentParser, id_help: str) -> None:
    p.add_argument("--ca-dir", required=True, metavar="DIR", help="the control plane's CA")
    p.add_argument("--id", required=True, dest="grant", metavar="SPIFFE_ID", help=id_help)


def run(args: argparse.Namespace) -> int:
    from .ca import CertificateAuthority

    prog = f"aimesh identity {args.identity_cmd}"
    try:
        ca = CertificateAuthority.load(args.ca_dir)
    except (ValueError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    try:
        if args.identity_cmd == "issue":
            _issue(ca, args.grant, args.out, args.lifetime)
        else:
            from .tokens import issue_join_token

            print(issue_join_token(ca.token_secret, args.grant, args.ttl))
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    return 0


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
    if args.plaintext_listen and mode not in ("PERMISSIVE", ""):
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
