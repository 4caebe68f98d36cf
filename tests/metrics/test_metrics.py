"""Prometheus metrics of the router (GET /metrics on its HTTP port) and of every worker
(its own metrics port), scraped after real requests through gRPC and HTTP and parsed with
prometheus_client's parser: the numbers equal what the requests and workers report."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from splitserve.v1 import router_pb2, router_pb2_grpc
from tests.service.deployment import Deployment, start_deployment

ENGINE = {"num_kv_blocks": 128, "block_size": 8, "max_num_batched_tokens": 256}
LONG = ("Disaggregated serving splits prefill from decode so that long prompts never stall "
        "the tokens of requests already decoding on another machine.")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def deployment(tiny_llama: Path) -> Iterator[Deployment]:
    d = start_deployment(str(tiny_llama), 1, 1, engine=ENGINE,
                         router={"http_port": 0, "local_prefill_threshold": 8})
    for worker in [*d.prefill, *d.decode]:
        worker.serve_metrics(0)
    yield d
    d.stop()


def scrape(address: str) -> Samples:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("splitserve_"), family.name
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample; labels not given (e.g. worker, role) match anything, and must be unique."""
    found = [v for (n, ls), v in samples.items()
             if n == name and set(labels.items()) <= set(ls)]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def grpc_generate(address: str, prompt: str, max_tokens: int) -> router_pb2.GenerateResponse:
    request = router_pb2.GenerateRequest(prompt=prompt)
    sp = request.sampling_params
    sp.max_tokens, sp.temperature, sp.ignore_eos = max_tokens, 0.0, True
    with grpc.insecure_channel(address) as channel:
        return list(router_pb2_grpc.SplitServeStub(channel).Generate(request, timeout=60))[-1]


