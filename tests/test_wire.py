"""The proxy's cheap routing-key read agrees with protobuf's own parser."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from aimesh.inference.v1 import inference_pb2 as pb
from aimesh.mesh.proxy.wire import read_string_field


@given(
    model=st.text(max_size=40),
    content=st.text(max_size=200),
    max_tokens=st.integers(min_value=-(2**31), max_value=2**31 - 1),
    temperature=st.floats(width=32, allow_nan=False),
    seed=st.one_of(st.none(), st.integers(min_value=-(2**63), max_value=2**63 - 1)),
)
def test_reads_the_model_of_any_generate_request(
    model: str, content: str, max_tokens: int, temperature: float, seed: int | None
) -> None:
    req = pb.GenerateRequest(
        model=model,
        messages=[pb.Message(role="user", content=content)],
        max_tokens=max_tokens,
        temperature=temperature,
        stop=["x"],
    )
    if seed is not None:
        req.seed = seed
    got = read_string_field(req.SerializeToString(), 1)
    assert got == (model or None)


def test_model_after_other_fields_and_repeated_last_wins() -> None:
    tail = pb.GenerateRequest(max_tokens=5).SerializeToString()
    data = tail + pb.GenerateRequest(model="a").SerializeToString()
    data += pb.GenerateRequest(model="b").SerializeToString()
    assert read_string_field(data, 1) == "b"


@given(st.binary(max_size=64))
def test_garbage_never_raises(data: bytes) -> None:
    result = read_string_field(data, 1)
    assert result is None or isinstance(result, str)
