"""The C++ CPU kernels (kernels/csrc/): paged decode attention, fused layer ops, a GEMM for
decode-sized batches.

Built ahead of time by the package's own build (`pip install -e .` / `make setup` compile
`splitserve.kernels._cpu_ops` with torch's cpp_extension; see setup.py). When that module
is absent or does not load (no torch in the build environment, a torch upgraded since), the
extension is built on first use by `kernels.jit_build` (bounded waits, a cache keyed by
source hash and path). Where no compiler is available either, `load()` returns None and
callers fall back to kernels.reference. SPLITSERVE_DISABLE_CPU_KERNELS=1 skips all of it.
"""

from __future__ import annotations

import functools
import importlib
import logging
import threading
from pathlib import Path
from types import ModuleType

import torch

from splitserve.common import envs
from splitserve.kernels.build_spec import CSRC, SOURCE_NAMES, compile_flags, source_digest

log = logging.getLogger(__name__)
AOT_MODULE = "splitserve.kernels._cpu_ops"
JIT_NAME = "splitserve_cpu_ops"
_lock = threading.Lock()
_module: ModuleType | None = None
_failed = False


# CPU flags (/proc/cpuinfo) each portable -march level needs; "native" needs none.
_MARCH_FLAGS = {
    "x86-64-v2": ("sse4_2", "popcnt", "ssse3"),
    "x86-64-v3": ("avx2", "fma", "bmi2", "movbe"),
    "x86-64-v4": ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"),
}


def missing_cpu_flags(march: str, cpuinfo: str | None = None) -> list[str]:
    """The flags `march` needs that this CPU lacks (empty: a build for it runs here)."""
    needed = _MARCH_FLAGS.get(march, ())
    if not needed:
        return []
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []  # cannot tell: trust the build
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                  if line.startswith("flags")), [])
    return [flag for flag in needed if flag not in flags]


@functools.cache
def _march() -> str:
    """(Read once per process.) SPLITSERVE_CPU_MARCH (what an install-time build was made for, as the Docker image
    sets it), or native when this CPU lacks what that target needs."""
    march = envs.get("SPLITSERVE_CPU_MARCH")
    missing = missing_cpu_flags(march)
    if missing:
        log.warning("SPLITSERVE_CPU_MARCH=%s needs CPU flags this CPU lacks (%s): the "
                    "kernels are built for -march=native on first use", march, ", ".join(missing))
        return "native"
    return march


def load_ahead_of_time() -> ModuleType | None:
    """The extension built at install time, if present, built from these sources, and built
    for a CPU target this CPU runs (an AVX-512 build would crash on a CPU without it)."""
    if _march() != envs.get("SPLITSERVE_CPU_MARCH"):
        return None
    try:
        module = importlib.import_module(AOT_MODULE)
    except ImportError as exc:  # not built, or built against another torch
        log.info("no ahead-of-time CPU kernels (%s); building them on first use", exc)
        return None
    built_from, current = getattr(module, "source_digest", ""), source_digest()
    if built_from != current:
        log.warning("the installed CPU kernels were built from other sources (%s, now %s); "
                    "building these on first use (`make setup` rebuilds them at install)",
                    built_from or "unknown", current)
        return None
    return module


def _load_just_in_time() -> ModuleType:
    from splitserve.kernels.jit_build import load_or_build

    cflags, ldflags = compile_flags(_march(), source_digest())
    return load_or_build(
        JIT_NAME, [CSRC / name for name in SOURCE_NAMES], [CSRC], cflags, ldflags,
        timeout_s=envs.get("SPLITSERVE_KERNEL_BUILD_TIMEOUT_S"),
    )


def load() -> ModuleType | None:
    """The compiled extension, or None when it cannot be had here (logged once)."""
    global _module, _failed
    with _lock:
        if _module is not None or _failed:
            return _module
        try:
            disabled = envs.get("SPLITSERVE_DISABLE_CPU_KERNELS")
        except ValueError as exc:  # set, but not a boolean: read it as "disable"
            log.warning("%s; the CPU kernels stay off", exc)
            disabled = True
        if disabled:
            _failed = True
            return None
        _module = load_ahead_of_time()
        if _module is None:
            try:
                _module = _load_just_in_time()
            except Exception as exc:  # no compiler, no ninja, lock timeout: the reference works
                log.warning("CPU kernels unavailable (%s); using the torch reference", exc)
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


def decode_layer_(x: torch.Tensor, residual: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                  context_lens: torch.Tensor, *layer: object) -> torch.Tensor:
    """One decoder layer of a decode-only step (kernels/csrc/decode_layer_cpu.cpp): the
    fused path's kernels for it in one call, the same bits. `x` = its input_layernorm of
    `residual`; residual becomes the layer's output in place; returns the next layer's input
    (the next RMSNorm of residual). `layer`: one layer's constant arguments, as
    engine.model.one_call_layers reads them."""
    return _extension().decode_layer_(x, residual, cos, sin, k_cache, v_cache, slot_mapping,
                                      block_tables, context_lens, *layer)


# fp32 and bf16 linear layers for small row counts (kernels/csrc/gemm_cpu.cpp).


def gemm_supported() -> bool:
    """Whether this build has linear_packed (it needs AVX-512, or AVX2 with FMA)."""
    module = load()
    return module is not None and bool(module.gemm_supported())


def gemm_bf16_supported() -> bool:
    """Whether this build's linear_packed takes bf16 weights (AVX512-BF16, or AVX2 with FMA
    widening them to fp32 as they are read)."""
    module = load()
    return module is not None and bool(module.gemm_bf16_supported())


def gemm_isa(dtype: torch.dtype) -> str:
    """What linear_packed runs on for weights of `dtype` in this build: "avx512" (fp32),
    "avx512_bf16" (bf16), "avx2", or "none" (also without the extension)."""
    module = load()
    return str(module.gemm_isa(dtype == torch.bfloat16)) if module is not None else "none"


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """fp32 [out_features, in_features] -> panels [ceil(out_features / 16), in_features, 16];
    bf16 (even in_features) -> panels of k pairs [ceil(out / 16), in_features / 2, 16, 2]."""
    return _extension().pack_linear_weight(weight.detach().contiguous())


def linear_packed(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                  out_features: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) from pack_linear_weight(weight); x [rows, in_features]."""
    if out is None:
        out = x.new_empty(x.shape[0], out_features)
    if x.shape[0]:
        _extension().linear_packed(x, packed, bias, out)
    return out
