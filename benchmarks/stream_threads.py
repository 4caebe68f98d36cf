"""What the decode worker's thread per stream costs the engine's step, in one process.

    PYTHONPATH=. .venv/bin/python benchmarks/stream_threads.py [--dtype bfloat16]
        [--threads 2] [--batch 16] [--rounds 3] [--modes none,threads,one]

The decode worker serves each Admit stream from a gRPC thread of its own, blocked on the
request's queue (decode_worker/servicer.py, _relay); the engine thread puts every step's
output in each running request's queue, so a step wakes one thread per request, each of
which takes the GIL to build and serialize its message. Here the offline engine steps a
batch of --batch requests (256-token prompts, 128 tokens out, greedy) in this thread and
hands each step's outputs on:
- none:    to nobody (the engine alone);
- threads: to one consumer thread per request, as the worker does (queue.get with a
           timeout, then the AdmitResponse built and serialized);
- one:     to one consumer thread that builds and serializes all of the step's messages.
No sockets: only the threads and the GIL. Prints the median decode-only step (ms) per mode
and round, modes alternating, and each mode's ratio to `none` (medians of the rounds).
"""

from __future__ import annotations

import argparse
import queue
import statistics
import threading
import time
from collections.abc import Callable

from splitserve.common.outputs import StepOutput
from splitserve.common.sampling_params import SamplingParams
from splitserve.llm import LLM
from splitserve.v1 import worker_pb2

Deliver = Callable[[list[StepOutput]], None]


def message(out: StepOutput, generated: int) -> bytes:
    output = worker_pb2.DecodeOutput(token_ids=out.new_token_ids,
                                     num_generated_tokens=generated)
    return worker_pb2.AdmitResponse(output=output).SerializeToString()


def consume_one(q: queue.Queue[StepOutput | None]) -> None:
    generated = 0
    while True:
        try:
            out = q.get(timeout=0.5)
        except queue.Empty:
            continue
        if out is None:
            return
        generated += len(out.new_token_ids)
        message(out, generated)


def consume_steps(q: queue.Queue[list[StepOutput] | None]) -> None:
    generated: dict[str, int] = {}
    while True:
        try:
            outs = q.get(timeout=0.5)
        except queue.Empty:
            continue
        if outs is None:
            return
        for out in outs:
            generated[out.request_id] = generated.get(out.request_id, 0) + len(out.new_token_ids)
            message(out, generated[out.request_id])


def run(llm: LLM, mode: str, batch: int, seed: int) -> float:
    engine = llm.engine
    params = SamplingParams(max_tokens=128, ignore_eos=True, temperature=0.0)
    ids = [engine.add_request([100 + (seed * 7919 + i * 104729 + j) % 30000 for j in range(256)],
                              params) for i in range(batch)]
    threads: list[threading.Thread] = []
    deliver: Deliver
    if mode == "threads":
        queues: dict[str, queue.Queue[StepOutput | None]] = {rid: queue.Queue() for rid in ids}
        threads = [threading.Thread(target=consume_one, args=(q,)) for q in queues.values()]

        def deliver(outs: list[StepOutput]) -> None:
            for out in outs:
                queues[out.request_id].put(out)
    elif mode == "one":
        steps: queue.Queue[list[StepOutput] | None] = queue.Queue()
        threads = [threading.Thread(target=consume_steps, args=(steps,))]

        def deliver(outs: list[StepOutput]) -> None:
            steps.put(outs)
    else:
        def deliver(outs: list[StepOutput]) -> None:
            pass
    for t in threads:
        t.start()
    step_ms = []
    while engine.has_unfinished():
        decoding = all(engine.requests[rid].seq.num_output_tokens > 0 for rid in ids
                       if rid in engine.requests)
        start = time.perf_counter()
        outs = engine.step()
        if decoding:
            step_ms.append((time.perf_counter() - start) * 1e3)
        deliver(outs)
    if mode == "threads":
        for q in queues.values():
            q.put(None)
    elif mode == "one":
        steps.put(None)
    for t in threads:
        t.join()
    return statistics.median(step_ms)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default="none,threads,one")
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    modes = args.modes.split(",")
    llm = LLM(model=args.model, dtype=args.dtype, num_threads=args.threads,
              max_num_seqs=args.batch, enable_prefix_caching=False)
    run(llm, "none", args.batch, seed=999)  # warm-up
    results: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for mode in modes:
            results[mode].append(run(llm, mode, args.batch, seed=r * len(modes) + modes.index(mode)))
            print(f"round {r} {mode}: decode step median {results[mode][-1]:.2f} ms", flush=True)
    base = results[modes[0]]
    for mode in modes:
        ratio = statistics.median(a / b for a, b in zip(results[mode], base, strict=True))
        print(f"{mode}: {statistics.median(results[mode]):.2f} ms, {ratio:.3f}x {modes[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
