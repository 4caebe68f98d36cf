"""`splitserve bench pacing` on the tiny model with short phases: both phases run against
real processes, the paced clients' chunks come one token apart at about the pace, and the
printed summary holds the figures the JSON holds. (Measured results: BENCHMARKS.md.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from splitserve.bench import main as bench_main


def test_pacing_bench_runs_both_phases(tiny_llama: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pacing.json"
    rc = bench_main(["pacing", "--model", str(tiny_llama), "--dtype", "float32",
                     "--threads", "1", "--num-kv-blocks", "256", "--seconds", "3",
                     "--warmup-seconds", "1", "--paced-concurrency", "2",
                     "--unpaced-concurrency", "1", "--input-len", "8", "--output-len", "24",
                     "--pace", "20", "--out", str(out)])
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert rc == 0
    assert set(data["results"]) == {"unpaced", "paced"}
    for phase in ("unpaced", "paced"):
        assert data["results"][phase]["unpaced"]["output_tokens"] > 0
    paced = data["results"]["paced"]["paced"]
    assert paced["num_gaps"] > 0 and data["results"]["unpaced"]["paced"]["num_gaps"] > 0
    # The pace holds the paced clients' tokens apart; a generous bound, not the target.
    assert paced["gap_p50_s"] > 0.5 / 20
    summary = data["summary"]
    assert (f"unpaced tok/s paced/unpaced phase = {summary['unpaced_tokens_per_s_ratio']}"
            in printed)
