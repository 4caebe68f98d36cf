"""Linear layers for CPU decode: a second copy of each weight in a layout for small batches.

Library GEMMs are tuned for large row counts; a decode step has one row per running
sequence. Each layer keeps the plain weight (for large prefill chunks, where the library
wins) and a packed copy made once at load time, and picks by row count:
- fp32: our panel GEMM (kernels/csrc/gemm_cpu.cpp; AVX-512, or AVX2 with FMA), else
  oneDNN's blocked layout;
- bf16: our panels of k pairs (gemm_cpu.cpp: vdpbf16ps where the CPU has AVX512-BF16, else
  widened to fp32 with AVX2: as read at few rows, once per panel group from 48), else
  oneDNN's blocked layout (AMX where the CPU has it; a layer whose input width is odd,
  which the k pairs cannot hold, too).
Measured on the 2-core AMX Xeon this project is developed on, SmolLM2's 30 layers plus
lm_head, one call each: fp32 at 1 row 18.9 ms (F.linear 21-23, oneDNN packed 30), 8 rows
25.5 (F.linear 50, oneDNN 36), 32 rows 46.3 (67, 59), 256 rows 232 (253); bf16 at 1 row
16.1 ms vs F.linear 23.9, 32 rows 18.1 vs 26.8, but 1,024 rows 221 vs 189.

On a 2-core Zen 4 (AVX512-BF16, no AMX), the same 121 layers in bf16, one call each:
1 row 9.1 ms with the bf16 panels against 14.4 (oneDNN packed) and 19.6 (F.linear); 16
rows 15.0 / 18.6 / 28.2; 64 rows 43.9 / 48.4 / 59.4; 256 rows 162.7 / 166.2 / 175.1; even
at 512 rows (342 / 335 / 341). At 1 row that reads the weights at 29.6 GB/s, the fp32
panels' bandwidth; oneDNN's bf16 reached about half of it.

On a 2-core Zen 3 (AVX2 and FMA, no AVX-512; benchmarks/linear_paths.py), the 121 layers
with the AVX2 panels against oneDNN packed and F.linear: fp32 1 row 20.3 ms / 26.4 / 26.5,
16 rows 42.3 / 56.2 / 88.6, 64 rows 138 / 156 / 207; bf16 (no oneDNN bf16 there) 1 row
11.1 against 17.1, 16 rows 36.6 against 236. The 120 layer linears alone (no lm_head, a
prefill chunk's rows): the bf16 panels 331 / 616 / 2,652 ms at 256 / 512 / 2,048 rows
against 499 / 808 / 2,884 for F.linear on operands widened to fp32 (torch's bf16 matmul:
~18 GFLOP/s there, 8x slower still).

The price is memory: every packed weight is a copy (the model's weights twice). Off with
EngineConfig(cpu_weight_prepack=False).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.kernels import cpu_ext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackedRows:
    """Row counts (tokens in the step) that use the packed weight: min_rows..max_rows."""

    min_rows: int
    max_rows: int


# From the measurements in the module docstring (crossovers rounded inward).
_PACKED_ROWS = {
    "panel": PackedRows(min_rows=1, max_rows=256),  # fp32, kernels/csrc/gemm_cpu.cpp
    "onednn_fp32": PackedRows(min_rows=4, max_rows=160),
    "onednn_bf16": PackedRows(min_rows=1, max_rows=384),
    "panel_bf16": PackedRows(min_rows=1, max_rows=384),  # AVX512-BF16, gemm_cpu.cpp
}
# AVX2 builds (no AVX-512): on a 2-core Zen 3 the panels matched or beat F.linear at every
# row count measured (fp32: 1.0-1.3x at 1 row, 3-3.9x at 4, 1.05-2.1x at 16-1,024; bf16
# 1.5-7x, torch's bf16 matmul having no fast path there), so they take every step up to
# this. (A later fp32 run had them at 0.86-0.97x F.linear at 256-2,048 rows with lm_head's
# 49,152 columns among the layers; without it, 1.0-1.18x at 128-2,048 rows.)
_AVX2_PANEL_ROWS = PackedRows(min_rows=1, max_rows=8192)
_ONEDNN_HINT_ROWS = 32  # the row count oneDNN tunes its blocked layout for


def packed_rows(packing: str, dtype: torch.dtype) -> PackedRows:
    """The row counts for which `packing` of a `dtype` weight beats F.linear in this build."""
    if packing in ("panel", "panel_bf16") and cpu_ext.gemm_isa(dtype) == "avx2":
        return _AVX2_PANEL_ROWS
    return _PACKED_ROWS[packing]


def packing_for(dtype: torch.dtype) -> str:
    """Which packed layout a weight of `dtype` gets here: 'panel', 'panel_bf16' or
    'onednn_*'."""
    if dtype == torch.float32:
        return "panel" if cpu_ext.gemm_supported() else "onednn_fp32"
    return "panel_bf16" if cpu_ext.gemm_bf16_supported() else "onednn_bf16"


def layer_packing(packing: str, in_features: int) -> str | None:
    """The packing one layer of `in_features` inputs gets where weights of its dtype get
    `packing`: the same, except that the bf16 panels hold k pairs, so an odd width goes to
    oneDNN's bf16 layout, or stays plain (None) where oneDNN has no bf16 path."""
    if packing != "panel_bf16" or in_features % 2 == 0:
        return packing
    return "onednn_bf16" if _onednn_bf16() else None


