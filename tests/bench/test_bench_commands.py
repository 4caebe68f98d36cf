"""The benchmark commands run end to end on a tiny model (numbers are not checked here:
timing claims live in BENCHMARKS.md, measured on an idle machine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitserve.bench import main as bench_main


def test_offline_benchmark_runs(tiny_llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main(["offline", "--model", str(tiny_llama), "--num-prompts", "4",
                       "--output-len", "4", "--skip-hf-single", "--prefill", "2x32",
                       "--step-batches", "1,3"]) == 0
    out = capsys.readouterr().out
    assert "(a) engine" in out and "engine / (c)" in out and "peak KV pool utilization" in out
    assert "prefill, 2 x 32 tokens" in out and "decode step, batch   3" in out


def test_offline_benchmark_writes_and_reuses_a_named_random_model(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["offline", "--random-model", "tiny", "--random-model-dir", str(tmp_path),
            "--num-prompts", "2", "--output-len", "2", "--skip-hf-single", "--prefill", "0x0",
            "--step-batches", "1", "--hf-batch-size", "2"]
    assert bench_main(args) == 0
    model_dir = tmp_path / "splitserve-random-models" / "tiny-float32"
    assert (model_dir / "config.json").is_file()
    written = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert bench_main(args) == 0  # the same shape again: reused, not rewritten
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == written
    assert "model tiny dtype float32" in capsys.readouterr().out


def test_kv_benchmark_runs(tiny_llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main(["kv", "--model", str(tiny_llama), "--prompt-len", "100", "--repeats", "1",
                       "--max-tokens", "4", "--decode-tokens", "8", "--no-gloo-bench"]) == 0
    out = capsys.readouterr().out
    assert "TTFT disaggregated" in out and "relay overhead" in out
