"""The int8 and fp8 KV caches (issue 16) on SmolLM2-135M-Instruct: accuracy, capacity,
speed, bytes.

    PYTHONPATH=. .venv/bin/python benchmarks/kv_quant.py [--dtype float32|bfloat16]
        [--prompts 64] [--tokens 64] [--context 4096] [--codecs int8,fp8]
        [--fp8-rotation-study]

Accuracy of each codec, against the same engine with the unquantized cache (--dtype), greedy:
- 64 chat prompts (8 tasks x 8 topics, fixed here, never tuned): the share of sequences
  whose first 32 and first 64 tokens are identical, and the mean absolute difference of
  the chosen tokens' logprobs over the positions before the first divergence.
- Perplexity of tests/data/perplexity.txt, scored in 16-token chunks so every chunk
  attends to the cached (quantized) KV of the text before it: each codec vs unquantized.
Capacity: KV blocks that fit in the same bytes. Speed: one sequence decoding at a
`--context`-token context, ms per step (medians over 32 steps), each codec with its fused
C++ kernel and through the unfused torch path (gather, dequantize, SDPA), and unquantized.
Bytes: what a 1,000-token prompt's KV transfer moves (the layout's bytes for its blocks).
--fp8-rotation-study: fp8 accuracy with and without the Hadamard rotation, both through the
torch path (the only one that reads kv_quant.ROTATED at run time), instead of the above.
--precision-ladder: how much precision the greedy-identity target needs, instead of the above:
the unquantized cache (torch path) whose stored K/V are first rounded like an int8 row with
more bits (rotated, one scale per row: 8 = the int8 codec's rounding, 9, 10, 12) or to bf16 or
fp16; the step's own fresh K/V stay exact, as with the real quantized store.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from splitserve.common.kv_layout import KVLayout
from splitserve.common.sampling_params import SamplingParams
from splitserve.engine.scheduler import ScheduledSequence
from splitserve.engine.sequence import Sequence
from splitserve.kernels import kv_quant
from splitserve.llm import LLM

TASKS = ["Explain briefly", "Write a short poem about", "List three facts about",
         "Give advice on", "Describe the history of", "Compare two kinds of",
         "Write a one-paragraph story about", "What are common mistakes with"]
TOPICS = ["the ocean", "bread baking", "learning a language", "volcanoes", "chess",
          "bicycles", "the moon", "saving money"]
TEXT = Path(__file__).resolve().parents[1] / "tests" / "data" / "perplexity.txt"


def _engine(dtype: str, kv: str, backend: str = "auto", blocks: int = 1024) -> LLM:
    return LLM(model="smollm2-135m", dtype=dtype, kv_cache_dtype=kv, attention_backend=backend,
               num_kv_blocks=blocks)


def agreement(base: LLM, quant: LLM, num: int, tokens: int) -> dict[str, Any]:
    tok = base.engine.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"{t} {p}."}])
               for t in TASKS for p in TOPICS][:num]
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, logprobs=0)
    want = base.generate(prompts, params)
    got = quant.generate(prompts, params)
    same32 = same_all = 0
    diffs: list[float] = []
    first_divergence = []
    for w, g in zip(want, got, strict=True):
        n = next((i for i, (a, b) in enumerate(zip(w.token_ids, g.token_ids, strict=True))
                  if a != b), len(w.token_ids))
        first_divergence.append(n)
        same32 += n >= 32
        same_all += n == len(w.token_ids)
        diffs += [abs(a.logprob - b.logprob) for a, b in zip(w.logprobs[:n], g.logprobs[:n],
                                                            strict=True)]
    return {"sequences": len(prompts), "identical_32": same32 / len(prompts),
            f"identical_{tokens}": same_all / len(prompts),
            "first_divergence_median": statistics.median(first_divergence),
            "mean_abs_logprob_diff": statistics.fmean(diffs)}


@torch.inference_mode()
def perplexity(llm: LLM, chunk: int = 16) -> float:
    """exp(mean NLL) of the text, teacher-forced chunk by chunk through the paged cache."""
    engine = llm.engine
    ids = engine.tokenizer.encode(TEXT.read_text(encoding="utf-8"))[: engine.max_model_len - 1]
    seq = Sequence("ppl", ids, SamplingParams(max_tokens=1))
    seq.block_table = list(range(-(-len(ids) // engine.block_size)))
    runner = engine.runner
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, chunk):
        n = min(chunk, len(ids) - start)
        batch = runner.prepare([ScheduledSequence(seq, n)])
        hidden = runner.model(batch.input_ids, batch.positions, runner.kv_caches, batch.meta,
                              runner.ops, None)
        logits = runner.model.compute_logits(hidden).float()
        seq.num_computed_tokens += n
        targets = torch.tensor(ids[start + 1: start + n + 1])
        logp = torch.log_softmax(logits[: len(targets)], dim=-1)
        nll -= float(logp.gather(1, targets.unsqueeze(1)).sum())
        count += len(targets)
    return math.exp(nll / count)


def decode_ms(llm: LLM, context: int, steps: int = 32) -> float:
    engine = llm.engine
    prompt = [(7 * i) % 20000 + 100 for i in range(context)]
    engine.add_request(prompt, SamplingParams(max_tokens=steps + 1, temperature=0.0,
                                              ignore_eos=True), "long")
    times = []
    while engine.has_unfinished():
        state = engine.requests.get("long")
        decoding = state is not None and state.seq.num_output_tokens >= 1  # prompt done
        started = time.perf_counter()
        engine.step()
        if decoding:
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def rotation_study(dtype: str, prompts: int, tokens: int) -> dict[str, Any]:
    """fp8 with and without the rotation, through the torch path (reads ROTATED per call)."""
    base = _engine(dtype, "auto", "torch")
    report: dict[str, Any] = {"perplexity_unquantized": round(perplexity(base), 4)}
    for rotated in (False, True):
        kv_quant.ROTATED["fp8"] = rotated
        quant = _engine(dtype, "fp8", "torch")
        report[f"fp8_rotated_{rotated}"] = {
            "perplexity": round(perplexity(quant), 4),
            "agreement": agreement(base, quant, prompts, tokens)}
    return report


LADDER = ("int8", "int9", "int10", "int12", "bfloat16", "float16")


def round_like(x: torch.Tensor, rounding: str) -> torch.Tensor:
    """x rounded as a cache of `rounding` would keep it: "int<b>" = b-bit signed integers times
    one fp16 scale per rotated row (int8: kv_quant's own rounding), or a float dtype."""
    if not rounding.startswith("int"):
        return x.to(getattr(torch, rounding)).to(x.dtype)
    qmax = 2.0 ** (int(rounding[3:]) - 1) - 1
    y = kv_quant.hadamard(x)
    scale = (y.abs().amax(dim=-1, keepdim=True) / qmax).to(torch.float16).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return kv_quant.hadamard(torch.round(y / scale).clamp_(-qmax, qmax) * scale).to(x.dtype)


def precision_ladder(dtype: str, prompts: int, tokens: int) -> dict[str, Any]:
    """Greedy agreement with the unquantized cache when its stored K/V are rounded first."""
    sample = torch.randn(256, 3, 64) * torch.rand(256, 3, 1) * 10
    codec = kv_quant.dequantize_rows(kv_quant.quantize_rows(sample, "int8"), torch.float32)
    assert torch.equal(round_like(sample, "int8"), codec), "int8 rung != the int8 codec"
    base = _engine(dtype, "auto", "torch")
    report: dict[str, Any] = {}
    for rounding in LADDER:
        llm = _engine(dtype, "auto", "torch")
        runner = llm.engine.runner
        store = runner.ops.store_kv

        def rounded_store(k: torch.Tensor, v: torch.Tensor, *rest: Any,
                          _rounding: str = rounding, _store: Any = store) -> None:
            _store(round_like(k, _rounding), round_like(v, _rounding), *rest)

        runner.ops = dataclasses.replace(runner.ops, store_kv=rounded_store)
        report[rounding] = agreement(base, llm, prompts, tokens)
        print(rounding, report[rounding], flush=True)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--codecs", default="int8,fp8", help="comma-separated KV cache dtypes")
    ap.add_argument("--fp8-rotation-study", action="store_true")
    ap.add_argument("--precision-ladder", action="store_true")
    args = ap.parse_args()
    if args.precision_ladder:
        print(json.dumps(precision_ladder(args.dtype, args.prompts, args.tokens), indent=1))
        return
    if args.fp8_rotation_study:
        print(json.dumps(rotation_study(args.dtype, args.prompts, args.tokens), indent=1))
        return
    codecs = args.codecs.split(",")
    base = _engine(args.dtype, "auto")
    report: dict[str, Any] = {"dtype": args.dtype, "agreement": {}}
    ppl_base = perplexity(base)
    report["perplexity"] = {"unquantized": round(ppl_base, 4)}
    for kv in codecs:
        quant = _engine(args.dtype, kv)
        report["agreement"][kv] = agreement(base, quant, args.prompts, args.tokens)
        ppl = perplexity(quant)
        report["perplexity"][kv] = {"ppl": round(ppl, 4), "ratio": round(ppl / ppl_base, 5)}
        del quant
    bf16 = _engine("bfloat16", "auto", blocks=1).engine.runner.kv_bytes_per_block
    report["capacity_blocks_vs"] = {}
    for kv in codecs:
        per_block = _engine(args.dtype, kv, blocks=1).engine.runner.kv_bytes_per_block
        report["capacity_blocks_vs"][kv] = {"bfloat16": round(bf16 / per_block, 3),
                                            "float32": round(bf16 * 2 / per_block, 3)}
    del base
    blocks = args.context // 16 + 8
    runs = [("unquantized", "auto", "auto")]
    for kv in codecs:
        runs += [(f"{kv}_fused", kv, "auto"), (f"{kv}_unfused_torch", kv, "torch")]
    report[f"decode_step_ms_at_{args.context}"] = {
        name: round(decode_ms(_engine(args.dtype, kv, backend, blocks), args.context), 2)
        for name, kv, backend in runs}
    arch = _engine(args.dtype, "auto", blocks=1).engine.arch
    num_blocks = -(-1000 // 16)
    report["kv_bytes_per_1k_token_transfer"] = {
        dt: KVLayout(arch.num_layers, arch.num_kv_heads, arch.head_dim, 16, dt).bytes_for(num_blocks)
        for dt in ("float32", "bfloat16", *codecs)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
