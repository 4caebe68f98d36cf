"""KVLayout contract, request keys and the wire header (no network)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from splitserve.common.kv_layout import KVLayout, KVLayoutMismatch, check_compatible
from splitserve.kvtransfer._wire import MAGIC, Header
from splitserve.kvtransfer.state import (
    Direction,
    KVTransfer,
    TransferState,
    block_ids_digest,
    request_key,
)

ROOT = Path(__file__).resolve().parents[2]
SMOLLM2 = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, block_size=16, dtype="bfloat16")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float8_e4m3fn"])
def test_json_round_trip(dtype: str) -> None:
    layout = replace(SMOLLM2, dtype=dtype)
    text = layout.to_json()
    assert json.loads(text) == {
        "num_layers": 30,
        "num_kv_heads": 3,
        "head_dim": 64,
        "block_size": 16,
        "dtype": dtype,
        "model_dtype": "",
    }
    assert KVLayout.from_json(text) == layout
    assert KVLayout.from_json(text.encode()) == layout
    stated = replace(layout, model_dtype="float32")
    assert KVLayout.from_json(stated.to_json()) == stated


def test_from_json_rejects_unknown_missing_and_bad_fields() -> None:
    good = json.loads(SMOLLM2.to_json())
    with pytest.raises(ValueError, match=r"unknown fields \['extra'\]"):
        KVLayout.from_json(json.dumps({**good, "extra": 1}))
    with pytest.raises(ValueError, match=r"missing fields \['head_dim'\]"):
        KVLayout.from_json(json.dumps({k: v for k, v in good.items() if k != "head_dim"}))
    with pytest.raises(ValueError, match="dtype"):
        KVLayout.from_json(json.dumps({**good, "dtype": "int4"}))
    with pytest.raises(ValueError, match="block_size"):
        KVLayout(30, 3, 64, 0, "float32")
    with pytest.raises(ValueError, match="num_layers"):
        KVLayout.from_json(json.dumps({**good, "num_layers": 2.5}))
    with pytest.raises(ValueError, match="model_dtype"):
        KVLayout.from_json(json.dumps({**good, "model_dtype": "int8"}))
    # A peer that does not state its model's dtype: the field is optional.
    assert KVLayout.from_json(json.dumps({k: v for k, v in good.items()
                                          if k != "model_dtype"})) == SMOLLM2


def test_the_model_dtype_is_compared_where_both_ends_state_it() -> None:
    """An fp32 model's bf16 cache and a bf16 model's hold alike bytes, other values."""
    fp32_model = replace(SMOLLM2, model_dtype="float32")
    bf16_model = replace(SMOLLM2, model_dtype="bfloat16")
    with pytest.raises(KVLayoutMismatch, match="model_dtype: 'float32' != 'bfloat16'") as info:
        check_compatible(fp32_model, bf16_model, "prefill-0", "decode-0")
    assert "prefill-0 (layers=30 kv_heads=3 head_dim=64 block_size=16 dtype=bfloat16 " \
           "model_dtype=float32)" in str(info.value)
    check_compatible(fp32_model, replace(SMOLLM2, model_dtype="float32"))
    check_compatible(fp32_model, SMOLLM2)  # not stated on one end
    check_compatible(SMOLLM2, bf16_model)


def test_sizes() -> None:
    assert SMOLLM2.block_shape == (16, 3, 64)
    assert SMOLLM2.bytes_per_block_per_layer == 2 * 16 * 3 * 64 * 2 == 12288
    assert replace(SMOLLM2, dtype="float32").bytes_per_block_per_layer == 24576
    assert SMOLLM2.bytes_for(63) == 63 * 30 * 12288
    assert SMOLLM2.torch_dtype is torch.bfloat16
    # int8: quantized rows of head_dim values and an fp16 scale (kernels.kv_quant).
    int8 = replace(SMOLLM2, dtype="int8")
    assert int8.block_shape == (16, 3, 66) and int8.torch_dtype is torch.int8
    assert int8.bytes_per_block_per_layer == 2 * 16 * 3 * 66
    # fp8: the same row shape, e4m3 codes stored as uint8 (kernels.kv_quant).
    fp8 = replace(SMOLLM2, dtype="fp8")
    assert fp8.block_shape == (16, 3, 66) and fp8.torch_dtype is torch.uint8
    assert fp8.bytes_per_block_per_layer == int8.bytes_per_block_per_layer


@pytest.mark.parametrize("other", ["int8", "bfloat16", "float8_e4m3fn"])
def test_an_fp8_cache_is_refused_beside_any_other_dtype_by_name(other: str) -> None:
    """Equal bytes per row (int8) or per element (a plain fp8 cache) do not make layouts
    compatible: the handshake compares the codec's name."""
    fp8 = replace(SMOLLM2, dtype="fp8")
    with pytest.raises(KVLayoutMismatch, match=f"dtype: 'fp8' != '{other}'"):
        check_compatible(fp8, replace(SMOLLM2, dtype=other), "prefill-0", "decode-0")
    check_compatible(fp8, KVLayout.from_json(fp8.to_json()))


