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
_SOURCES = [_CSRC / "bindings.cpp", _CSRC / "paged_decode_cpu.cpp"]
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
