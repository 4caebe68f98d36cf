"""The engine's public behaviour: bad input gets a clear ValueError and the engine keeps
serving; abort frees every block; the step-level API the workers use; stops; rope scaling."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitserve.common.sampling_params import SamplingParams
from splitserve.engine.tiny_model import write_tiny_model
from splitserve.llm import LLM
from tests.engine.hf_reference import assert_greedy_equal, hf_greedy

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_llama: Path) -> LLM:
    return LLM(model=str(tiny_llama), num_kv_blocks=64, block_size=8, max_model_len=256)


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ([], GREEDY, "prompt is empty"),
        ("", GREEDY, "prompt is empty"),
        (list(range(1, 300)), GREEDY, "context holds 256"),
        ([1, 2, 10**9], GREEDY, "unknown token ids"),
        ([1, 2, -5], GREEDY, "unknown token ids"),
    ],
)
def test_bad_prompts_are_refused_and_engine_keeps_serving(llm: LLM, prompt, params, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        llm.generate([[5, 6, 7], prompt], params)
    assert not llm.engine.has_unfinished(), "a refused batch must queue nothing"
    out = llm.generate([[5, 6, 7]], GREEDY)
    assert len(out[0].token_ids) == 8


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
     ({"max_tokens": 0}, "max_tokens")],
)
def test_bad_sampling_params_are_refused(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_step_api_and_abort_free_every_block(llm: LLM) -> None:
    engine = llm.engine
    total = engine.block_manager.num_free_blocks
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    for i in range(4):
        engine.add_request(list(range(10 + i, 40 + i)), params, f"abort-{i}")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([1, 2], params, "abort-0")
    seen: dict[str, list[int]] = {}
    for _ in range(5):
        for out in engine.step():
            seen.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert set(seen) == {f"abort-{i}" for i in range(4)}
    assert engine.block_manager.num_free_blocks < total
    assert engine.abort("abort-1") and engine.abort("abort-3")
    assert not engine.abort("abort-1") and not engine.abort("never-added")
    while engine.has_unfinished():
        engine.step()
    engine.block_manager.check_invariants([])
    assert engine.block_manager.num_free_blocks == total


def test_stop_token_ids_and_max_tokens(llm: LLM) -> None:
    reference = llm.generate([[9, 9, 9]], GREEDY)[0].token_ids
    stop_at = reference[3]
    out = llm.generate([[9, 9, 9]], SamplingParams(temperature=0.0, max_tokens=8,
                                                   stop_token_ids=[stop_at], ignore_eos=True))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == reference[: reference.index(stop_at) + 1]
    short = llm.generate([[9, 9, 9]], SamplingParams(temperature=0.0, max_tokens=3,
                                                     ignore_eos=True))[0]
    assert short.finish_reason == "length" and short.token_ids == reference[:3]


def test_eos_stops_unless_ignored(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = llm.generate([[9, 8, 7]], GREEDY)[0].token_ids
    eos = reference[2]  # make the third greedy token an end-of-sequence token
    monkeypatch.setattr(llm.tokenizer, "eos_token_ids", frozenset({eos}))
    params = SamplingParams(temperature=0.0, max_tokens=8)
    out = llm.generate([[9, 8, 7]], params)[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == reference[: reference.index(eos) + 1]
    ignored = llm.generate([[9, 8, 7]], SamplingParams(temperature=0.0, max_tokens=8,
                                                       ignore_eos=True))[0]
    assert ignored.token_ids == reference and ignored.finish_reason == "length"


def test_stop_string_on_smollm2(smollm2_dir: Path) -> None:
    llm = LLM(model="smollm2-135m", num_kv_blocks=64)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    free = llm.chat(chat, SamplingParams(temperature=0.0, max_tokens=24))[0]
    assert "Paris" in free.text
    cut = llm.chat(chat, SamplingParams(temperature=0.0, max_tokens=24, stop=["Paris"]))[0]
    assert cut.finish_reason == "stop" and "Paris" not in cut.text
    assert cut.text == free.text[: free.text.index("Paris")]


def test_llama3_rope_scaling_matches_transformers(tmp_path: Path) -> None:
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    model_dir = write_tiny_model(tmp_path / "llama3", rope_scaling=scaling, seed=5,
                                 head_dim=32, num_heads=2, num_kv_heads=1)
    prompt = list(range(1000, 1100))
    out = LLM(model=str(model_dir), num_kv_blocks=64, block_size=16).generate([prompt], GREEDY)[0]
    assert_greedy_equal(model_dir, prompt, out.token_ids, hf_greedy(model_dir, prompt, 8))


def test_bfloat16_runs_close_to_float32(tiny_llama: Path) -> None:
    prompt = list(range(2000, 2030))
    fp32 = LLM(model=str(tiny_llama), num_kv_blocks=32).generate([prompt], GREEDY)[0].token_ids
    bf16 = LLM(model=str(tiny_llama), num_kv_blocks=32, dtype="bfloat16").generate([prompt], GREEDY)[0]
    assert bf16.finish_reason == "length" and len(bf16.token_ids) == 8
    assert bf16.token_ids[:2] == fp32[:2]  # low precision may drift later, not at once


def test_a_resumed_seeded_request_continues_the_same_stream(llm: LLM) -> None:
    """A request re-admitted with its first k output tokens in the prompt (num_sampled=k)
    samples the tokens an uninterrupted run samples after them."""
    prompt = list(range(300, 340))
    params = SamplingParams(temperature=1.1, top_k=40, seed=99, max_tokens=24, ignore_eos=True)
    whole = llm.generate([prompt], params)[0].token_ids
    k = 9
    rest = SamplingParams(temperature=1.1, top_k=40, seed=99, max_tokens=24 - k, ignore_eos=True)
    engine = llm.engine
    engine.add_request([*prompt, *whole[:k]], rest, "resumed", num_sampled=k)
    got: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            got.extend(out.new_token_ids)
    assert got == whole[k:]
    with pytest.raises(ValueError, match="num_sampled"):
        engine.add_request([1, 2, 3], rest, "bad", num_sampled=3)


def test_a_detached_request_continues_elsewhere_from_its_kv(tiny_llama: Path) -> None:
    """Live migration at engine level: detach a running seeded request after k tokens,
    copy its KV blocks into another engine's pool, and it continues there exactly as an
    uninterrupted run (nothing recomputed); the source's blocks all come back."""
    prompt = list(range(400, 437))
    params = SamplingParams(temperature=0.9, top_k=30, seed=5, max_tokens=20, ignore_eos=True)
    make = lambda: LLM(model=str(tiny_llama), num_kv_blocks=64, block_size=8)  # noqa: E731
    whole = make().generate([prompt], params)[0].token_ids
    source, target = make().engine, make().engine
    free = source.block_manager.num_free_blocks
    assert source.detach("unknown") is None
    source.add_request(prompt, params, "r")
    got: list[int] = []
    while len(got) < 7:
        for out in source.step():
            got.extend(out.new_token_ids)
    moved = source.detach("r")
    assert moved is not None and source.detach("r") is None
    assert moved.token_ids == [*prompt, *got] and moved.num_computed_tokens == len(prompt) + 6
    assert not source.has_unfinished()
    dst = target.reserve_blocks(moved.num_computed_tokens)
    assert dst is not None and len(dst) == len(moved.block_ids)
    for (sk, sv), (tk, tv) in zip(source.runner.kv_caches, target.runner.kv_caches, strict=True):
        tk[dst] = sk[moved.block_ids]
        tv[dst] = sv[moved.block_ids]
    source.release_blocks(moved.block_ids)
    assert source.block_manager.num_free_blocks == free
    rest = SamplingParams(temperature=0.9, top_k=30, seed=5, max_tokens=20 - 6, ignore_eos=True)
    assert target.add_prefilled_request("r2", moved.token_ids[:-1], got[-1], rest, dst,
                                        num_sampled=len(got)) is None
    while target.has_unfinished():
        for out in target.step():
            got.extend(out.new_token_ids)
    assert got == whole


def test_prefilled_requests_count_for_their_clients_fair_share(tiny_llama: Path) -> None:
    """A request whose KV came from a prefill worker joins its client's active sequences
    (fair share on a disaggregated decode worker) and leaves them when it ends."""
    engine = LLM(model=str(tiny_llama), num_kv_blocks=64, block_size=8).engine
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    for i, client in enumerate(("a", "a", "b")):
        blocks = engine.reserve_blocks(5)
        assert blocks is not None
        assert engine.add_prefilled_request(f"r{i}", [5, 6, 7, 8, 9], 11, params, blocks,
                                            client=client) is None
    assert dict(engine.scheduler.shares.active) == {"a": 2, "b": 1}
    assert engine.scheduler.shares.contended
    while engine.has_unfinished():
        engine.step()
    assert not engine.scheduler.shares.active


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"client_weights": (("a", 0.0),)}, "weight of client 'a'"),
     ({"client_weights": (("a", float("nan")),)}, "weight of client 'a'"),
     ({"priority_aging_s": -1.0}, "priority_aging_s")],
)
def test_bad_engine_config_is_refused(kwargs: dict, message: str) -> None:
    from splitserve.engine.config import EngineConfig

    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)
