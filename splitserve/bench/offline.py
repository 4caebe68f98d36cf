"""Offline throughput: the engine against transformers' generate, in one invocation.

    splitserve bench offline [--model smollm2-135m | --random-model llama-1b]
                             [--device cpu|cuda] [--dtype float32] [--num-prompts 32]
                             [--output-len 64] [--hf-batch-size 16] [--skip-hf-single]

Runs one seeded set of mixed-length prompts through (a) the engine (continuous batching),
(b) transformers generate one prompt at a time, (c) transformers generate in static batches
(--hf-batch-size) with left padding, each producing exactly --output-len tokens per prompt.
Prints output tokens/s and the ratios, prefill tokens/s, the decode step time at the
--step-batches sizes next to the time to read every weight once (the batch-1 floor: on CPU
a read of every weight, on CUDA the weight bytes at the measured copy bandwidth), and peak
KV pool utilization. On CUDA it also profiles decode steps (torch profiler): GPU kernel time
against wall time per step, and kernel launches per step (a graph launch counts once).
`--random-model NAME` writes a random-weight model of a named shape (engine.tiny_model.
NAMED_SHAPES, e.g. llama-1b) so a GPU benchmark needs no download.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from splitserve.common.sampling_params import SamplingParams
from splitserve.engine.config import EngineConfig
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.model_files import DEFAULT_MODEL

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    device = next(model.parameters()).device
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
            out = cast(Any, model).generate(
                ids.to(device), attention_mask=mask.to(device), do_sample=False,
                max_new_tokens=output_len, min_new_tokens=output_len, pad_token_id=0)
        produced += (out.shape[1] - width) * len(batch)
    _sync(device)
    return time.perf_counter() - start, produced


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def copy_floor_ms(engine: LLMEngine, nbytes: int, repeats: int = 5) -> tuple[float, float]:
    """(weight bytes at the device's measured copy bandwidth in ms, that bandwidth in GB/s):
    a 1 GiB device-to-device copy reads and writes every byte, best of N."""
    device = engine.runner.device
    src = torch.empty(1 << 28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    bandwidth = 2 * src.numel() * src.element_size() / best
    del src, dst
    return nbytes / bandwidth * 1000.0, bandwidth / 1e9


@contextlib.contextmanager
def running_batch(engine: LLMEngine, batch: int, context: int, steps: int) -> Iterator[None]:
    """`batch` sequences of `context` random tokens, prefilled and decoding, for `steps`
    more decode steps (aborted on exit)."""
    params = SamplingParams(temperature=0.0, max_tokens=steps + 4, ignore_eos=True)
    rng = random.Random(batch)
    ids = [f"step-{batch}-{i}" for i in range(batch)]
    for rid in ids:
        engine.add_request([rng.randrange(100, 30000) for _ in range(context)], params, rid)
    while any(s.is_prefilling or s.status.value == "waiting" for s in
              list(engine.scheduler.waiting) + engine.scheduler.running):
        engine.step()
    try:
        yield
    finally:
        for rid in ids:
            engine.abort(rid)


def decode_step_ms(engine: LLMEngine, batch: int, context: int = 128, steps: int = 8) -> float:
    """Median time of one decode step with `batch` running sequences of ~context tokens."""
    times = []
    with running_batch(engine, batch, context, steps):
        for _ in range(steps):
            start = time.perf_counter()
            engine.step()  # returns after the sampled ids reached the host
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1000.0


@dataclass(frozen=True)
class StepProfile:
    wall_ms: float  # per step, under the profiler
    kernel_ms: float  # GPU kernel time per step
    launches: float  # kernel (and graph) launches per step


_LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                 "cudaGraphLaunch")


def profile_decode(engine: LLMEngine, batch: int, context: int, steps: int = 5) -> StepProfile:
    """Decode steps under the torch profiler (CUDA): kernel time and launches per step."""
    from torch.profiler import ProfilerActivity, profile

    with running_batch(engine, batch, context, steps + 2):
        engine.step()  # not the first step after the prompts
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                engine.step()
            wall = time.perf_counter() - start
    kernel_us, launches = 0.0, 0
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernel_us += event.time_range.elapsed_us()
        elif event.name in _LAUNCH_CALLS:
            launches += 1
    return StepProfile(wall * 1000.0 / steps, kernel_us / 1000.0 / steps, launches / steps)


def prefill_tokens_per_s(engine: LLMEngine, num_prompts: int, prompt_len: int) -> float:
    """Prompt tokens per second for `num_prompts` fresh prompts of `prompt_len` tokens."""
    rng = random.Random(prompt_len)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    prompts = [[rng.randrange(100, 30000) for _ in range(prompt_len)] for _ in range(num_prompts)]
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(prompt, params, f"prefill-{i}")
    while engine.has_unfinished():
        engine.step()
    return num_prompts * prompt_len / (time.perf_counter() - start)


def _model_dir(args: argparse.Namespace) -> str:
    if args.random_model is None:
        return str(args.model)
    from splitserve.engine.tiny_model import write_named_model

    root = Path(args.random_model_dir or tempfile.gettempdir()) / "splitserve-random-models"
    path = write_named_model(root / f"{args.random_model}-{args.dtype}", args.random_model,
                             dtype=args.dtype,
                             tokenizer_from=args.random_model_tokenizer or DEFAULT_MODEL)
    return str(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="splitserve bench offline")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--random-model", default=None, metavar="SHAPE",
                    help="use a random-weight model of a named shape (e.g. llama-1b, tiny) "
                         "written under --random-model-dir (reused once written)")
    ap.add_argument("--random-model-dir", default=None, help="default: the temp directory")
    ap.add_argument("--random-model-tokenizer", default=None, metavar="DIR",
                    help="tokenizer files for the random model (default: smollm2-135m's)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=list(_DTYPES))
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-prompt-len", type=int, default=16)
    ap.add_argument("--max-prompt-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=None, help="default: 64 (CPU), 128 (CUDA)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="default: 2048 (CPU), 8192 (CUDA)")
    ap.add_argument("--enforce-eager", action="store_true", help="CUDA: no CUDA graphs")
    ap.add_argument("--hf-batch-size", type=int, default=16,
                    help="transformers' static batch size for baseline (c)")
    ap.add_argument("--skip-hf-single", action="store_true", help="skip baseline (b) (slow)")
    ap.add_argument("--step-batches", default="1,8,32",
                    help="decode step timings at these batch sizes (comma-separated)")
    ap.add_argument("--step-context", type=int, default=128,
                    help="context tokens of each sequence in the step timings")
    ap.add_argument("--prefill", default="8x1024", metavar="NxLEN",
                    help="prefill throughput: N prompts of LEN tokens ('0x0': skip)")
    ap.add_argument("--profile-batch", type=int, default=32,
                    help="CUDA: batch size of the profiled decode steps (0: skip)")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    step_batches = [int(b) for b in args.step_batches.split(",") if b]
    max_num_seqs = args.max_num_seqs or (128 if cuda else 64)
    budget = args.max_num_batched_tokens or (8192 if cuda else 2048)

    engine = LLMEngine(EngineConfig(
        model=_model_dir(args), dtype=args.dtype, device=args.device, num_threads=args.threads,
        max_num_seqs=max(max_num_seqs, *step_batches), max_num_batched_tokens=budget,
        enforce_eager=args.enforce_eager))
    device = engine.runner.device
    prompts = make_prompts(args.num_prompts, args.seed, engine.arch.vocab_size,
                           args.min_prompt_len, args.max_prompt_len)
    graphs = engine.runner.graphs
    print(f"model {args.random_model or args.model} dtype {args.dtype} device {device} "
          f"threads {torch.get_num_threads()} graphs "
          f"{graphs.sizes if graphs is not None else 'off'} | "
          f"{len(prompts)} prompts, {sum(map(len, prompts))} prompt tokens "
          f"(lengths {min(map(len, prompts))}..{max(map(len, prompts))}), "
          f"{args.output_len} new tokens each")
    run_engine(engine, prompts[:2], 4)  # warm-up
    ours = run_engine(engine, prompts, args.output_len)
    ours_tps = ours.output_tokens / ours.seconds
    print(f"(a) engine                        {ours_tps:8.1f} tok/s  ({ours.seconds:.1f} s)")

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=_DTYPES[args.dtype],
                                              local_files_only=True).eval().to(device)
    hf.generation_config.eos_token_id = None
    results = {}
    if not args.skip_hf_single:
        results["b"] = run_hf(hf, prompts, args.output_len, 1)
    results["c"] = run_hf(hf, prompts, args.output_len, args.hf_batch_size)
    labels = {"b": "transformers, one prompt at a time",
              "c": f"transformers, static batches of {args.hf_batch_size}"}
    for key, (seconds, tokens) in results.items():
        tps = tokens / seconds
        print(f"({key}) {labels[key]:34s}{tps:8.1f} tok/s  ({seconds:.1f} s)   "
              f"engine / ({key}) = {ours_tps / tps:5.2f}x")
    del hf
    if cuda:
        torch.cuda.empty_cache()

    num, _, length = args.prefill.partition("x")
    if int(num) > 0:
        print(f"prefill, {num} x {length} tokens: "
              f"{prefill_tokens_per_s(engine, int(num), int(length)):10.0f} tok/s")
    if cuda:
        nbytes = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
        floor_ms, bandwidth = copy_floor_ms(engine, nbytes)
        print(f"weight-read floor (batch 1): {floor_ms:.3f} ms for {nbytes / 1e6:.0f} MB at the "
              f"measured copy bandwidth {bandwidth:.0f} GB/s")
    else:
        floor_ms, nbytes = weight_read_floor_ms(engine)
        print(f"weight-read floor (batch 1): {floor_ms:.1f} ms for {nbytes / 1e6:.0f} MB")
    for batch in step_batches:
        step = decode_step_ms(engine, batch, args.step_context)
        print(f"decode step, batch {batch:3d}, context {args.step_context}: {step:8.3f} ms   "
              f"({step / floor_ms:.2f}x the floor)")
    if cuda and args.profile_batch > 0:
        prof = profile_decode(engine, args.profile_batch, args.step_context)
        print(f"profiled decode step, batch {args.profile_batch}: wall {prof.wall_ms:.3f} ms, "
              f"GPU kernels {prof.kernel_ms:.3f} ms ({prof.kernel_ms / prof.wall_ms * 100:.0f}% "
              f"of wall), {prof.launches:.0f} launches per step")
    print(f"peak KV pool utilization: {ours.peak_utilization * 100:.1f}% "
          f"(slots holding tokens / slots allocated)")
    return 0
