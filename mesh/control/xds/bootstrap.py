"""`aimesh xds bootstrap`: the file that puts Envoy or a proxyless gRPC client on the mesh.

aimesh xds bootstrap --node edge-1 --for envoy --listen 0.0.0.0:10000 -o envoy.json
envoy -c envoy.json

aimesh xds bootstrap --node chat-app --for grpc -o xds.json
GRPC_XDS_BOOTSTRAP=xds.json python app.py   # grpc.insecure_channel("xds:///gpt4-gateway")
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


def envoy_bootstrap(
    node_id: str,
    control_planes: Sequence[str],
    *,
    listen: str = DEFAULT_ENVOY_LISTEN,
    admin: str = "127.0.0.1:9901",
    cluster: str = "",
    zone: str = "",
) -> dict[str, Any]:
    """For `envoy -c FILE`: ADS for listeners, routes, clusters and endpoints; the gateway
    listener binds `listen` (sent to the control plane in the node's metadata)."""

    def address(host_port: str) -> dict[str, Any]:
        host, port = listen_address(host_port)
        return {"socket_address": {"address": host, "port_value": port}}

    ads = {"ads": {}, "resource_api_version": "V3"}
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
        "static_resources": {
            "clusters": [
                {
                    "name": CONTROL_PLANE_CLUSTER,
                    "type": "STRICT_DNS",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": CONTROL_PLANE_CLUSTER,
                        "endpoints": [
                            {"lb_endpoints": [{"endpoint": {"address": address(cp)}}]}
                            for cp in control_planes
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
            ]
        },
    }


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
        "$AIMESH_CONTROL_PLANE, then 127.0.0.1:15010)",
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
            )
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
