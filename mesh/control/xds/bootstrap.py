"""`aimesh xds bootstrap`: the file that puts Envoy or a proxyless gRPC client on the mesh.

aimesh xds bootstrap --node edge-1 --for envoy --listen 0.0.0.0:10000 -o envoy.json
envoy -c envoy.json

aimesh xds bootstrap --node chat-app --for grpc -o xds.json
GRPC_XDS_BOOTSTRAP=xds.json python app.py   # grpc.insecure_channel("xds:///gpt4-gateway")

A STRICT control plane serves ADS only on its mTLS port: `--tls-dir DIR` (from `aimesh
identity issue`) gives Envoy's control-plane cluster a client certificate and requires the
control plane's SPIFFE ID, and `--control-plane` is then that --secure-listen port. Envoy
reads the files once: issue the certificate again and restart Envoy before it expires.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..client import resolve_target, targets
from .ads import DEFAULT_ENVOY_LISTEN, LISTEN_METADATA
from .resources import listen_address

CONTROL_PLANE_CLUSTER = "aimesh-control-plane"
_TYPE = "type.googleapis.com/envoy.extensions."


def _node(node_id: str, cluster: str, zone: str, metadata: dict[str, str]) -> dict[str, Any]:
    # grpc-js rejects a bootstrap whose node has no locality, even an empty one.
    node: dict[str, Any] = {
        "id": node_id,
        "cluster": cluster or node_id,
        "locality": {"zone": zone} if zone else {},
    }
    if metadata:
        node["metadata"] = metadata
    return node


def grpc_bootstrap(
    node_id: str, control_planes: Sequence[str], *, cluster: str = "", zone: str = ""
) -> dict[str, Any]:
    """For grpcio, grpc-js, grpc-go, grpc-java (GRPC_XDS_BOOTSTRAP=FILE). Several control
    planes are listed in order: gRPC falls back to the next when one is unreachable."""
    return {
        "xds_servers": [
            {
                "server_uri": cp,
                "channel_creds": [{"type": "insecure"}],
                # ignore_resource_deletion (gRFC A53): a control plane restarted on an
                # empty store answers before the sims re-register, without the client's
                # listener and clusters; without this, the client drops them, and
                # grpc-js-xds 1.14.1 never takes them back when they return unchanged
                # (its cache still holds them, so no update is delivered).
                "server_features": ["xds_v3", "ignore_resource_deletion"],
            }
            for cp in control_planes
        ],
        "node": _node(node_id, cluster, zone, {}),
    }


def envoy_control_plane_tls(tls_dir: str | Path) -> dict[str, Any]:
    """The transport socket for Envoy's control-plane cluster: mTLS with the certificate in
    `tls_dir` (key.pem, cert.pem, ca.pem from `aimesh identity issue`), trusting the mesh
    CA there and only the control plane's SPIFFE ID (a URI SAN) in that trust domain.
    ValueError (naming the file) when the directory holds no usable certificate: a key
    others can read, a certificate that expired or does not match the key."""
    # cryptography: only when asked for (the CLI imports this module to build its parser)
    from ...security.spiffe import CONTROL_PLANE_SA, SYSTEM_NAMESPACE, parse, spiffe_id
    from ...security.workload import TLS_BUNDLE, TLS_CERT, TLS_KEY, dns_name_for, load_tls_dir

    directory = Path(tls_dir).resolve()  # Envoy may run from anywhere: absolute paths
    identity = load_tls_dir(directory)
    trust_domain = parse(identity.spiffe_id).trust_domain
    control_plane = spiffe_id(trust_domain, SYSTEM_NAMESPACE, CONTROL_PLANE_SA)
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _TYPE + "transport_sockets.tls.v3.UpstreamTlsContext",
            # The DNS SAN that stands for the control plane's ID (no server checks it).
            "sni": dns_name_for(control_plane),
            "common_tls_context": {
                "alpn_protocols": ["h2"],
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(directory / TLS_CERT)},
                        "private_key": {"filename": str(directory / TLS_KEY)},
                    }
                ],
                "validation_context": {
                    "trusted_ca": {"filename": str(directory / TLS_BUNDLE)},
                    "match_typed_subject_alt_names": [
                        {"san_type": "URI", "matcher": {"exact": control_plane}}
                    ],
                },
            },
        },
    }


def envoy_bootstrap(
    node_id: str,
    control_planes: Sequence[str],
    *,
    listen: str = DEFAULT_ENVOY_LISTEN,
    admin: str = "127.0.0.1:9901",
    cluster: str = "",
    zone: str = "",
    tls_dir: str | Path | None = None,
) -> dict[str, Any]:
    """For `envoy -c FILE`: ADS for listeners, routes, clusters and endpoints; the gateway
    listener binds `listen` (sent to the control plane in the node's metadata). With
    `tls_dir`, ADS goes over mTLS (`envoy_control_plane_tls`): `control_planes` are then
    the control plane's --secure-listen addresses."""

    def address(host_port: str) -> dict[str, Any]:
        host, port = listen_address(host_port)
        return {"socket_address": {"address": host, "port_value": port}}

    ads = {"ads": {}, "resource_api_version": "V3"}
    control_plane_cluster: dict[str, Any] = {
        "name": CONTROL_PLANE_CLUSTER,
        "type": "STRICT_DNS",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": CONTROL_PLANE_CLUSTER,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": address(cp)}}]} for cp in control_planes
            ],
        },
        # ADS is gRPC: HTTP/2 to the control plane.
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _TYPE + "upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
    }
    if tls_dir is not None:
        control_plane_cluster["transport_socket"] = envoy_control_plane_tls(tls_dir)
    return {
        "node": _node(node_id, cluster, zone, {LISTEN_METADATA: listen}),
        "admin": {"address": address(admin)},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [
                    {
                        "envoy_grpc": {
                            "cluster_name": CONTROL_PLANE_CLUSTER,
                            # Reconnect to a restarted control plane within a second, not
                            # after Envoy's default backoff (seen up to 4.4 s here).
                            "retry_policy": {
                                "retry_back_off": {"base_interval": "0.1s", "max_interval": "1s"}
                            },
                        }
                    }
                ],
                "set_node_on_first_message_only": True,
            },
            "cds_config": ads,
            "lds_config": ads,
        },
        "static_resources": {"clusters": [control_plane_cluster]},
    }


