"""ModelArch.from_model_dir: a plain config.json is read without transformers, and what it
reads equals what AutoConfig gives; anything else goes through AutoConfig."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, PretrainedConfig

from splitserve.engine.model import ModelArch, _rope_inv_freq

MODELS = ("tiny_llama", "tiny_llama_mha_tied", "tiny_qwen2", "smollm2_dir")


def _facts(arch: ModelArch) -> dict[str, Any]:
    return {f.name: getattr(arch, f.name) for f in dataclasses.fields(arch) if f.name != "hf_config"}


def _through_auto_config(model_dir: Path) -> ModelArch:
    return ModelArch.from_hf_config(AutoConfig.from_pretrained(model_dir, local_files_only=True))


@pytest.mark.parametrize("fixture", MODELS)
def test_a_plain_config_reads_as_auto_config_does(fixture: str,
                                                  request: pytest.FixtureRequest) -> None:
    model_dir: Path = request.getfixturevalue(fixture)
    plain = ModelArch.from_model_dir(model_dir)
    assert not isinstance(plain.hf_config, PretrainedConfig)  # read without AutoConfig
    reference = _through_auto_config(model_dir)
    assert _facts(plain) == _facts(reference)
    ours, scale = _rope_inv_freq(plain)
    theirs, their_scale = _rope_inv_freq(reference)
    assert torch.equal(ours, theirs) and scale == their_scale


def _edited(src: Path, dst: Path, edit: dict[str, Any], drop: tuple[str, ...] = ()) -> Path:
    dst.mkdir()
    raw = json.loads((src / "config.json").read_text())
    raw.update(edit)
    for key in drop:
        raw.pop(key)
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


@pytest.mark.parametrize(("edit", "drop"), [
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 1024}}, ()),
    ({}, ("tie_word_embeddings",)),  # AutoConfig's default fills it in
    ({}, ("rope_parameters",)),  # no theta given: AutoConfig's default
    ({"architectures": None}, ()),
])
def test_anything_else_goes_through_auto_config(tiny_llama: Path, tmp_path: Path,
                                                edit: dict[str, Any], drop: tuple[str, ...]
                                                ) -> None:
    model_dir = _edited(tiny_llama, tmp_path / "model", edit, drop)
    arch = ModelArch.from_model_dir(model_dir)
    assert isinstance(arch.hf_config, PretrainedConfig)
    assert _facts(arch) == _facts(_through_auto_config(model_dir))


def test_mistral_without_its_window_gets_auto_configs_default_and_is_refused(
        tiny_llama: Path, tmp_path: Path) -> None:
    mistral = {"architectures": ["MistralForCausalLM"], "model_type": "mistral"}
    model_dir = _edited(tiny_llama, tmp_path / "windowed", mistral)  # MistralConfig: 4,096
    with pytest.raises(ValueError, match="Mistral with sliding-window attention"):
        ModelArch.from_model_dir(model_dir)
    model_dir = _edited(tiny_llama, tmp_path / "plain", {**mistral, "sliding_window": None})
    arch = ModelArch.from_model_dir(model_dir)
    assert not isinstance(arch.hf_config, PretrainedConfig)
    assert _facts(arch) == _facts(_through_auto_config(model_dir))


def test_an_unsupported_architecture_is_refused_by_name(tiny_llama: Path,
                                                        tmp_path: Path) -> None:
    model_dir = _edited(tiny_llama, tmp_path / "model", {"architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        ModelArch.from_model_dir(model_dir)


def test_an_engine_starts_without_importing_transformers(tiny_llama: Path) -> None:
    """transformers (AutoConfig's imports, ~2 s) and torch._dynamo (~1 s, pulled in by a
    random init on the meta device) stay out of a worker's start."""
    code = ("import sys\n"
            "from splitserve.engine.config import EngineConfig\n"
            "from splitserve.engine.llm_engine import LLMEngine\n"
            "LLMEngine(EngineConfig(model=sys.argv[1], num_kv_blocks=16))\n"
            "print(sorted(m for m in ('transformers', 'torch._dynamo') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code, str(tiny_llama)],
                         capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr
