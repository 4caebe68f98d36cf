"""The benchmark commands run end to end on a tiny model (numbers are not checked here:
timing claims live in BENCHMARKS.md, measured on an idle machine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitserve.bench import main as bench_main


def test_offline_benchmark_runs(tiny_llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main(["offline", "--model", str(tiny_llama), "--num-prompts", "4",
                       "--output-len", "4", "--skip-hf-single"]) == 0
    out = capsys.readouterr().out
    assert "(a) engine" in out and "engine / (c)" in out and "peak KV pool utilization" in out


def test_kv_benchmark_runs(tiny_llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main(["kv", "--model", str(tiny_llama), "--prompt-len", "100", "--repeats", "1",
                       "--max-tokens", "4", "--decode-tokens", "8", "--no-gloo-bench"]) == 0
    out = capsys.readouterr().out
    assert "TTFT disaggregated" in out and "relay overhead" in out
