"""usage.prompt_tokens_details.cached_tokens when the decode worker prefills the prompt itself
from its own prefix cache (no prefill worker here, so every prompt is prefilled locally),
and the router's cached-tokens metric agrees with usage."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from splitserve.client import Client
from tests.service.deployment import Deployment, start_deployment

ENGINE = {"num_kv_blocks": 64, "block_size": 8, "max_num_batched_tokens": 128}


@pytest.fixture(scope="module")
def deployment(tiny_llama: Path) -> Iterator[Deployment]:
    d = start_deployment(str(tiny_llama), 0, 1, engine=ENGINE, router={"http_port": 0})
    yield d
    d.stop()


def _cached_metric(d: Deployment) -> float:
    with urllib.request.urlopen(f"http://{d.router.http_address}/metrics", timeout=10) as r:
        text = r.read().decode()
    match = re.search(r"^splitserve_prompt_cached_tokens_total (\S+)$", text, re.M)
    assert match, text
    return float(match.group(1))


def test_local_prefill_reports_the_decode_workers_cache_hits(deployment: Deployment) -> None:
    prompt = list(range(300, 317))  # 17 tokens: two full blocks of 8 can come from the cache
    before = _cached_metric(deployment)
    with Client(deployment.address, timeout=60) as client:
        first = client.generate(prompt, max_tokens=2, temperature=0.0)
        second = client.generate(prompt, max_tokens=2, temperature=0.0)
    assert first.timings.prefill_local and second.timings.prefill_local
    assert (first.usage.cached_tokens, second.usage.cached_tokens) == (0, 16)
    with openai.OpenAI(base_url=f"http://{deployment.router.http_address}/v1", api_key="-",
                       max_retries=0) as oai:
        third = oai.completions.create(model=deployment.router.model.model_id,  # type: ignore[union-attr]
                                       prompt=prompt, max_tokens=2, temperature=0.0)
    assert third.usage is not None and third.usage.prompt_tokens_details is not None
    assert third.usage.prompt_tokens_details.cached_tokens == 16
    assert _cached_metric(deployment) - before == 32
