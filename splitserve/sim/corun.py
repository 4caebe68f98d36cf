"""Interference between workers that share one machine's cores and memory.

Workers placed on the same CPU host (bench disagg's deployments: two workers, one thread
each, on one machine) slow each other down: decode steps stream the weights through the
shared memory bus and caches, prefill steps keep the cores' vector units and the package
power busy. A step-time profile measured with one engine alone misses that. This module
measures it the same way for every pair of step kinds:

    factor[measured][load] = median step of kind `measured` while another process runs
                             steps of kind `load` back to back / the same step alone

with kinds "prefill" (one fresh prompt of PREFILL_TOKENS) and "decode" (DECODE_BATCH
sequences at DECODE_CONTEXT tokens). Each load is a second process
(`python -m splitserve.sim.corun --load KIND ...`) with its own engine and thread count,
started and warmed up once, then told to run (b"g") and pause (b"s") over its stdin; the
measurements interleave alone and loaded steps in rounds, so a drifting machine (or a
cold first measurement) does not pass for interference.

The simulator (sim.cluster) multiplies a step's compute time by the factor of its own kind
under the heaviest kind another worker of the same host is running when it starts. On a
host whose workers own separate devices the factors are 1 (measure with --no-corun).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import TYPE_CHECKING

from splitserve.sim.child import AnsweringChild
from splitserve.sim.profile import STEP_KINDS

if TYPE_CHECKING:
    from splitserve.engine.llm_engine import LLMEngine

PREFILL_TOKENS = 256
DECODE_BATCH = 4
DECODE_CONTEXT = 512
LOAD_DECODE_STEPS = 4096


def _prefill_step_ms(engine: LLMEngine, seed: int) -> float:
    from splitserve.sim.profiler import measure_prefill_ms

    return measure_prefill_ms(engine, PREFILL_TOKENS, 1, seed)


def _decode_steps_ms(engine: LLMEngine, steps: int) -> list[float]:
    from splitserve.bench.offline import running_batch

    times = []
    with running_batch(engine, DECODE_BATCH, DECODE_CONTEXT, steps):
        for _ in range(steps):
            start = time.perf_counter()
            engine.step()
            times.append((time.perf_counter() - start) * 1e3)
    return times


def measure_kind(engine: LLMEngine, kind: str, repeats: int, seed: int) -> float:
    """Median milliseconds of `repeats` steps of `kind`."""
    if kind == "prefill":
        return statistics.median(_prefill_step_ms(engine, seed + r) for r in range(repeats))
    return statistics.median(_decode_steps_ms(engine, max(repeats, 8)))


def _make_engine(model: str, dtype: str, threads: int, decode_steps: int = 64) -> LLMEngine:
    """An engine with KV room for the decode batch to run `decode_steps` steps (beyond
    that its sequences would be preempted and recomputed: prompt steps, not decodes)."""
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.llm_engine import LLMEngine

    blocks = (-(-(DECODE_BATCH * (DECODE_CONTEXT + decode_steps)) // 16)
              + PREFILL_TOKENS // 16 + 32)
    return LLMEngine(EngineConfig(model=model, dtype=dtype, num_threads=threads,
                                  enable_prefix_caching=False, num_kv_blocks=blocks,
                                  max_num_batched_tokens=max(PREFILL_TOKENS, 512)))


class _Load:
    """A second process that runs steps of one kind back to back while told to (its own
    engine, started once): `go()` starts it, `stop()` pauses it (its sequences stay). A
    process that does not answer in time is killed (TimeoutError)."""

    def __init__(self, kind: str, model: str, dtype: str, threads: int,
                 load_timeout_s: float = 600.0, answer_timeout_s: float = 300.0) -> None:
        self._child = AnsweringChild(
            [sys.executable, "-m", "splitserve.sim.corun", "--load", kind, "--model", model,
             "--dtype", dtype, "--threads", str(threads)], f"the co-run {kind} load")
        self._answer_timeout_s = answer_timeout_s
        self._expect(b"r", load_timeout_s)

    def _expect(self, byte: bytes, timeout_s: float) -> None:
        try:
            got = self._child.read_bytes(1, timeout_s)
        except BaseException:
            self.close()
            raise
        if got != byte:
            self.close()
            raise RuntimeError(f"co-run load process: expected {byte!r}, got {got!r}")

    def go(self) -> None:
        self._child.send(b"g")
        self._expect(b"g", self._answer_timeout_s)

    def stop(self) -> None:
        self._child.send(b"s")  # it answers once its running step has ended
        self._expect(b"s", self._answer_timeout_s)

    def close(self) -> None:
        self._child.close()


def measure_factors(model: str, dtype: str, threads: int, repeats: int = 5,
                    seed: int = 0, rounds: int = 3) -> dict[str, dict[str, float]]:
    """factor[measured kind][load kind] on this machine (see the module docstring): in each
    of `rounds`, every kind alone and then under each load, each loaded time over the alone
    time of its round; the median over the rounds (the machine drifts; rounds cancel it)."""
    engine = _make_engine(model, dtype, threads)
    loads = {kind: _Load(kind, model, dtype, threads) for kind in STEP_KINDS}
    ratios: dict[str, dict[str, list[float]]] = {
        kind: {load: [] for load in STEP_KINDS} for kind in STEP_KINDS}
    try:
        for kind in STEP_KINDS:  # warm-up
            measure_kind(engine, kind, 2, seed)
        for r in range(rounds):
            alone = {kind: measure_kind(engine, kind, repeats, seed + r) for kind in STEP_KINDS}
            for load_kind, load in loads.items():
                load.go()
                try:
                    for kind in STEP_KINDS:
                        loaded = measure_kind(engine, kind, repeats, seed + r)
                        ratios[kind][load_kind].append(loaded / alone[kind])
                finally:
                    load.stop()
    finally:
        for load in loads.values():
            load.close()
    return {kind: {load: statistics.median(values) for load, values in row.items()}
            for kind, row in ratios.items()}


def _run_load(kind: str, model: str, dtype: str, threads: int) -> int:
    """The load process: waits for b"g", then steps of `kind` back to back until b"s"
    (answering each with the same byte), until stdin closes. Unbuffered reads of fd 0, so
    select sees every byte."""
    import contextlib
    import os
    import select

    from splitserve.bench.offline import running_batch

    # The decode load keeps one batch decoding for the whole measurement: KV room for
    # LOAD_DECODE_STEPS steps of it (a minute or more of a CPU engine's steps).
    engine = _make_engine(model, dtype, threads, LOAD_DECODE_STEPS)
    measure_kind(engine, kind, 1, 0)  # warm-up before the measurements start

    def reply(byte: bytes) -> None:
        sys.stdout.buffer.write(byte)
        sys.stdout.buffer.flush()

    batch = (running_batch(engine, DECODE_BATCH, DECODE_CONTEXT, 1 << 20) if kind == "decode"
             else contextlib.nullcontext())
    seed = 1000
    with batch:  # decode: one long-running batch, so every step is a decode step
        reply(b"r")
        while (command := os.read(0, 1)) == b"g":
            reply(b"g")
            while not select.select([0], [], [], 0)[0]:
                if kind == "decode":
                    engine.step()
                else:
                    _prefill_step_ms(engine, seed)
                    seed += 1
            if os.read(0, 1) != b"s":
                break
            reply(b"s")
        return 0 if command in (b"", b"s") else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m splitserve.sim.corun")
    ap.add_argument("--load", choices=STEP_KINDS, required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    return _run_load(args.load, args.model, args.dtype, args.threads)


if __name__ == "__main__":
    sys.exit(main())
