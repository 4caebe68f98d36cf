"""Loading Hugging Face safetensors checkpoints into engine.model.CausalLM."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from splitserve.engine.model import CausalLM, ModelArch, RotaryEmbedding

_PREFIX = "model."
_FUSED = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


def _checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / name for name in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    return files


def read_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in _checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def build_model(
    arch: ModelArch, model_dir: Path, dtype: torch.dtype, device: str, max_positions: int
) -> CausalLM:
    """Build the model without random init (meta device) and fill it from the checkpoint."""
    # The rope tables are computed for real (not on meta), in the target dtype.
    rope = RotaryEmbedding(arch, max_positions, dtype).to(device)
    with torch.device("meta"):
        model = CausalLM(arch)
    state = _to_our_names(read_state_dict(model_dir), arch)
    expected = {k for k in model.state_dict() if not k.startswith("rope.")}
    if arch.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(
            f"checkpoint in {model_dir} does not fit the model: "
            f"missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}"
        )
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if arch.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rope = rope
    return model.eval()


def _to_our_names(hf: dict[str, torch.Tensor], arch: ModelArch) -> dict[str, torch.Tensor]:
    ours: dict[str, torch.Tensor] = {}
    for name, tensor in hf.items():
        if "rotary_emb" in name:
            continue
        key = name[len(_PREFIX) :] if name.startswith(_PREFIX) else name
        ours[key.replace("self_attn.", "").replace("mlp.", "")] = tensor
    for layer in range(arch.num_layers):
        for fused, parts in _FUSED.items():
            for kind in ("weight", "bias"):
                names = [f"layers.{layer}.{p}.{kind}" for p in parts]
                if all(n in ours for n in names):
                    ours[f"layers.{layer}.{fused}.{kind}"] = torch.cat([ours.pop(n) for n in names])
    if arch.tie_word_embeddings:
        ours.pop("lm_head.weight", None)
    return ours
