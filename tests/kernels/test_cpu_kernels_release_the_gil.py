"""The C++ CPU kernels run without the GIL: while one runs, another Python thread of the
process goes on (a worker's gRPC streams beside its engine thread).

How it is seen: a second thread stamps the time in a loop while the main thread makes one
long kernel call (single-threaded, so the stamping thread has a core of its own), the GIL's
switch interval cut to 0.5 ms. Holding the GIL, the kernel would leave no stamp in the
middle half of its call: the stamping thread could run only within a switch interval or so
of the call's ends."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch

from splitserve.kernels import cpu_ext

pytestmark = pytest.mark.skipif(cpu_ext.load() is None, reason="CPU kernels could not be built")

SWITCH_INTERVAL_S = 0.0005
# Each case takes 25-75 ms on a 2.4 GHz Zen 3 core; the middle half of a 10 ms call is
# 2.5 ms away from either end, five switch intervals.
MIN_CALL_S = 0.01


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads, interval = torch.get_num_threads(), sys.getswitchinterval()
    torch.set_num_threads(1)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        sys.setswitchinterval(interval)


def stamps_in_the_middle(call: Callable[[], object]) -> tuple[int, float]:
    """(how many stamps the other thread made in the middle half of `call`, the call's
    seconds)."""
    stamps: list[float] = []
    stop = threading.Event()
    started = threading.Event()

    def stamp() -> None:
        started.set()
        while not stop.is_set():
            stamps.append(time.perf_counter())

    thread = threading.Thread(target=stamp, daemon=True)
    thread.start()
    started.wait()
    t0 = time.perf_counter()
    call()
    t1 = time.perf_counter()
    stop.set()
    thread.join()
    quarter = (t1 - t0) / 4
    return sum(t0 + quarter <= s <= t1 - quarter for s in stamps), t1 - t0


def _linear() -> Callable[[], object]:
    x = torch.ones(512, 2048)
    packed = cpu_ext.pack_linear_weight(torch.full((2048, 2048), 0.5))
    return lambda: cpu_ext.linear_packed(x, packed, None, 2048)


def _attention() -> Callable[[], object]:
    # 128 sequences reading the same 4,096-token context (one block table): long, small.
    num_seqs, heads, head_dim, block, context = 128, 8, 64, 16, 4096
    q = torch.full((num_seqs, heads, head_dim), 0.1)
    cache = torch.full((context // block, block, heads, head_dim), 0.2)
    tables = torch.arange(context // block, dtype=torch.int32).repeat(num_seqs, 1)
    lens = torch.full((num_seqs,), context, dtype=torch.int32)
    return lambda: cpu_ext.paged_decode_attention(q, cache, cache, tables, lens, 0.125)


def _silu() -> Callable[[], object]:
    gate_up, out = torch.full((16384, 4096), 0.3), torch.empty(16384, 2048)
    return lambda: cpu_ext.silu_and_mul(gate_up, out)


def _rms_norm() -> Callable[[], object]:
    x, out = torch.full((49152, 1024), 0.3), torch.empty(49152, 1024)
    return lambda: cpu_ext.rms_norm(x, torch.ones(1024), 1e-5, out)


def _add_rms_norm() -> Callable[[], object]:
    x, residual = torch.full((49152, 1024), 0.3), torch.full((49152, 1024), 0.1)
    return lambda: cpu_ext.add_rms_norm_(x, residual, torch.ones(1024), 1e-5)


def _rotary_store() -> Callable[[], object]:
    tokens, heads, kv_heads, head_dim = 32768, 8, 8, 64
    qkv = torch.full((tokens, (heads + 2 * kv_heads) * head_dim), 0.3)
    cos, sin = torch.full((tokens, head_dim), 0.6), torch.full((tokens, head_dim), 0.8)
    cache = torch.zeros(tokens // 16, 16, kv_heads, head_dim)
    slots = torch.arange(tokens)
    return lambda: cpu_ext.rotary_store_kv_(qkv, cos, sin, cache, cache.clone(), slots,
                                            heads, kv_heads, head_dim)


def _pack() -> Callable[[], object]:
    weight = torch.full((4096, 4096), 0.5)
    return lambda: cpu_ext.pack_linear_weight(weight)


def _decode_layer() -> Callable[[], object]:
    # 256 sequences, each writing its token to a slot of its own and reading one shared
    # 512-token context; SmolLM2-like widths.
    n, hidden, heads, kv_heads, head_dim, inter, block = 256, 1024, 16, 8, 64, 2816, 16
    context = 512

    def packed(out_features: int, in_features: int) -> tuple[torch.Tensor, None, int]:
        weight = torch.full((out_features, in_features), 0.01)
        return cpu_ext.pack_linear_weight(weight), None, out_features

    layer = (*packed((heads + 2 * kv_heads) * head_dim, hidden),
             *packed(hidden, heads * head_dim), *packed(2 * inter, hidden),
             *packed(hidden, inter), torch.ones(hidden), 1e-5, torch.ones(hidden), 1e-5,
             head_dim ** -0.5, heads, kv_heads, head_dim)
    x, residual = torch.full((n, hidden), 0.1), torch.full((n, hidden), 0.2)
    cos, sin = torch.full((n, head_dim), 0.6), torch.full((n, head_dim), 0.8)
    k_cache, v_cache = (torch.zeros(n // block + context // block, block, kv_heads, head_dim)
                        for _ in range(2))
    slots = torch.arange(n)
    tables = torch.arange(context // block, dtype=torch.int32).repeat(n, 1)
    lens = torch.full((n,), context, dtype=torch.int32)
    return lambda: cpu_ext.decode_layer_(x, residual, cos, sin, k_cache, v_cache, slots, tables,
                                         lens, *layer)


KERNELS = {"decode_layer_": _decode_layer, "linear_packed": _linear, "paged_decode_attention": _attention,
           "silu_and_mul": _silu, "rms_norm": _rms_norm, "add_rms_norm_": _add_rms_norm,
           "rotary_store_kv_": _rotary_store, "pack_linear_weight": _pack}


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_another_python_thread_runs_while_a_kernel_does(name: str, one_thread: None) -> None:
    if name in ("decode_layer_", "linear_packed", "pack_linear_weight") and (
            not cpu_ext.gemm_supported()):
        pytest.skip("this build has no linear_packed")
    call = KERNELS[name]()
    call()  # warm: first-touch of the output, the kernel's own set-up
    stamped, seconds = stamps_in_the_middle(call)
    assert seconds >= MIN_CALL_S, f"{name} took {seconds * 1e3:.1f} ms: the case is too small"
    assert stamped > 0, (f"no Python ran in the middle of {name}'s {seconds * 1e3:.0f} ms "
                         "call: it holds the GIL")
