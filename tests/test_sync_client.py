"""The blocking client surface (generated grpcio stub and the InferenceClient facade) on
pytest-grpc's fixtures.

pytest-grpc runs a sync `grpc.server`; its servicer here relays each call to a real sim
backend process, so the sync clients see real text, errors and trailers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from aimesh.clients import InferenceClient, instance_of
from aimesh.inference.v1 import inference_pb2 as pb
from aimesh.inference.v1 import inference_pb2_grpc as pb_grpc


def _timeout(context: grpc.ServicerContext) -> float | None:
    # grpcio reports "no deadline" as a huge number of seconds, or None.
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < 3600 else None


class SyncRelay(pb_grpc.InferenceServicer):
    """A blocking servicer that forwards to another Inference server, errors and trailers too."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.InferenceStub(self.channel)

    def _unary(self, method: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            response, call = method.with_call(request, timeout=_timeout(context))
        except grpc.RpcError as exc:
            context.set_trailing_metadata(exc.trailing_metadata())  # type: ignore[attr-defined]
            context.abort(exc.code(), exc.details())  # type: ignore[attr-defined]
        context.set_trailing_metadata(call.trailing_metadata())
        return response

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self._unary(self.stub.Generate, request, context)

    def Embed(self, request: pb.EmbedRequest, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self._unary(self.stub.Embed, request, context)

    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self._unary(self.stub.ListModels, request, context)

    def GenerateStream(  # noqa: N802
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateChunk]:
        call = self.stub.GenerateStream(request, timeout=_timeout(context))
        context.add_callback(call.cancel)
        try:
            yield from call
        except grpc.RpcError as exc:
            context.set_trailing_metadata(exc.trailing_metadata())  # type: ignore[attr-defined]
            context.abort(exc.code(), exc.details())  # type: ignore[attr-defined]
        context.set_trailing_metadata(call.trailing_metadata())


@pytest.fixture(scope="module")
def grpc_add_to_server() -> Any:
    return pb_grpc.add_InferenceServicer_to_server


@pytest.fixture(scope="module")
def grpc_servicer(sim_process_address: str) -> SyncRelay:
    return SyncRelay(sim_process_address)


@pytest.fixture(scope="module")
def grpc_stub_cls(grpc_channel: grpc.Channel) -> Any:
    return pb_grpc.InferenceStub


def test_generated_stub_unary_and_stream(grpc_stub: pb_grpc.InferenceStub) -> None:
    req = pb.GenerateRequest(
        model="gpt-4", messages=[pb.Message(role="user", content="hey")], max_tokens=8
    )
    response, call = grpc_stub.Generate.with_call(req)
    chunks = list(grpc_stub.GenerateStream(req))
    assert response.usage.completion_tokens == 8
    assert "".join(c.text for c in chunks) == response.text
    assert instance_of(call.trailing_metadata()) == "sim-proc"


def test_facade_generate_stream_embed_and_models(grpc_channel: grpc.Channel) -> None:
    client = InferenceClient(grpc_channel, model="gpt-4", timeout=10)
    full = client.generate("Tell me about meshes", seed=1, max_tokens=20)
    streamed = "".join(c.text for c in client.stream("Tell me about meshes", seed=1, max_tokens=20))
    assert streamed == full.text
    assert full.finish_reason == pb.FINISH_REASON_LENGTH
    sys_first = client.generate([("system", "be brief"), ("user", "hi")], max_tokens=3)
    assert sys_first.usage.prompt_tokens == 3
    assert [len(e.values) for e in client.embed(["a", "b"], dimensions=16).embeddings] == [16, 16]
    assert {m.id for m in client.list_models()} == {"gpt-4", "claude-3-5-sonnet"}


def test_facade_surfaces_status_and_message(grpc_channel: grpc.Channel) -> None:
    client = InferenceClient(grpc_channel, model="no-such-model", timeout=10)
    with pytest.raises(grpc.RpcError) as info:
        client.generate("hi")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    assert "no-such-model" in info.value.details()  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="model is required"):
        InferenceClient(grpc_channel).generate("hi")
    # A name metadata cannot carry (x-aimesh-model) still reaches the backend in the body.
    with pytest.raises(grpc.RpcError) as info:
        InferenceClient(grpc_channel, model="modèle", timeout=10).generate("hi")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    assert "modèle" in info.value.details()  # type: ignore[attr-defined]


def test_facade_stream_stops_early_without_error(grpc_channel: grpc.Channel) -> None:
    client = InferenceClient(grpc_channel, model="gpt-4", timeout=10)
    stream = client.stream("long answer please", max_tokens=50)
    first = next(iter(stream))
    stream.close()  # type: ignore[attr-defined]
    assert first.text
