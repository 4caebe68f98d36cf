"""`splitserve bench kv-tier`: multi-turn chats on a device KV pool too small to hold them,
without and with the host-memory KV tier (issue 16).

    splitserve bench kv-tier [--model smollm2-135m] [--num-kv-blocks 64]
                             [--host-kv-cache-bytes 1GiB] [--conversations 8] [--num-turns 10]
                             [--input-len 16] [--output-len 16] [--concurrency 2]
                             [--repeats 1] [--out results/kv_tier.json]

Each phase starts a router and one decode worker (prefilling its own prompts) as plain
processes on 127.0.0.1 and sends `splitserve bench serve`'s multi-turn workload (the same
seed, so identical prompts) over gRPC, greedy: every conversation's turn 1, then every
turn 2, ..., at most --concurrency requests at a time, so between two turns of one
conversation the pool serves the others and evicts its blocks. Phase "off" runs with the
device prefix cache alone, phase "on" adds --host-kv-cache-bytes of host tier. Printed:
TTFT p50 of turns >= 2 in each phase and the ratio off/on (the issue's target: >= 3x), the
prompt tokens served from a cache, and whether every request's tokens are identical.

The workload's earlier assistant turns are seeded text, not the model's replies, so what a
turn can reuse is the previous turn's prompt (its full blocks); each turn computes the
last assistant message and the new user message at least. The ratio therefore grows with
the turn number (printed per turn).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from splitserve.bench.procs import local_deployment
from splitserve.bench.workloads import BenchRequest, WorkloadConfig, make_workload


def _requests(args: argparse.Namespace) -> list[BenchRequest]:
    cfg = WorkloadConfig(kind="multi-turn", seed=args.seed, num_turns=args.num_turns,
                         input_len=args.input_len, output_len=args.output_len)
    stream = make_workload(cfg)
    # The workload interleaves groups of 8 conversations turn by turn.
    per_group = 8 * args.num_turns
    groups = -(-args.conversations // 8)
    return [next(stream) for _ in range(groups * per_group)]


def _send(address: str, request: BenchRequest) -> dict[str, Any]:
    from splitserve.client import Client

    with Client(address, timeout=600) as client:
        start = time.perf_counter()
        first = None
        tokens: list[int] = []
        usage = None
        for chunk in client.stream(request.messages or [], chat=True,
                                   max_tokens=request.max_tokens, temperature=0.0,
                                   ignore_eos=True):
            if chunk.token_ids and first is None:
                first = time.perf_counter()
            tokens.extend(chunk.token_ids)
            usage = chunk.usage or usage
    assert first is not None, "no token came back"
    return {"tag": request.tag, "ttft_s": first - start, "token_ids": tokens,
            "prompt_tokens": usage.prompt_tokens if usage else 0,
            "cached_tokens": usage.cached_tokens if usage else 0}


def _phase(args: argparse.Namespace, requests: list[BenchRequest], tier: bool
           ) -> list[dict[str, Any]]:
    worker_args = ["--num-kv-blocks", str(args.num_kv_blocks), "--dtype", args.dtype,
                   "--max-num-seqs", str(args.concurrency)]
    if tier:
        worker_args += ["--host-kv-cache-bytes", args.host_kv_cache_bytes]
    results: list[dict[str, Any] | None] = [None] * len(requests)
    with local_deployment(args.model, num_prefill=0, num_decode=1,
                          local_prefill_threshold=1 << 20, threads=args.threads,
                          worker_args=tuple(worker_args)) as addrs, \
            ThreadPoolExecutor(args.concurrency) as pool:
        _send(addrs["router"], BenchRequest(messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=2))  # warm-up
        # Turn-major order with a dependency on the conversation's previous turn: a
        # request is submitted once its predecessor finished.
        futures: dict[int, Any] = {}
        for index, request in enumerate(requests):
            if request.depends_on is not None:
                futures[request.depends_on].result()
            futures[index] = pool.submit(_send, addrs["router"], request)
        for index, future in futures.items():
            results[index] = future.result()
    return [r for r in results if r is not None]


def _summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    later = [r for r in results if r["tag"] != "turn-1"]
    turns = sorted({r["tag"] for r in results}, key=lambda tag: int(tag.split("-")[1]))
    return {"ttft_p50_by_turn_s": {t: statistics.median(r["ttft_s"] for r in results
                                                        if r["tag"] == t) for t in turns},
            "ttft_p50_turn2plus_s": statistics.median(r["ttft_s"] for r in later),
            "ttft_p50_turn1_s": statistics.median(r["ttft_s"] for r in results
                                                  if r["tag"] == "turn-1"),
            "cached_tokens_turn2plus": sum(r["cached_tokens"] for r in later),
            "prompt_tokens_turn2plus": sum(r["prompt_tokens"] for r in later)}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="splitserve bench kv-tier", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1, help="the worker's CPU threads")
    ap.add_argument("--num-kv-blocks", type=int, default=64,
                    help="the device pool (16-token blocks): too small for every chat")
    ap.add_argument("--host-kv-cache-bytes", default="1GiB")
    ap.add_argument("--conversations", type=int, default=8, help="rounded up to 8s")
    ap.add_argument("--num-turns", type=int, default=10)
    ap.add_argument("--input-len", type=int, default=16, help="words per user message")
    ap.add_argument("--output-len", type=int, default=16, help="tokens (words) per answer")
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1, help="off/on pairs; medians printed")
    ap.add_argument("--out", default=None, help="write every result as JSON here")
    args = ap.parse_args(argv)
    requests = _requests(args)
    runs = []
    for repeat in range(args.repeats):
        off = _phase(args, requests, tier=False)
        on = _phase(args, requests, tier=True)
        s_off, s_on = _summary(off), _summary(on)
        identical = [a["token_ids"] for a in off] == [b["token_ids"] for b in on]
        ratio = s_off["ttft_p50_turn2plus_s"] / s_on["ttft_p50_turn2plus_s"]
        runs.append({"off": s_off, "on": s_on, "ratio": ratio, "identical": identical,
                     "results": {"off": off, "on": on}})
        print(f"run {repeat + 1}: TTFT p50 turns>=2 off {s_off['ttft_p50_turn2plus_s']*1e3:.0f} ms"
              f", on {s_on['ttft_p50_turn2plus_s']*1e3:.0f} ms: {ratio:.2f}x; turn 1 "
              f"{s_off['ttft_p50_turn1_s']*1e3:.0f} / {s_on['ttft_p50_turn1_s']*1e3:.0f} ms; "
              f"cached prompt tokens turns>=2 {s_off['cached_tokens_turn2plus']} / "
              f"{s_on['cached_tokens_turn2plus']} of {s_on['prompt_tokens_turn2plus']}; "
              f"tokens identical: {identical}", flush=True)
        print("  TTFT p50 by turn (ms, off/on): " + ", ".join(
            f"{tag.split('-')[1]}: {s_off['ttft_p50_by_turn_s'][tag]*1e3:.0f}/"
            f"{s_on['ttft_p50_by_turn_s'][tag]*1e3:.0f}" for tag in s_off["ttft_p50_by_turn_s"]),
            flush=True)
    median_ratio = statistics.median(r["ratio"] for r in runs)
    print(f"{len(requests)} requests x {args.repeats} run(s): TTFT p50 of turns >= 2, "
          f"off / on = {median_ratio:.2f}x (median; target >= 3x); tokens identical in "
          f"every run: {all(r['identical'] for r in runs)}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    return 0
