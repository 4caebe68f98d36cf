"""Loopback throughput of TorchDistBackend (gloo on CPU, or NCCL with --device cuda).

    python -m kvtransfer.bench [--tokens 1000] [--requests 4] [--repeats 5] [--dtype float32]
                               [--device cpu | cuda (two GPUs: the sender uses cuda:1)]

Two processes on one machine: this one hosts the rendezvous store and receives, a child
process sends. Layout: SmolLM2-135M (30 layers, 3 KV heads, head_dim 64), block 16. A round
moves `--requests` requests of `--tokens` tokens each, layer by layer. It is timed with one
message per (request, layer) -- how the backend is meant to be used -- `--repeats` times, and
once against a baseline with one message per (block, layer) (every block its own
single-block transfer). Prints MB/s (best and median) and the ratio; never asserts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

from splitserve.common.kv_layout import KVLayout
from splitserve.kvtransfer.state import KVTransfer, TransferState
from splitserve.kvtransfer.torch_dist import TorchDistBackend, create_rendezvous_store

Plan = list[tuple[str, list[int]]]  # (request id, block ids); the same ids on both sides


def smollm2_layout(dtype: str) -> KVLayout:
    """SmolLM2-135M's KV layout (30 layers, 3 KV heads, head_dim 64, block 16)."""
    return KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, block_size=16, dtype=dtype)


def _num_blocks(args: argparse.Namespace) -> int:
    return -(-args.tokens // 16)


def _rounds(args: argparse.Namespace) -> list[tuple[str, Plan]]:
    n = _num_blocks(args)
    batched = [(f"req-{r}", list(range(r * n, (r + 1) * n))) for r in range(args.requests)]
    per_block = [(f"{rid}-{b}", [b]) for rid, ids in batched for b in ids]
    rounds = [("warmup", [("warmup", [0])])]
    rounds += [(f"batched-{i}", batched) for i in range(args.repeats)]
    return rounds + [("per-block", per_block)]


def wait_all(handles: list[KVTransfer]) -> None:
    """Poll until every handle finished; RuntimeError if any failed."""
    while not all(h.poll().finished for h in handles):
        time.sleep(0.0005)
    bad = [h.error for h in handles if h.state is not TransferState.DONE]
    if bad:
        raise RuntimeError(f"transfer failed: {bad[0]}")


def _setup(
    args: argparse.Namespace, worker: str, port: int
) -> tuple[TorchDistBackend, list[torch.Tensor]]:
    layout = smollm2_layout(args.dtype)
    device = args.device
    if device.startswith("cuda") and worker == "bench-P":
        device = "cuda:1"  # NCCL needs the two ranks on different GPUs
    backend = TorchDistBackend(worker, layout, "127.0.0.1", port, device, default_timeout_s=120)
    shape = (args.requests * _num_blocks(args), *layout.block_shape)
    # one [num_blocks, block_size, kv_heads, head_dim] tensor per layer, used as K and as V
    pool = [torch.randn(shape).to(device, layout.torch_dtype) for _ in range(layout.num_layers)]
    return backend, pool


def _send(args: argparse.Namespace) -> None:
    backend, pool = _setup(args, "bench-P", args.port)
    for name, plan in _rounds(args):
        handles = [backend.start_send(f"{name}/{rid}", "bench-D", ids, ids) for rid, ids in plan]
        for layer in range(backend.layout.num_layers):
            for h in handles:
                backend.send_layer(h, layer, pool[layer], pool[layer])
        wait_all(handles)
    backend.close()


def _spawn_sender(args: argparse.Namespace, port: int) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "splitserve.kvtransfer.bench", "--role", "send", "--port", str(port)]
    for flag in ("tokens", "requests", "repeats", "dtype", "device"):
        argv += [f"--{flag}", str(getattr(args, flag))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen(argv, env=env)


def _receive(args: argparse.Namespace) -> None:
    store = create_rendezvous_store("127.0.0.1", 0)
    child = _spawn_sender(args, store.port)
    backend, pool = _setup(args, "bench-D", store.port)
    rates: dict[str, list[float]] = {"batched": [], "per-block": []}
    sizes: dict[str, tuple[float, int]] = {}
    for name, plan in _rounds(args):
        start = time.perf_counter()
        handles = [backend.expect(f"{name}/{rid}", "bench-P", ids, pool, pool) for rid, ids in plan]
        wait_all(handles)
        seconds = time.perf_counter() - start
        megabytes = sum(h.bytes for h in handles) / 1e6
        kind = name.rsplit("-", 1)[0] if name.startswith("batched") else name
        if kind in rates:
            rates[kind].append(megabytes / seconds)
            sizes[kind] = (megabytes, len(plan) * backend.layout.num_layers)
    child.wait(timeout=60)
    backend.close()
    print(f"layout: {backend.layout.describe()}")
    print(f"{args.requests} requests x {args.tokens} tokens per round, {args.device}, loopback")
    for kind, values in rates.items():
        megabytes, messages = sizes[kind]
        print(
            f"{kind:>9}: {megabytes:7.1f} MB/round in {messages} messages: best "
            f"{max(values):7.1f} MB/s, median {statistics.median(values):7.1f} MB/s "
            f"({len(values)} rounds)"
        )
    ratio = statistics.median(rates["batched"]) / statistics.median(rates["per-block"])
    print(f"batched / per-block (medians): {ratio:.1f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=1000, help="KV tokens per request")
    parser.add_argument("--requests", type=int, default=4, help="requests per round")
    parser.add_argument("--repeats", type=int, default=5, help="timed batched rounds")
    parser.add_argument("--dtype", default="float32", help="KV dtype (float32, bfloat16, ...)")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL)")
    parser.add_argument("--role", default="recv", choices=["recv", "send"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "send":
        _send(args)
    else:
        _receive(args)


if __name__ == "__main__":
    main()
