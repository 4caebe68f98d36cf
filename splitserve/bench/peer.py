"""`splitserve bench peer`: SplitServe's served path against llama.cpp's `llama-server` and
against its own engine offline, on one workload, in one invocation.

For each precision asked for (bf16, fp32), on this machine with the same thread count:
1. llama-server with the GGUF of that precision (`--llama-server PATH --gguf-bf16 FILE`,
   `--gguf-fp32 FILE`; made from the shipped Q4_1 GGUF with `llama-quantize
   --allow-requantize IN OUT BF16|F32`, so they hold the values our converted weights hold),
   driven by `bench serve`; skipped with a message when the binary or the file is absent;
2. SplitServe colocated (a router and one decode worker that prefills its own prompts, as
   processes), driven by the same `bench serve` arguments through the same front end,
   its OpenAI API over HTTP with SSE (`--api grpc`: through the SDK's gRPC instead, the
   default before the twenty-seventh session); its fp32 runs keep the
   KV cache type llama-server keeps (`--fp32-kv-cache-dtype match`, the default: f16,
   llama.cpp's default for an F32 model, or what `--llama-cache-type` names), so both
   servers read the same KV bytes per token;
3. the engine offline on the same prompts (the workload's texts tokenized as the router
   does), `max_num_seqs` = the concurrency, every prompt submitted at once.
4. with `--single-stream N`: N requests one at a time (concurrency 1) to each server; after
   each of SplitServe's, the engine's batch-1 decode step at the prompt's length, measured
   in this process while the server idles, so the served TPOT of a lone stream is set
   against the step it is made of, measured seconds apart (the ratio is the median of the
   N pairs: this VM's speed drifts by tens of percent over minutes).
All of one precision's servers are up together and take turns, so `--rounds K` runs the
workload K times on each, interleaved (llama.cpp, SplitServe, offline; again; round r on
seed+r's prompts, so that no server serves a prompt it has cached), and each
ratio is the median of the K rounds' ratios: this VM's speed drifts by tens of percent over
minutes, and a ratio of two runs minutes apart measures the drift as much as the servers.
It prints one table (output tok/s, TTFT p50, TPOT p50, failed: medians over the rounds)
with the ratios the issue asks for (SplitServe / llama.cpp at the same precision; served /
offline; lone-stream TPOT / batch-1 step) and writes it as JSON with `--out`.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splitserve.bench import serve as serve_bench
from splitserve.bench.procs import free_port, local_deployment
from splitserve.bench.workloads import WorkloadConfig, make_workload

if TYPE_CHECKING:
    from splitserve.engine.llm_engine import LLMEngine

PRECISIONS = {"bf16": ("bfloat16", "BF16"), "fp32": ("float32", "F32")}
# bench serve's target for SplitServe's router by front end: the address local_deployment
# gives for it, and the target's scheme.
API_SCHEMES = {"http": ("http", "http"), "grpc": ("router", "grpc")}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="splitserve bench peer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--llama-server", default=None, help="path of a llama-server binary "
                    "(absent: the llama.cpp rows are skipped)")
    ap.add_argument("--gguf-bf16", default=None, help="BF16 GGUF of the same model")
    ap.add_argument("--gguf-fp32", default=None, help="F32 GGUF of the same model")
    ap.add_argument("--precisions", default="bf16,fp32")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="CPU threads of every server (and of the offline engine)")
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="SplitServe's prefill chunk budget (default: the engine's)")
    ap.add_argument("--stream-interval", type=int, default=1,
                    help="SplitServe's decode worker sends tokens this many at a time "
                         "(`splitserve decode --stream-interval`; 1: every step)")
    ap.add_argument("--api", choices=API_SCHEMES, default="http",
                    help="how bench serve reaches SplitServe's router: http (default), its "
                         "OpenAI API with SSE, as it reaches llama-server; grpc, the SDK")
    ap.add_argument("--fp32-kv-cache-dtype", default="match",
                    choices=["match", "auto", "bfloat16", "float16"],
                    help="SplitServe's KV cache (worker and offline engine) in the fp32 runs: "
                         "match (default) keeps the type llama-server keeps, like for like: "
                         "float16 under its default f16 cache, fp32 under --llama-cache-type "
                         "f32; auto is fp32. bf16 runs keep the model's bf16 cache")
    ap.add_argument("--llama-cache-type", default=None, metavar="TYPE",
                    help="llama-server's K and V cache type (-ctk/-ctv: f32, f16, bf16; "
                         "default: its own, f16)")
    ap.add_argument("--skip-offline", action="store_true", help="no offline engine run")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the workload on every server this many times, interleaved "
                         "(llama.cpp, SplitServe, offline; again): medians, and ratios "
                         "paired by round")
    ap.add_argument("--single-stream", type=int, default=0, metavar="N",
                    help="also N requests at concurrency 1 per server, against the engine's "
                         "batch-1 decode step (0: skip)")
    ap.add_argument("--step-trace", metavar="DIR", default=None,
                    help="every engine (the worker's, the offline one) records its steps "
                         "under DIR/<precision> (SPLITSERVE_STEP_TRACE), and each round's "
                         "steps are summarized: where the served time goes")
    ap.add_argument("--out", help="results JSON")
    return ap


def _workload_args(ns: argparse.Namespace) -> list[str]:
    return ["--workload", "fixed", "--input-len", str(ns.input_len), "--output-len",
            str(ns.output_len), "--concurrency", str(ns.concurrency), "--num-requests",
            str(ns.num_requests), "--seed", str(ns.seed), "--no-progress"]


def _serve_lone(target: str, label: str, ns: argparse.Namespace,
                between: Callable[[], float] | None) -> dict[str, Any]:
    """--single-stream N requests, one `bench serve` run of one request each, `between()`
    measured after each; one summary of them all, with the N measurements as
    "paired_step_ms". Their seeds follow the rounds' (seed+rounds, seed+rounds+1, ...):
    N prompts no server has cached, the same for every server."""
    runs, steps = [], []
    for i in range(ns.single_stream):
        one = argparse.Namespace(**{**vars(ns), "concurrency": 1, "num_requests": 1,
                                    "seed": ns.seed + ns.rounds + i})
        runs.append(_serve_once(target, label, one))
        if between is not None:
            steps.append(between())
    return lone_summary(runs, steps)


def _median_p50(runs: list[dict[str, Any]], metric: str) -> float | None:
    """The median of the runs' p50s of `metric` (runs without one left out)."""
    values = [run[metric]["p50"] for run in runs if (run.get(metric) or {}).get("p50")]
    return statistics.median(values) if values else None


