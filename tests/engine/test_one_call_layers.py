"""A decode-only step on the C++ CPU kernels runs each decoder layer in one call
(cpu_ext.decode_layer_), with the bits of the layer-by-layer fused path; every other step
(a prompt chunk in it, linears not on the panel GEMM) keeps that path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from splitserve.common.sampling_params import SamplingParams
from splitserve.engine.cpu_linear import PackedLinear
from splitserve.engine.model import CausalLM, OneCallLayers
from splitserve.kernels import cpu_ext
from splitserve.llm import LLM

pytestmark = pytest.mark.skipif(cpu_ext.load() is None or not cpu_ext.gemm_supported(),
                                reason="CPU kernels (with the panel GEMM) could not be built")

# Mixed lengths, more prompts than max_num_seqs: steps that decode while others prefill, and
# decode-only steps of 2 and 3 rows.
PROMPTS = [[7, 8, 9], list(range(500, 540)), [42] * 11, [3, 1, 4, 1, 5, 9, 2, 6], [11] * 25]


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count cpu_ext.decode_layer_ calls of engines built after this (their rows)."""
    calls: list[int] = []
    real: Callable[..., torch.Tensor] = cpu_ext.decode_layer_

    def counted(x: torch.Tensor, *args: Any) -> torch.Tensor:
        calls.append(x.shape[0])
        return real(x, *args)

    monkeypatch.setattr(cpu_ext, "decode_layer_", counted)
    return calls


def _llm(model_dir: Path, dtype: str, **extra: Any) -> LLM:
    return LLM(model=str(model_dir), attention_backend="cpu", num_kv_blocks=64, block_size=8,
               dtype=dtype, max_num_seqs=3, **extra)


def _model(llm: LLM) -> CausalLM:
    model: CausalLM = llm.engine.runner.model
    return model


def _outputs(llm: LLM) -> list[tuple[list[int], list[str]]]:
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=3, ignore_eos=True)
    return [(o.token_ids, [repr(p) for p in o.logprobs or []])
            for o in llm.generate(PROMPTS, params)]


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen2", "tiny_llama_mha_tied"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_one_call_layers_give_the_bits_of_the_layer_by_layer_path(
        model: str, dtype: str, kv_cache_dtype: str, request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = request.getfixturevalue(model)
    calls = _counting(monkeypatch)
    one_call = _llm(model_dir, dtype, kv_cache_dtype=kv_cache_dtype)
    layer_by_layer = _llm(model_dir, dtype, kv_cache_dtype=kv_cache_dtype)
    _model(layer_by_layer)._one_call = None  # as for a model whose linears are not panels

    got = _outputs(one_call)
    assert isinstance(_model(one_call)._one_call, OneCallLayers)
    num_layers = len(_model(one_call).layers)
    assert calls and len(calls) % num_layers == 0
    assert len(set(calls)) > 1  # decode-only steps of several batch sizes
    calls.clear()
    assert got == _outputs(layer_by_layer)  # tokens and every logprob, bit for bit
    assert calls == []


def test_steps_with_a_prompt_chunk_run_layer_by_layer(
        tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting(monkeypatch)
    llm = _llm(tiny_llama, "float32")
    llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    assert calls == []  # every step prefilled
    llm.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    assert len(calls) == 2 * len(_model(llm).layers)  # two decode steps of one row


def test_linears_off_the_panels_keep_the_layer_by_layer_path(
        tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting(monkeypatch)
    llm = _llm(tiny_llama, "float32", cpu_weight_prepack=False)
    assert not any(isinstance(m, PackedLinear) for m in _model(llm).modules())
    out = llm.generate(PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=4,
                                                   ignore_eos=True))
    assert [len(o.token_ids) for o in out] == [4, 4]
    assert _model(llm)._one_call is None and calls == []


def test_the_row_range_is_the_narrowest_of_the_layers(tiny_llama: Path) -> None:
    llm = _llm(tiny_llama, "float32")
    model = _model(llm)
    llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    one_call = model._one_call
    assert isinstance(one_call, OneCallLayers)
    linears = [m for m in model.layers.modules() if isinstance(m, PackedLinear)]
    assert len(linears) == 4 * len(model.layers) == 4 * len(one_call.args)
    assert one_call.min_rows == max(m.rows.min_rows for m in linears)
    assert one_call.max_rows == min(m.rows.max_rows for m in linears)
