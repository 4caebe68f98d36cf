"""SplitServe kernels: paged decode attention, KV store, KV pack/unpack for transfer.

Each Triton kernel lives beside a plain-torch reference (`kernels.reference`). Importing
this package never imports triton: use `kernels.backend.get_attention_ops(backend, device)`
to pick an implementation ('torch', 'triton' or 'auto').
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["get_attention_ops", "reference"]


def __getattr__(name: str) -> Any:
    # Lazy so that `import kernels` stays cheap and triton-free.
    if name == "get_attention_ops":
        return importlib.import_module("kernels.backend").get_attention_ops
    if name == "reference":
        return importlib.import_module("kernels.reference")
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
