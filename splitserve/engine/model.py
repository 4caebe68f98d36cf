"""Llama-family decoder (Llama 2/3, SmolLM, Mistral without sliding window, Qwen2) over a
paged KV cache. Weights use Hugging Face names; q/k/v and gate/up are fused at load time.

Shapes: the step's tokens are flattened, [num_tokens, hidden_size]; see engine/attention.py
for how they are ordered.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.engine.attention import AttentionMetadata, attend_stored, paged_attention
from splitserve.engine.cpu_linear import PackedLinear

_SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class ModelArch:
    """The architecture facts the runtime needs, read from a Hugging Face config."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    hf_config: Any  # the config (rope parameters live here): PretrainedConfig, or config.json's keys

    @classmethod
    def from_hf_config(cls, config: Any) -> ModelArch:
        architecture = (getattr(config, "architectures", None) or ["LlamaForCausalLM"])[0]
        if architecture not in _SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {architecture!r}; supported: {_SUPPORTED_ARCHITECTURES}"
            )
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
            if architecture == "MistralForCausalLM":
                raise ValueError("Mistral with sliding-window attention is not supported")
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        return cls(
            architecture=architecture,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            max_position_embeddings=config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=architecture == "Qwen2ForCausalLM"
            or bool(getattr(config, "attention_bias", False)),
            hf_config=config,
        )

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike[str]) -> ModelArch:
        """The model folder's architecture. A plain config.json (a supported architecture,
        every field given, the default rope) is read as it is: transformers' AutoConfig
        costs ~2 s of imports at every engine start; anything else goes through AutoConfig
        (its defaults and rope parameters)."""
        raw = json.loads(Path(model_dir, "config.json").read_text())
        if _is_plain_config(raw):
            return cls.from_hf_config(SimpleNamespace(**raw))
        from transformers import AutoConfig

        return cls.from_hf_config(AutoConfig.from_pretrained(model_dir, local_files_only=True))


# The fields a config.json must give to be read without AutoConfig (whose per-architecture
# defaults would otherwise fill them in).
_PLAIN_FIELDS = ("architectures", "vocab_size", "hidden_size", "intermediate_size",
                 "num_hidden_layers", "num_attention_heads", "rms_norm_eps",
                 "max_position_embeddings", "tie_word_embeddings")


def _is_plain_config(raw: dict[str, Any]) -> bool:
    """A supported architecture with every _PLAIN_FIELDS key (Mistral: and its
    sliding_window) and the default rope given by its theta (rope_theta, or rope_parameters
    of type "default"; no rope_scaling)."""
    if any(raw.get(key) is None for key in _PLAIN_FIELDS):
        return False
    architectures = raw["architectures"]
    if not isinstance(architectures, list) or not architectures:
        return False
    if architectures[0] not in _SUPPORTED_ARCHITECTURES or raw.get("rope_scaling"):
        return False
    if architectures[0] == "MistralForCausalLM" and "sliding_window" not in raw:
        return False  # MistralConfig's default window (4,096) is what from_hf_config refuses
    params = raw.get("rope_parameters")
    if params is None:
        return isinstance(raw.get("rope_theta"), (int, float))
    return (isinstance(params, dict) and params.get("rope_type", "default") == "default"
            and isinstance(params.get("rope_theta"), (int, float)))


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op; the same math as below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # transformers' LlamaRMSNorm: normalize in fp32, cast back, then scale.
        normed = F.rms_norm(x.to(torch.float32), self.weight.shape, None, self.eps)
        return self.weight * normed.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position up to max_positions, computed like transformers."""

    cos: torch.Tensor  # [max_positions, head_dim] (buffers, not parameters)
    sin: torch.Tensor

    def __init__(self, arch: ModelArch, max_positions: int, dtype: torch.dtype):
        super().__init__()
        inv_freq, scaling = _rope_inv_freq(arch)
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_positions, head_dim]
        self.register_buffer("cos", (emb.cos() * scaling).to(dtype), persistent=False)
        self.register_buffer("sin", (emb.sin() * scaling).to(dtype), persistent=False)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for the step's tokens, [num_tokens, 1, head_dim] (shared by all layers)."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, heads, head_dim]; cos, sin: [num_tokens, 1, head_dim]."""
    return x * cos + _rotate_half(x) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope_inv_freq(arch: ModelArch) -> tuple[torch.Tensor, float]:
    config = arch.hf_config
    params = getattr(config, "rope_parameters", None) or {}
    scaling_cfg = getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or scaling_cfg.get("rope_type") or "default"
    if rope_type == "default":
        base: float = params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
        exponents = torch.arange(0, arch.head_dim, 2, dtype=torch.float32) / arch.head_dim
        return 1.0 / (base**exponents), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS or rope_type == "dynamic":
        raise ValueError(f"unsupported rope type {rope_type!r}")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq.to(torch.float32), float(scaling)


