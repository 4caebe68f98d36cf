"""SplitServe kvtransfer: move a request's KV-cache blocks from a prefill worker's pool to a
decode worker's pool, layer by layer.

    layout      KVLayout (the contract both sides must share), KVLayoutMismatch  [torch-free]
    state       TransferState, KVTransfer (the polled handle), TransferStats     [torch-free]
    base        KVBackend: the interface the engine uses
    inproc      InProcBackend: P and D in one process
    torch_dist  TorchDistBackend: gloo (CPU) / NCCL (CUDA) point-to-point, and
                create_rendezvous_store()

Exports are lazy so that `kvtransfer.layout` and `kvtransfer.state` stay importable without
torch (the router builds and compares layouts).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "KVLayout": "kvtransfer.layout",
    "KVLayoutMismatch": "kvtransfer.layout",
    "check_compatible": "kvtransfer.layout",
    "TransferState": "kvtransfer.state",
    "KVTransfer": "kvtransfer.state",
    "TransferHandle": "kvtransfer.state",
    "TransferStats": "kvtransfer.state",
    "request_key": "kvtransfer.state",
    "KVBackend": "kvtransfer.base",
    "InProcBackend": "kvtransfer.inproc",
    "InProcRegistry": "kvtransfer.inproc",
    "TorchDistBackend": "kvtransfer.torch_dist",
    "create_rendezvous_store": "kvtransfer.torch_dist",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvtransfer' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
