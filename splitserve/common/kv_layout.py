"""The KV layout contract between a sending and a receiving worker.

Both ends of a transfer must agree on how one layer of one block looks in memory:

    k_cache[l], v_cache[l]: [num_blocks, block_size, num_kv_heads, head_dim] of `dtype`

An "int8" or "fp8" layout is a quantized cache of kernels.kv_quant: each (token, head) row
holds head_dim one-byte values (int8, or e4m3 stored as uint8) and an fp16 scale, so a row
is head_dim + 2 bytes; "float8_e4m3fn" would be a plain fp8 cache without scales, another
layout. A P/D pair whose dtypes differ is refused by check_compatible. The layout travels
as JSON (never pickle) through the rendezvous store or the control plane. This module is
torch-free so that the router can build and compare layouts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

# dtype name -> bytes per element. Names are torch's attribute names (torch.<name>).
_DTYPE_BYTES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,  # quantized rows: head_dim values + an fp16 scale
    "fp8": 1,  # quantized rows: head_dim e4m3 values + an fp16 scale
}
# Bytes after the values of a quantized row (its scale), by dtype.
_SCALE_BYTES: dict[str, int] = {"int8": 2, "fp8": 2}
# Layout dtype names that are not torch attribute names -> the torch dtype that stores them.
_STORAGE: dict[str, str] = {"fp8": "uint8"}
# The dtypes a model computes in ("": not stated).
_MODEL_DTYPES = frozenset({"", "float32", "float16", "bfloat16"})


class KVLayoutMismatch(ValueError):
    """The two ends of a transfer hold KV caches of different layouts."""


@dataclass(frozen=True)
class KVLayout:
    """Shape and dtype of a worker's KV pool, per layer: [num_blocks, block_size, num_kv_heads,
    head_dim] for K and for V. The pool's num_blocks is local and not part of the contract."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"
    # The dtype the model computes in, which the values come from ("" : not stated). Two
    # layouts that both state it must agree: an fp32 model's bf16 cache holds other values
    # than a bf16 model's, though the bytes look alike.
    model_dtype: str = ""

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"KVLayout.{name} must be a positive int, got {value!r}")
        if self.dtype not in _DTYPE_BYTES:
            raise ValueError(
                f"KVLayout.dtype must be one of {sorted(_DTYPE_BYTES)}, got {self.dtype!r}"
            )
        if self.model_dtype not in _MODEL_DTYPES:
            raise ValueError(f"KVLayout.model_dtype must be one of {sorted(_MODEL_DTYPES)} "
                             f"(or empty), got {self.model_dtype!r}")

    @property
    def element_size(self) -> int:
        return _DTYPE_BYTES[self.dtype]

    @property
    def row_width(self) -> int:
        """Elements of one (token, head) row: head_dim, plus the scale of a quantized row."""
        return self.head_dim + _SCALE_BYTES.get(self.dtype, 0)

    @property
    def block_shape(self) -> tuple[int, int, int]:
        """One block of one layer of K (or V): (block_size, num_kv_heads, row_width)."""
        return (self.block_size, self.num_kv_heads, self.row_width)

    @property
    def bytes_per_block_per_layer(self) -> int:
        """Bytes of K plus V for one block of one layer."""
        return 2 * self.block_size * self.num_kv_heads * self.row_width * self.element_size

    def bytes_for(self, num_blocks: int) -> int:
        """Bytes of K plus V for `num_blocks` blocks across all layers."""
        return num_blocks * self.num_layers * self.bytes_per_block_per_layer

    @property
    def torch_dtype(self) -> Any:
        import torch  # local: keep this module importable without torch

        return getattr(torch, _STORAGE.get(self.dtype, self.dtype))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> KVLayout:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"KVLayout JSON must be an object, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        missing = sorted(names - set(data) - {"model_dtype"})  # optional: not stated
        if unknown or missing:
            raise ValueError(f"KVLayout JSON: unknown fields {unknown}, missing fields {missing}")
        return cls(**data)

    def describe(self) -> str:
        model = f" model_dtype={self.model_dtype}" if self.model_dtype else ""
        return (
            f"layers={self.num_layers} kv_heads={self.num_kv_heads} head_dim={self.head_dim} "
            f"block_size={self.block_size} dtype={self.dtype}{model}"
        )


def check_compatible(
    local: KVLayout, remote: KVLayout, local_name: str = "local", remote_name: str = "remote"
) -> None:
    """Raise KVLayoutMismatch naming both sides and every differing field (model_dtype only
    where both state it)."""
    diffs = [
        f"{f.name}: {getattr(local, f.name)!r} != {getattr(remote, f.name)!r}"
        for f in fields(KVLayout)
        if getattr(local, f.name) != getattr(remote, f.name)
        and (f.name != "model_dtype" or (local.model_dtype and remote.model_dtype))
    ]
    if diffs:
        raise KVLayoutMismatch(
            f"KV layout mismatch between {local_name} ({local.describe()}) and "
            f"{remote_name} ({remote.describe()}); differing fields: {'; '.join(diffs)}"
        )
