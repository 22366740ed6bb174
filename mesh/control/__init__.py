"""The aimesh control plane: registry, declarative config and status (`aimesh control-plane`)."""