_NO_GRPC_TLS = (
    "--tls-dir is not supported with --for grpc yet: a proxyless gRPC client verifies the "
    "control plane's address as a hostname, and its certificate carries a SPIFFE URI and a "
    "mesh DNS name, not an IP; use --for envoy, or a PERMISSIVE control plane's plaintext "
    "port"
)


def add_parsers(sub: Any) -> None:
    xds = sub.add_parser("xds", help="xDS: put Envoy or proxyless gRPC clients on the mesh")
    xsub = xds.add_subparsers(dest="xds_cmd", metavar="ACTION", required=True)
    p = xsub.add_parser(
        "bootstrap", help="write a bootstrap file for Envoy or a proxyless gRPC client"
    )
    p.add_argument("--node", required=True, help="the node id the control plane sees")
    p.add_argument("--for", dest="consumer", choices=["envoy", "grpc"], required=True)
    p.add_argument(
        "--control-plane",
        default=None,
        metavar="ADDR[,ADDR]",
        help="HOST:PORT of the control plane, or several replicas (default "
        "$AIMESH_CONTROL_PLANE, then 127.0.0.1:15010); with --tls-dir, its --secure-listen "
        "(mTLS) address",
    )
    p.add_argument(
        "--tls-dir",
        default=None,
        metavar="DIR",
        help="Envoy: reach the control plane over mTLS with the certificate in DIR (key.pem, "
        "cert.pem, ca.pem from `aimesh identity issue`), requiring its SPIFFE ID; needed "
        "for a --mtls-mode STRICT control plane. Envoy reads the files once: issue them "
        "again and restart Envoy before the certificate expires (default lifetime 24 h)",
    )
    p.add_argument("--cluster", default="", help="node.cluster (default: the node id)")
    p.add_argument("--zone", default="", help="node.locality.zone")
    p.add_argument(
        "--listen",
        default=DEFAULT_ENVOY_LISTEN,
        help=f"Envoy: where its gateway listener binds (default {DEFAULT_ENVOY_LISTEN})",
    )
    p.add_argument(
        "--admin", default="127.0.0.1:9901", help="Envoy: its admin address (default :9901)"
    )
    p.add_argument("-o", "--output", default="-", help="the file to write ('-': stdout)")


def run(args: argparse.Namespace) -> int:
    try:
        cps = targets(resolve_target(args.control_plane))
        if args.consumer == "envoy":
            listen_address(args.listen)
            doc = envoy_bootstrap(
                args.node,
                cps,
                listen=args.listen,
                admin=args.admin,
                cluster=args.cluster,
                zone=args.zone,
                tls_dir=args.tls_dir,
            )
        elif args.tls_dir is not None:
            raise ValueError(_NO_GRPC_TLS)
        else:
            doc = grpc_bootstrap(args.node, cps, cluster=args.cluster, zone=args.zone)
    except ValueError as exc:
        print(f"aimesh xds bootstrap: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(doc, indent=2) + "\n"
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    Path(args.output).write_text(text)
    use = (
        f"envoy -c {args.output}"
        if args.consumer == "envoy"
        else f"GRPC_XDS_BOOTSTRAP={args.output} and dial xds:///<service>"
    )
    print(f"wrote {args.output}; next: {use}", file=sys.stderr)
    return 0
