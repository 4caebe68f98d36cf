"""SPLITSERVE_STEP_TRACE: every engine step as a line of its own, and the summary of a
window of them (bench peer --step-trace)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from splitserve.common.sampling_params import SamplingParams
from splitserve.engine.step_trace import StepTrace, read, summarize
from splitserve.llm import LLM


def test_each_step_is_recorded_with_what_it_computed(
        tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPLITSERVE_STEP_TRACE", str(tmp_path / "trace"))
    llm = LLM(model=str(tiny_llama), num_kv_blocks=64, block_size=8, max_model_len=256,
              max_num_batched_tokens=16)
    prompts = [list(range(3, 23)), list(range(30, 36))]  # 20 and 6 prompt tokens
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))

    files = list((tmp_path / "trace").glob(f"steps-{os.getpid()}-*.jsonl"))
    assert len(files) == 1
    records = read(files[0])
    assert sum(r["prompt_tokens"] for r in records) == 26
    assert max(r["prompt_tokens"] for r in records) <= 16  # the chunk budget held
    # 5 tokens each: the prefill's last chunk samples the first, 4 decode steps the rest.
    assert sum(r["decode"] for r in records) == 8
    for r in records:
        assert r["ms"] > 0 and r["gap_ms"] >= 0
        assert 0 <= r["decode"] <= r["seqs"]
        if r["prompt_tokens"] == 0:
            assert r["decode"] == r["seqs"]
    assert [r["t"] for r in records] == sorted(r["t"] for r in records)
    # Each decode step of a sequence of P prompt tokens attends over P, P+1, P+2, P+3 tokens.
    assert sum(r["decode_context"] for r in records) == (4 * 20 + 6) + (4 * 6 + 6)

    summary = summarize(records)
    assert summary is not None
    assert summary.steps == len(records)
    assert summary.decode_steps + summary.prompt_steps == len(records)
    assert summary.stepping_s == pytest.approx(sum(r["ms"] for r in records) / 1e3)
    assert summary.stepping_s <= summary.wall_s + 1e-6


def test_no_trace_unless_asked(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPLITSERVE_STEP_TRACE", raising=False)
    llm = LLM(model=str(tiny_llama), num_kv_blocks=16, block_size=8, max_model_len=64)
    assert llm.engine.step_trace is None


def _record(t: float, ms: float, seqs: int, prompt_tokens: int) -> dict[str, float]:
    return {"t": t, "ms": ms, "seqs": seqs, "prompt_tokens": prompt_tokens,
            "decode": seqs - (1 if prompt_tokens else 0), "gap_ms": 0.0}


def test_a_window_is_summarized_from_its_steps_alone() -> None:
    records = [_record(0.0, 500.0, 1, 256),  # before the window
               _record(10.0, 400.0, 4, 256), _record(10.5, 20.0, 4, 0),
               _record(10.6, 30.0, 8, 0), _record(11.0, 20.0, 2, 0),
               _record(20.0, 20.0, 1, 0)]  # after it
    summary = summarize(records, start=9.0, end=13.0)
    assert summary is not None
    assert (summary.steps, summary.decode_steps, summary.prompt_steps) == (4, 3, 1)
    assert summary.decode_step_ms == 20.0 and summary.decode_batch == pytest.approx(14 / 3)
    assert summary.prompt_tokens_per_step == 256
    assert summary.window_s == 4.0
    assert summary.wall_s == pytest.approx(1.02)
    assert summary.stepping_share == pytest.approx(0.47 / 4.0)
    assert summarize(records, start=30.0, end=40.0) is None


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    trace = StepTrace(tmp_path / "t" / "steps.jsonl")
    trace.record(1.0, 0.02, 2, 0, 2)
    trace.record(1.03, 0.02, 2, 0, 2)
    trace.close()
    trace.record(2.0, 0.02, 2, 0, 2)  # after close: dropped, not an error
    with open(tmp_path / "t" / "steps.jsonl", "a", encoding="utf-8") as f:
        f.write('{"t": 3.0, "ms"')
    records = read(tmp_path / "t" / "steps.jsonl")
    assert len(records) == 2
    assert records[1]["gap_ms"] == pytest.approx(10.0)
