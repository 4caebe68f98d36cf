"""The offline engine's decode step with each layer in one C++ call (cpu_ext.decode_layer_)
against the layer-by-layer fused path, interleaved in one process.

    PYTHONPATH=. .venv/bin/python benchmarks/one_call_layers.py [--dtype bfloat16]
        [--batch 1] [--rounds 4] [--threads 2] [--model smollm2-135m]

`--batch` prompts of 256 tokens, greedy, EOS ignored; the step is (time of 129 output
tokens - time of 2) / 127. The two paths alternate round by round on the same engine (the
layer-by-layer one by clearing the model's one-call arguments, as for a model whose linears
are not on the panel GEMM). Prints every value, the medians and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

from splitserve.common.sampling_params import SamplingParams
from splitserve.llm import LLM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ns = ap.parse_args()
    llm = LLM(model=ns.model, dtype=ns.dtype, num_threads=ns.threads,
              max_num_seqs=max(ns.batch, 1))
    model = llm.engine.runner.model
    prompts = [list(range(100 + i, 356 + i)) for i in range(ns.batch)]

    def step_ms() -> float:
        start = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_tokens=2, ignore_eos=True))
        short = time.perf_counter() - start
        start = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_tokens=129, ignore_eos=True))
        return (time.perf_counter() - start - short) / 127 * 1e3

    step_ms()  # warm-up
    steps: dict[str, list[float]] = {"one call per layer": [], "layer by layer": []}
    for _ in range(ns.rounds):
        for path, values in steps.items():
            # False: read the arguments again at the next step; None: no one-call layers.
            model._one_call = False if path == "one call per layer" else None
            values.append(step_ms())
    medians = {path: statistics.median(values) for path, values in steps.items()}
    for path, values in steps.items():
        print(f"{ns.dtype}, batch {ns.batch}, {path}: median {medians[path]:.2f} ms "
              f"({', '.join(f'{v:.2f}' for v in values)})")
    print(f"layer by layer / one call: {medians['layer by layer'] / medians['one call per layer']:.3f}")


if __name__ == "__main__":
    main()
