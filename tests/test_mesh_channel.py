"""The proxyless MeshChannel: the proxy's routing and resilience, no proxy hop."""

from __future__ import annotations

from collections import Counter

import grpc
import grpc.aio
import pytest

from aimesh.clients import MeshChannel
from aimesh.inference.v1 import inference_pb2 as pb
from aimesh.inference.v1 import inference_pb2_grpc as pb_grpc
from aimesh.mesh.config import load_dict
from aimesh.mesh.sim.faults import Faults

from .support import SimFactory, mesh_doc, prompt


async def test_generated_stub_over_mesh_channel_routes_and_balances(make_sim: SimFactory) -> None:
    a, b = await make_sim(instance_id="a"), await make_sim(instance_id="b")
    claude = await make_sim(instance_id="claude")
    cfg = load_dict(
        mesh_doc(
            [
                {"name": "gpt", "models": ["gpt-4"], "loadBalancer": {"algorithm": "round_robin"}},
                {"name": "claude", "models": ["claude-3-5-sonnet"]},
            ]
        ),
        source="test",
    )
    async with MeshChannel(
        cfg,
        endpoints={
            "gpt": [f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"],
            "claude": [f"127.0.0.1:{claude.port}"],
        },
    ) as ch:
        stub = pb_grpc.InferenceStub(ch)
        for i in range(10):
            reply = await stub.Generate(prompt(str(i), max_tokens=3), timeout=5)
            assert reply.usage.completion_tokens == 3
        assert (a.backend.stats.calls, b.backend.stats.calls) == (5, 5)
        chunks = [c async for c in stub.GenerateStream(prompt(model="claude-3-5-sonnet"))]
        assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP
        assert claude.backend.stats.calls == 1
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Generate(prompt(model="nope"))
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_mesh_channel_retries_and_keeps_backend_errors(make_sim: SimFactory) -> None:
    good = await make_sim(instance_id="good")
    bad = await make_sim(instance_id="bad", faults=Faults(error_rate=1.0))
    cfg = load_dict(
        mesh_doc(
            [
                {
                    "name": "gpt",
                    "models": ["gpt-4"],
                    "loadBalancer": {
                        "algorithm": "round_robin",
                        "outlierDetection": {"consecutiveErrors": 1000},
                    },
                }
            ],
            [
                {
                    "name": "all",
                    "routes": [{"destination": "gpt"}],
                    "retry": {"attempts": 3, "backoff": {"base": "1ms", "max": "2ms"}},
                }
            ],
        ),
        source="t",
    )
    async with MeshChannel(
        cfg, endpoints={"gpt": [f"127.0.0.1:{good.port}", f"127.0.0.1:{bad.port}"]}
    ) as ch:
        stub = pb_grpc.InferenceStub(ch)
        for i in range(10):
            await stub.Generate(prompt(str(i), max_tokens=1), timeout=5)
        assert good.backend.stats.calls == 10
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Generate(prompt(max_tokens=-1))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_tokens: must not be negative" in (info.value.details() or "")


async def test_mesh_channel_resumes_a_broken_stream(make_sim: SimFactory) -> None:
    dying = await make_sim(
        instance_id="dying", faults=Faults(die_after_tokens=7), length_range=(40, 40)
    )
    spare = await make_sim(instance_id="spare", length_range=(40, 40))
    cfg = load_dict(
        mesh_doc(
            [{"name": "gpt", "models": ["gpt-4"]}, {"name": "spare"}],
            [{"name": "all", "routes": [{"destination": "gpt"}], "backups": ["spare"]}],
        ),
        source="t",
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{spare.port}") as direct:
        expected = "".join(
            [c.text async for c in pb_grpc.InferenceStub(direct).GenerateStream(prompt(seed=4))]
        )
    async with MeshChannel(
        cfg, endpoints={"gpt": [f"127.0.0.1:{dying.port}"], "spare": [f"127.0.0.1:{spare.port}"]}
    ) as ch:
        chunks = [c async for c in pb_grpc.InferenceStub(ch).GenerateStream(prompt(seed=4))]
    assert "".join(c.text for c in chunks) == expected
    assert [c.index for c in chunks] == list(range(40))
    served = Counter({"dying": dying.backend.stats.calls, "spare": spare.backend.stats.calls})
    assert served == {"dying": 1, "spare": 2}  # the direct call, then the resumed half
