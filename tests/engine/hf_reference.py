"""Greedy references from Hugging Face transformers, and the near-tie-aware comparison."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

NEAR_TIE = 1e-3  # fp32: a divergence is accepted only where HF's top-2 logits are this close


@lru_cache(maxsize=4)
def hf_model(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, local_files_only=True
    )
    # No EOS: the reference runs exactly max_new_tokens, like our requests with ignore_eos.
    model.generation_config.eos_token_id = None
    return model.eval()


@torch.inference_mode()
def hf_greedy(model_dir: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' generate(do_sample=False), exactly max_new_tokens (EOS does not stop it)."""
    model = hf_model(model_dir)
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


@torch.inference_mode()
def hf_logits(model_dir: Path, token_ids: list[int]) -> torch.Tensor:
    """Next-token logits after `token_ids` (fp32 [vocab])."""
    return hf_model(model_dir)(torch.tensor([token_ids])).logits[0, -1].float()


def assert_greedy_equal(
    model_dir: Path, prompt: list[int], ours: list[int], reference: list[int]
) -> None:
    """Equal token for token, except after a divergence at a near-tie of HF's own logits."""
    assert len(ours) == len(reference), f"lengths differ: {len(ours)} vs {len(reference)}"
    for i, (a, b) in enumerate(zip(ours, reference, strict=True)):
        if a == b:
            continue
        logits = hf_logits(model_dir, prompt + reference[:i])
        gap = abs(float(logits[a] - logits[b]))
        assert gap < NEAR_TIE, (
            f"divergence at output token {i}: ours {a}, transformers {b}; "
            f"transformers' logit gap {gap:.3g} is not a near-tie"
        )
        return
