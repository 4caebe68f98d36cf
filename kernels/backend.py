"""The one dispatch point between the engine and the attention/KV kernels.

    ops = get_attention_ops("auto", device)
    ops.store_kv(k, v, k_cache, v_cache, slot_mapping)
    ops.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, out=out)

'torch' is the plain-torch reference, 'triton' the Triton kernels, the fused layer ops of
kernels.fused_ops included (on CPU they run under TRITON_INTERPRET=1, for tests), 'auto'
picks triton on CUDA and torch otherwise. The Triton modules are imported only here, lazily,
so that TRITON_INTERPRET can be set first.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from splitserve.kernels import attention_plan, reference

__all__ = ["BACKENDS", "AttentionOps", "FusedLayerOps", "get_attention_ops", "triton_available"]

BACKENDS = ("auto", "torch", "triton", "cpu")


@dataclass(frozen=True)
class FusedLayerOps:
    """Fused elementwise ops of a decoder layer (signatures: kernels.cpu_ext)."""

    rotary_store_kv_: Callable[..., None]  # rope on q/k in place + K/V into the cache
    silu_and_mul: Callable[..., torch.Tensor]
    rms_norm: Callable[..., torch.Tensor]
    add_rms_norm_: Callable[..., None]  # residual += x; x = rms_norm(residual)
    # A whole decoder layer of a decode-only step in one call, where the backend has it
    # (the C++ CPU kernels: cpu_ext.decode_layer_); None: layer by layer through the above.
    decode_layer_: Callable[..., torch.Tensor] | None = None


@dataclass(frozen=True)
class AttentionOps:
    """Callables with the signatures of `kernels.reference` (see there for layouts)."""

    name: str  # 'torch', 'triton' or 'cpu': the backend actually chosen
    paged_decode_attention: Callable[..., torch.Tensor]
    store_kv: Callable[..., None]
    pack_kv: Callable[..., torch.Tensor]
    unpack_kv: Callable[..., None]
    fused: FusedLayerOps | None = None  # the model's fused layer path, where a backend has one


_TORCH_OPS = AttentionOps(
    name="torch",
    paged_decode_attention=reference.paged_decode_attention,
    store_kv=reference.store_kv,
    pack_kv=reference.pack_kv,
    unpack_kv=reference.unpack_kv,
)


def triton_available(device: torch.device) -> bool:
    """Whether `import triton` works (after setting the interpreter flag for CPU)."""
    try:
        _import_triton_modules(device)
    except ImportError:
        return False
    return True


def _import_triton_modules(device: torch.device) -> tuple[ModuleType, ModuleType, ModuleType]:
    if device.type != "cuda":
        # Read when @triton.jit decorates a kernel, so it must be set before the kernel
        # modules below are first imported; an earlier import on another device wins.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    attention = importlib.import_module("splitserve.kernels.paged_attention")
    kv_ops = importlib.import_module("splitserve.kernels.kv_ops")
    fused_ops = importlib.import_module("splitserve.kernels.fused_ops")
    return attention, kv_ops, fused_ops


class _ScratchCache:
    """Split-K scratch owned by one AttentionOps: two flat fp32 buffers grown on demand and
    viewed at each call's exact [seqs, heads, splits, head_dim], then reused by every layer
    and step, so steady-state decode allocates nothing (the buffers grow to the largest
    seqs x splits product seen, not to max seqs x MAX_SPLITS). Calls are assumed to be
    issued in order on one stream (as a model runner does)."""

    def __init__(self) -> None:
        self._flat: tuple[torch.Tensor, torch.Tensor] | None = None
        self._view: tuple[tuple[Any, ...], Any] | None = None  # the last shape and its view
        self._lock = threading.Lock()

    def get(self, q: torch.Tensor, num_splits: int) -> Any:
        num_seqs, num_heads, head_dim = q.shape
        key = (num_seqs, num_heads, head_dim, num_splits, q.device)
        with self._lock:
            if self._view is not None and self._view[0] == key:
                return self._view[1]
            need_out, need_lse = attention_plan.scratch_elements(num_seqs, num_heads, head_dim,
                                                                 num_splits)
            flat = self._flat
            if (flat is None or flat[0].device != q.device or flat[0].numel() < need_out
                    or flat[1].numel() < need_lse):
                keep = flat is not None and flat[0].device == q.device
                n_out = max(need_out, flat[0].numel() if flat is not None and keep else 0)
                n_lse = max(need_lse, flat[1].numel() if flat is not None and keep else 0)
                flat = (torch.empty(n_out, dtype=torch.float32, device=q.device),
                        torch.empty(n_lse, dtype=torch.float32, device=q.device))
                self._flat = flat
            view = attention_plan.scratch_view(*flat, num_seqs, num_heads, head_dim, num_splits)
            self._view = (key, view)
            return view


def _triton_ops(device: torch.device) -> AttentionOps:
    attention, kv_ops, fused_ops = _import_triton_modules(device)
    cache = _ScratchCache()

    def paged_decode_attention(
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        scale: float,
        out: torch.Tensor | None = None,
        scratch: Any = None,
        num_splits: int | None = None,
        max_context_len: int | None = None,
    ) -> torch.Tensor:
        # Extra keywords over the reference: see kernels.paged_attention.paged_decode_attention.
        splits = attention.plan_num_splits(q, k_cache, block_tables, num_splits, max_context_len)
        if scratch is None and splits > 1:
            scratch = cache.get(q, splits)
        return attention.paged_decode_attention(
            q, k_cache, v_cache, block_tables, context_lens, scale,
            out=out, scratch=scratch, num_splits=splits,
        )

    return AttentionOps(
        name="triton",
        paged_decode_attention=paged_decode_attention,
        store_kv=kv_ops.store_kv,
        pack_kv=kv_ops.pack_kv,
        unpack_kv=kv_ops.unpack_kv,
        # The unfused Triton path, for comparison: dataclasses.replace(ops, fused=None).
        fused=FusedLayerOps(
            rotary_store_kv_=fused_ops.rotary_store_kv_,
            silu_and_mul=fused_ops.silu_and_mul,
            rms_norm=fused_ops.rms_norm,
            add_rms_norm_=fused_ops.add_rms_norm_,
        ),
    )


def _cpu_ops() -> AttentionOps | None:
    """The C++ CPU kernels (kernels.cpu_ext: decode attention and the fused layer ops) with
    the reference KV ops, if they build."""
    from splitserve.kernels import cpu_ext

    if cpu_ext.load() is None:
        return None
    return AttentionOps(
        name="cpu",
        paged_decode_attention=cpu_ext.paged_decode_attention,
        store_kv=reference.store_kv,
        pack_kv=reference.pack_kv,
        unpack_kv=reference.unpack_kv,
        fused=FusedLayerOps(
            rotary_store_kv_=cpu_ext.rotary_store_kv_,
            silu_and_mul=cpu_ext.silu_and_mul,
            rms_norm=cpu_ext.rms_norm,
            add_rms_norm_=cpu_ext.add_rms_norm_,
            decode_layer_=cpu_ext.decode_layer_,
        ),
    )


def get_attention_ops(backend: str, device: torch.device | str) -> AttentionOps:
    """Return the kernels for `backend` ('auto' | 'torch' | 'triton' | 'cpu') on `device`.

    'auto' is triton on CUDA when triton imports, else torch; on CPU it is 'cpu' (the C++
    decode kernel, built on first use) when that builds, else torch. 'triton' raises
    RuntimeError when triton is not importable; 'cpu' when the kernel cannot be built.
    """
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    if backend == "torch":
        return _TORCH_OPS
    if backend == "cpu" or (backend == "auto" and device.type == "cpu"):
        if device.type != "cpu":
            raise ValueError(f"attention backend 'cpu' needs a CPU device, got {device}")
        ops = _cpu_ops()
        if ops is not None:
            return ops
        if backend == "cpu":
            raise RuntimeError("attention backend 'cpu' requested but its C++ kernel "
                               "could not be built (see the log); use backend 'torch'")
        return _TORCH_OPS
    if backend == "auto" and device.type != "cuda":
        return _TORCH_OPS
    try:
        return _triton_ops(device)
    except ImportError as exc:
        if backend == "auto":
            return _TORCH_OPS
        raise RuntimeError(
            f"attention backend 'triton' requested but triton is not importable: {exc}. "
            "Install it (pip install 'splitserve[triton]') or use backend 'torch'."
        ) from exc
