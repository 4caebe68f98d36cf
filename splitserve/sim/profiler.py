"""`splitserve profile`: measure the step-time model's points on this machine.

    splitserve profile [--model smollm2-135m] [--dtype float32] [--threads 1]
                       [--prefill-tokens 16,64,...] [--decode-batches 1,4,8,16]
                       [--decode-contexts 64,512,1024] [--no-serving] --out P.json

Measures, with the engine in this process (no prefix caching, one step per point):
  - prefill: one fresh prompt of N tokens computed in one step (median of --repeats);
  - decode: one decode step with B running sequences of C tokens (bench.offline's
    decode_step_ms, median of 8 steps);
  - KV transfer: gloo loopback bandwidth between two processes (kvtransfer.bench, batched
    per-layer messages, median), and the KV bytes per token of this model's layout;
  - co-run factors (unless --no-corun): each step kind's time while a second engine
    process on the same cores runs steps of each kind, over its time alone (sim.corun);
  - the host's speed drift (unless --speed-probe-s 0): the speed probe (sim.probe: batch-1
    decode steps in an engine process of its own, as a sweep's probes run) timed for
    --speed-probe-s seconds; the spread of log(median step) across
    periods of --speed-period-s is the drift's sigma (sim.speed), what `bench simulate`
    replicates under, and their median is the speed level a sweep's probes compare with;
  - serving overheads (unless --no-serving): a local deployment (router + workers as
    processes, --threads each) serves short prompts one at a time, colocated and then
    disaggregated; what TTFT and TPOT hold beyond the engine's own step times; and the
    remote prefills again while the decode worker decodes a long stream: their compute
    over the idle one is the prefill-under-decode factor the simulator uses (it replaces
    the bare engines' co-run factor, which misses part of the deployment's slowdown), and
    that stream's token gaps while the prefills run over its gaps before them is the
    decode-under-prefill factor (likewise); and
    a colocated pair (two decode workers prefilling their own prompts) serving one stream,
    then two at once, one per worker: the TPOT ratio is the decode-under-decode factor
    (the router's and client's work for both streams shares the workers' cores).
The machine and settings are recorded beside the points. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING

from splitserve.sim.probe import SpeedProbe
from splitserve.sim.profile import Profile, ProfiledStepTimes, ServingOverheads
from splitserve.sim.speed import measure_speed

if TYPE_CHECKING:
    from splitserve.engine.llm_engine import LLMEngine

# The stream that keeps the decode worker decoding while remote prefills are timed (cut
# off once they are: its length only has to outlast them).
_BACKGROUND_TOKENS = 2048
# How long that stream decodes alone before the prefills are timed: its token gaps over the
# last of it (its first 0.2 s left out) are the decode-under-prefill factor's reference.
_DECODE_ALONE_S = 2.0


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def measure_prefill_ms(engine: LLMEngine, num_tokens: int, repeats: int, seed: int) -> float:
    from splitserve.common.sampling_params import SamplingParams

    rng = random.Random(seed + num_tokens)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    times = []
    for r in range(repeats):
        prompt = [rng.randrange(100, 30000) for _ in range(num_tokens)]
        engine.add_request(prompt, params, f"prefill-{num_tokens}-{r}")
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
        while engine.has_unfinished():
            engine.step()
    return statistics.median(times) * 1e3


def measure_kv_bandwidth(dtype: str) -> float:
    """Median batched bytes/s of `python -m splitserve.kvtransfer.bench` (gloo, loopback)."""
    out = subprocess.run([sys.executable, "-m", "splitserve.kvtransfer.bench", "--tokens",
                          "1000", "--requests", "1", "--repeats", "5", "--dtype", dtype],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    match = re.search(r"batched:.*median\s+([\d.]+) MB/s", out)
    if match is None:
        raise RuntimeError(f"kvtransfer.bench printed no batched rate:\n{out}")
    return float(match.group(1)) * 1e6


def measure_serving(args: argparse.Namespace, model: ProfiledStepTimes) -> ServingOverheads:
    from splitserve.bench.kv import measure_requests
    from splitserve.bench.procs import local_deployment

    rng = random.Random(args.seed)
    prompt_len, max_tokens = 64, 32
    prompts = [[rng.randrange(100, 30000) for _ in range(prompt_len)] for _ in range(5)]
    worker_args = ("--no-prefix-caching", "--num-kv-blocks", "512", "--dtype", args.dtype)
    rows = {}
    under_decode = under_prefill = 0.0
    for mode, num_prefill, threshold in (("local", 0, 10**9), ("remote", 1, 0)):
        with local_deployment(args.model, num_prefill=num_prefill, num_decode=1,
                              local_prefill_threshold=threshold, threads=args.threads,
                              worker_args=worker_args) as addrs:
            measure_requests(addrs["router"], prompts[:1], 4)  # warm-up
            rows[mode] = measure_requests(addrs["router"], prompts, max_tokens)
            if mode == "remote":
                under_decode, under_prefill = under_load(addrs["router"], prompts, rows[mode])
    pair = decode_under_decode(args, prompts, max_tokens, worker_args)
    med = statistics.median
    compute = model.prefill_ms(prompt_len)
    step = model.decode_ms(1, prompt_len + max_tokens / 2)
    local = med(r["ttft_ms"] for r in rows["local"]) - compute
    remote = med(r["ttft_ms"] - r["kv_transfer_ms"] for r in rows["remote"]) - compute
    tpot = med(r["tpot_ms"] for r in rows["local"] + rows["remote"])
    return ServingOverheads(ttft_local_ms=max(0.0, local), ttft_remote_ms=max(0.0, remote),
                            decode_step_ms=max(0.0, tpot - step),
                            prefill_under_decode=under_decode, decode_under_decode=pair,
                            decode_under_prefill=under_prefill)


def decode_under_decode(args: argparse.Namespace, prompts: list[list[int]], max_tokens: int,
                        worker_args: tuple[str, ...]) -> float:
    """In a colocated pair (two decode workers, --threads each, prefilling their own
    prompts): per prompt, a lone stream, then two streams at once (the router sends the
    second to the other worker); the median over prompts of the pair's mean TPOT over the
    lone stream's."""
    from splitserve.bench.kv import measure_requests
    from splitserve.bench.procs import local_deployment

    ratios = []
    with local_deployment(args.model, num_prefill=0, num_decode=2,
                          local_prefill_threshold=10**9, threads=args.threads,
                          worker_args=worker_args) as addrs:
        router = addrs["router"]
        measure_requests(router, prompts[:1], 4)  # warm-up
        for i, prompt in enumerate(prompts):
            alone = measure_requests(router, [prompt], max_tokens)[0]["tpot_ms"]
            other = prompts[(i + 1) % len(prompts)]
            with ThreadPoolExecutor(2) as pool:
                both = list(pool.map(lambda p: measure_requests(router, [p], max_tokens)[0],
                                     [prompt, other]))  # (no prefix caching)
            ratios.append(statistics.mean(r["tpot_ms"] for r in both) / alone)
    return statistics.median(ratios)


