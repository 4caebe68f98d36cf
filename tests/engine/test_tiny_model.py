"""engine.tiny_model: random-weight model directories that transformers loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from splitserve.engine.model_files import load_config
from splitserve.engine.tiny_model import write_tiny_model
from splitserve.engine.tokenizer import Tokenizer

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def _keys(model_dir: Path) -> set[str]:
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def _load(model_dir: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _top2_gaps(model: Any, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        top2 = model(ids).logits.topk(2, dim=-1).values
    return (top2[..., 0] - top2[..., 1]).flatten()


def test_llama_config_and_tensors(tiny_llama: Path) -> None:
    config = load_config(tiny_llama)
    assert config["architectures"] == ["LlamaForCausalLM"]
    got = {k: config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                  "num_attention_heads", "num_key_value_heads", "head_dim",
                                  "vocab_size", "tie_word_embeddings", "eos_token_id")}
    assert got == {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                   "vocab_size": 49152, "tie_word_embeddings": False, "eos_token_id": 2}
    keys = _keys(tiny_llama)
    assert "lm_head.weight" in keys
    assert not any(k.endswith(".bias") for k in keys)
    model = _load(tiny_llama)
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (2 * 16, 64)


def test_generate_matches_uncached_greedy_loop(tiny_llama: Path) -> None:
    model = _load(tiny_llama)
    prompt = torch.tensor([Tokenizer.from_dir(tiny_llama).encode("The quick brown fox")])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(16):
            next_id = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    assert out.tolist() == ids.tolist()
    assert len(set(out[0, prompt.shape[1]:].tolist())) > 4  # not stuck on one token


def test_default_init_gives_clear_greedy_choices(tiny_llama: Path, tmp_path: Path) -> None:
    gaps = _top2_gaps(_load(tiny_llama))
    assert gaps.median() > 0.1
    assert (gaps < 1e-3).float().mean() < 0.02
    # The usual std of 0.02 would fail this: near-uniform logits.
    weak = _top2_gaps(_load(write_tiny_model(tmp_path / "weak", init_std=0.02)))
    assert weak.median() < 0.05


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = write_tiny_model(tmp_path / "a", seed=7)
    b = write_tiny_model(tmp_path / "b", seed=7)
    c = write_tiny_model(tmp_path / "c", seed=8)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_qwen2_has_qkv_biases(tiny_qwen2: Path) -> None:
    assert load_config(tiny_qwen2)["architectures"] == ["Qwen2ForCausalLM"]
    keys = _keys(tiny_qwen2)
    for layer in range(2):
        prefix = f"model.layers.{layer}.self_attn."
        assert {prefix + p + "_proj.bias" for p in "qkv"} <= keys
        assert prefix + "o_proj.bias" not in keys
    model = _load(tiny_qwen2)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.model.layers[0].self_attn.q_proj.bias.abs().min() > 0


def test_tied_embeddings(tiny_llama_mha_tied: Path) -> None:
    assert "lm_head.weight" not in _keys(tiny_llama_mha_tied)
    assert load_config(tiny_llama_mha_tied)["tie_word_embeddings"] is True
    model = _load(tiny_llama_mha_tied)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_llama3_rope_scaling_and_head_dim(tmp_path: Path) -> None:
    common: dict[str, Any] = dict(head_dim=32, rope_theta=500000.0, seed=3)
    scaled = write_tiny_model(tmp_path / "scaled", rope_scaling=LLAMA3_SCALING, **common)
    plain = write_tiny_model(tmp_path / "plain", **common)
    config = load_config(scaled)
    assert config["rope_scaling"] == LLAMA3_SCALING
    assert (config["rope_theta"], config["head_dim"]) == (500000.0, 32)
    # Same weights, different RoPE: logits agree at position 0 and differ later.
    assert (scaled / "model.safetensors").read_bytes() == (plain / "model.safetensors").read_bytes()
    ids = torch.arange(100, 140)[None]
    with torch.no_grad():
        a, b = _load(scaled)(ids).logits, _load(plain)(ids).logits
    assert _load(scaled).model.layers[0].self_attn.q_proj.weight.shape == (4 * 32, 64)
    torch.testing.assert_close(a[:, 0], b[:, 0])
    assert (a[:, -1] - b[:, -1]).abs().max() > 1e-3


def test_tokenizer_and_dtype(tmp_path: Path, smollm2_dir: Path) -> None:
    model_dir = write_tiny_model(tmp_path / "bf16", arch="qwen2", dtype="bfloat16")
    text = "Tokenize me, 123 😀"
    assert Tokenizer.from_dir(model_dir).encode(text) == Tokenizer.from_dir(smollm2_dir).encode(text)
    assert (model_dir / "chat_template.jinja").is_file()
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    assert json.loads((model_dir / "config.json").read_text())["dtype"] == "bfloat16"


def test_small_vocab_without_tokenizer_and_bad_args(tmp_path: Path) -> None:
    model_dir = write_tiny_model(tmp_path / "v", vocab_size=300, tokenizer_from=None)
    assert not (model_dir / "tokenizer.json").exists()
    assert _load(model_dir).lm_head.weight.shape == (300, 64)
    with pytest.raises(ValueError, match="vocab_size"):
        write_tiny_model(tmp_path / "x", vocab_size=300)
    with pytest.raises(ValueError, match="num_kv_heads"):
        write_tiny_model(tmp_path / "x", num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="arch"):
        write_tiny_model(tmp_path / "x", arch="gpt2")


def test_write_named_model_rejects_unknown_shapes(tmp_path: Path) -> None:
    from splitserve.engine.tiny_model import NAMED_SHAPES, write_named_model

    assert "llama-1b" in NAMED_SHAPES
    with pytest.raises(ValueError, match="unknown model shape"):
        write_named_model(tmp_path, "llama-70b")
