"""A prompt's KV over gloo: one message per layer while the prompt computes, or all layers
in one message at the end (`splitserve prefill --kv-send layer|whole`)?

    PYTHONPATH=. .venv/bin/python benchmarks/kv_send.py sockets [--tokens 64]
        [--layer-ms 5] [--requests 10]
    PYTHONPATH=. .venv/bin/python benchmarks/kv_send.py served [--tokens 64]
        [--modes layer,whole,layer,whole] [--prompts 7] [--dtype float32]

sockets: two processes on 127.0.0.1 with the real TorchDistBackend (SmolLM2-135M's KV
layout, fp32). The sender emulates a prompt's compute: --layer-ms of matrix products (one
thread) after each layer, sending that layer at once (layer), or every layer after the
last one (whole); "idle" rows sleep instead of computing. Prints each process's CPU time
per request by thread name (gloo's socket thread is gloo_tcp_loop) and the wall time.

served: router + prefill worker + decode worker as processes (one thread each, every
prompt prefilled remotely), once per mode in --modes. Fresh prompts of --tokens tokens,
one at a time: first with the decode worker idle, then while it decodes a long stream.
Prints medians of TTFT, the prefill's compute and the KV transfer left exposed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
from cpu_per_token import thread_cpu_s

from splitserve.kvtransfer._rendezvous import create_rendezvous_store
from splitserve.kvtransfer.bench import smollm2_layout, wait_all
from splitserve.kvtransfer.torch_dist import TorchDistBackend

LAYOUT = smollm2_layout("float32")


def _cpu_ms_by_name() -> dict[str, float]:
    """CPU milliseconds of this process so far, by thread name."""
    out: dict[str, float] = {}
    for name, seconds in thread_cpu_s(os.getpid()).values():
        out[name] = out.get(name, 0.0) + seconds * 1e3
    return out


def _per_request(before: dict[str, float], after: dict[str, float], n: int) -> str:
    spent = {k: (after[k] - before.get(k, 0.0)) / n for k in after}
    return ", ".join(f"{k} {v:.1f}" for k, v in sorted(spent.items(), key=lambda kv: -kv[1])
                     if v >= 0.5)


def _backend(worker: str, port: int, blocks: int) -> tuple[TorchDistBackend, list[torch.Tensor]]:
    backend = TorchDistBackend(worker, LAYOUT, "127.0.0.1", port, "cpu", default_timeout_s=120)
    pool = [torch.randn((blocks, *LAYOUT.block_shape)) for _ in range(LAYOUT.num_layers)]
    return backend, pool


def _sender(port: int, mode: str, busy: bool, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    blocks = -(-args.tokens // LAYOUT.block_size)
    backend, pool = _backend("bench-P", port, blocks)
    work = torch.randn(256, 256)
    for r in range(args.requests + 1):  # request 0 warms the connection up
        if r == 1:
            before, start = _cpu_ms_by_name(), time.perf_counter()
        ids = list(range(blocks))
        handle = backend.start_send(f"r{r}", "bench-D", ids, ids)
        for layer in range(LAYOUT.num_layers):
            if mode == "layer":
                backend.send_layer(handle, layer, pool[layer], pool[layer])
            end = time.perf_counter() + args.layer_ms / 1e3
            while time.perf_counter() < end:
                if busy:
                    torch.mm(work, work)
                else:
                    time.sleep(max(0.0, end - time.perf_counter()))
        if mode == "whole":
            backend.send_all_layers(handle, pool, pool)
        wait_all([handle])
    wall_ms = (time.perf_counter() - start) * 1e3 / args.requests
    spent = _per_request(before, _cpu_ms_by_name(), args.requests)
    print(f"  sender ({wall_ms:.1f} ms a request): {spent}", flush=True)
    backend.close()


def sockets(args: argparse.Namespace) -> None:
    blocks = -(-args.tokens // LAYOUT.block_size)
    print(f"{args.tokens}-token prompts ({blocks} blocks, "
          f"{LAYOUT.bytes_for(blocks) / 1e6:.2f} MB of KV), {args.layer_ms} ms per layer, "
          f"{args.requests} requests; CPU ms per request by thread")
    for mode, busy in (("layer", False), ("layer", True), ("whole", True)):
        print(f"{mode}, sender {'computing' if busy else 'idle'} between layers:", flush=True)
        store = create_rendezvous_store("127.0.0.1", 0)
        child = subprocess.Popen([sys.executable, __file__, "_send", "--port", str(store.port),
                                  "--mode", mode, "--busy", str(int(busy)),
                                  "--tokens", str(args.tokens), "--layer-ms",
                                  str(args.layer_ms), "--requests", str(args.requests)])
        backend, pool = _backend("bench-D", store.port, blocks)
        ids = list(range(blocks))
        for r in range(args.requests + 1):
            if r == 1:
                before = _cpu_ms_by_name()
            wait_all([backend.expect(f"r{r}", "bench-P", ids, pool, pool)])
        after = _cpu_ms_by_name()
        child.wait(timeout=120)
        print(f"  receiver: {_per_request(before, after, args.requests)}", flush=True)
        backend.close()


def served(args: argparse.Namespace) -> None:
    import random

    from splitserve.bench.kv import measure_requests, requests_while_decoding
    from splitserve.bench.procs import local_deployment

    rng = random.Random(0)
    prompts = [[rng.randrange(100, 30000) for _ in range(args.tokens)]
               for _ in range(args.prompts)]
    med = statistics.median

    def row(rows: list[dict[str, float]]) -> str:
        return (f"TTFT {med(r['ttft_ms'] for r in rows):7.1f}, prefill "
                f"{med(r['prefill_compute_ms'] for r in rows):7.1f}, KV exposed "
                f"{med(r['kv_transfer_ms'] for r in rows):5.1f}")

    print(f"{args.tokens}-token prompts, {args.dtype}, medians of {args.prompts} (ms)")
    for mode in args.modes.split(","):
        worker_args = ("--no-prefix-caching", "--num-kv-blocks", "512", "--dtype", args.dtype,
                       "--kv-send", mode)
        with local_deployment(args.model, num_prefill=1, num_decode=1,
                              local_prefill_threshold=0, threads=1,
                              worker_args=worker_args) as addrs:
            measure_requests(addrs["router"], prompts[:1], 4)  # warm-up
            idle = measure_requests(addrs["router"], prompts, 2)
            loaded = requests_while_decoding(addrs["router"], prompts, 4096, 2)
            print(f"{mode:>5}: decode worker idle: {row(idle)} | decoding: "
                  f"{row(loaded.rows) if loaded else 'the background stream ended first'}",
                  flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["sockets", "served", "_send"])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--layer-ms", type=float, default=5.0)
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--modes", default="layer,whole,layer,whole")
    ap.add_argument("--prompts", type=int, default=7)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="layer", help=argparse.SUPPRESS)
    ap.add_argument("--busy", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.what == "_send":
        _sender(args.port, args.mode, bool(args.busy), args)
    elif args.what == "sockets":
        sockets(args)
    else:
        served(args)


if __name__ == "__main__":
    main()
