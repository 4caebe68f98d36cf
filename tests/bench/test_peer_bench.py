"""`splitserve bench peer` on the tiny model: without a llama-server binary the peer rows
are skipped with the reason, and SplitServe's served and offline rows run for real (router
and decode worker processes, then the engine in process) with the served/offline ratio.
(The llama.cpp rows were run by hand against a built llama-server: BENCHMARKS.md.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from splitserve.bench import main as bench_main
from splitserve.bench.peer import (
    build_parser,
    colocated_worker_args,
    kv_cache_dtype,
    lone_summary,
    median_summary,
    offline_engine,
    paired_ratio,
    router_target,
)


def test_peer_bench_without_a_peer(tiny_llama: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "peer.json"
    rc = bench_main(["peer", "--model", str(tiny_llama), "--precisions", "fp32",
                     "--threads", "1", "--input-len", "8", "--output-len", "6",
                     "--concurrency", "2", "--num-requests", "4", "--single-stream", "2",
                     "--rounds", "2", "--step-trace", str(tmp_path / "steps"),
                     "--fp32-kv-cache-dtype", "bfloat16",
                     "--llama-server", str(tmp_path / "absent"), "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    rows = {row["server"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["llama.cpp llama-server, F32 GGUF"] == {
        "server": "llama.cpp llama-server, F32 GGUF", "skipped": True,
        "why": "no --llama-server binary"}
    served = rows["SplitServe colocated, fp32, KV bfloat16"]
    offline = rows["SplitServe engine offline, fp32, KV bfloat16"]
    assert served["failed"] == 0 and served["output_tok_s"] > 0 and offline["output_tok_s"] > 0
    # Two rounds each, paired: the ratio is the median (here the mean) of the two rounds'.
    assert len(served["rounds_tok_s"]) == 2 and len(offline["rounds_tok_s"]) == 2
    assert served["ratios"]["served/offline"] == pytest.approx(sum(
        s / o for s, o in zip(served["rounds_tok_s"], offline["rounds_tok_s"], strict=True)) / 2)
    assert served["output_tok_s"] == pytest.approx(sum(served["rounds_tok_s"]) / 2)
    lone = rows["SplitServe colocated, fp32, KV bfloat16, c=1"]
    steps = lone["paired_step_ms"]  # one after each of the 2 lone requests
    assert lone["failed"] == 0 and len(steps) == 2 and min(steps) > 0
    assert lone["tpot_p50_ms"] / max(steps) * 0.999 <= lone["ratios"]["TPOT/batch-1 step"]
    assert "skipped: no --llama-server binary" in printed
    assert "batch-1 decode step after each request" in printed
    assert f"served/offline {served['ratios']['served/offline']:.2f}x" in printed
    # --step-trace: each round's steps, of the worker's engine and of the offline one, from
    # traces the engines wrote (the worker: a process of its own) under steps/fp32.
    assert len(list((tmp_path / "steps" / "fp32").glob("steps-*.jsonl"))) == 2
    assert "SPLITSERVE_STEP_TRACE" not in os.environ
    traced = json.loads(out.read_text())["step_summaries"]
    for name in ("SplitServe colocated, fp32, KV bfloat16",
                 "SplitServe engine offline, fp32, KV bfloat16"):
        assert len(traced[name]) == 2
        for r, summary in enumerate(traced[name]):
            # 4 requests of 6 tokens, 2 at a time: each samples its first token in a prompt
            # step and 5 by decoding, at most one of them beside another's prompt tokens.
            decoded_alone = summary["decode_steps"] * summary["decode_batch"]
            assert summary["prompt_steps"] >= 2 and 16 - 1e-6 <= decoded_alone <= 20 + 1e-6
            assert 0 < summary["stepping_share"] <= 1.0
            assert f"{name} round {r}: {summary['steps']} steps" in printed


def test_splitserve_is_reached_through_the_front_end_llama_server_is_reached_through() -> None:
    """By default bench serve drives the router's OpenAI HTTP API, as it drives
    llama-server (the run above went that way); --api grpc goes through the SDK."""
    addrs = {"router": "127.0.0.1:5001", "http": "127.0.0.1:5002"}
    assert build_parser().parse_args([]).api == "http"
    assert router_target(addrs, "http") == "http://127.0.0.1:5002"
    assert router_target(addrs, "grpc") == "grpc://127.0.0.1:5001"


def _one_request(duration_s: float, output_tokens: int, ttft_ms: float, tpot_ms: float,
                 failed: int = 0) -> dict[str, object]:
    return {"duration_s": duration_s, "total_output_tokens": output_tokens, "failed": failed,
            "ttft_ms": {"p50": ttft_ms}, "tpot_ms": {"p50": tpot_ms}}


def test_lone_summary_pairs_each_request_with_the_step_after_it() -> None:
    runs = [_one_request(2.0, 100, 40.0, 20.0), _one_request(3.0, 100, 50.0, 30.0),
            _one_request(1.0, 0, 60.0, 0.0, failed=1)]
    out = lone_summary(runs, [10.0, 30.0, 12.0])
    assert out["output_throughput"] == pytest.approx(200 / 6.0)
    assert out["ttft_ms"]["p50"] == 50.0 and out["tpot_ms"]["p50"] == 25.0
    assert out["failed"] == 1 and out["paired_step_ms"] == [10.0, 30.0, 12.0]
    # Pairs 20/10 and 30/30 (the failed request has no TPOT): median 1.5, where the
    # unpaired medians would give 25/12 = 2.08.
    assert out["tpot_over_step"] == pytest.approx(1.5)
    assert "tpot_over_step" not in lone_summary(runs, [])


def _run(tok_s: float, ttft_ms: float = 100.0, tpot_ms: float = 10.0,
         failed: int = 0) -> dict[str, object]:
    return {"output_throughput": tok_s, "failed": failed, "connection_retries": 1,
            "ttft_ms": {"p50": ttft_ms}, "tpot_ms": {"p50": tpot_ms}}


def test_rounds_give_medians_and_ratios_paired_by_round() -> None:
    ours = [_run(100.0, 300.0, 30.0), _run(80.0, 200.0, 20.0, failed=1), _run(120.0)]
    peer = [_run(50.0), _run(80.0), _run(60.0)]
    summary = median_summary(ours)
    assert summary["output_throughput"] == 100.0 and summary["rounds"] == [100.0, 80.0, 120.0]
    assert summary["ttft_ms"]["p50"] == 200.0 and summary["tpot_ms"]["p50"] == 20.0
    assert summary["failed"] == 1 and summary["connection_retries"] == 3
    # Round ratios 2.0, 1.0, 2.0: median 2.0 (the medians' ratio would be 100/60 = 1.67).
    assert paired_ratio(ours, peer) == 2.0
    assert paired_ratio([_run(0.0)], [_run(5.0)]) is None


def test_peer_bench_refuses_unknown_precisions(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main(["peer", "--precisions", "fp8"]) == 2
    assert "precisions are bf16, fp32" in capsys.readouterr().err
    assert bench_main(["peer", "--rounds", "0"]) == 2
    assert "--rounds must be >= 1" in capsys.readouterr().err


def test_the_fp32_kv_cache_dtype_reaches_the_worker_and_the_offline_engine(tiny_llama: Path
                                                                          ) -> None:
    ns = build_parser().parse_args(["--model", str(tiny_llama), "--threads", "1",
                                    "--fp32-kv-cache-dtype", "float16"])
    fp32_args, bf16_args = colocated_worker_args("float32", ns), colocated_worker_args("bfloat16", ns)
    assert fp32_args[fp32_args.index("--kv-cache-dtype") + 1] == "float16"
    assert bf16_args[bf16_args.index("--kv-cache-dtype") + 1] == "auto"  # bf16 keeps its own
    assert offline_engine("float32", ns).runner.kv_pool.dtype == torch.float16
    assert offline_engine("bfloat16", ns).runner.kv_pool.dtype == torch.bfloat16


@pytest.mark.parametrize(("llama_args", "fp32_kv"), [
    ([], "float16"),  # llama-server's own default, f16
    (["--llama-cache-type", "f32"], "auto"),
    (["--llama-cache-type", "bf16"], "bfloat16"),
    (["--llama-cache-type", "f32", "--fp32-kv-cache-dtype", "float16"], "float16"),  # asked
])
def test_the_fp32_kv_cache_matches_llama_servers_by_default(llama_args: list[str],
                                                            fp32_kv: str) -> None:
    ns = build_parser().parse_args(llama_args)
    assert ns.fp32_kv_cache_dtype == ("match" if "--fp32-kv-cache-dtype" not in llama_args
                                      else "float16")
    assert kv_cache_dtype("float32", ns) == fp32_kv
    assert kv_cache_dtype("bfloat16", ns) == "auto"


def test_a_llama_cache_type_with_no_match_is_refused(capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    assert bench_main(["peer", "--llama-cache-type", "q8_0"]) == 2
    err = capsys.readouterr().err
    assert "no KV cache type that holds llama-server's 'q8_0' values" in err
    assert "--fp32-kv-cache-dtype" in err