class PackedLinear(nn.Module):
    """nn.Linear's forward with the weight also held packed for small batches."""

    def __init__(self, linear: nn.Linear, packing: str):
        super().__init__()
        self.weight = linear.weight  # shared, not copied: embeddings may be tied to it
        self.bias = linear.bias
        resolved = layer_packing(packing, linear.in_features)
        if resolved is None:
            raise ValueError(f"no packed layout for a bf16 layer of {linear.in_features} inputs "
                             "here (odd: the panels hold k pairs; oneDNN has no bf16 path)")
        self.packing = packing = resolved
        self.rows = packed_rows(packing, linear.weight.dtype)
        weight = self.weight.detach()
        if packing in ("panel", "panel_bf16"):
            self.packed = cpu_ext.pack_linear_weight(weight)
        else:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, _ONEDNN_HINT_ROWS)

    def panel_args(self) -> tuple[torch.Tensor, torch.Tensor | None, int] | None:
        """(packed weight, bias, out_features) for a C++ kernel that runs this layer's
        panel GEMM itself (cpu_ext.decode_layer_); None where the weight is oneDNN's."""
        if self.packing not in ("panel", "panel_bf16"):
            return None
        return self.packed, self.bias, self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [num_rows, in_features] -> [num_rows, out_features]."""
        if not self.rows.min_rows <= x.shape[0] <= self.rows.max_rows or x.dim() != 2:
            return F.linear(x, self.weight, self.bias)
        if self.packing in ("panel", "panel_bf16"):
            return cpu_ext.linear_packed(x.contiguous(), self.packed, self.bias,
                                         self.weight.shape[0])
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def prepack_supported(dtype: torch.dtype, device: torch.device) -> bool:
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return cpu_ext.gemm_bf16_supported() or _onednn_bf16()
    return dtype == torch.float32


def _onednn_bf16() -> bool:
    """Whether oneDNN's bf16 path runs here (it needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def prepack_linears(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every nn.Linear in `model` by a PackedLinear, in place; returns how many.

    Leaves the model untouched (and logs why) if oneDNN cannot reorder a weight here.
    """
    packing = packing_for(dtype)
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if type(child) is nn.Linear
               and layer_packing(packing, child.in_features) is not None]
    try:
        packed = [(parent, name, PackedLinear(child, packing)) for parent, name, child in targets]
    except RuntimeError as exc:  # e.g. a torch build whose oneDNN lacks the op or the dtype
        log.warning("CPU weight prepacking unavailable (%s); using plain linear layers", exc)
        return 0
    for parent, name, layer in packed:
        setattr(parent, name, layer)
    return len(packed)
