"""Disaggregation costs on one long prompt, everything measured in this invocation.

    splitserve bench kv [--model smollm2-135m] [--prompt-len 1000] [--repeats 5]

Starts the components as plain processes on 127.0.0.1 (one CPU thread per worker) twice:
  disaggregated: router + prefill worker + decode worker (every prompt prefilled remotely)
  colocated:     router + one decode worker that prefills locally (the baseline)
and reports, as medians over --repeats fresh prompts (no prefix-cache hits):
  - TTFT disaggregated / colocated (target <= 1.15x);
  - KV transfer time left exposed after the prefill's compute, as a share of it (<= 5%);
  - KV bytes/s moved over gloo (bytes / exposed-or-total transfer time, see output);
  - router relay overhead per token: TPOT through the router vs TPOT read straight off the
    decode worker's Admit stream for the same decode, as a share of TPOT (<= 5%).
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from splitserve.bench.procs import local_deployment
from splitserve.client import Client
from splitserve.common import envs
from splitserve.common.convert.common import sampling_to_proto
from splitserve.common.grpc_guard import sync_channel
from splitserve.common.sampling_params import SamplingParams
from splitserve.v1 import worker_pb2, worker_pb2_grpc


def _prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(100, 40000) for _ in range(length)]


def measure_requests(router: str, prompts: list[list[int]], max_tokens: int) -> list[dict[str, float]]:
    rows = []
    with Client(router, timeout=600) as client:
        for prompt in prompts:
            start = time.perf_counter()
            times = []
            last = None
            for chunk in client.stream(prompt, max_tokens=max_tokens, temperature=0.0,
                                       ignore_eos=True):
                now = time.perf_counter()
                times.extend([now] * max(1, len(chunk.token_ids)))
                last = chunk
            assert last is not None and last.timings is not None
            t = last.timings
            rows.append({
                "ttft_ms": (times[0] - start) * 1000.0,
                "tpot_ms": (times[-1] - times[0]) * 1000.0 / max(1, len(times) - 1),
                "prefill_compute_ms": t.prefill_compute_ms,
                "kv_transfer_ms": t.kv_transfer_ms,
            })
    return rows


@dataclass
class UnderDecode:
    """What requests_while_decoding measured."""

    rows: list[dict[str, float]]  # measure_requests' rows
    token_times: list[float]  # when each chunk of the background stream arrived (perf_counter)
    measured_from: float  # when the measured requests began (perf_counter)
    measured_to: float  # when they ended

    def mean_gap_ms(self, start: float, end: float) -> float:
        """The background stream's mean time between chunks arriving in [start, end] (0.0
        with fewer than two)."""
        inside = [t for t in self.token_times if start <= t <= end]
        return (inside[-1] - inside[0]) * 1e3 / (len(inside) - 1) if len(inside) > 1 else 0.0

    def slowdown(self, alone_s: float, skip_s: float = 0.2) -> float:
        """The background stream's mean gap while the measured requests ran over its mean
        gap in the `alone_s` before them, less their first `skip_s` (0.0 where either window
        holds fewer than two chunks). The first window covers everything the requests did
        between their starts and ends, their routing and KV transfer included."""
        alone = self.mean_gap_ms(self.measured_from - alone_s + skip_s, self.measured_from)
        during = self.mean_gap_ms(self.measured_from, self.measured_to)
        return during / alone if alone and during else 0.0


def requests_while_decoding(router: str, prompts: list[list[int]], background_tokens: int,
                            max_tokens: int = 1, settle_s: float = 0.2) -> UnderDecode | None:
    """measure_requests(router, prompts, max_tokens) while another stream (up to
    `background_tokens` long, cut off once the measurement ends) keeps a decode worker
    decoding, `settle_s` after its first chunk; None when that stream ended first (the
    measurement did not run under load)."""
    decoding, stop = threading.Event(), threading.Event()
    outlived: list[bool] = []
    failed: list[BaseException] = []
    token_times: list[float] = []
    prompt = prompts[0][::-1]  # not one of the timed prompts

    def background() -> None:
        try:
            with Client(router, timeout=600) as client:
                room = client.list_models()[0].max_model_len - len(prompt) - 1
                chunks = client.stream(prompt, max_tokens=min(background_tokens, room),
                                       temperature=0.0, ignore_eos=True)
                try:
                    for _ in chunks:
                        token_times.append(time.perf_counter())
                        decoding.set()
                        if stop.is_set():
                            outlived.append(True)
                            break
                finally:
                    chunks.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the measuring thread
            failed.append(exc)

    thread = threading.Thread(target=background, name="decode-load", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while not decoding.wait(0.05):
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the background stream never decoded: {failed or 'timeout'}")
        time.sleep(settle_s)  # into its steady decode steps
        measured_from = time.perf_counter()
        rows = measure_requests(router, prompts, max_tokens)
        measured_to = time.perf_counter()
    finally:
        stop.set()
        thread.join(120)
    return UnderDecode(rows, token_times, measured_from, measured_to) if outlived else None


def direct_decode_tpot(decode: str, prompt: list[int], max_tokens: int) -> float:
    """TPOT read straight off the decode worker (local prefill), no router in between."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    with sync_channel(decode, envs.cluster_token()) as channel:
        stub = worker_pb2_grpc.DecodeWorkerStub(channel)
        times: list[float] = []
        for message in stub.Admit(worker_pb2.AdmitRequest(
            request_id=f"direct-{time.time_ns()}", prompt_token_ids=prompt,
            sampling_params=sampling_to_proto(params), prefill_locally=True,
        ), timeout=600):
            if message.HasField("output"):
                times.extend([time.perf_counter()] * len(message.output.token_ids))
    return (times[-1] - times[0]) * 1000.0 / max(1, len(times) - 1)