LayerHook = Callable[[int], None]


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            arch.num_heads,
            arch.num_kv_heads,
            arch.head_dim,
        )
        self.q_size = arch.num_heads * arch.head_dim
        self.kv_size = arch.num_kv_heads * arch.head_dim
        self.scale = arch.head_dim**-0.5
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.qkv_proj = nn.Linear(arch.hidden_size, self.q_size + 2 * self.kv_size, arch.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, arch.hidden_size, bias=False)
        self.gate_up_proj = nn.Linear(arch.hidden_size, 2 * arch.intermediate_size, bias=False)
        self.down_proj = nn.Linear(arch.intermediate_size, arch.hidden_size, bias=False)
        self.intermediate_size = arch.intermediate_size

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        ops: Any,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(self.input_layernorm(x))
        # q and k heads are adjacent in qkv: rotate them together, [num_tokens, H + KVH, d].
        qk = qkv[:, : self.q_size + self.kv_size].view(
            num_tokens, self.num_heads + self.num_kv_heads, self.head_dim
        )
        qk = apply_rope(qk, *rope)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.q_size + self.kv_size :].reshape(
            num_tokens, self.num_kv_heads, self.head_dim
        )
        attn = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale, ops)
        h = x + self.o_proj(attn.reshape(num_tokens, self.q_size))
        gate, up = self.gate_up_proj(self.post_attention_layernorm(h)).split(
            self.intermediate_size, dim=-1
        )
        return h + self.down_proj(F.silu(gate) * up)

    def forward_fused(
        self,
        x: torch.Tensor,
        residual: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        ops: Any,
    ) -> torch.Tensor:
        """forward() through the fused ops of `ops.fused`, the residual stream kept apart.

        In: x = input_layernorm(residual) (the previous layer left it so). Out: the MLP's
        output; residual has become this layer's attention output plus its input, in place.
        Same arithmetic and rounding as forward().
        """
        fused, num_tokens = ops.fused, x.shape[0]
        qkv = self.qkv_proj(x)
        fused.rotary_store_kv_(qkv, *rope, k_cache, v_cache, meta.slot_mapping,
                               self.num_heads, self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        attn = attend_stored(
            q.view(num_tokens, self.num_heads, self.head_dim),
            k.view(num_tokens, self.num_kv_heads, self.head_dim),
            v.view(num_tokens, self.num_kv_heads, self.head_dim),
            k_cache, v_cache, meta, self.scale, ops,
        )
        h = self.o_proj(attn.view(num_tokens, self.q_size))
        norm = self.post_attention_layernorm
        fused.add_rms_norm_(h, residual, norm.weight, norm.eps)  # residual += h; h = norm
        return self.down_proj(fused.silu_and_mul(self.gate_up_proj(h)))


class OneCallLayers(NamedTuple):
    """Every layer's constant arguments of FusedLayerOps.decode_layer_, and the step sizes
    (tokens) whose linears all run on the packed panels, where that call applies."""

    args: list[tuple[object, ...]]
    min_rows: int
    max_rows: int


def one_call_layers(layers: list[DecoderLayer], final_norm: RMSNorm) -> OneCallLayers | None:
    """The layers' arguments for decode_layer_; None unless every linear of every layer is
    a PackedLinear on the panel GEMM (the C++ kernel runs no other linear)."""
    args: list[tuple[object, ...]] = []
    min_rows, max_rows = 1, 1 << 62
    for index, layer in enumerate(layers):
        panels: list[object] = []  # (packed weight, bias, out_features) of each linear
        for m in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj):
            if not isinstance(m, PackedLinear) or (panel := m.panel_args()) is None:
                return None
            panels += panel
            min_rows, max_rows = max(min_rows, m.rows.min_rows), min(max_rows, m.rows.max_rows)
        post = layer.post_attention_layernorm
        following = layers[index + 1].input_layernorm if index + 1 < len(layers) else final_norm
        args.append((*panels, post.weight, post.eps, following.weight, following.eps,
                     layer.scale, layer.num_heads, layer.num_kv_heads, layer.head_dim))
    return OneCallLayers(args, min_rows, max_rows)


