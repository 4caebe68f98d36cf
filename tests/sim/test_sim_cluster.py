"""The event loop: exact single-request timings, determinism, and an M/D/1 queue."""

from __future__ import annotations

import dataclasses
import random

import pytest

from splitserve.bench.metrics import summarize
from splitserve.sim.cluster import Deployment, SimRequest, Simulation, simulate
from splitserve.sim.profile import ProfiledStepTimes, ServingOverheads
from splitserve.sim.sweep import make_trace, parse_workload
from tests.sim.test_sim_profile import make_profile


def flat_model(prefill_ms: float = 40.0, decode_ms: float = 10.0,
               serving: ServingOverheads | None = None) -> ProfiledStepTimes:
    """Every prompt step takes prefill_ms, every decode step decode_ms."""
    return ProfiledStepTimes(make_profile(
        prefill_tokens=[1, 10_000], prefill_ms=[prefill_ms, prefill_ms],
        decode_batches=[1, 64], decode_contexts=[1, 10_000],
        decode_ms=[[decode_ms, decode_ms], [decode_ms, decode_ms]],
        serving=serving or ServingOverheads()))


def test_a_lone_colocated_request_takes_prefill_then_one_step_per_token() -> None:
    model = flat_model(serving=ServingOverheads(ttft_local_ms=5.0, decode_step_ms=1.0))
    [record] = simulate(Deployment(num_decode=1), model, [SimRequest(0, 0.5, 64, 4)])
    assert record.ok and record.output_tokens == 4
    assert record.ttft_ms == pytest.approx(5.0 + 40.0 + 1.0)
    assert record.tpot_ms == pytest.approx(10.0 + 1.0)
    assert record.chunk_s[0] == pytest.approx(0.5 + 0.046)


def test_a_lone_disaggregated_request_pays_the_exposed_transfer() -> None:
    # 1000 bytes/token at 1 MB/s: 100 tokens take 100 ms, 40 of them hidden by the prefill.
    model = flat_model(serving=ServingOverheads(ttft_remote_ms=20.0))
    deployment = Deployment(num_prefill=1, num_decode=1, local_prefill_threshold=0)
    [record] = simulate(deployment, model, [SimRequest(0, 0.0, 100, 3)])
    assert record.ttft_ms == pytest.approx(20.0 + 40.0 + 60.0)
    assert record.tpot_ms == pytest.approx(10.0)


def test_a_remote_prefill_waits_for_its_busy_decode_workers_step_to_end() -> None:
    # The decode worker admits between steps: request 1 arrives 3 ms into a decode step of
    # request 0, so its prompt reaches the prefill worker only after that step ends.
    model = flat_model(serving=ServingOverheads(ttft_remote_ms=20.0))
    deployment = Deployment(num_prefill=1, num_decode=1, local_prefill_threshold=0,
                            admit_between_steps=True)
    trace = [SimRequest(0, 0.0, 10, 5), SimRequest(1, 0.063, 10, 2)]
    first, second = simulate(deployment, model, trace)
    # 0: admitted at once, prompt 20-60 ms, KV (10 ms, hidden) -> first token at 60 ms;
    # decodes 60-70, 70-80, ... 1 arrives at 63 ms, admitted at 70, prefilled 90-130.
    assert first.ttft_ms == pytest.approx(60.0)
    assert second.ttft_ms == pytest.approx((0.070 - 0.063) * 1e3 + 20.0 + 40.0)
    # Admitting between layers (no CUDA graphs), 1 goes to the prefill worker at once.
    _, at_once = simulate(dataclasses.replace(deployment, admit_between_steps=False), model,
                          trace)
    assert at_once.ttft_ms == pytest.approx(20.0 + 40.0)


def test_workers_on_one_host_slow_each_other_by_the_corun_factors() -> None:
    corun = {"prefill": {"prefill": 1.5, "decode": 1.1}, "decode": {"prefill": 1.3,
                                                                   "decode": 1.2}}
    model = ProfiledStepTimes(make_profile(
        prefill_tokens=[1, 10_000], prefill_ms=[40.0, 40.0], decode_batches=[1, 64],
        decode_contexts=[1, 10_000], decode_ms=[[10.0, 10.0], [10.0, 10.0]], corun=corun))
    # Request 0 starts its prompt step on one worker at 0 ms, request 1 on the other at 1 ms.
    trace = [SimRequest(0, 0.0, 64, 3), SimRequest(1, 0.001, 64, 3)]
    alone = simulate(Deployment(num_decode=2), model, trace)  # one device per worker
    assert [r.ttft_ms for r in alone] == pytest.approx([40.0, 40.0])
    assert [r.tpot_ms for r in alone] == pytest.approx([10.0, 10.0])
    first, second = simulate(Deployment(num_decode=2, shared_host=True), model, trace)
    # 0: prompt 0-40 alone; decodes 40-53 and 53-66 under the other's prompt (x1.3).
    assert (first.ttft_ms, first.tpot_ms) == pytest.approx((40.0, 13.0))
    # 1: prompt 1-61 under the other's prompt (x1.5); decode 61-73 under the other's
    # decode (x1.2), then 73-83 alone (the other finished at 66).
    assert (second.ttft_ms, second.tpot_ms) == pytest.approx((60.0, 11.0))


