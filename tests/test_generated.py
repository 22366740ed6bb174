"""Generated code: fresh against protos/, and every generated client works on a live backend."""

from __future__ import annotations

from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpclib.client import Channel as GrpclibChannel

from aimesh.clients.betterproto.aimesh.inference import v1 as bp
from aimesh.mesh import protogen
from aimesh.mesh.sim.server import RunningSim

ROOT = Path(__file__).resolve().parents[1]


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def _problems(committed: Path, fresh: Path) -> list[str]:
    old, new = _files(committed), _files(fresh)
    return (
        [
            f"stale: {committed.name}/{n}"
            for n in sorted(old.keys() & new.keys())
            if old[n] != new[n]
        ]
        + [f"missing: {committed.name}/{n}" for n in sorted(new.keys() - old.keys())]
        + [f"left over: {committed.name}/{n}" for n in sorted(old.keys() - new.keys())]
    )


def test_generated_code_is_fresh_byte_for_byte(tmp_path: Path) -> None:
    gen, clients = tmp_path / "gen", tmp_path / "betterproto"
    protogen.generate(ROOT / "protos", gen, clients)
    problems = _problems(ROOT / "gen", gen) + _problems(ROOT / "clients" / "betterproto", clients)
    assert not problems, "generated code differs from protos/; run `make proto` and commit:\n" + (
        "\n".join(problems)
    )


def _request() -> bp.GenerateRequest:
    return bp.GenerateRequest(
        model="gpt-4", messages=[bp.Message(role="user", content="hi")], seed=11, max_tokens=12
    )


async def test_betterproto2_async_client_on_grpclib(sim: RunningSim) -> None:
    channel = GrpclibChannel("127.0.0.1", sim.port)
    try:
        stub = bp.InferenceAsyncStub(channel)
        unary = await stub.generate(_request())
        chunks = [c async for c in stub.generate_stream(_request())]
        models = await stub.list_models(bp.ListModelsRequest())
    finally:
        channel.close()
    assert unary.finish_reason == bp.FinishReason.LENGTH
    assert unary.usage is not None and unary.usage.completion_tokens == 12
    assert "".join(c.text for c in chunks) == unary.text
    assert chunks[-1].finish_reason == bp.FinishReason.LENGTH
    assert [m.id for m in models.models] == ["claude-3-5-sonnet", "gpt-4"]


def test_betterproto2_sync_client_on_grpcio(sim_process_address: str) -> None:
    with grpc.insecure_channel(sim_process_address) as channel:
        stub = bp.InferenceStub(channel)
        unary = stub.generate(_request())
        chunks = list(stub.generate_stream(_request()))
        emb = stub.embed(bp.EmbedRequest(model="gpt-4", inputs=["a"], dimensions=4))
    assert "".join(c.text for c in chunks) == unary.text
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert len(emb.embeddings[0].values) == 4


def test_betterproto2_sync_client_maps_errors(sim_process_address: str) -> None:
    with grpc.insecure_channel(sim_process_address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            bp.InferenceStub(channel).generate(bp.GenerateRequest(model="gpt-4"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
