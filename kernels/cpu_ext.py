"""A small C++ CPU kernel for paged decode attention, built on first use.

It reads K/V rows straight from the paged cache (no gathered copy) with one task per
(sequence, kv head), fp32 scores and softmax. Built with torch.utils.cpp_extension into the
torch extensions cache (TORCH_EXTENSIONS_DIR); where no compiler is available, `load()`
returns None and callers fall back to kernels.reference.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)
_CSRC = Path(__file__).with_name("csrc")
_SOURCES = [_CSRC / name for name in
            ("bindings.cpp", "paged_decode_cpu.cpp", "fused_ops_cpu.cpp", "gemm_cpu.cpp")]
_lock = threading.Lock()
_module: ModuleType | None = None
_failed = False


def load() -> ModuleType | None:
    """The compiled extension, or None when it cannot be built here (logged once)."""
    global _module, _failed
    with _lock:
        if _module is not None or _failed:
            return _module
        if os.environ.get("SPLITSERVE_DISABLE_CPU_KERNELS"):
            _failed = True
            return None
        try:
            from torch.utils.cpp_extension import load as load_extension

            # pip's ninja lives beside the interpreter, which may not be on PATH.
            bin_dir = os.path.dirname(sys.executable)
            os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
            _module = load_extension(
                name="splitserve_paged_decode_cpu",
                sources=[str(path) for path in _SOURCES],
                extra_include_paths=[str(_CSRC)],
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except Exception as exc:  # no compiler, no ninja, ...: the reference path works
            log.warning("CPU decode kernel unavailable (%s); using the torch reference", exc)
            _failed = True
        return _module


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    **_: object,
) -> torch.Tensor:
    """Same contract as kernels.reference.paged_decode_attention (CPU tensors)."""
    module = load()
    assert module is not None, "call load() first and fall back when it returns None"
    if out is None:
        out = torch.empty_like(q)
    if q.shape[0] == 0:
        return out
    tables = block_tables.to(torch.int32).contiguous()
    lens = context_lens.to(torch.int32).contiguous()
    module.paged_decode_attention(q, k_cache, v_cache, tables, lens, float(scale), out)
    return out


def _extension() -> ModuleType:
    module = _module if _module is not None else load()
    assert module is not None, "call load() first and fall back when it returns None"
    return module


# Fused elementwise ops of a decoder layer (kernels/csrc/fused_ops_cpu.cpp). Each matches the
# torch ops it replaces in engine/model.py, rounding wherever they round; tensors are CPU,
# fp32/bf16/fp16, rows with innermost stride 1, all of one dtype.


def rotary_store_kv_(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> None:
    """Rope on the q and k heads of `qkv` in place, then its k and v heads into the caches.

    qkv: [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim], q heads then k then v;
    cos, sin: [num_tokens, head_dim] or [num_tokens, 1, head_dim] (RotaryEmbedding.tables);
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], contiguous;
    slot_mapping: int [num_tokens] (negative = not stored). Bit-exact with
    engine.model.apply_rope on the q and k heads followed by kernels.reference.store_kv.
    """
    if slot_mapping.dtype != torch.int64:
        slot_mapping = slot_mapping.to(torch.int64)
    _extension().rotary_store_kv_(qkv, cos, sin, k_cache, v_cache, slot_mapping.contiguous(),
                                  num_heads, num_kv_heads, head_dim)


def silu_and_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """[num_tokens, 2 * n] -> F.silu(gate_up[:, :n]) * gate_up[:, n:], [num_tokens, n]."""
    if out is None:
        out = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)
    _extension().silu_and_mul(gate_up, out)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """engine.model.RMSNorm.forward: x, out [num_tokens, hidden]; weight [hidden]."""
    if out is None:
        out = torch.empty_like(x)
    _extension().rms_norm(x, weight, eps, out)
    return out


def add_rms_norm_(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                  eps: float) -> None:
    """In place: residual <- residual + x, then x <- RMSNorm(residual) (weight [hidden]).

    x, residual: [num_tokens, hidden]; the add rounds to the dtype like `h = x + o_proj(...)`.
    """
    _extension().add_rms_norm_(x, residual, weight, eps)


# fp32 linear layers for small row counts (kernels/csrc/gemm_cpu.cpp).


def gemm_supported() -> bool:
    """Whether this build has linear_packed (it needs AVX-512)."""
    module = load()
    return module is not None and bool(module.gemm_supported())


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """fp32 [out_features, in_features] -> panels [ceil(out_features / 16), in_features, 16]."""
    return _extension().pack_linear_weight(weight.detach().contiguous())


def linear_packed(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                  out_features: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) from pack_linear_weight(weight); x [rows, in_features]."""
    if out is None:
        out = x.new_empty(x.shape[0], out_features)
    if x.shape[0]:
        _extension().linear_packed(x, packed, bias, out)
    return out
