"""engine.tokenizer against transformers' tokenizer, and the incremental detokenizer's
deltas against a one-shot decode."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello, world! The year 2024 had 366 days.",
    "  leading spaces\tand tabs\n\nnewlines  ",
    "Grüße aus Köln, ça va? Ñandú.",
    "Привет, как дела?",
    "日本語のテキストと中文文本。",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "def f(x):\n    return x ** 2  # code",
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"},
     {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke about the number 7."}],
    [{"role": "system", "content": "You answer in French."},
     {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "Quatre."}],
]


@pytest.fixture(scope="module")
def tok(smollm2_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(smollm2_dir)


@pytest.fixture(scope="module")
def hf_tok(smollm2_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def byte_token_ids(tok: Tokenizer) -> list[int]:
    """The one-character tokens of the byte-level alphabet (235 of the 256 bytes here):
    most are a lone UTF-8 lead or continuation byte, the raw material of split characters."""
    ids = sorted(i for t, i in tok.backend.get_vocab().items() if len(t) == 1)
    assert len(ids) > 200
    return ids


def test_special_ids_and_sizes(tok: Tokenizer, hf_tok: Any) -> None:
    assert tok.eos_token_ids == frozenset({2})
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok.vocab_size == len(hf_tok) == 49152


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok: Tokenizer, hf_tok: Any, text: str) -> None:
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    tok: Tokenizer, hf_tok: Any, messages: list[dict[str, str]], add_generation_prompt: bool
) -> None:
    expected = hf_tok.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True
    )["input_ids"]
    assert tok.apply_chat_template(messages, add_generation_prompt) == expected
    text = tok.apply_chat_template_text(messages, add_generation_prompt)
    assert text == hf_tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_generation_config_eos_and_missing_template(smollm2_dir: Path, tmp_path: Path) -> None:
    shutil.copyfile(smollm2_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    shutil.copyfile(smollm2_dir / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.eos_token_ids == frozenset({0, 2})
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path / "missing")


def test_tokenizer_module_is_torch_free(smollm2_dir: Path) -> None:
    code = (
        "import sys; from splitserve.engine.tokenizer import Tokenizer; "
        f"t = Tokenizer.from_dir({str(smollm2_dir)!r}); "
        "assert t.apply_chat_template([{'role': 'user', 'content': 'hi'}]); "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


# ---------------------------------------------------------------- incremental detokenizer


def _stream(
    tok: Tokenizer, prompt: list[int], output: list[int], chunks: list[int],
    skip_special_tokens: bool = True,
) -> tuple[list[str], IncrementalDetokenizer]:
    """Feed ``output`` in chunks of the given sizes (cycled); return all deltas."""
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip_special_tokens)
    deltas, i, k = [], 0, 0
    while i < len(output):
        size = chunks[k % len(chunks)]
        deltas.append(detok.add(output[i:i + size]))
        i, k = i + size, k + 1
    deltas.append(detok.flush())
    return deltas, detok


@st.composite
def _token_ids(draw: st.DrawFn, byte_ids: list[int], max_size: int) -> list[int]:
    # Mix any token, byte-alphabet tokens (split UTF-8) and special tokens (ids 0..16).
    one = st.one_of(st.integers(0, 49151), st.sampled_from(byte_ids), st.integers(0, 16))
    return draw(st.lists(one, max_size=max_size))


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_deltas_concatenate_to_full_decode(
    tok: Tokenizer, byte_token_ids: list[int], data: st.DataObject
) -> None:
    prompt = data.draw(_token_ids(byte_token_ids, 8), label="prompt")
    output = data.draw(_token_ids(byte_token_ids, 40), label="output")
    chunks = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=4), label="chunks")
    skip = data.draw(st.booleans(), label="skip_special_tokens")
    deltas, detok = _stream(tok, prompt, output, chunks, skip)
    full = tok.decode(output, skip_special_tokens=skip)
    assert "".join(deltas) == full == detok.text
    assert detok.output_token_ids == output
    if "\ufffd" not in full:
        assert not any("\ufffd" in delta for delta in deltas)


def test_split_character_is_held_back(tok: Tokenizer) -> None:
    emoji = [tok.backend.token_to_id(c) for c in "ðŁĺĢ"]  # the 4 bytes F0 9F 98 80 of 😀
    detok = IncrementalDetokenizer(tok, tok.encode("Say:"))
    assert [detok.add([i]) for i in emoji] == ["", "", "", "😀"]
    # A prompt ending inside a character: its continuation bytes are orphans in the output.
    deltas, _ = _stream(tok, tok.encode("Say:") + emoji[:2], emoji[2:], [1])
    assert "".join(deltas) == tok.decode(emoji[2:]) == "\ufffd\ufffd"
    # Never-completed bytes come out only at flush().
    detok = IncrementalDetokenizer(tok, [])
    assert detok.add(emoji[:3]) == "" and detok.flush() == "\ufffd"


@pytest.mark.parametrize("text", TEXTS)
def test_real_text_streams_exactly(tok: Tokenizer, text: str) -> None:
    prompt = tok.apply_chat_template([{"role": "user", "content": "Repeat after me."}])
    output = tok.encode(text)
    deltas, detok = _stream(tok, prompt, output, [1])
    assert "".join(deltas) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")
    assert not any("\ufffd" in delta for delta in deltas)
    assert detok.text == "".join(deltas)


def test_decode_window_stays_small(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each step decodes a few recent tokens, not the whole sequence."""
    lengths: list[int] = []
    real_decode = tok.decode

    def spy(ids: list[int], skip_special_tokens: bool = True) -> str:
        lengths.append(len(ids))
        return real_decode(ids, skip_special_tokens)

    output = tok.encode(" ".join(TEXTS) * 4)
    assert len(output) > 400
    detok = IncrementalDetokenizer(tok, tok.encode("a prompt of several tokens here"))
    monkeypatch.setattr(tok, "decode", spy)
    streamed = "".join(detok.add([i]) for i in output) + detok.flush()
    assert streamed == real_decode(output)
    # 5 prompt tokens + 1; afterwards the held-back bytes of one character at most.
    assert max(lengths) <= 8
