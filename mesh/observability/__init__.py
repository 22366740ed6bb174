"""Observability: what the mesh tells operators about its calls (metrics, traces, audit)."""
