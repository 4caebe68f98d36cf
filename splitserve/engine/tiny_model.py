"""Random-weight Llama / Qwen2 model directories for tests.

``write_tiny_model`` writes a complete HF directory (config.json, model.safetensors,
generation_config.json and the SmolLM2 tokenizer, so prompts tokenize for real) that
both transformers and SplitServe load. The same arguments give the same bytes.

Weights are N(0, init_std) for every matrix and bias, and 1 + N(0, 0.1) for RMSNorm
scales (so a model that ignores a norm weight is caught). With the default
``init_std=0.15`` greedy decoding is not degenerate: the gap between the two largest
logits is almost always well above float32 noise (see tests/engine/test_tiny_model.py),
whereas the usual 0.02 leaves near-uniform logits with frequent near-ties.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from splitserve.engine.model_files import DEFAULT_MODEL, resolve_model

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_INIT_STD = 0.15
NORM_WEIGHT_STD = 0.1


def write_tiny_model(
    path: str | os.PathLike[str],
    arch: str = "llama",
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    tie_word_embeddings: bool = False,
    vocab_size: int | None = None,
    max_position_embeddings: int = 2048,
    rope_theta: float = 10000.0,
    rope_scaling: dict[str, Any] | None = None,
    rms_norm_eps: float = 1e-6,
    seed: int = 0,
    dtype: str = "float32",
    init_std: float = DEFAULT_INIT_STD,
    tokenizer_from: str | os.PathLike[str] | None = DEFAULT_MODEL,
) -> Path:
    """Write a random-weight model directory at ``path`` and return it.

    ``tokenizer_from`` is a model (anything ``resolve_model`` accepts) whose tokenizer
    files are copied; ``vocab_size`` defaults to that tokenizer's size and may not be
    smaller. With ``tokenizer_from=None`` no tokenizer is written and ``vocab_size``
    is required. ``rope_scaling`` (e.g. ``{"rope_type": "llama3", "factor": 8.0, ...}``)
    is passed through to the config.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer_dir = resolve_model(tokenizer_from) if tokenizer_from is not None else None
    special_ids: dict[str, int | None] = {}
    if tokenizer_dir is not None:
        from splitserve.engine.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(tokenizer_dir)
        if vocab_size is None:
            vocab_size = tokenizer.vocab_size
        if vocab_size < tokenizer.vocab_size:
            raise ValueError(
                f"vocab_size {vocab_size} < tokenizer size {tokenizer.vocab_size}; "
                "pass tokenizer_from=None for a smaller vocabulary"
            )
        special_ids = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    elif vocab_size is None:
        raise ValueError("vocab_size is required when tokenizer_from is None")

    rope_parameters = {"rope_type": "default", **(rope_scaling or {}), "rope_theta": rope_theta}
    config_kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim if head_dim is not None else hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        rope_parameters=rope_parameters,
        rms_norm_eps=rms_norm_eps,
        tie_word_embeddings=tie_word_embeddings,
        **special_ids,
    )
    _save_random_model(out, arch, config_kwargs, seed=seed, dtype=dtype, init_std=init_std)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, out / name)
    return out


def _save_random_model(
    out: Path, arch: str, config_kwargs: dict[str, Any], *, seed: int, dtype: str, init_std: float
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config_cls = LlamaConfig if arch == "llama" else Qwen2Config
    config = config_cls(architectures=[ARCHITECTURES[arch]], **config_kwargs)
    # transformers' own init draws from the global RNG; keep the caller's stream intact.
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # named_parameters() is in definition order and lists a tied weight once.
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + NORM_WEIGHT_STD * noise)
            else:
                param.copy_(init_std * noise)
    model = model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    model.save_pretrained(out, safe_serialization=True)


# Named shapes for benchmarks that need a model of a realistic size without a download
# (`splitserve bench offline --random-model NAME`); the vocabulary is SmolLM2's tokenizer.
NAMED_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                         num_kv_heads=3, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                     num_kv_heads=8, head_dim=64),
}


def write_named_model(path: str | os.PathLike[str], name: str, dtype: str = "bfloat16",
                      seed: int = 0,
                      tokenizer_from: str | os.PathLike[str] | None = DEFAULT_MODEL) -> Path:
    """A random-weight model of a NAMED_SHAPES shape at `path`, reused when its config
    already says so (weights N(0, 0.02): a realistic scale for the larger shapes)."""
    if name not in NAMED_SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known: {sorted(NAMED_SHAPES)}")
    out = Path(path)
    marker = out / ".splitserve-shape"
    stamp = f"{name} {dtype} {seed}"
    if marker.is_file() and marker.read_text() == stamp:
        return out
    init_std = DEFAULT_INIT_STD if name == "tiny" else 0.02
    write_tiny_model(out, dtype=dtype, seed=seed, init_std=init_std,
                     tokenizer_from=tokenizer_from, **NAMED_SHAPES[name])
    marker.write_text(stamp)
    return out
