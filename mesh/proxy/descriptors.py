"""What the services behind the proxy look like, learned through their own reflection.

The proxy uses it twice: to serve reflection for those services (so `grpcurl PROXY list`,
`describe` and calls work against the proxy as against a backend), and to know each
method's call type, so it can use the cheaper handler for unary and server-streaming
methods instead of the general stream-stream one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import grpc
import grpc.aio
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2

from .cluster import SS, SU, US, UU

log = logging.getLogger("aimesh.proxy.descriptors")

_SKIP = ("grpc.reflection.", "grpc.health.")


def kind_of(method: descriptor_pb2.MethodDescriptorProto) -> str:
    return {(False, False): UU, (False, True): US, (True, False): SU, (True, True): SS}[
        (method.client_streaming, method.server_streaming)
    ]


class Catalog:
    """A descriptor pool of the services behind the proxy, and their methods' call types."""

    def __init__(self, seed_files: Iterable[str] = ()) -> None:
        self.pool = descriptor_pool.DescriptorPool()
        self.files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
        self.services: set[str] = set()
        self.kinds: dict[str, str] = {}
        for name in seed_files:
            self._add_from_default(name)

    def _add_from_default(self, name: str) -> bool:
        try:
            fd = descriptor_pool.Default().FindFileByName(name)
        except KeyError:
            return False
        fdp = descriptor_pb2.FileDescriptorProto()
        fd.CopyToProto(fdp)
        self.add([fdp])
        return True

    def add(self, files: Iterable[descriptor_pb2.FileDescriptorProto]) -> int:
        """Adds files (any order), dependencies first; returns how many services are new."""
        pending = {f.name: f for f in files if f.name not in self.files}
        before = len(self.services)
        progress = True
        while pending and progress:
            progress = False
            for name, fdp in list(pending.items()):
                missing = [d for d in fdp.dependency if d not in self.files]
                for dep in missing:
                    if dep not in pending and self._add_from_default(dep):
                        missing.remove(dep)
                if any(d not in self.files for d in fdp.dependency):
                    continue
                self.pool.Add(fdp)
                self.files[name] = fdp
                del pending[name]
                progress = True
                for svc in fdp.service:
                    full = f"{fdp.package}.{svc.name}" if fdp.package else svc.name
                    self.services.add(full)
                    for m in svc.method:
                        self.kinds[f"/{full}/{m.name}"] = kind_of(m)
        for name in pending:
            log.warning("descriptor %s skipped: its dependencies were not offered", name)
        return len(self.services) - before


async def fetch(
    channel: grpc.aio.Channel, timeout: float = 5.0
) -> list[descriptor_pb2.FileDescriptorProto]:
    """Every file (with dependencies) behind the services a server lists via reflection."""
    call: Any = channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )(timeout=timeout)  # type: ignore[call-arg]
    try:
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        listing = await call.read()
        names = [
            s.name for s in listing.list_services_response.service if not s.name.startswith(_SKIP)
        ]
        files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
        for name in names:
            await call.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol=name))
            resp = await call.read()
            for raw in resp.file_descriptor_response.file_descriptor_proto:
                fdp = descriptor_pb2.FileDescriptorProto.FromString(raw)
                files.setdefault(fdp.name, fdp)
        await call.done_writing()
        return list(files.values())
    finally:
        call.cancel()


async def discover(catalog: Catalog, channel: grpc.aio.Channel, label: str) -> None:
    try:
        added = catalog.add(await fetch(channel))
    except (TimeoutError, grpc.aio.AioRpcError) as exc:
        log.info("reflection from %s not available: %s", label, exc)
        return
    if added:
        log.info("learned %d service(s) from %s", added, label)
