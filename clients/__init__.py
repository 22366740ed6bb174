"""Python clients for aimesh services.

- `InferenceClient` / `AsyncInferenceClient`: a typed facade (generate, stream, embed).
- `MeshChannel`: a proxyless mesh client (routing, balancing, retries, resumable streams
  in-process), usable with the generated grpc.aio stubs.
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

__all__ = [
    "AsyncInferenceClient",
    "InferenceClient",
    "MeshChannel",
    "TokenStream",
    "build_request",
    "instance_of",
]


def __getattr__(name: str) -> object:
    # MeshChannel brings the whole routing stack (config, balancers, proxy core); load it
    # only for the apps that use it.
    if name == "MeshChannel":
        from .mesh_channel import MeshChannel

        return MeshChannel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
