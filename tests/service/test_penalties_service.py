"""Penalties and logit_bias through the disaggregated service: the prefill worker samples
the first token with them, the decode worker continues with the prefill worker's token
counted as output, and the outputs equal the colocated engine's (greedy and seeded)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from splitserve.client import Client, InvalidRequest
from splitserve.common.sampling_params import SamplingParams
from splitserve.llm import LLM
from tests.service.deployment import Deployment, start_deployment

ENGINE = {"num_kv_blocks": 128, "block_size": 8, "max_num_batched_tokens": 256}
PROMPTS = [[5, 9, 9, 23, 71, 5, 300, 301, 302, 9], [7, 8], [100 + i for i in range(40)]]
SAMPLING: list[dict[str, Any]] = [
    {"temperature": 0.0, "logit_bias": {42: 6.0}, "frequency_penalty": 1.5},
    {"temperature": 0.0, "logit_bias": {42: 6.0}, "repetition_penalty": 2.0},
    {"temperature": 0.9, "top_k": 30, "seed": 11, "logit_bias": {42: 6.0},
     "presence_penalty": 2.0},
]


@pytest.fixture(scope="module")
def deployment(tiny_llama: Path) -> Iterator[Deployment]:
    dep = start_deployment(str(tiny_llama), 1, 1, engine=ENGINE,
                           router={"local_prefill_threshold": 4})
    yield dep
    dep.stop()


def test_penalized_requests_equal_the_colocated_engine(deployment: Deployment,
                                                       tiny_llama: Path) -> None:
    llm = LLM(model=str(tiny_llama), num_kv_blocks=128, block_size=8)
    with Client(deployment.address, timeout=60) as client:
        for base in PROMPTS:
            for j, sampling in enumerate(SAMPLING):
                # A first token of its own: no prefix-cache hit turns a remote prefill local.
                prompt = [1000 + 17 * j, *base]
                params = SamplingParams(max_tokens=12, ignore_eos=True, **sampling)
                want = llm.generate([prompt], params)[0].token_ids
                got = client.generate(prompt, max_tokens=12, ignore_eos=True, **sampling)
                assert got.token_ids == want, (prompt, sampling)
                assert got.token_ids.count(42) < 12  # the penalty acted on the bias
                local = len(prompt) <= 4  # the router's local_prefill_threshold
                assert got.timings is not None and got.timings.prefill_local == local


def test_bad_penalties_are_invalid_arguments(deployment: Deployment) -> None:
    with Client(deployment.address, timeout=30) as client:
        with pytest.raises(ValueError, match="presence_penalty"):
            client.generate([1, 2, 3], presence_penalty=3.0)
        with pytest.raises(InvalidRequest, match="outside the vocabulary"):
            client.generate([1, 2, 3], logit_bias={10**8: 1.0})
