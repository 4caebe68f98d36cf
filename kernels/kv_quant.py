"""The quantized KV cache formats ("int8", "fp8"): one (token, kv head) row is `head_dim`
one-byte values followed by its scale, an fp16 in 2 bytes, so a block stays one
self-contained run of bytes (the KV transfer, the host and disk tiers and live migration
move quantized blocks and their scales without knowing about them):

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim + 2] of the storage
    dtype, torch.int8 for "int8", torch.uint8 (the bytes of e4m3 values) for "fp8"
    both: y = H x (head_dim a power of two; else y = x)
    int8: y[d] ~ int8[d] * scale,  scale = max_d |y[d]| / 127 (rounded to fp16 first)
    fp8:  y made finite first (NaN -> 0, clamped to +-448 * 65504, the most a row holds)
          y[d] ~ e4m3[d] * scale,  scale = max_d |y[d]| / 448 (rounded to fp16 first),
          e4m3[d] = y[d] / scale clamped to +-448, rounded to nearest even (OCP e4m3fn:
          bias 7, subnormals down to 2^-9, no infinities; the NaN codes are never written)

The fp8 cache is stored as uint8 because torch's CPU float8 tensors lack index_copy_ and
friends, which the stores, transfer and tiers use (vLLM stores its fp8 cache as uint8 too);
the storage dtype names the codec everywhere (kernels, layouts, disk keys).

H is the orthonormal Walsh-Hadamard matrix (symmetric, H H = I; QuaRot's trick): keys have a
few channels far larger than the rest, which would set a per-row scale too coarse for the
others; rotated, every channel carries a share of them. Attention is unchanged by it, since
(H q).(H k) = q.k and sum_i p_i H v_i = H (sum_i p_i v_i): the decode kernels rotate the
query in and the output back, and never rotate a cached row. Measured on SmolLM2 (see
BENCHMARKS.md): int8 greedy outputs identical for 32 tokens rose from 22 to 28 of 32
prompts. fp8 keeps a relative precision in every channel, yet the rotation still helps it:
see ROTATED below. fp8's 3 mantissa bits cost accuracy against int8's 7 (a row's relative
error ~2.2% vs ~0.5% on Gaussian rows); it is the format GPUs convert in hardware.
Per-token-per-head scales need no rescaling when a block fills up token by token (KIVI's
per-channel keys would). The C++ and Triton kernels read these layouts in place; this module
is the torch reference of both directions.
"""

from __future__ import annotations

import functools
import math

import torch

SCALE_BYTES = 2  # the fp16 scale after each row
# Bumped whenever the bytes of a quantized row change meaning (KV kept on disk, e.g. the
# disk tier's files, must not outlive it): 2 = rotated int8 rows (fp8 rows: new in 2).
FORMAT_VERSION = 2
QMAX = 127.0  # int8
FP8_MAX = 448.0  # e4m3fn's largest finite value
# The largest |y| an fp8 row holds: FP8_MAX times fp16's largest scale (exact in fp32).
FP8_ROW_LIMIT = FP8_MAX * 65504.0

# Float caches that may differ from the model's dtype (--kv-cache-dtype bfloat16 /
# float16): K/V rounded to them as they are stored, read back exactly; no scales.
HALF_CACHE_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)
# --kv-cache-dtype name -> the pool's storage dtype.
STORAGE_DTYPES: dict[str, torch.dtype] = {"int8": torch.int8, "fp8": torch.uint8}
_CODECS = {dtype: name for name, dtype in STORAGE_DTYPES.items()}
# Whether a codec stores power-of-two rows rotated (H x); the C++ kernels mirror it
# (csrc/kv_quant.h). fp8 on SmolLM2-135M fp32, torch path, 24 prompts x 64 greedy tokens:
# perplexity +0.08% rotated vs +0.44% not, first divergence median 18.5 vs 15 tokens,
# mean |dlogprob| 0.036 vs 0.037 (benchmarks/kv_quant.py --fp8-rotation-study).
ROTATED: dict[str, bool] = {"int8": True, "fp8": True}

__all__ = ["FP8_MAX", "HALF_CACHE_DTYPES", "SCALE_BYTES", "STORAGE_DTYPES", "check_device",
           "codec_of", "dequantize_rows", "e4m3_bits", "e4m3_values", "hadamard",
           "hadamard_matrix", "is_quantized", "kernel_codec", "quantize_rows", "rotates",
           "row_width"]


