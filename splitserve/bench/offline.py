"""Offline throughput: the engine against transformers' generate, in one invocation.

    splitserve bench offline [--model smollm2-135m] [--dtype float32] [--num-prompts 32]
                             [--output-len 64] [--skip-hf-single]

Runs one seeded set of mixed-length prompts through (a) the engine (continuous batching),
(b) transformers generate one prompt at a time, (c) transformers generate in static batches
of 16 with left padding, each producing exactly --output-len tokens per prompt. Prints
output tokens/s and the ratios, decode step time at batch 1/8/32 next to the time to read
every weight once (the batch-1 floor, measured here), and peak KV pool utilization.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass

import torch

from splitserve.common.sampling_params import SamplingParams
from splitserve.engine.config import EngineConfig
from splitserve.engine.llm_engine import LLMEngine

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def make_prompts(num: int, seed: int, vocab: int, min_len: int = 16, max_len: int = 256
                 ) -> list[list[int]]:
    """Seeded prompts with log-uniform lengths (many short, some long)."""
    rng = random.Random(seed)
    lengths = [int(min_len * (max_len / min_len) ** rng.random()) for _ in range(num)]
    return [[rng.randrange(100, vocab) for _ in range(n)] for n in lengths]


@dataclass
class EngineRun:
    seconds: float
    output_tokens: int
    peak_utilization: float  # slots holding tokens / slots allocated, at peak allocation


def run_engine(engine: LLMEngine, prompts: list[list[int]], output_len: int) -> EngineRun:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    bs = engine.block_size
    peak_blocks, peak_util, produced = 0, 0.0, 0
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(prompt, params, f"bench-{i}")
    while engine.has_unfinished():
        produced += sum(len(o.new_token_ids) for o in engine.step())
        running = engine.scheduler.running
        blocks = sum(len(s.block_table) for s in running)
        if blocks >= peak_blocks and blocks:
            peak_blocks = blocks
            peak_util = sum(s.num_computed_tokens for s in running) / (blocks * bs)
    return EngineRun(time.perf_counter() - start, produced, peak_util)


def run_hf(model: torch.nn.Module, prompts: list[list[int]], output_len: int,
           batch_size: int) -> tuple[float, int]:
    produced = 0
    start = time.perf_counter()
    for begin in range(0, len(prompts), batch_size):
        batch = prompts[begin : begin + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, prompt in enumerate(batch):  # left padding
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=output_len, min_new_tokens=output_len,
                                 pad_token_id=0)
        produced += (out.shape[1] - width) * len(batch)
    return time.perf_counter() - start, produced


def weight_read_floor_ms(engine: LLMEngine, repeats: int = 5) -> tuple[float, int]:
    """Time to read every weight once (a reduction over each parameter), best of N."""
    params = list(engine.runner.model.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in params)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            for p in params:
                p.sum()
            best = min(best, time.perf_counter() - start)
    return best * 1000.0, nbytes


def decode_step_ms(engine: LLMEngine, batch: int, context: int = 128, steps: int = 8) -> float:
    """Median time of one decode step with `batch` running sequences of ~context tokens."""
    params = SamplingParams(temperature=0.0, max_tokens=steps + 4, ignore_eos=True)
    rng = random.Random(batch)
    ids = [f"step-{batch}-{i}" for i in range(batch)]
    for rid in ids:
        engine.add_request([rng.randrange(100, 30000) for _ in range(context)], params, rid)
    while any(s.is_prefilling or s.status.value == "waiting" for s in
              list(engine.scheduler.waiting) + engine.scheduler.running):
        engine.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    for rid in ids:
        engine.abort(rid)
    return sorted(times)[len(times) // 2] * 1000.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="splitserve bench offline")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32", choices=list(_DTYPES))
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-prompt-len", type=int, default=16)
    ap.add_argument("--max-prompt-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-hf-single", action="store_true", help="skip baseline (b) (slow)")
    args = ap.parse_args(argv)

    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, num_threads=args.threads,
                                    max_num_seqs=64, max_num_batched_tokens=2048))
    prompts = make_prompts(args.num_prompts, args.seed, engine.arch.vocab_size,
                           args.min_prompt_len, args.max_prompt_len)
    print(f"model {args.model} dtype {args.dtype} threads {torch.get_num_threads()} | "
          f"{len(prompts)} prompts, {sum(map(len, prompts))} prompt tokens "
          f"(lengths {min(map(len, prompts))}..{max(map(len, prompts))}), "
          f"{args.output_len} new tokens each")
    run_engine(engine, prompts[:2], 4)  # warm-up
    ours = run_engine(engine, prompts, args.output_len)
    ours_tps = ours.output_tokens / ours.seconds
    print(f"(a) engine                        {ours_tps:8.1f} tok/s  ({ours.seconds:.1f} s)")

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=_DTYPES[args.dtype],
                                              local_files_only=True).eval()
    hf.generation_config.eos_token_id = None
    results = {}
    if not args.skip_hf_single:
        results["b"] = run_hf(hf, prompts, args.output_len, 1)
    results["c"] = run_hf(hf, prompts, args.output_len, 16)
    labels = {"b": "transformers, one prompt at a time", "c": "transformers, static batches of 16"}
    for key, (seconds, tokens) in results.items():
        tps = tokens / seconds
        print(f"({key}) {labels[key]:34s}{tps:8.1f} tok/s  ({seconds:.1f} s)   "
              f"engine / ({key}) = {ours_tps / tps:5.2f}x")
    del hf

    floor_ms, nbytes = weight_read_floor_ms(engine)
    print(f"weight-read floor (batch 1): {floor_ms:.1f} ms for {nbytes / 1e6:.0f} MB")
    for batch in (1, 8, 32):
        step = decode_step_ms(engine, batch)
        print(f"decode step, batch {batch:2d}: {step:7.1f} ms"
              + (f"   ({step / floor_ms:.2f}x the floor)" if batch == 1 else ""))
    print(f"peak KV pool utilization: {ours.peak_utilization * 100:.1f}% "
          f"(slots holding tokens / slots allocated)")
    return 0