def under_load(router: str, prompts: list[list[int]],
               idle_rows: list[dict[str, float]]) -> tuple[float, float]:
    """(prefill under decode, decode under prefill) in the disaggregated deployment behind
    `router`: the remote prefills' compute while the decode worker decodes another stream,
    over `idle_rows`' (the same prompts measured one at a time, that worker idle), as
    medians: how much the deployment's decoding slows its prefill worker on shared cores;
    and that stream's mean token gap while the prefills run over its mean gap in the
    seconds before them: how much the prefill worker, the KV it sends and the requests'
    serving slow the decode worker. (0.0, 0.0) when the background stream ended before
    the measurement did: not measured."""
    from splitserve.bench.kv import requests_while_decoding

    loaded = requests_while_decoding(router, prompts, _BACKGROUND_TOKENS,
                                     settle_s=_DECODE_ALONE_S)
    if loaded is None:
        return 0.0, 0.0
    med = statistics.median
    prefill = (med(r["prefill_compute_ms"] for r in loaded.rows)
               / med(r["prefill_compute_ms"] for r in idle_rows))
    return prefill, loaded.slowdown(_DECODE_ALONE_S)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (per worker)")
    ap.add_argument("--prefill-tokens", default="16,64,128,256,512,1024,2048")
    ap.add_argument("--decode-batches", default="1,4,8,16")
    ap.add_argument("--decode-contexts", default="64,512,1024")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-serving", action="store_true",
                    help="skip the local deployment (serving overheads recorded as 0)")
    ap.add_argument("--no-kv", action="store_true",
                    help="skip the gloo measurement (--kv-bandwidth is recorded instead)")
    ap.add_argument("--kv-bandwidth", type=float, default=1e9, help="bytes/s with --no-kv")
    ap.add_argument("--no-corun", action="store_true",
                    help="skip the co-run factors (steps slowed by another worker on the "
                         "same host's cores; sim.corun): recorded as none")
    ap.add_argument("--speed-probe-s", type=float, default=30.0,
                    help="how long to time batch-1 decode steps for the host's speed drift "
                         "(0: not measured)")
    ap.add_argument("--speed-period-s", type=float, default=2.0,
                    help="the drift's period: step times are grouped by it")
    ap.add_argument("--out", required=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="splitserve profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return run(ap.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    import torch

    from splitserve.bench.offline import decode_step_ms
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.llm_engine import LLMEngine
    from splitserve.worker.runtime import engine_layout

    prefill_tokens, batches, contexts = (_ints(args.prefill_tokens), _ints(args.decode_batches),
                                         _ints(args.decode_contexts))
    budget = max(max(prefill_tokens), max(batches) * max(contexts))
    engine = LLMEngine(EngineConfig(
        model=args.model, dtype=args.dtype, num_threads=args.threads,
        enable_prefix_caching=False, max_num_batched_tokens=max(prefill_tokens),
        num_kv_blocks=-(-budget // 16) + 4 * max(batches) + 8))
    measure_prefill_ms(engine, min(prefill_tokens), 2, args.seed)  # warm-up
    prefill_ms = []
    for n in prefill_tokens:
        prefill_ms.append(measure_prefill_ms(engine, n, args.repeats, args.seed))
        print(f"prefill {n:5d} tokens: {prefill_ms[-1]:8.1f} ms", flush=True)
    decode_ms = []
    for b in batches:
        decode_ms.append([decode_step_ms(engine, b, c) for c in contexts])
        print(f"decode batch {b:3d}: " + ", ".join(
            f"ctx {c}: {t:.1f} ms" for c, t in zip(contexts, decode_ms[-1], strict=True)),
              flush=True)
    speed_sigma = speed_probe_ms = 0.0
    if args.speed_probe_s > 0:
        # In the probe's own process and engine, as a sweep's probes run (sim.probe): one
        # measurement per call.
        with SpeedProbe(args.model, args.dtype, args.threads) as probe:
            speed_sigma, speed_probe_ms = measure_speed(
                partial(probe.measure, 0.0), args.speed_probe_s, args.speed_period_s)
        print(f"speed drift: sigma {speed_sigma:.3f} per {args.speed_period_s:g} s "
              f"({args.speed_probe_s:g} s of batch-1 decode steps, median "
              f"{speed_probe_ms:.2f} ms)", flush=True)
    layout = engine_layout(engine)
    bytes_per_token = layout.bytes_for(1) // layout.block_size
    bandwidth = args.kv_bandwidth if args.no_kv else measure_kv_bandwidth(
        layout.dtype if layout.dtype in ("float32", "bfloat16") else "float32")
    print(f"KV: {bytes_per_token} bytes/token, {bandwidth / 1e6:.0f} MB/s", flush=True)
    hardware = {"cpu": _cpu_name(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
                "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                "host": platform.node(), "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    profile = Profile(model=args.model, dtype=args.dtype, threads=args.threads,
                      hardware=hardware, prefill_tokens=prefill_tokens, prefill_ms=prefill_ms,
                      decode_batches=batches, decode_contexts=contexts, decode_ms=decode_ms,
                      kv_bytes_per_token=bytes_per_token, kv_bandwidth_bytes_per_s=bandwidth,
                      speed_sigma=speed_sigma, speed_period_s=args.speed_period_s,
                      speed_probe_ms=speed_probe_ms)
    del engine
    if not args.no_corun:
        from splitserve.sim.corun import measure_factors

        corun = measure_factors(args.model, args.dtype, args.threads, args.repeats, args.seed)
        profile = replace(profile, corun=corun)
        print("co-run factors (step kind under another worker's kind): " + ", ".join(
            f"{k} under {o} {f:.3f}" for k, row in corun.items() for o, f in row.items()),
              flush=True)
    if not args.no_serving:
        serving = measure_serving(args, ProfiledStepTimes(profile))
        profile = replace(profile, serving=serving)
        print(f"serving overheads: {serving}", flush=True)
    profile.save(args.out)
    print(f"profile: {args.out}")
    return 0