class CausalLM(nn.Module):
    def __init__(self, arch: ModelArch, rope: RotaryEmbedding | None = None):
        super().__init__()
        self.arch = arch
        # The weight given: no random init (the loader builds this on the meta device, where
        # normal_ runs a Python reference that imports torch._dynamo, ~1 s at every start).
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size,
                                         _weight=torch.empty(arch.vocab_size, arch.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(arch) for _ in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = rope  # set by the loader (built off the meta device) when None here
        # decode_layer_'s arguments, read at the first fused step (the linears are packed
        # before any step: ModelRunner); False: not read yet.
        self._one_call: OneCallLayers | None | bool = False

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        ops: Any,
        layer_hook: LayerHook | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [num_tokens] -> final hidden states [num_tokens, hidden]."""
        assert self.rope is not None, "the rope tables were never set"
        x = self.embed_tokens(input_ids)
        rope = self.rope.tables(positions)
        if ops.fused is not None:
            return self._forward_fused(x, rope, kv_caches, meta, ops, layer_hook)
        for index, layer in enumerate(self.layers):
            k_cache, v_cache = kv_caches[index]
            x = layer(x, rope, k_cache, v_cache, meta, ops)
            if layer_hook is not None:
                layer_hook(index)  # this layer's KV for the step is now in the cache
        return self.norm(x)

    def _forward_fused(
        self,
        residual: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        ops: Any,
        layer_hook: LayerHook | None,
    ) -> torch.Tensor:
        """forward() on the fused layer ops; `residual` (the embeddings) is updated in place."""
        fused = ops.fused
        layers = cast("list[DecoderLayer]", list(self.layers))
        first_norm = layers[0].input_layernorm
        x = fused.rms_norm(residual, first_norm.weight, first_norm.eps)
        one_call = self._one_call_layers(fused, x.shape[0], meta)
        if one_call is not None:  # a decode-only step: each layer in one C++ call
            decode_layer, (cos, sin) = fused.decode_layer_, rope
            slots, tables, lens = (meta.slot_mapping, meta.decode_block_tables,
                                   meta.decode_context_lens)
            for index, layer_args in enumerate(one_call.args):
                k_cache, v_cache = kv_caches[index]
                x = decode_layer(x, residual, cos, sin, k_cache, v_cache, slots, tables, lens,
                                 *layer_args)
                if layer_hook is not None:
                    layer_hook(index)
            return x
        for index, layer in enumerate(layers):
            k_cache, v_cache = kv_caches[index]
            x = layer.forward_fused(x, residual, rope, k_cache, v_cache, meta, ops)
            if layer_hook is not None:
                layer_hook(index)
            # Close this layer (residual += x) and normalize for the next one, in one op.
            next_norm = layers[index + 1].input_layernorm if index + 1 < len(layers) else self.norm
            fused.add_rms_norm_(x, residual, next_norm.weight, next_norm.eps)
        return x

    def _one_call_layers(self, fused: Any, num_tokens: int,
                         meta: AttentionMetadata) -> OneCallLayers | None:
        """The layers' decode_layer_ arguments when this step can run each layer in one
        call: the backend has the call, every row is a sequence's one decode token (no
        prompt chunk, no per-step plan or launch settings of another backend), and every
        linear is on the panels at this many rows."""
        if (fused.decode_layer_ is None or meta.prefills or meta.num_decode_tokens != num_tokens
                or meta.decode_plan is not None or meta.decode_launch is not None):
            return None
        if self._one_call is False:
            self._one_call = one_call_layers(cast("list[DecoderLayer]", list(self.layers)),
                                             self.norm)
        one_call = cast("OneCallLayers | None", self._one_call)
        if one_call is None or not one_call.min_rows <= num_tokens <= one_call.max_rows:
            return None
        return one_call

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> fp32 logits [n, vocab]."""
        return self.lm_head(hidden).float()
