"""StopChecker with SmolLM2's real tokenizer: stop strings, held-back text, EOS, lengths."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.common.sampling_params import SamplingParams
from splitserve.engine.stop_checker import StopChecker
from splitserve.engine.tokenizer import Tokenizer

EOS = 2  # <|im_end|>
MAX_MODEL_LEN = 1000


@pytest.fixture(scope="module")
def tok(smollm2_dir: Path) -> Tokenizer:
    tokenizer = Tokenizer.from_dir(smollm2_dir)
    assert tokenizer.eos_token_ids == frozenset({EOS})
    return tokenizer


@pytest.fixture(scope="module")
def prompt(tok: Tokenizer) -> list[int]:
    return tok.encode("Say:")


def checker(
    tok: Tokenizer, prompt: list[int], max_model_len: int = MAX_MODEL_LEN, **kwargs: object
) -> StopChecker:
    params = SamplingParams(**{"max_tokens": 100, **kwargs})  # type: ignore[arg-type]
    return StopChecker(tok, prompt, params, tok.eos_token_ids, max_model_len)


def feed(sc: StopChecker, ids: list[int]) -> tuple[list[str], str | None, int]:
    """(deltas, finish reason, tokens consumed) feeding ids until the checker finishes."""
    deltas: list[str] = []
    for n, token_id in enumerate(ids, start=1):
        delta, reason = sc.add(token_id)
        deltas.append(delta)
        if reason is not None:
            return deltas, reason, n
    return deltas, None, len(ids)


def test_tokens_split_the_way_these_tests_assume(tok: Tokenizer) -> None:
    ids = tok.encode("Hello world, STOP here")
    assert [tok.decode([i]) for i in ids] == ["Hello", " world", ",", " ST", "OP", " here"]


def test_stop_string_split_across_tokens_is_matched_and_not_emitted(
    tok: Tokenizer, prompt: list[int]
) -> None:
    sc = checker(tok, prompt, stop="STOP")
    deltas, reason, n = feed(sc, tok.encode("Hello world, STOP here"))
    # " ST" might begin "STOP": "ST" is held back, then "OP" completes the stop string.
    assert deltas == ["Hello", " world", ",", " ", ""]
    assert (reason, n) == ("stop", 5)
    assert sc.text == "Hello world, "


def test_held_back_text_is_released_when_it_is_not_a_stop_string(
    tok: Tokenizer, prompt: list[int]
) -> None:
    sc = checker(tok, prompt, stop=["STAR"], max_tokens=6)
    deltas, reason, n = feed(sc, tok.encode("Hello world, STOP here"))
    assert deltas == ["Hello", " world", ",", " ", "STOP", " here"]
    assert (reason, n) == ("length", 6)
    assert sc.text == "Hello world, STOP here"


def test_stop_string_inside_one_token(tok: Tokenizer, prompt: list[int]) -> None:
    sc = checker(tok, prompt, stop="lo w")
    deltas, reason, n = feed(sc, tok.encode("Hello world"))
    assert deltas == ["Hel", ""]  # "lo" held back, then " world" completes "lo w"
    assert (reason, n) == ("stop", 2)
    assert sc.text == "Hel"


def test_the_earliest_stop_string_wins(tok: Tokenizer, prompt: list[int]) -> None:
    sc = checker(tok, prompt, stop=["rld", "wor"])
    deltas, reason, _ = feed(sc, tok.encode("Hello world"))
    assert deltas == ["Hello", " "]
    assert reason == "stop" and sc.text == "Hello "


PARAGRAPH = "The answer is 42.\n\nQuestion: why? Hello world, STOP here and there."


def reference_text(tok: Tokenizer, ids: list[int], stops: list[str]) -> tuple[str, int | None]:
    """The text up to the first stop string to appear, decoding growing prefixes of ids."""
    for n in range(1, len(ids) + 1):
        text = tok.decode(ids[:n])
        hits = [p for p in (text.find(s) for s in stops) if p >= 0]
        if hits:
            return text[: min(hits)], n
    return tok.decode(ids), None


@pytest.mark.parametrize(
    "stops",
    [
        ["\n\n"],
        ["Question"],
        ["4"],
        ["swer is"],
        ["on: w", "is 4"],
        [" why?"],
        ["STOP", "world, S"],
        ["there.", "xyz"],
        ["absent"],
        ["e", "zz"],
    ],
)
def test_deltas_concatenate_to_the_final_text(
    tok: Tokenizer, prompt: list[int], stops: list[str]
) -> None:
    ids = tok.encode(PARAGRAPH)
    sc = checker(tok, prompt, stop=stops, max_tokens=len(ids))
    deltas, reason, n = feed(sc, ids)
    expected, stop_at = reference_text(tok, ids, stops)
    assert "".join(deltas) == sc.text == expected
    if stop_at is None:
        assert (reason, n) == ("length", len(ids))
    else:
        assert (reason, n) == ("stop", stop_at)
    for i in range(len(deltas)):  # never emitted text that the final text lacks
        assert expected.startswith("".join(deltas[: i + 1]))


def test_eos_finishes_with_stop_and_releases_held_back_text(
    tok: Tokenizer, prompt: list[int]
) -> None:
    sc = checker(tok, prompt, stop="d!")
    deltas, reason, n = feed(sc, [*tok.encode("Hello world"), EOS, *tok.encode(" more")])
    assert deltas == ["Hello", " worl", "d"]
    assert (reason, n) == ("stop", 3)
    assert sc.text == "Hello world"


def test_ignore_eos(tok: Tokenizer, prompt: list[int]) -> None:
    sc = checker(tok, prompt, ignore_eos=True, max_tokens=4)
    deltas, reason, n = feed(sc, [*tok.encode("Hello"), EOS, *tok.encode(" world again")])
    assert deltas == ["Hello", "", " world", " again"]  # the special token is skipped
    assert (reason, n) == ("length", 4)
    assert sc.text == "Hello world again"


def test_stop_token_ids(tok: Tokenizer, prompt: list[int]) -> None:
    world = tok.encode(" world")
    assert len(world) == 1
    sc = checker(tok, prompt, stop_token_ids=world, ignore_eos=True)
    deltas, reason, n = feed(sc, tok.encode("Hello world, STOP here"))
    assert deltas == ["Hello", ""]
    assert (reason, n) == ("stop", 2)
    assert sc.text == "Hello"


def test_max_tokens_finishes_with_length_and_flushes(tok: Tokenizer, prompt: list[int]) -> None:
    sc = checker(tok, prompt, stop="STOP", max_tokens=4)
    deltas, reason, n = feed(sc, tok.encode("Hello world, STOP here"))
    assert deltas == ["Hello", " world", ",", " ST"]  # the held-back "ST" comes out at the end
    assert (reason, n) == ("length", 4)
    assert sc.text == "Hello world, ST"


def test_max_model_len_finishes_with_length(tok: Tokenizer, prompt: list[int]) -> None:
    ids = tok.encode("one two three four five six seven")
    sc = checker(tok, prompt, max_model_len=len(prompt) + 3)
    deltas, reason, n = feed(sc, ids)
    assert (reason, n) == ("length", 3)
    assert "".join(deltas) == sc.text == "one two three"


def test_without_stop_strings_every_token_is_emitted_at_once(
    tok: Tokenizer, prompt: list[int]
) -> None:
    ids = tok.encode(PARAGRAPH)
    sc = checker(tok, prompt, max_tokens=len(ids))
    deltas, reason, _ = feed(sc, ids)
    assert deltas == [tok.decode(ids[: i + 1])[len(tok.decode(ids[:i])) :] for i in range(len(ids))]
    assert reason == "length"


REPETITIVE = "abab aab ba aaab abba b a ab. ab, ba; aab abab"


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_random_stop_strings_match_a_reference(
    tok: Tokenizer, prompt: list[int], data: st.DataObject
) -> None:
    """Overlapping, repetitive stop strings (substrings of the text, so they hit) against
    decoding growing prefixes: the same final text, finish step and no text emitted twice."""
    ids = tok.encode(REPETITIVE)
    text = tok.decode(ids)
    num_stops = data.draw(st.integers(1, 3))
    stops = []
    for _ in range(num_stops):
        start = data.draw(st.integers(0, len(text) - 1))
        length = data.draw(st.integers(1, 5))
        stops.append(text[start : start + length])
    start = data.draw(st.integers(0, len(ids) - 1))
    piece = ids[start:]
    sc = checker(tok, prompt, stop=stops, max_tokens=len(piece))
    deltas, reason, n = feed(sc, piece)
    expected, stop_at = reference_text(tok, piece, stops)
    assert "".join(deltas) == sc.text == expected
    assert (reason, n) == (("length", len(piece)) if stop_at is None else ("stop", stop_at))