def lone_summary(runs: list[dict[str, Any]], steps: list[float]) -> dict[str, Any]:
    """The one-request summaries `runs` as one: output tok/s over their summed durations,
    TTFT and TPOT p50 over the requests; with `steps` (one per run), "tpot_over_step": the
    median of each request's TPOT over the step measured right after it."""
    duration = sum(run["duration_s"] for run in runs)
    out: dict[str, Any] = {
        "output_throughput": (sum(run["total_output_tokens"] for run in runs) / duration
                              if duration > 0 else 0.0),
        "ttft_ms": {"p50": _median_p50(runs, "ttft_ms")},
        "tpot_ms": {"p50": _median_p50(runs, "tpot_ms")},
        "failed": sum(run["failed"] for run in runs),
        "connection_retries": sum(run.get("connection_retries", 0) for run in runs),
    }
    if steps:
        out["paired_step_ms"] = steps
        pairs = [run["tpot_ms"]["p50"] / step for run, step in zip(runs, steps, strict=True)
                 if (run.get("tpot_ms") or {}).get("p50") and step > 0]
        out["tpot_over_step"] = statistics.median(pairs) if pairs else None
    return out


def _serve_once(target: str, label: str, ns: argparse.Namespace) -> dict[str, Any]:
    """One `bench serve` run's summary, with its wall-clock "window" (start, end)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        argv = ["--target", target, "--label", label, *_workload_args(ns), "--out", str(out)]
        started = time.time()
        serve_bench.main(argv)
        return {**json.loads(out.read_text())["summary"], "window": (started, time.time())}


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"llama-server did not answer {url}")


@contextlib.contextmanager
def llama_server(binary: str, gguf: str, ns: argparse.Namespace) -> Iterator[str]:
    """A llama-server on `gguf` while the block runs; yields its target URL."""
    port = free_port()
    context = ns.concurrency * (ns.input_len * 2 + ns.output_len + 64)  # words -> tokens
    command = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port),
               "-t", str(ns.threads), "-tb", str(ns.threads), "-np", str(ns.concurrency),
               "-c", str(context), "--no-webui"]
    if ns.llama_cache_type:
        command += ["-ctk", ns.llama_cache_type, "-ctv", ns.llama_cache_type]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


# llama-server's cache types (-ctk/-ctv) and the SplitServe KV cache holding the same values.
_LLAMA_CACHE_TYPES = {"f16": "float16", "f32": "auto", "bf16": "bfloat16"}
_LLAMA_DEFAULT_CACHE_TYPE = "f16"


def kv_cache_dtype(dtype: str, ns: argparse.Namespace) -> str:
    """The engine's --kv-cache-dtype for a run of model dtype `dtype`: in fp32 runs the one
    asked for, or with "match" the one of llama-server's cache type (its default f16)."""
    if dtype != "float32":
        return "auto"
    if ns.fp32_kv_cache_dtype != "match":
        return str(ns.fp32_kv_cache_dtype)
    llama = ns.llama_cache_type or _LLAMA_DEFAULT_CACHE_TYPE
    if llama not in _LLAMA_CACHE_TYPES:
        raise ValueError(f"--fp32-kv-cache-dtype match: SplitServe has no KV cache type that "
                         f"holds llama-server's {llama!r} values (it has "
                         f"{', '.join(sorted(_LLAMA_CACHE_TYPES))}); name one with "
                         f"--fp32-kv-cache-dtype")
    return _LLAMA_CACHE_TYPES[llama]


