"""The planner's search and explanation on synthetic profiles with known answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitserve.sim import planner
from splitserve.sim.cluster import Deployment
from tests.sim.test_sim_cluster import flat_model


def test_deployments_cover_every_split_of_every_size() -> None:
    names = [d.name for d in planner.deployments(3, [0])]
    assert names == ["colocated x1", "colocated x2", "1P+1D", "colocated x3", "1P+2D", "2P+1D"]
    assert len(planner.deployments(3, [0, 256])) == 9
    assert all(d.local_prefill_threshold == 256
               for d in planner.deployments(3, [256]) if d.num_prefill)


def _plan(tmp_path: Path, capsys: pytest.CaptureFixture[str], prefill_ms: float,
          argv: list[str]) -> list[str]:
    path = tmp_path / "profile.json"
    flat_model(prefill_ms=prefill_ms, decode_ms=10.0).profile.save(path)
    assert planner.main(["--profile", str(path), *argv]) == 0
    return capsys.readouterr().out.splitlines()


def test_short_prompts_colocated_wins(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = _plan(tmp_path, capsys, 5.0, [
        "--rate", "2", "--slo", "ttft_ms=1000,tpot_ms=50", "--gpus", "3", "--workload", "fixed",
        "--workload-args", "--input-len 32 --output-len 64", "--num-requests", "60"])
    top = lines[2]
    assert "colocated x1" in top and "SLO met 100.0%" in top
    assert lines[-1].startswith("colocated wins: colocated x1")


def test_long_prefills_that_stall_decodes_make_disaggregation_win(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A 2 s prefill stalls every colocated stream it lands beside: its TPOT over 255 tokens
    # rises by ~8 ms past the 15 ms SLO. A decode worker that never prefills stays at 10 ms.
    lines = _plan(tmp_path, capsys, 2000.0, [
        "--rate", "0.3", "--slo", "ttft_ms=20000,tpot_ms=15", "--gpus", "2",
        "--workload-args", "--input-len 500 --long-input-len 500 --output-len 256",
        "--num-requests", "60"])
    assert "1P+1D" in lines[2] and "SLO met 100.0%" in lines[2]
    assert lines[-1].startswith("disaggregation wins: 1P+1D")


def test_rank_puts_feasible_first_then_goodput_per_device() -> None:
    def candidate(n_prefill: int, n_decode: int, good: int, goodput: float
                  ) -> planner.Candidate:
        summary = {"goodput": goodput, "good_requests": good, "num_requests": 10}
        return planner.Candidate(Deployment(num_prefill=n_prefill, num_decode=n_decode),
                                 summary, 0.0, 0.0)

    cheap_but_failing = candidate(0, 1, 5, 1.0)
    big = candidate(1, 2, 10, 2.4)
    small = candidate(0, 2, 10, 2.0)
    ranked = planner.rank([cheap_but_failing, big, small], min_attainment=0.9)
    assert ranked == [small, big, cheap_but_failing]