def run_requests(d: Deployment) -> list[dict[str, Any]]:
    """Requests through both front ends; per request its finish reason and usage."""
    results = []
    with openai.OpenAI(base_url=f"http://{d.router.http_address}/v1", api_key="none",
                       max_retries=0, timeout=60) as client:
        model = d.router.model.model_id
        texts = []
        for _ in range(3):  # the same long prompt: prefix-cache hits from the second on
            out = client.completions.create(model=model, prompt=LONG, max_tokens=6,
                                            temperature=0.0, extra_body={"ignore_eos": True})
            texts.append(out.choices[0].text)
            results.append({"finish": out.choices[0].finish_reason, **out.usage.model_dump()})  # type: ignore[union-attr]
        stop = texts[0][2:5]
        assert stop.strip(), texts[0]
        events = list(client.completions.create(
            model=model, prompt=LONG, max_tokens=1000, temperature=0.0, stop=stop, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
        usage = events[-1].usage.model_dump()  # type: ignore[union-attr]
        results.append({"finish": events[-2].choices[0].finish_reason, **usage})
    for prompt in ("Hi", "Hi there"):  # short prompts: prefilled on the decode worker
        last = grpc_generate(d.address, prompt, 5)
        assert last.finish_reason == 2  # FINISH_REASON_LENGTH
        results.append({"finish": "length", "prompt_tokens": last.usage.prompt_tokens,
                        "completion_tokens": last.usage.completion_tokens})
    return results


def test_router_and_worker_metrics_match_the_requests(deployment: Deployment) -> None:
    d = deployment
    results = run_requests(d)
    n = len(results)
    finishes = [r["finish"] for r in results]
    assert finishes.count("stop") == 1 and finishes.count("length") == n - 1
    state = d.wait_all_blocks_free()
    assert all(free == total for free, total in state.values()), state

    r = scrape(d.router.http_address)  # type: ignore[arg-type]
    tokens = sum(x["completion_tokens"] for x in results)
    assert value(r, "splitserve_time_to_first_token_seconds_count") == n
    assert value(r, "splitserve_e2e_request_latency_seconds_count") == n
    multi = sum(x["completion_tokens"] > 1 for x in results)  # TPOT needs two tokens
    assert value(r, "splitserve_time_per_output_token_seconds_count") == multi
    assert value(r, "splitserve_inter_token_latency_seconds_count") == tokens - n
    assert value(r, "splitserve_requests_total", finish_reason="length") == n - 1
    assert value(r, "splitserve_requests_total", finish_reason="stop") == 1
    assert value(r, "splitserve_requests_total", finish_reason="abort") == 0
    assert value(r, "splitserve_requests_total", finish_reason="error") == 0
    assert value(r, "splitserve_generation_tokens_total") == tokens
    assert value(r, "splitserve_prompt_tokens_total") == sum(x["prompt_tokens"] for x in results)
    remote = value(r, "splitserve_prefills_total", location="remote")
    local = value(r, "splitserve_prefills_total", location="local")
    # The two short prompts are prefilled on the decode worker, the first long one on the
    # prefill worker; a repeat of it goes either way, by whether the decode worker's cached
    # prefix (published asynchronously) has reached the router's view when it arrives.
    assert remote >= 1 and local >= 2 and remote + local == n, (remote, local)
    for phase in ("router_queue", "prefill_queue", "prefill_compute", "decode_queue"):
        assert value(r, "splitserve_request_phase_seconds_count", phase=phase) == n
    assert value(r, "splitserve_request_phase_seconds_count", phase="kv_transfer") == remote
    assert value(r, "splitserve_requests_inflight") == 0
    assert value(r, "splitserve_requests_queued") == 0

    (p,), (dw,) = d.prefill, d.decode
    sent, received = p.kv.stats().bytes_sent, dw.kv.stats().bytes_received
    # (Seen once in a full run on a loaded 2-core VM: sent one transfer more than received;
    # the message says which transfers and resumes there were, to find out why.)
    assert sent > 0 and sent == received, (
        p.kv.stats(), dw.kv.stats(), remote, local,
        {k: v for k, v in r.items() if k[0] == "splitserve_request_resumes_total"})
    assert value(r, "splitserve_routed_kv_transfer_bytes_total") == sent

    pm = scrape(f"127.0.0.1:{p.metrics_port}")
    dm = scrape(f"127.0.0.1:{dw.metrics_port}")
    assert value(pm, "splitserve_worker_kv_transfer_bytes_total", direction="sent") == sent
    assert value(dm, "splitserve_worker_kv_transfer_bytes_total", direction="received") == sent
    assert value(pm, "splitserve_worker_kv_transfers_total") == remote
    assert value(dm, "splitserve_worker_kv_transfer_failures_total") == 0
    hits = [value(m, "splitserve_worker_prefix_cache_hit_tokens_total") for m in (pm, dm)]
    assert sum(hits) > 0
    # P: each remote prefill ends 'length' after its one token. D: the stop-string request
    # was still generating when the router saw the stop string and aborted it.
    assert value(pm, "splitserve_worker_requests_finished_total", reason="length") == remote
    assert value(dm, "splitserve_worker_requests_finished_total", reason="length") == n - 1
    assert value(dm, "splitserve_worker_requests_finished_total", reason="abort") == 1
    for m, w in ((pm, p), (dm, dw)):
        assert value(m, "splitserve_worker_kv_blocks_total", worker=w.worker_id) == 128
        assert value(m, "splitserve_worker_kv_blocks_used", role=w.role) == 0
        assert value(m, "splitserve_worker_requests_running") == 0
        counters = w.counters_proto()  # the Stats RPC reports the same counts
        assert counters.num_finished_requests + counters.num_aborted_requests == sum(
            v for (name, _), v in m.items() if name == "splitserve_worker_requests_finished_total")
        assert counters.prefix_cache_hit_tokens == value(
            m, "splitserve_worker_prefix_cache_hit_tokens_total")


def test_counters_never_decrease(deployment: Deployment) -> None:
    d = deployment
    targets = [d.router.http_address, *(f"127.0.0.1:{w.metrics_port}"
                                        for w in [*d.prefill, *d.decode])]
    before = [scrape(t) for t in targets]  # type: ignore[arg-type]
    grpc_generate(d.address, LONG + " Again.", 4)
    after = [scrape(t) for t in targets]  # type: ignore[arg-type]
    monotonic = ("_total", "_count", "_sum", "_bucket")
    for old, new in zip(before, after, strict=True):
        for key, v in old.items():
            if key[0].endswith(monotonic):
                assert new[key] >= v, key
    assert value(after[0], "splitserve_e2e_request_latency_seconds_count") == value(
        before[0], "splitserve_e2e_request_latency_seconds_count") + 1
