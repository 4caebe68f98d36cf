"""Engine configuration: one frozen dataclass, validated on construction.

Runtime facts (how many KV blocks fit in memory, the model's context length) are returned
by the components that discover them, never written back into the config.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import Any

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_DEVICES = ("auto", "cpu", "cuda")
_ATTENTION_BACKENDS = ("auto", "torch", "triton", "cpu")
_ROLES = ("both", "prefill", "decode")
# auto: the model's dtype; bfloat16 / float16: a half-width float cache (for an fp32 model:
# half the bytes, like llama.cpp's default f16 cache); int8 / fp8: quantized (kv_quant.py).
KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "int8", "fp8")
FLOAT_KV_CACHE_DTYPES = ("bfloat16", "float16")


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine (colocated, prefill or decode role) is built from."""

    model: str = "smollm2-135m"
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "auto"  # auto: cuda when available, else cpu
    block_size: int = 16  # token slots per KV block
    num_kv_blocks: int | None = None  # explicit pool size; None sizes it from kv_cache_memory_bytes
    kv_cache_memory_bytes: int | None = None  # None: 1 GiB on CPU, 90% of free memory on CUDA
    max_num_seqs: int = 64  # running sequences per step
    max_num_batched_tokens: int = 2048  # token budget per step (prefill chunks + decodes)
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    # Fair share across clients in the scheduler (engine/fair_share.py); off: FCFS.
    fair_share: bool = True
    # Fair-share weights by client name, (name, weight) pairs (default 1): the router's
    # --client-weights, so a worker shares its batch as the router shares its queue.
    client_weights: tuple[tuple[str, float], ...] = ()
    # A waiting request's priority class improves by one per this many seconds (0: never),
    # so better classes delay worse ones by a bounded time (engine/scheduler.py).
    priority_aging_s: float = 10.0
    # KV cache storage: auto (the model's dtype); bfloat16 or float16 (K/V rounded to it as
    # they are stored, read back as the model's dtype: half of fp32's bytes); int8 or fp8
    # (e4m3), both with per-token-per-head fp16 scales (kernels/kv_quant.py: about half the
    # bytes of bf16, a quarter of fp32). fp8 needs a CUDA device of compute capability 8.9+,
    # or the CPU.
    kv_cache_dtype: str = "auto"
    # KV tiers below the pool (engine/kv_tier.py): evicted prefix-cache blocks go to host
    # memory (0: no host tier), then to one file per block under disk_kv_cache_dir (None:
    # no disk tier), at most disk_kv_cache_bytes of them; both LRU.
    host_kv_cache_bytes: int = 0
    disk_kv_cache_dir: str | None = None
    disk_kv_cache_bytes: int = 8 << 30
    attention_backend: str = "auto"  # auto: triton on CUDA, the C++ kernel (else torch) on CPU
    num_threads: int | None = None  # CPU threads for torch; None: all cores
    # CPU: keep each linear weight also in a packed layout for decode-sized batches (our
    # fp32 panel GEMM, oneDNN's for bf16): faster decode, twice the weight memory; see
    # engine/cpu_linear.py.
    cpu_weight_prepack: bool = True
    # CUDA: decode steps replay CUDA graphs captured per batch size (engine/cuda_graphs.py);
    # True runs every step eagerly (debugging, or to measure what the graphs save).
    enforce_eager: bool = False
    role: str = "both"  # which phases this engine runs: both (colocated), prefill, decode
    seed: int = 0  # seeds requests that ask for sampling without a seed of their own
    # Paced streams (engine/pacing.py): how far ahead of its reader a paced request may
    # run, in seconds of its own pace (at 20 tokens/s, 1.0 s is 20 tokens).
    stream_pace_buffer_s: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.device not in _DEVICES and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be one of {_DEVICES} or 'cuda:N', got {self.device!r}")
        if self.attention_backend not in _ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {_ATTENTION_BACKENDS}, "
                f"got {self.attention_backend!r}"
            )
        if self.role not in _ROLES:
            raise ValueError(f"role must be one of {_ROLES}, got {self.role!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            raise ValueError("kv_cache_memory_bytes must be positive")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, "
                             f"got {self.kv_cache_dtype!r}")
        if self.host_kv_cache_bytes < 0 or self.disk_kv_cache_bytes < 0:
            raise ValueError("host_kv_cache_bytes and disk_kv_cache_bytes must be >= 0")
        if (self.host_kv_cache_bytes or self.disk_kv_cache_dir) and not self.enable_prefix_caching:
            raise ValueError("a host or disk KV tier needs prefix caching")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if not 0 < self.stream_pace_buffer_s <= 3600:
            raise ValueError("stream_pace_buffer_s must be in (0, 3600], "
                             f"got {self.stream_pace_buffer_s}")
        if not (math.isfinite(self.priority_aging_s) and self.priority_aging_s >= 0):
            raise ValueError(f"priority_aging_s must be a finite number >= 0, "
                             f"got {self.priority_aging_s}")
        for client, weight in self.client_weights:
            if not (math.isfinite(weight) and weight > 0):
                raise ValueError(f"the weight of client {client!r} must be > 0, got {weight}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")

    @property
    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "float32" if self.resolved_device == "cpu" else "bfloat16"

    @property
    def resolved_num_threads(self) -> int:
        from splitserve.common import envs

        return self.num_threads or envs.num_threads() or os.cpu_count() or 1

    def with_overrides(self, **changes: Any) -> EngineConfig:
        return replace(self, **changes)