def _kv_bytes(decode: str) -> int:
    with sync_channel(decode, envs.cluster_token()) as channel:
        stats = worker_pb2_grpc.DecodeWorkerStub(channel).Stats(worker_pb2.DecodeStatsRequest())
    return int(stats.counters.kv_transfer_bytes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="splitserve bench kv")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt-len", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=128, help="for the relay measurement")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per worker")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-gloo-bench", action="store_true", help="skip kvtransfer.bench")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    prompts = [_prompt(rng, args.prompt_len) for _ in range(args.repeats)]
    short = _prompt(rng, 16)
    med = statistics.median
    results: dict[str, list[dict[str, float]]] = {}
    relay: dict[str, float] = {}
    for mode in ("colocated", "disaggregated"):
        disaggregated = mode == "disaggregated"
        with local_deployment(args.model, num_prefill=1 if disaggregated else 0,
                              num_decode=1, local_prefill_threshold=0 if disaggregated
                              else 10**9, threads=args.threads) as addrs:
            measure_requests(addrs["router"], [prompts[0][:64]], 4)  # warm-up
            bytes_before = _kv_bytes(addrs["decode"][0])
            results[mode] = measure_requests(addrs["router"], prompts, args.max_tokens)
            if mode == "disaggregated":
                kv_bytes = _kv_bytes(addrs["decode"][0]) - bytes_before
            else:
                # Relay overhead: the same decode, through the router and straight off D.
                routed = [measure_requests(addrs["router"], [short], args.decode_tokens)[0]
                          for _ in range(3)]
                relay["router_tpot_ms"] = med(r["tpot_ms"] for r in routed)
                relay["direct_tpot_ms"] = med(direct_decode_tpot(addrs["decode"][0], short,
                                                                 args.decode_tokens)
                                              for _ in range(3))
    colo, dis = results["colocated"], results["disaggregated"]
    ttft_c, ttft_d = med(r["ttft_ms"] for r in colo), med(r["ttft_ms"] for r in dis)
    compute = med(r["prefill_compute_ms"] for r in dis)
    exposed = med(r["kv_transfer_ms"] for r in dis)
    print(f"model {args.model}, prompt {args.prompt_len} tokens, {args.repeats} repeats, "
          f"{args.threads} thread(s) per worker (medians)")
    print(f"TTFT colocated      {ttft_c:8.1f} ms")
    print(f"TTFT disaggregated  {ttft_d:8.1f} ms   ratio {ttft_d / ttft_c:.3f}x (target <= 1.15x)")
    print(f"prefill compute     {compute:8.1f} ms on the prefill worker")
    print(f"KV transfer exposed {exposed:8.1f} ms = {100 * exposed / compute:.1f}% of prefill "
          f"(target <= 5%)")
    per_request = kv_bytes / args.repeats
    print(f"KV bytes per {args.prompt_len}-token prompt: {per_request / 1e6:.1f} MB; "
          f"moved while {compute:.0f} ms of compute ran (layer-wise overlap)")
    r, d = relay["router_tpot_ms"], relay["direct_tpot_ms"]
    print(f"TPOT through router {r:6.2f} ms, straight off the decode worker {d:6.2f} ms: "
          f"relay overhead {100 * (r - d) / d:+.1f}% of TPOT (target <= 5%)")
    if not args.no_gloo_bench:
        print("gloo loopback throughput (python -m kvtransfer.bench):", flush=True)
        subprocess.run([sys.executable, "-m", "splitserve.kvtransfer.bench"], check=False)
    return 0
