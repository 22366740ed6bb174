"""A small typed facade over the Inference service: `generate()` and `stream()`.

    import grpc
    from aimesh.clients import InferenceClient

    with grpc.insecure_channel("127.0.0.1:50051") as channel:
        client = InferenceClient(channel, model="gpt-4")
        print(client.generate("Say hello").text)
        for chunk in client.stream("Tell me a story"):
            print(chunk.text, end="", flush=True)

`AsyncInferenceClient` is the same over a `grpc.aio` channel. Messages are the grpcio
generated types (`aimesh.inference.v1.inference_pb2`); for dataclasses use the betterproto2
clients in `aimesh.clients.betterproto`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, TypeAlias, TypedDict, Unpack

import grpc
import grpc.aio

from aimesh.inference.v1 import inference_pb2 as pb
from aimesh.inference.v1 import inference_pb2_grpc as pb_grpc

Prompt: TypeAlias = str | Sequence[pb.Message] | Sequence[tuple[str, str]]
Metadata: TypeAlias = Sequence[tuple[str, str | bytes]]
INSTANCE_TRAILER = "aimesh-instance"
# Sent with every call that names a model: Envoy and proxyless gRPC clients route on
# headers, not on the request body, so the mesh's model routes over xDS match this.
MODEL_HEADER = "x-aimesh-model"


class GenerateOptions(TypedDict, total=False):
    """Keyword options of generate() and stream(); see GenerateRequest in the proto."""

    max_tokens: int
    temperature: float
    stop: Sequence[str]
    seed: int | None
    system: str | None
    continuation: str


def build_request(
    prompt: Prompt,
    *,
    model: str,
    max_tokens: int = 0,
    temperature: float = 0.0,
    stop: Sequence[str] = (),
    seed: int | None = None,
    system: str | None = None,
    continuation: str = "",
) -> pb.GenerateRequest:
    """A GenerateRequest from a plain prompt, (role, content) pairs or Message objects."""
    if not model:
        raise ValueError("model is required: pass model= here or when creating the client")
    messages: list[pb.Message] = []
    if system:
        messages.append(pb.Message(role="system", content=system))
    if isinstance(prompt, str):
        messages.append(pb.Message(role="user", content=prompt))
    else:
        for m in prompt:
            messages.append(m if isinstance(m, pb.Message) else pb.Message(role=m[0], content=m[1]))
    req = pb.GenerateRequest(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=temperature,
        stop=list(stop),
        continuation=continuation,
    )
    if seed is not None:
        req.seed = seed
    return req


def instance_of(metadata: Any) -> str:
    """The `aimesh-instance` trailer: which instance served a call ('' if none said)."""
    for key, value in metadata or ():  # a sequence of (key, value) pairs
        if key == INSTANCE_TRAILER:
            return value.decode() if isinstance(value, bytes) else value
    return ""


class _ClientBase:
    """What the blocking and the asyncio client share: defaults applied to every call."""

    def __init__(
        self,
        channel: grpc.Channel | grpc.aio.Channel,
        *,
        model: str = "",
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> None:
        # Typed per subclass by the methods; the generated stub is sync or async by channel.
        self.stub: Any = pb_grpc.InferenceStub(channel)  # type: ignore[arg-type]
        self.model = model
        self.timeout = timeout
        self.metadata = tuple(metadata)

    def _request(self, prompt: Prompt, model: str, options: GenerateOptions) -> pb.GenerateRequest:
        return build_request(prompt, model=model or self.model, **options)

    def _embed_request(self, inputs: Sequence[str], model: str, dimensions: int) -> pb.EmbedRequest:
        return pb.EmbedRequest(
            model=model or self.model, inputs=list(inputs), dimensions=dimensions
        )

    def _call_options(self, timeout: float | None, model: str = "") -> dict[str, Any]:
        # Only a model name gRPC metadata can carry (printable ASCII): another is still
        # sent in the request, and routed on by the aimesh proxy, not by xDS consumers.
        sendable = model and model.isascii() and model.isprintable()
        metadata = (*self.metadata, (MODEL_HEADER, model)) if sendable else self.metadata
        return {"timeout": timeout or self.timeout, "metadata": metadata}


class InferenceClient(_ClientBase):
    """Blocking client over a `grpc.Channel`."""

    def generate(
        self,
        prompt: Prompt,
        *,
        model: str = "",
        timeout: float | None = None,
        **options: Unpack[GenerateOptions],
    ) -> pb.GenerateResponse:
        req = self._request(prompt, model, options)
        response: pb.GenerateResponse = self.stub.Generate(
            req, **self._call_options(timeout, req.model)
        )
        return response

    def stream(
        self,
        prompt: Prompt,
        *,
        model: str = "",
        timeout: float | None = None,
        **options: Unpack[GenerateOptions],
    ) -> Iterator[pb.GenerateChunk]:
        req = self._request(prompt, model, options)
        call = self.stub.GenerateStream(req, **self._call_options(timeout, req.model))
        try:
            yield from call
        finally:
            call.cancel()  # type: ignore[no-untyped-call]  # an early stop must not leave the backend generating

    def embed(
        self,
        inputs: Sequence[str],
        *,
        model: str = "",
        dimensions: int = 0,
        timeout: float | None = None,
    ) -> pb.EmbedResponse:
        req = self._embed_request(inputs, model, dimensions)
        response: pb.EmbedResponse = self.stub.Embed(req, **self._call_options(timeout, req.model))
        return response

    def list_models(self, *, timeout: float | None = None) -> list[pb.ModelInfo]:
        resp: pb.ListModelsResponse = self.stub.ListModels(
            pb.ListModelsRequest(), **self._call_options(timeout)
        )
        return list(resp.models)


class TokenStream:
    """An async iterator of chunks that also tells, once done, who served the call."""

    def __init__(self, call: grpc.aio.UnaryStreamCall) -> None:  # type: ignore[type-arg]
        self.call = call

    def __aiter__(self) -> AsyncIterator[pb.GenerateChunk]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[pb.GenerateChunk]:
        try:
            async for chunk in self.call:
                yield chunk
        finally:
            self.call.cancel()  # type: ignore[no-untyped-call]

    async def text(self) -> str:
        return "".join([c.text async for c in self])

    async def instance(self) -> str:
        return instance_of(await self.call.trailing_metadata())

    def cancel(self) -> bool:
        return bool(self.call.cancel())


class AsyncInferenceClient(_ClientBase):
    """Asyncio client over a `grpc.aio.Channel`."""

    async def generate(
        self,
        prompt: Prompt,
        *,
        model: str = "",
        timeout: float | None = None,
        **options: Unpack[GenerateOptions],
    ) -> pb.GenerateResponse:
        req = self._request(prompt, model, options)
        response: pb.GenerateResponse = await self.stub.Generate(
            req, **self._call_options(timeout, req.model)
        )
        return response

    def stream(
        self,
        prompt: Prompt,
        *,
        model: str = "",
        timeout: float | None = None,
        **options: Unpack[GenerateOptions],
    ) -> TokenStream:
        req = self._request(prompt, model, options)
        return TokenStream(self.stub.GenerateStream(req, **self._call_options(timeout, req.model)))

    async def embed(
        self,
        inputs: Sequence[str],
        *,
        model: str = "",
        dimensions: int = 0,
        timeout: float | None = None,
    ) -> pb.EmbedResponse:
        req = self._embed_request(inputs, model, dimensions)
        response: pb.EmbedResponse = await self.stub.Embed(
            req, **self._call_options(timeout, req.model)
        )
        return response

    async def list_models(self, *, timeout: float | None = None) -> list[pb.ModelInfo]:
        resp: pb.ListModelsResponse = await self.stub.ListModels(
            pb.ListModelsRequest(), **self._call_options(timeout)
        )
        return list(resp.models)