def test_short_prompts_stay_local_under_the_threshold() -> None:
    model = flat_model()
    deployment = Deployment(num_prefill=1, num_decode=1, local_prefill_threshold=64)
    sim = Simulation(deployment, model)
    sim.run([SimRequest(0, 0.0, 64, 2), SimRequest(1, 1.0, 65, 2)])
    assert sim.prefill[0].busy_s == pytest.approx(0.040)  # only the 65-token prompt


def test_the_same_trace_gives_the_same_records() -> None:
    workload = parse_workload("--long-input-len 1000 --long-fraction 0.2 --input-len 64 "
                              "--output-len 96", seed=3)
    trace = make_trace(workload, rate=4.0, num_requests=60)
    model = ProfiledStepTimes(make_profile())
    for deployment in (Deployment(num_kv_blocks=4096),
                       Deployment(num_prefill=1, num_decode=1, local_prefill_threshold=0,
                                  num_kv_blocks=4096)):
        first = simulate(deployment, model, trace)
        second = simulate(deployment, model, trace)
        assert [(r.chunk_s, r.end_s) for r in first] == [(r.chunk_s, r.end_s) for r in second]
        assert all(r.ok and r.output_tokens == 96 for r in first)


def test_the_trace_is_the_bench_workload_at_the_bench_arrivals() -> None:
    workload = parse_workload("--long-input-len 1000 --long-fraction 0.5 --input-len 64 "
                              "--output-len 8", seed=0)
    trace = make_trace(workload, rate=2.0, num_requests=50)
    assert trace[0].arrival_s == 0.0
    assert {r.prompt_tokens for r in trace} == {64, 1000}
    assert {r.tag for r in trace} == {"short", "long"}
    assert all(b.arrival_s >= a.arrival_s for a, b in zip(trace, trace[1:], strict=False))


def test_one_prompt_per_step_queues_like_md1() -> None:
    """Poisson arrivals, one 40 ms prompt step each (budget = one prompt), max_tokens 1:
    an M/D/1 queue. Mean TTFT = D + rho D / (2 (1 - rho)) (Pollaczek-Khinchine)."""
    service_s, rate = 0.040, 15.0
    rho = rate * service_s
    rng = random.Random(7)
    now, trace = 0.0, []
    for i in range(20_000):
        trace.append(SimRequest(i, now, 32, 1))
        now += rng.expovariate(rate)
    deployment = Deployment(num_decode=1, max_num_batched_tokens=32)
    summary = summarize(simulate(deployment, flat_model(prefill_ms=40.0), trace))
    expected_ms = (service_s + rho * service_s / (2 * (1 - rho))) * 1e3
    assert summary["ttft_ms"]["mean"] == pytest.approx(expected_ms, rel=0.05)
    assert summary["request_throughput"] == pytest.approx(rate, rel=0.03)


def test_a_full_decode_worker_refuses_remote_prefills() -> None:
    """Its blocks are reserved at admission; with none left the request fails at once
    (the real router's RESOURCE_EXHAUSTED)."""
    deployment = Deployment(num_prefill=1, num_decode=1, local_prefill_threshold=0,
                            num_kv_blocks=15, block_size=16)
    trace = [SimRequest(0, 0.0, 150, 50), SimRequest(1, 0.001, 150, 50)]
    first, second = simulate(deployment, flat_model(), trace)
    assert first.ok and second.status == "error" and second.e2e_ms == 0.0


def test_overload_grows_ttft_without_bound_but_never_loses_requests() -> None:
    trace = [SimRequest(i, i * 0.01, 32, 1) for i in range(400)]  # 100/s into a 25/s server
    deployment = Deployment(num_decode=1, max_num_batched_tokens=32)
    records = simulate(deployment, flat_model(prefill_ms=40.0), trace)
    assert all(r.ok for r in records)
    ttfts = [r.ttft_ms or 0.0 for r in records]
    # request i starts service after i earlier ones: TTFT = 40 (i + 1) - 10 i ms
    assert ttfts[-1] == pytest.approx(40.0 * 400 - 10.0 * 399)