def test_check_compatible_names_both_sides_and_every_field() -> None:
    check_compatible(SMOLLM2, KVLayout.from_json(SMOLLM2.to_json()))
    remote = replace(SMOLLM2, head_dim=128, dtype="float16")
    with pytest.raises(KVLayoutMismatch) as info:
        check_compatible(SMOLLM2, remote, "worker 'prefill-0'", "worker 'decode-1'")
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "worker 'prefill-0' (layers=30 kv_heads=3 head_dim=64" in message
    assert "worker 'decode-1' (layers=30 kv_heads=3 head_dim=128" in message
    assert "head_dim: 64 != 128" in message
    assert "dtype: 'bfloat16' != 'float16'" in message
    assert "num_layers" not in message.split("differing fields:")[1]


def test_keys_are_stable_across_processes_and_torch_free() -> None:
    """request keys must agree between P and D processes (no PYTHONHASHSEED dependence), and
    the layout/state modules must not import torch (the router uses them)."""
    code = (
        "import sys, json; from splitserve.kvtransfer.state import request_key, block_ids_digest; "
        "import splitserve.common.kv_layout; "
        "print(json.dumps([request_key('req-a'), request_key('ü/9'), block_ids_digest([3, 1, 2]), "
        "'torch' in sys.modules]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    key_a, key_u, digest, imported_torch = json.loads(out.stdout)
    assert (key_a, key_u, digest) == (
        request_key("req-a"),
        request_key("ü/9"),
        block_ids_digest([3, 1, 2]),
    )
    assert imported_torch is False
    assert 0 <= key_a < 2**63 and key_a != key_u
    assert block_ids_digest([3, 1, 2]) != block_ids_digest([1, 2, 3])  # order matters


def test_header_round_trip_and_rejects_garbage() -> None:
    header = Header(1, request_key("r"), 29, 63, block_ids_digest([5, 6]), 63 * 12288)
    buf = torch.empty(8, dtype=torch.int64)
    assert Header.decode(header.encode(buf)) == header
    assert int(buf[0]) == MAGIC
    buf[0] = 7
    with pytest.raises(ValueError, match="not a kvtransfer header"):
        Header.decode(buf)
    with pytest.raises(ValueError, match="bad kvtransfer header"):
        Header.decode(Header(9, 1).encode(buf))


def test_a_finished_transfer_is_counted_before_its_waiters_wake() -> None:
    # The backend's statistics come from the finish callback: a waiter that sees the
    # transfer done (and frees the request) must find it counted.
    seen: list[tuple[TransferState, TransferState, bool]] = []

    def count(h: KVTransfer, state: TransferState) -> None:
        seen.append((state, h.poll(), h._finished.is_set()))

    handle = KVTransfer("r1", "peer", Direction.RECV, 2, 1, 10.0, on_finish=count)
    assert handle._record_layer(0, 100) and handle._record_layer(1, 100)
    # Told DONE while the handle still reads as transferring, and no waiter woken yet.
    assert seen == [(TransferState.DONE, TransferState.TRANSFERRING, False)]
    assert handle.wait(0) is TransferState.DONE and handle.bytes == 200
    assert not handle._fail("late") and not handle._record_layer(1, 100)

    def boom(h: KVTransfer, state: TransferState) -> None:  # still wakes the waiters
        raise RuntimeError("stats broke")

    failing = KVTransfer("r2", "peer", Direction.SEND, 1, 1, 10.0, on_finish=boom)
    with pytest.raises(RuntimeError, match="stats broke"):
        failing._fail("cut")
    assert failing.wait(0) is TransferState.FAILED
