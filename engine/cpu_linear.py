"""Linear layers for CPU decode: a second copy of each weight in oneDNN's blocked layout.

At the small row counts of decode steps, oneDNN's matmul on a weight reordered once at load
time beats `F.linear` on the plain weight: measured on the 2-core AMX Xeon this project is
developed on, for SmolLM2's 30 layers plus lm_head, bf16 at 1 row 16.1 ms vs 23.9 ms and at
32 rows 18.1 vs 26.8 ms; fp32 at 8 rows 38 vs 50 ms and at 32 rows 61 vs 67 ms. Large
prefill chunks are faster on the plain weight (bf16 1,024 rows: 221 vs 189 ms) and so is
fp32 at 1-3 rows (MKL's GEMV), so each layer keeps both and picks by row count.

The price is memory: every packed weight is a copy (the model's weights twice). Off with
EngineConfig(cpu_weight_prepack=False).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackedRows:
    """Row counts (tokens in the step) that use the packed weight: min_rows..max_rows."""

    min_rows: int
    max_rows: int


# From the measurements in the module docstring (crossovers rounded inward).
_PACKED_ROWS = {
    torch.float32: PackedRows(min_rows=4, max_rows=160),
    torch.bfloat16: PackedRows(min_rows=1, max_rows=384),
}
_PACK_HINT_ROWS = 32  # the row count oneDNN tunes the blocked layout for


class PackedLinear(nn.Module):
    """nn.Linear's forward with the weight also held in oneDNN's layout for small batches."""

    def __init__(self, linear: nn.Linear, rows: PackedRows):
        super().__init__()
        self.weight = linear.weight  # shared, not copied: embeddings may be tied to it
        self.bias = linear.bias
        self.rows = rows
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), _PACK_HINT_ROWS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [num_rows, in_features] -> [num_rows, out_features]."""
        if self.rows.min_rows <= x.shape[0] <= self.rows.max_rows and x.dim() == 2:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def prepack_supported(dtype: torch.dtype, device: torch.device) -> bool:
    return (device.type == "cpu" and dtype in _PACKED_ROWS
            and torch.backends.mkldnn.is_available())


def prepack_linears(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every nn.Linear in `model` by a PackedLinear, in place; returns how many.

    Leaves the model untouched (and logs why) if oneDNN cannot reorder a weight here.
    """
    rows = _PACKED_ROWS[dtype]
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if type(child) is nn.Linear]
    try:
        packed = [(parent, name, PackedLinear(child, rows)) for parent, name, child in targets]
    except RuntimeError as exc:  # a torch build whose oneDNN lacks the op or the dtype
        log.warning("CPU weight prepacking unavailable (%s); using plain linear layers", exc)
        return 0
    for parent, name, layer in packed:
        setattr(parent, name, layer)
    return len(packed)
