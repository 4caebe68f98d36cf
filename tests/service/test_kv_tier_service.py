"""The host KV tier in a served deployment (a prefill and a decode worker, both with a
tiny pool and a host tier): two-turn conversations interleaved so the pools evict turn 1
before turn 2 comes; greedy tokens equal the colocated engine's without a tier, turn 2 is
served from a host tier, the cluster's prefix index shows the workers' host-tier blocks,
and the workers' metrics count the tier's hits and bytes."""

from __future__ import annotations

import time
from pathlib import Path

import grpc

from splitserve.cluster.store import PrefixOverlap
from splitserve.common.sampling_params import SamplingParams
from splitserve.engine.block_hash import compute_block_hashes
from splitserve.llm import LLM
from splitserve.v1 import router_pb2, router_pb2_grpc
from tests.metrics.test_metrics import scrape, value
from tests.service.deployment import start_deployment

ENGINE = {"num_kv_blocks": 12, "block_size": 8, "max_model_len": 96,
          "host_kv_cache_bytes": 1 << 24}
MAX_TOKENS = 5


def prompts() -> list[list[int]]:
    """Turn 1 of three conversations, then turn 2 of each (turn 1's prompt + more)."""
    firsts = [[(13 * c + 5 * i) % 150 + 3 for i in range(41)] for c in range(3)]
    return firsts + [p + [(3 * c + i) % 150 + 3 for i in range(10)]
                     for c, p in enumerate(firsts)]


def generate(address: str, token_ids: list[int]) -> list[router_pb2.GenerateResponse]:
    request = router_pb2.GenerateRequest(token_ids=router_pb2.TokenIds(token_ids=token_ids))
    sp = request.sampling_params
    sp.max_tokens, sp.temperature, sp.ignore_eos = MAX_TOKENS, 0.0, True
    with grpc.insecure_channel(address) as channel:
        chunks = list(router_pb2_grpc.SplitServeStub(channel).Generate(request, timeout=60))
    return chunks


def test_turn_two_comes_back_from_the_host_tier_with_equal_tokens(tiny_llama: Path) -> None:
    reference = LLM(model=str(tiny_llama), num_kv_blocks=64, block_size=8, max_model_len=96)
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    want = [reference.generate([p], greedy)[0].token_ids for p in prompts()]
    d = start_deployment(str(tiny_llama), 1, 1, engine=ENGINE,
                         router={"local_prefill_threshold": 4})
    try:
        for worker in [*d.prefill, *d.decode]:
            worker.serve_metrics(0)
        got, cached = [], []
        for p in prompts():
            chunks = generate(d.address, p)
            got.append([t for c in chunks for t in c.token_ids])
            cached.append(chunks[-1].usage.cached_tokens)
        assert got == want
        assert all(n >= 40 for n in cached[3:]), cached  # turn 1's 5 full blocks
        workers = [*d.prefill, *d.decode]
        hits = {w.worker_id: w.loop.call(lambda e: e.kv_tier.stats["host"].hits)
                for w in workers}
        assert sum(hits.values()) >= 15, hits
        # The index learns each worker's host tier from its heartbeats (every ttl/3).
        turn1 = compute_block_hashes(prompts()[0], 8)
        deadline = time.monotonic() + 10
        while True:
            index = d.router.store.prefix_overlap_tiers(turn1)
            if any(run.host_blocks for run in index.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert any(run.host_blocks > 0 and run.num_blocks == 5 for run in index.values()), index
        assert all(isinstance(run, PrefixOverlap) for run in index.values())
        for worker in workers:
            m = scrape(f"127.0.0.1:{worker.metrics_port}")
            assert value(m, "splitserve_worker_kv_tier_hit_blocks_total",
                         tier="host") == hits[worker.worker_id]
            stored = value(m, "splitserve_worker_kv_tier_stored_bytes_total", tier="host")
            assert stored > 0
            assert value(m, "splitserve_worker_kv_tier_capacity_bytes", tier="host") == 1 << 24
    finally:
        d.stop()
