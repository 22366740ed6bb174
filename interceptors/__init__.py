"""grpc.aio interceptors of the mesh, one concern per module.

- `decode`: a request that does not parse gets INTERNAL with a message naming the type,
  instead of grpc's UNKNOWN with a Python traceback class name.
"""

from .decode import DecodeErrorInterceptor

__all__ = ["DecodeErrorInterceptor"]
