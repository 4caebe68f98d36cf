"""kernels.backend: dispatch by name and device, lazy triton import, scratch reuse."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from splitserve.kernels import backend, reference


def test_torch_backend_is_the_reference():
    ops = backend.get_attention_ops("torch", "cpu")
    assert ops.name == "torch"
    assert ops.paged_decode_attention is reference.paged_decode_attention
    assert ops.store_kv is reference.store_kv
    assert ops.pack_kv is reference.pack_kv and ops.unpack_kv is reference.unpack_kv


def test_auto_on_cpu_is_the_cpu_kernel_or_torch():
    from splitserve.kernels import cpu_ext

    expected = "cpu" if cpu_ext.load() is not None else "torch"
    assert backend.get_attention_ops("auto", torch.device("cpu")).name == expected


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="unknown attention backend"):
        backend.get_attention_ops("flash", "cpu")


def test_triton_backend_runs_and_matches_torch(make_batch):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ops = backend.get_attention_ops("triton", device)
    assert ops.name == "triton"
    # Batches of 3, then 5, then 2 sequences: the backend's split-K scratch grows, then is
    # reused with stale rows from the larger batch in it.
    for lens, splits in [([1, 40, 130], 1), ([1, 40, 130], 4), ([300, 2, 90, 64, 65], 3), ([7, 200], 4)]:
        q, kv = make_batch(lens, 8, 2, 64, 16, device=device)
        args = (q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, 0.125)
        out = torch.empty_like(q)
        assert ops.paged_decode_attention(*args, out=out, num_splits=splits) is out
        torch.testing.assert_close(out, reference.paged_decode_attention(*args), atol=2e-5, rtol=2e-5)


def _run_isolated(code: str, env_extra: dict[str, str] | None = None) -> str:
    env = {**os.environ, **(env_extra or {})}
    env.pop("TRITON_INTERPRET", None)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env, capture_output=True, text=True, timeout=120, check=True,
    )
    return result.stdout.strip()


def test_importing_kernels_and_torch_backend_never_imports_triton():
    out = _run_isolated(
        """
        import sys
        from splitserve.kernels import attention_plan, backend, reference
        attention_plan.alloc_scratch(2, 4, 64, "cpu")
        backend.get_attention_ops("torch", "cpu")
        backend.get_attention_ops("auto", "cpu")
        print("triton" in sys.modules)
        """
    )
    assert out == "False"


def test_triton_on_cpu_sets_interpreter_before_import():
    out = _run_isolated(
        """
        import os, sys
        from splitserve.kernels import backend
        ops = backend.get_attention_ops("triton", "cpu")
        print(ops.name, os.environ.get("TRITON_INTERPRET"), "triton" in sys.modules)
        """
    )
    assert out == "triton 1 True"


def test_triton_unavailable_auto_falls_back_and_explicit_raises():
    # A sitecustomize-free way to make `import triton` fail: shadow it with a broken module.
    out = _run_isolated(
        """
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch
        from splitserve.kernels import backend
        fake_cuda = torch.device("cuda")
        print(backend.get_attention_ops("auto", fake_cuda).name)
        try:
            backend.get_attention_ops("triton", "cpu")
        except RuntimeError as exc:
            print("raised", "not importable" in str(exc))
        """
    )
    assert out.splitlines() == ["torch", "raised True"]


def test_scratch_cache_views_exact_shapes_and_grows_to_the_largest_product():
    cache = backend._ScratchCache()
    q = torch.empty(4, 8, 64)
    wide = cache.get(q, 2)  # 4 seqs x 2 splits
    assert wide.partial_out.shape == (4, 8, 2, 64) and wide.partial_lse.shape == (4, 8, 2)
    assert cache.get(q, 2) is wide  # the same shape again: the cached view
    flat = cache._flat
    assert flat is not None
    # 1 seq x 8 splits is the same product: a view of the same buffers, nothing allocated.
    long = cache.get(q[:1], 8)
    assert long.partial_out.shape == (1, 8, 8, 64)
    assert long.partial_out.data_ptr() == flat[0].data_ptr() and cache._flat is flat
    # A larger product grows both buffers.
    grown = cache.get(q, 16)
    assert grown.partial_out.shape == (4, 8, 16, 64) and cache._flat is not flat
    assert cache._flat[0].numel() == 4 * 8 * 16 * 64 and cache._flat[1].numel() == 4 * 8 * 16
