"""xDS v3 for Envoy and proxyless gRPC clients, from the control plane's catalog and config."""