def codec_of(dtype: torch.dtype) -> str | None:
    """The codec ("int8" or "fp8") of a quantized cache's storage dtype, else None."""
    return _CODECS.get(dtype)


def kernel_codec(cache_dtype: torch.dtype) -> int:
    """The Triton kernels' CODEC constexpr for a cache: 0 float, 1 int8, 2 fp8."""
    return {None: 0, "int8": 1, "fp8": 2}[codec_of(cache_dtype)]


def rotates(cache_dtype: torch.dtype, head_dim: int) -> bool:
    """Whether a cache of this storage dtype holds rows of this width rotated (a quantized
    codec that rotates, and a power-of-two head_dim)."""
    codec = codec_of(cache_dtype)
    return (codec is not None and ROTATED[codec] and head_dim >= 2
            and head_dim & (head_dim - 1) == 0)


@functools.lru_cache(maxsize=16)
def hadamard_matrix(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """H as an fp32 [n, n] matrix (for kernels that rotate with a matrix product); built
    once per (n, device), never written."""
    return hadamard(torch.eye(n, device=device))


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """H x along the last dim (a power of two), fp32, by butterflies in the order the C++
    kernels use (csrc/kv_quant.h), so both round alike. H is its own inverse."""
    n = x.shape[-1]
    y = x.float()
    h = 1
    while h < n:
        pairs = y.reshape(*x.shape[:-1], n // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2).reshape(x.shape)
        h *= 2
    return y * (1.0 / math.sqrt(n))


def row_width(head_dim: int) -> int:
    """Bytes of one quantized (token, head) row."""
    return head_dim + SCALE_BYTES


def is_quantized(cache: torch.Tensor) -> bool:
    return codec_of(cache.dtype) is not None


def e4m3_bits(v: torch.Tensor) -> torch.Tensor:
    """fp32 values within +-448 -> uint8 e4m3fn codes, rounded to nearest even (torch's
    conversion; the C++ and Triton stores compute the same codes arithmetically)."""
    return v.to(torch.float8_e4m3fn).view(torch.uint8)


def e4m3_values(bits: torch.Tensor) -> torch.Tensor:
    """uint8 e4m3fn codes -> fp32 values (exact)."""
    return bits.view(torch.float8_e4m3fn).float()


def quantize_rows(x: torch.Tensor, codec: str = "int8") -> torch.Tensor:
    """[..., head_dim] floats -> [..., head_dim + 2] of the codec's storage dtype (values,
    then the fp16 scale)."""
    rotate = rotates(STORAGE_DTYPES[codec], x.shape[-1])
    y = hadamard(x) if rotate else x.float()
    if codec == "fp8":
        y = torch.nan_to_num(y, nan=0.0, posinf=FP8_ROW_LIMIT, neginf=-FP8_ROW_LIMIT)
        y = y.clamp(-FP8_ROW_LIMIT, FP8_ROW_LIMIT)
    qmax = FP8_MAX if codec == "fp8" else QMAX
    scale = (y.abs().amax(dim=-1, keepdim=True) / qmax).to(torch.float16)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).float()
    if codec == "fp8":
        values = e4m3_bits((y / safe).clamp_(-FP8_MAX, FP8_MAX))
    else:
        values = torch.round(y / safe).clamp_(-QMAX, QMAX).to(torch.int8)
    return torch.cat([values, scale.view(values.dtype)], dim=-1)


def dequantize_rows(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., head_dim + 2] quantized rows -> [..., head_dim] of `dtype` (values times the
    scale, rotated back)."""
    head_dim = packed.shape[-1] - SCALE_BYTES
    scale = packed[..., head_dim:].contiguous().view(torch.float16).float()
    raw = packed[..., :head_dim]
    decoded = e4m3_values(raw) if codec_of(packed.dtype) == "fp8" else raw.float()
    values = decoded * scale
    return (hadamard(values) if rotates(packed.dtype, head_dim) else values).to(dtype)


def check_device(codec: str, device: torch.device) -> None:
    """Raise ValueError where `device` cannot hold this codec's cache: fp8 on a CUDA device
    older than compute capability 8.9 (Ada/Hopper, the first with e4m3 conversions). CPUs
    run every codec through the C++ kernels."""
    if codec == "fp8" and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            name = torch.cuda.get_device_name(device)
            raise ValueError(
                f"--kv-cache-dtype fp8 needs a GPU of compute capability 8.9 or newer (e4m3 "
                f"support); {name} is {major}.{minor}: use --kv-cache-dtype int8 instead")
