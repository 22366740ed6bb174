"""The routing gRPC proxy (gateway or sidecar): raw-bytes forwarding of any gRPC call."""