@contextlib.contextmanager
def splitserve_colocated(dtype: str, ns: argparse.Namespace) -> Iterator[str]:
    """A router and one decode worker that prefills its own prompts, as processes, while
    the block runs; yields the router's target for `ns.api`."""
    with local_deployment(ns.model, num_prefill=0, num_decode=1,
                          local_prefill_threshold=1 << 20, threads=ns.threads,
                          worker_args=colocated_worker_args(dtype, ns)) as addrs:
        yield router_target(addrs, ns.api)


def router_target(addrs: dict[str, Any], api: str) -> str:
    """bench serve's target for the router of local_deployment's `addrs` through `api`."""
    key, scheme = API_SCHEMES[api]
    return f"{scheme}://{addrs[key]}"


def colocated_worker_args(dtype: str, ns: argparse.Namespace) -> tuple[str, ...]:
    """The decode worker's engine options: those offline_engine builds its engine with."""
    args = ["--dtype", dtype, "--max-num-seqs", str(max(ns.concurrency, 1)),
            "--num-kv-blocks", "2048", "--kv-cache-dtype", kv_cache_dtype(dtype, ns)]
    if ns.max_num_batched_tokens:
        args += ["--max-num-batched-tokens", str(ns.max_num_batched_tokens)]
    if ns.stream_interval != 1:
        args += ["--stream-interval", str(ns.stream_interval)]
    return tuple(args)


def median_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one server's workload run as one summary: the medians of output tok/s and
    of the TTFT and TPOT p50s, failures and connection retries summed, each round's tok/s
    in "rounds"."""
    return {"output_throughput": statistics.median(r["output_throughput"] for r in runs),
            "ttft_ms": {"p50": _median_p50(runs, "ttft_ms")},
            "tpot_ms": {"p50": _median_p50(runs, "tpot_ms")},
            "failed": sum(r["failed"] for r in runs),
            "connection_retries": sum(r.get("connection_retries", 0) for r in runs),
            "rounds": [r["output_throughput"] for r in runs]}


def paired_ratio(numerators: list[dict[str, Any]], denominators: list[dict[str, Any]]
                 ) -> float | None:
    """The median over rounds of one run's output tok/s over the other's in that round."""
    ratios = [n["output_throughput"] / d["output_throughput"]
              for n, d in zip(numerators, denominators, strict=True)
              if n["output_throughput"] and d["output_throughput"]]
    return statistics.median(ratios) if ratios else None


def offline_engine(dtype: str, ns: argparse.Namespace) -> LLMEngine:
    """The engine as the worker runs it (`ns`: model, threads, concurrency,
    fp32_kv_cache_dtype, max_num_batched_tokens)."""
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(
        model=ns.model, dtype=dtype, num_threads=ns.threads, num_kv_blocks=2048,
        max_num_seqs=ns.concurrency, kv_cache_dtype=kv_cache_dtype(dtype, ns),
        **({"max_num_batched_tokens": ns.max_num_batched_tokens}
           if ns.max_num_batched_tokens else {})))


def workload_prompts(engine: LLMEngine, ns: argparse.Namespace, seed: int) -> list[list[int]]:
    """The workload's prompts for `seed`, tokenized as the router tokenizes them."""
    workload = WorkloadConfig(kind="fixed", seed=seed, input_len=ns.input_len,
                              output_len=ns.output_len)
    return [engine.tokenizer.encode(request.as_prompt(), add_special_tokens=True)
            for request in itertools.islice(make_workload(workload), ns.num_requests)]


