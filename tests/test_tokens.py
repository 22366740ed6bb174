"""The sim backend's pure text generation: determinism, resume points, stop sequences."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from aimesh.mesh.sim.tokens import Completion, StopMatcher, count_tokens, embedding, split_tokens


def _completion(prompt: str = "hello", seed: int | None = 7) -> Completion:
    return Completion.for_prompt("gpt-4", [("user", prompt)], seed, (16, 64))


def test_same_prompt_and_seed_give_the_same_tokens() -> None:
    a, b = _completion(), _completion()
    assert a.text(50) == b.text(50)
    assert a.natural_length == b.natural_length
    assert 16 <= a.natural_length <= 64


def test_seed_model_and_prompt_each_change_the_text() -> None:
    base = _completion().text(20)
    assert _completion(seed=8).text(20) != base
    assert _completion(prompt="hello!").text(20) != base
    other_model = Completion.for_prompt("claude", [("user", "hello")], 7, (16, 64))
    assert other_model.text(20) != base


@given(st.integers(min_value=0, max_value=60))
def test_generated_text_splits_back_into_its_tokens(n: int) -> None:
    c = _completion()
    text = c.text(n)
    assert count_tokens(text) == n
    assert split_tokens(text) == [c.token(i) for i in range(n)]


@given(st.integers(min_value=0, max_value=400))
def test_resume_after_any_character_prefix_rebuilds_the_same_text(cut: int) -> None:
    c = _completion()
    full = c.text(80)
    prefix = full[: min(cut, len(full))]
    pos, owed = c.resume_point(prefix)
    rest = "".join(c.token(i) for i in range(pos, 80))
    assert prefix + owed + rest == full


def test_resume_point_for_foreign_text_counts_tokens() -> None:
    assert _completion().resume_point("Something else entirely") == (3, "")


@given(
    tokens=st.lists(st.text(alphabet="ab .", min_size=1, max_size=4), max_size=30),
    stops=st.lists(st.text(alphabet="ab .", min_size=1, max_size=3), max_size=3),
)
def test_stop_matcher_cuts_at_the_first_stop_whatever_the_token_split(
    tokens: list[str], stops: list[str]
) -> None:
    matcher = StopMatcher(stops)
    out = []
    stopped = False
    for t in tokens:
        emit, stopped = matcher.feed(t)
        out.append(emit)
        if stopped:
            break
    if not stopped:
        out.append(matcher.flush())
    # Generation is checked after every token: at the first token after which some stop
    # sequence appears in the text, the text is cut where the earliest one starts.
    expected, hit = "".join(tokens), False
    for n in range(1, len(tokens) + 1):
        text = "".join(tokens[:n])
        cuts = [i for s in stops if s and (i := text.find(s)) >= 0]
        if cuts:
            expected, hit = text[: min(cuts)], True
            break
    assert "".join(out) == expected
    assert stopped == hit


def test_stop_matcher_holds_back_a_possible_stop_prefix() -> None:
    m = StopMatcher(["END"])
    assert m.feed("the E") == ("the ", False)
    assert m.feed("N") == ("", False)
    assert m.feed("X") == ("ENX", False)


def test_embeddings_are_deterministic_unit_vectors() -> None:
    v = embedding("hello", "m", 64)
    assert v == embedding("hello", "m", 64)
    assert v != embedding("hello!", "m", 64)
    assert len(v) == 64
    assert abs(sum(x * x for x in v) - 1.0) < 1e-9
