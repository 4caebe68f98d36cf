"""The int8 KV cache (issue 16) on SmolLM2-135M-Instruct: accuracy, capacity, speed, bytes.

    PYTHONPATH=. .venv/bin/python benchmarks/kv_quant.py [--dtype float32|bfloat16]
        [--prompts 64] [--tokens 64] [--context 4096]

Accuracy, against the same engine with the unquantized cache (--dtype), greedy:
- 64 chat prompts (8 tasks x 8 topics, fixed here, never tuned): the share of sequences
  whose first 32 and first 64 tokens are identical, and the mean absolute difference of
  the chosen tokens' logprobs over the positions before the first divergence.
- Perplexity of tests/data/perplexity.txt, scored in 16-token chunks so every chunk
  attends to the cached (quantized) KV of the text before it: int8 vs unquantized.
Capacity: KV blocks that fit in the same bytes. Speed: one sequence decoding at a
`--context`-token context, ms per step (medians over 32 steps), int8 with its fused C++
kernel, int8 through the unfused torch path (gather, dequantize, SDPA), and unquantized.
Bytes: what a 1,000-token prompt's KV transfer moves (the layout's bytes for its blocks).
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--context", type=int, default=4096)
    args = ap.parse_args()
    base, quant = _engine(args.dtype, "auto"), _engine(args.dtype, "int8")
    report: dict[str, Any] = {"dtype": args.dtype}
    report["agreement"] = agreement(base, quant, args.prompts, args.tokens)
    ppl_base, ppl_quant = perplexity(base), perplexity(quant)
    report["perplexity"] = {"unquantized": round(ppl_base, 4), "int8": round(ppl_quant, 4),
                            "ratio": round(ppl_quant / ppl_base, 5)}
    per_block = {kv: _engine(args.dtype, kv, blocks=1).engine.runner.kv_bytes_per_block
                 for kv in ("auto", "int8")}
    bf16 = _engine("bfloat16", "auto", blocks=1).engine.runner.kv_bytes_per_block
    report["capacity_blocks_vs"] = {"bfloat16": round(bf16 / per_block["int8"], 3),
                                    "float32": round(bf16 * 2 / per_block["int8"], 3)}
    del base, quant
    blocks = args.context // 16 + 8
    speeds = {}
    for name, kv, backend in (("unquantized", "auto", "auto"), ("int8_fused", "int8", "auto"),
                              ("int8_unfused_torch", "int8", "torch")):
        speeds[name] = round(decode_ms(_engine(args.dtype, kv, backend, blocks), args.context), 2)
    report[f"decode_step_ms_at_{args.context}"] = speeds
    arch = _engine(args.dtype, "auto", blocks=1).engine.arch
    num_blocks = -(-1000 // 16)
    report["kv_bytes_per_1k_token_transfer"] = {
        dt: KVLayout(arch.num_layers, arch.num_kv_heads, arch.head_dim, 16, dt).bytes_for(num_blocks)
        for dt in ("float32", "bfloat16", "int8")}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