def step_meter(engine: LLMEngine, prompts: list[list[int]], output_len: int
               ) -> Callable[[], float]:
    """A function timing `engine`'s batch-1 decode step (median of 16) at a lone stream's
    mean context: the prompts' mean length plus half the output."""
    from splitserve.bench.offline import decode_step_ms

    context = int(sum(map(len, prompts)) / len(prompts)) + output_len // 2
    return lambda: decode_step_ms(engine, 1, context, steps=16)


def warm_up(engine: LLMEngine, prompts: list[list[int]]) -> None:
    """First-call costs paid on the second halves of two prompts: not prefixes of any, so
    nothing of the workload lands in the prefix cache."""
    from splitserve.bench.offline import run_engine

    run_engine(engine, [p[len(p) // 2:] for p in prompts[:2]], 4)


def run_offline(engine: LLMEngine, prompts: list[list[int]],
                ns: argparse.Namespace) -> dict[str, Any]:
    """The engine alone on the workload's prompts, every one submitted at once."""
    from splitserve.bench.offline import run_engine

    warm_up(engine, prompts)
    started = time.time()
    result = run_engine(engine, prompts, ns.output_len)
    return {"output_throughput": result.output_tokens / result.seconds,
            "completed": len(prompts), "failed": 0, "seconds": result.seconds,
            "mean_input_tokens": sum(map(len, prompts)) / len(prompts),
            "window": (started, time.time())}


@contextlib.contextmanager
def step_traces(folder: Path | None) -> Iterator[None]:
    """SPLITSERVE_STEP_TRACE=`folder` for the engines built in the block (this process's
    and the processes it starts); nothing when `folder` is None."""
    if folder is None:
        yield
        return
    before = os.environ.get("SPLITSERVE_STEP_TRACE")
    os.environ["SPLITSERVE_STEP_TRACE"] = str(folder)
    try:
        yield
    finally:
        if before is None:
            del os.environ["SPLITSERVE_STEP_TRACE"]
        else:
            os.environ["SPLITSERVE_STEP_TRACE"] = before


def round_steps(folder: Path, runs: dict[str, list[dict[str, Any]]]
                ) -> dict[str, list[dict[str, Any] | None]]:
    """Each round's step summary (engine.step_trace.summarize within the run's window) of
    the served worker's engine ("ours") and of the offline engine (this process's)."""
    from splitserve.engine.step_trace import read, summarize

    mine = f"steps-{os.getpid()}-"
    records: dict[str, list[dict[str, Any]]] = {"ours": [], "offline": []}
    for path in sorted(folder.glob("steps-*.jsonl")):
        records["offline" if path.name.startswith(mine) else "ours"] += read(path)
    found: dict[str, list[dict[str, Any] | None]] = {}
    for kind, recs in records.items():
        recs.sort(key=lambda r: r["t"])
        summaries = [summarize(recs, *run["window"]) for run in runs[kind]]
        found[kind] = [s.as_dict() if s is not None else None for s in summaries]
    return found


def format_steps(name: str, summaries: list[dict[str, Any] | None]) -> str:
    """One line per round: where the engine's wall time went."""
    lines = []
    for r, s in enumerate(summaries):
        if s is None:
            lines.append(f"{name} round {r}: no step recorded")
            continue
        lines.append(
            f"{name} round {r}: {s['steps']} steps from the first to the last "
            f"{s['wall_s']:.1f} s of the run's {s['window_s']:.1f} s, stepping "
            f"{100 * s['stepping_share']:.0f}% of it; decode-only {s['decode_steps']} x "
            f"{s['decode_step_ms']:.1f} ms at batch {s['decode_batch']:.1f}; with prompt "
            f"tokens {s['prompt_steps']} x {s['prompt_step_ms']:.1f} ms "
            f"({s['prompt_tokens_per_step']:.0f} tokens); gap {s['gap_ms']:.2f} ms")
    return "\n".join(lines)


def _row(name: str, summary: dict[str, Any] | None) -> dict[str, Any]:
    if summary is None:
        return {"server": name, "skipped": True}
    ttft = (summary.get("ttft_ms") or {}).get("p50")
    tpot = (summary.get("tpot_ms") or {}).get("p50")
    return {"server": name, "output_tok_s": summary.get("output_throughput"),
            "ttft_p50_ms": ttft, "tpot_p50_ms": tpot, "failed": summary.get("failed", 0),
            "connection_retries": summary.get("connection_retries", 0)}


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'server':<34s}{'out tok/s':>10s}{'TTFT p50':>10s}{'TPOT p50':>10s}"
             f"{'failed':>8s}  ratios"]
    for row in rows:
        if row.get("skipped"):
            lines.append(f"{row['server']:<34s}  skipped: {row.get('why', '')}")
            continue
        ttft = row.get("ttft_p50_ms")
        lines.append(
            f"{row['server']:<34s}{_fmt(row['output_tok_s'], '.1f'):>10s}"
            f"{_fmt(None if ttft is None else ttft / 1000, '.2f') + ' s':>10s}"
            f"{_fmt(row.get('tpot_p50_ms'), '.1f') + ' ms':>10s}{row.get('failed', 0):>8d}  "
            + ", ".join(f"{k} {v:.2f}x" for k, v in row.get("ratios", {}).items()))
    return "\n".join(lines)


def _precision_rows(peer_name: str, name: str, precision: str,
                    runs: dict[str, list[dict[str, Any]]],
                    lone: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One precision's table rows: each server's rounds as one row, then its lone stream,
    with the ratios paired by round (and, for the lone stream, by request)."""
    rows = []
    if runs["peer"]:
        peer = _row(peer_name, median_summary(runs["peer"]))
        peer["rounds_tok_s"] = [r["output_throughput"] for r in runs["peer"]]
        rows.append(peer)
        if "peer" in lone:
            rows.append(_row(f"{peer_name}, c=1", lone["peer"]))
    ours = _row(name, median_summary(runs["ours"]))
    ours["rounds_tok_s"] = [r["output_throughput"] for r in runs["ours"]]
    rows.append(ours)
    ratios: dict[str, float] = {}
    if runs["peer"] and (vs := paired_ratio(runs["ours"], runs["peer"])):
        ratios["vs llama.cpp"] = vs
    if runs["offline"] and (served := paired_ratio(runs["ours"], runs["offline"])):
        ratios["served/offline"] = served
    if ratios:
        ours["ratios"] = ratios
    if "ours" in lone:
        row = _row(f"{name}, c=1", lone["ours"])
        if lone["ours"].get("tpot_over_step"):
            row["ratios"] = {"TPOT/batch-1 step": lone["ours"]["tpot_over_step"]}
            row["paired_step_ms"] = lone["ours"]["paired_step_ms"]
        rows.append(row)
    if runs["offline"]:
        rows.append({"server": f"SplitServe engine offline, {precision}", "failed": 0,
                     "output_tok_s": statistics.median(r["output_throughput"]
                                                       for r in runs["offline"]),
                     "rounds_tok_s": [r["output_throughput"] for r in runs["offline"]]})
    return rows


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    precisions = [p.strip() for p in ns.precisions.split(",") if p.strip()]
    unknown = [p for p in precisions if p not in PRECISIONS]
    if ns.rounds < 1:
        print("splitserve bench peer: error: --rounds must be >= 1", file=sys.stderr)
        return 2
    if unknown or not precisions:
        print(f"splitserve bench peer: error: precisions are {', '.join(PRECISIONS)}",
              file=sys.stderr)
        return 2
    try:
        kv_cache_dtype("float32", ns)
    except ValueError as exc:
        print(f"splitserve bench peer: error: {exc}", file=sys.stderr)
        return 2
    rows: list[dict[str, Any]] = []
    traced: list[tuple[str, list[dict[str, Any] | None]]] = []
    for precision in precisions:
        dtype, gguf_kind = PRECISIONS[precision]
        gguf = getattr(ns, f"gguf_{precision}")
        peer_name = f"llama.cpp llama-server, {gguf_kind} GGUF" + (
            f", KV {ns.llama_cache_type}" if ns.llama_cache_type else "")
        kv_dtype = kv_cache_dtype(dtype, ns)
        kv = f", KV {kv_dtype}" if kv_dtype != "auto" else ""
        name = f"SplitServe colocated, {precision}{kv}" + (
            f", stream interval {ns.stream_interval}" if ns.stream_interval != 1 else "") + (
            ", gRPC" if ns.api == "grpc" else "")
        trace_dir = Path(ns.step_trace) / precision if ns.step_trace else None
        with contextlib.ExitStack() as stack:
            stack.enter_context(step_traces(trace_dir))
            peer = None
            if not ns.llama_server or not os.access(ns.llama_server, os.X_OK):
                rows.append({**_row(peer_name, None), "why": "no --llama-server binary"})
            elif not gguf or not Path(gguf).is_file():
                rows.append({**_row(peer_name, None), "why": f"no --gguf-{precision} file"})
            else:
                peer = stack.enter_context(llama_server(ns.llama_server, gguf, ns))
            ours = stack.enter_context(splitserve_colocated(dtype, ns))
            # The offline engine is built before the rounds, so that its batch-1 step can be
            # timed beside each lone-stream request; idle (no thread of its own) meanwhile.
            engine = None if ns.skip_offline else offline_engine(dtype, ns)
            runs: dict[str, list[dict[str, Any]]] = {"peer": [], "ours": [], "offline": []}
            prompts: list[list[int]] = []
            for r in range(ns.rounds):  # each round: every server, one after the other
                # Round r's workload is seed+r's: prompts no server has cached (each
                # caches prefixes), the same for all of them within the round.
                one = argparse.Namespace(**{**vars(ns), "seed": ns.seed + r})
                if peer is not None:
                    runs["peer"].append(_serve_once(peer, "llama.cpp", one))
                runs["ours"].append(_serve_once(ours, "splitserve", one))
                if engine is not None:
                    prompts = workload_prompts(engine, ns, ns.seed + r)
                    runs["offline"].append(run_offline(engine, prompts, ns))
            lone: dict[str, dict[str, Any]] = {}
            if ns.single_stream:
                if peer is not None:
                    lone["peer"] = _serve_lone(peer, "llama.cpp c=1", ns, None)
                between = (step_meter(engine, prompts, ns.output_len)
                           if engine is not None else None)
                lone["ours"] = _serve_lone(ours, "splitserve c=1", ns, between)
            del engine
        rows += _precision_rows(peer_name, name, f"{precision}{kv}", runs, lone)
        if trace_dir is not None:
            steps = round_steps(trace_dir, runs)
            traced.append((name, steps["ours"]))
            traced.append((f"SplitServe engine offline, {precision}{kv}", steps["offline"]))
    print(f"\nworkload: fixed, {ns.input_len} in / {ns.output_len} out, concurrency "
          f"{ns.concurrency}, {ns.num_requests} requests, {ns.threads} threads per server, "
          f"seed {ns.seed}, {ns.rounds} round(s); SplitServe through its "
          f"{'OpenAI HTTP API' if ns.api == 'http' else 'gRPC SDK'}")
    print(format_table(rows))
    for name, summaries in traced:
        print(format_steps(name, summaries))
    for row in rows:
        if row.get("paired_step_ms"):
            steps = row["paired_step_ms"]
            print(f"{row['server']}: the engine's batch-1 decode step after each request "
                  f"{statistics.median(steps):.1f} ms median ({min(steps):.1f}-"
                  f"{max(steps):.1f}); the ratio is the median of the pairs")
    if ns.out:
        Path(ns.out).write_text(json.dumps({"argv": argv, "rows": rows,
                                            "step_summaries": dict(traced)}, indent=2))
        print(f"results: {ns.out}", file=sys.stderr)
    return 0
