"""The fp8 KV cache through the disaggregated service: the prefill worker stores e4m3 rows,
ships them with their scales over gloo, and the decode worker continues from them; tokens
equal the colocated fp8 engine's, the transfer moves the quantized bytes, and an fp8 prefill
worker beside an int8 decode worker is refused with a message naming both dtypes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from splitserve.client import Client, SplitServeError
from splitserve.common.sampling_params import SamplingParams
from splitserve.engine.model_files import load_config
from splitserve.llm import LLM
from tests.service.deployment import Deployment, start_deployment

ENGINE = {"num_kv_blocks": 128, "block_size": 8, "max_num_batched_tokens": 256,
          "kv_cache_dtype": "fp8"}
PROMPTS = [[1000 + 7 * i, *range(40, 40 + n)] for i, n in enumerate((9, 23, 50))]


@pytest.fixture(scope="module")
def deployment(tiny_llama: Path) -> Iterator[Deployment]:
    dep = start_deployment(str(tiny_llama), 1, 1, engine=ENGINE,
                           router={"local_prefill_threshold": 4})
    yield dep
    dep.stop()


def test_remote_prefill_equals_the_colocated_fp8_engine(deployment: Deployment,
                                                        tiny_llama: Path) -> None:
    llm = LLM(model=str(tiny_llama), **ENGINE)  # type: ignore[arg-type]
    config = load_config(tiny_llama)
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    row = config["num_hidden_layers"] * 2 * 8 * config["num_key_value_heads"] * (head_dim + 2)
    with Client(deployment.address, timeout=60) as client:
        for base in PROMPTS:
            for j, sampling in enumerate(({"temperature": 0.0},
                                          {"temperature": 0.8, "seed": 5})):
                prompt = [3000 + j, *base]  # its own first block: no prefix-cache hit
                want = llm.generate([prompt], SamplingParams(max_tokens=16, ignore_eos=True,
                                                             **sampling))[0].token_ids
                got = client.generate(prompt, max_tokens=16, ignore_eos=True, **sampling)
                assert got.token_ids == want, (prompt, sampling)
                assert got.timings is not None and not got.timings.prefill_local
                blocks = -(-len(prompt) // 8)
                assert got.timings.kv_transfer_bytes == blocks * row


def test_fp8_beside_int8_is_refused_by_name(tiny_llama: Path) -> None:
    dep = start_deployment(str(tiny_llama), 1, 1, engine=ENGINE,
                           router={"local_prefill_threshold": 4, "max_resumes": 0},
                           engine_overrides={"decode-0": {"kv_cache_dtype": "int8"}})
    try:
        with Client(dep.address, timeout=60) as client:
            with pytest.raises(SplitServeError, match="dtype: 'fp8' != 'int8'|dtype: 'int8' != 'fp8'"):
                client.generate(PROMPTS[1], max_tokens=4)
            # A short prompt prefills on the decode worker alone: still served.
            assert len(client.generate([1, 2, 3], max_tokens=4).token_ids) == 4
    finally:
        dep.stop()
