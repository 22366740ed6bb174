"""The aimesh control plane: registry, declarative config and status (`aimesh control-plane`)."""

# The control plane's gRPC port when none is given (Istio's istiod uses the same number
# for plaintext xDS, so a mesh operator's firewall rules likely know it already).
DEFAULT_PORT = 15010
