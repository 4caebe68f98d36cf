"""KV caches narrower than the model's fp32 through the disaggregated service: quantized
(int8, fp8: the prefill worker stores quantized rows and ships them with their scales over
gloo) and half-width (bfloat16); the decode worker continues from them. Tokens equal the
colocated engine's with the same cache, the transfer moves the narrow bytes, and a prefill
worker whose KV dtype differs from the decode worker's, or whose model computes in another
dtype, is refused with a message naming them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from splitserve.client import Client, SplitServeError
from splitserve.common.sampling_params import SamplingParams
from splitserve.engine.model_files import load_config
from splitserve.llm import LLM
from tests.service.deployment import Deployment, start_deployment

PROMPTS = [[1000 + 7 * i, *range(40, 40 + n)] for i, n in enumerate((9, 23, 50))]


def _engine(kv_cache_dtype: str) -> dict[str, Any]:
    return {"num_kv_blocks": 128, "block_size": 8, "max_num_batched_tokens": 256,
            "kv_cache_dtype": kv_cache_dtype}


@pytest.fixture(scope="module", params=["int8", "fp8", "bfloat16"])
def deployment(request: pytest.FixtureRequest, tiny_llama: Path
               ) -> Iterator[tuple[str, Deployment]]:
    dep = start_deployment(str(tiny_llama), 1, 1, engine=_engine(request.param),
                           router={"local_prefill_threshold": 4})
    yield request.param, dep
    dep.stop()


def test_remote_prefill_equals_the_colocated_engine(deployment: tuple[str, Deployment],
                                                    tiny_llama: Path) -> None:
    kv_cache_dtype, dep = deployment
    llm = LLM(model=str(tiny_llama), **_engine(kv_cache_dtype))
    config = load_config(tiny_llama)
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    row_bytes = head_dim * 2 if kv_cache_dtype == "bfloat16" else head_dim + 2  # + fp16 scale
    row = config["num_hidden_layers"] * 2 * 8 * config["num_key_value_heads"] * row_bytes
    with Client(dep.address, timeout=60) as client:
        for base in PROMPTS:
            for j, sampling in enumerate(({"temperature": 0.0},
                                          {"temperature": 0.8, "seed": 5})):
                prompt = [2000 + j, *base]  # its own first block: no prefix-cache hit
                want = llm.generate([prompt], SamplingParams(max_tokens=16, ignore_eos=True,
                                                             **sampling))[0].token_ids
                got = client.generate(prompt, max_tokens=16, ignore_eos=True, **sampling)
                assert got.token_ids == want, (kv_cache_dtype, prompt, sampling)
                assert got.timings is not None and not got.timings.prefill_local
                blocks = -(-len(prompt) // 8)
                assert got.timings.kv_transfer_bytes == blocks * row


@pytest.mark.parametrize(("prefill", "decode", "message"), [
    ("int8", {"kv_cache_dtype": "auto"}, "dtype"),
    ("fp8", {"kv_cache_dtype": "int8"}, "dtype: 'fp8' != 'int8'|dtype: 'int8' != 'fp8'"),
    ("bfloat16", {"kv_cache_dtype": "auto"},
     "dtype: 'bfloat16' != 'float32'|dtype: 'float32' != 'bfloat16'"),
    # The same bf16 bytes, from an fp32 model on P and a bf16 model on D.
    ("bfloat16", {"kv_cache_dtype": "auto", "dtype": "bfloat16"},
     "model_dtype: 'float32' != 'bfloat16'|model_dtype: 'bfloat16' != 'float32'"),
])
def test_kv_dtypes_that_differ_are_refused_by_name(tiny_llama: Path, prefill: str,
                                                   decode: dict[str, str], message: str) -> None:
    dep = start_deployment(str(tiny_llama), 1, 1, engine=_engine(prefill),
                           router={"local_prefill_threshold": 4, "max_resumes": 0},
                           engine_overrides={"decode-0": decode})
    try:
        with Client(dep.address, timeout=60) as client:
            with pytest.raises(SplitServeError, match=message):
                client.generate(PROMPTS[1], max_tokens=4)
            # A short prompt prefills on the decode worker alone: still served.
            assert len(client.generate([1, 2, 3], max_tokens=4).token_ids) == 4
    finally:
        dep.stop()
