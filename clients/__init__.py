"""Python clients for aimesh services.

- `InferenceClient` / `AsyncInferenceClient`: a typed facade (generate, stream, embed).
- `aimesh.clients.betterproto`: betterproto2 dataclasses and stubs generated from protos/
  (`InferenceStub` on grpcio, `InferenceAsyncStub` on grpclib).
"""

from .inference import (
    AsyncInferenceClient,
    InferenceClient,
    TokenStream,
    build_request,
    instance_of,
)

__all__ = ["AsyncInferenceClient", "InferenceClient", "TokenStream", "build_request", "instance_of"]
