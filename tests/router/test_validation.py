"""GenerateRequest validation and resolution, with SmolLM2's real tokenizer and template."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from splitserve.common.grpc_util import ServiceError
from splitserve.engine.block_hash import compute_block_hashes
from splitserve.engine.tokenizer import Tokenizer
from splitserve.router.model import ServedModel, load_served_model
from splitserve.router.validation import validate_request
from splitserve.v1 import common_pb2, router_pb2

MAX_MODEL_LEN = 64
VOCAB = 49152


@pytest.fixture(scope="module")
def model(smollm2_dir: Path) -> ServedModel:
    return ServedModel("smollm2-135m", smollm2_dir, Tokenizer.from_dir(smollm2_dir),
                       MAX_MODEL_LEN, VOCAB)


def sp(**fields: object) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(**fields)  # type: ignore[arg-type]


def ok(served: ServedModel, default_max_tokens: int | None = 16, **request: object):  # type: ignore[no-untyped-def]
    return validate_request(router_pb2.GenerateRequest(**request), served, 16,  # type: ignore[arg-type]
                            default_max_tokens)


def rejected(served: ServedModel, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT,
             **request: object) -> str:
    with pytest.raises(ServiceError) as info:
        ok(served, **request)
    assert info.value.code == code
    return info.value.message


def test_load_served_model_reads_the_context_and_vocab(smollm2_dir: Path) -> None:
    served = load_served_model("smollm2-135m")
    assert served.model_dir == smollm2_dir
    assert (served.model_id, served.max_model_len, served.vocab_size) == (
        "smollm2-135m", 8192, VOCAB)
    assert load_served_model("smollm2-135m", max_model_len=100).max_model_len == 100


def test_text_prompt_is_tokenized_and_hashed(model: ServedModel) -> None:
    text = "The quick brown fox jumps over the lazy dog, again and again and again."
    req = ok(model, prompt=text, request_id="client-7")
    assert req.prompt_token_ids == model.tokenizer.encode(text, add_special_tokens=True)
    assert req.block_hashes == compute_block_hashes(req.prompt_token_ids, 16)
    assert len(req.block_hashes) == req.prompt_len // 16 >= 1
    assert req.request_id == "client-7"
    assert len(req.worker_request_id) == 32 and req.worker_request_id != "client-7"


def test_router_assigns_a_request_id_when_the_client_does_not(model: ServedModel) -> None:
    a, b = ok(model, prompt="hi"), ok(model, prompt="hi")
    assert a.request_id == a.worker_request_id
    assert a.request_id != b.request_id


def test_messages_go_through_the_chat_template(model: ServedModel) -> None:
    messages = router_pb2.ChatMessages(messages=[
        router_pb2.ChatMessage(role="system", content="Be brief."),
        router_pb2.ChatMessage(role="user", content="What is 2+2?"),
    ])
    req = ok(model, messages=messages)
    expected = model.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
        add_generation_prompt=True,
    )
    assert req.prompt_token_ids == expected
    assert model.tokenizer.decode(expected, skip_special_tokens=False).endswith(
        "<|im_start|>assistant\n")


def test_token_ids_are_used_verbatim(model: ServedModel) -> None:
    req = ok(model, token_ids=router_pb2.TokenIds(token_ids=[5, 6, 7, VOCAB - 1]))
    assert req.prompt_token_ids == [5, 6, 7, VOCAB - 1]


def test_defaults_are_resolved_and_stop_strings_stay_on_the_router(model: ServedModel) -> None:
    req = ok(model, prompt="hi", sampling_params=sp(stop=["\n\n"], stop_token_ids=[7]))
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (16, 1.0, 1.0, 0, 0.0)
    assert p.stop == ("\n\n",) and p.stop_token_ids == (7,)
    assert p.skip_special_tokens is True and p.logprobs is None and p.seed is not None
    w = req.worker_params
    assert list(w.stop) == [] and list(w.stop_token_ids) == [7]
    for name in ("max_tokens", "temperature", "top_p", "seed", "skip_special_tokens"):
        assert w.HasField(name), name
    assert (w.max_tokens, w.temperature, w.top_p, w.seed) == (16, 1.0, 1.0, p.seed)


def test_explicit_values_are_kept(model: ServedModel) -> None:
    req = ok(model, prompt="hi", sampling_params=sp(
        max_tokens=3, temperature=0.0, top_p=0.5, top_k=4, seed=42, logprobs=True,
        top_logprobs=2, skip_special_tokens=False, ignore_eos=True))
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed) == (3, 0.0, 0.5, 4, 42)
    assert (p.logprobs, p.skip_special_tokens, p.ignore_eos) == (2, False, True)
    w = req.worker_params
    assert (w.logprobs, w.top_logprobs, w.skip_special_tokens, w.ignore_eos) == (
        True, 2, False, True)


def test_default_max_tokens_is_capped_by_the_context(model: ServedModel) -> None:
    ids = router_pb2.TokenIds(token_ids=list(range(1, 58)))  # 57 tokens: 7 left of 64
    assert ok(model, token_ids=ids).params.max_tokens == 7
    assert ok(model, default_max_tokens=None, prompt="hi").params.max_tokens == (
        MAX_MODEL_LEN - len(model.tokenizer.encode("hi", add_special_tokens=True)))
    assert ok(model, token_ids=ids, sampling_params=sp(max_tokens=7)).params.max_tokens == 7
    message = rejected(model, token_ids=ids, sampling_params=sp(max_tokens=8))
    assert message == ("prompt (57 tokens) plus max_tokens (8) exceeds the model context "
                       "of 64 tokens")


@pytest.mark.parametrize(("request_fields", "message"), [
    ({}, "no prompt: set one of prompt, messages or token_ids"),
    ({"prompt": ""}, "prompt is empty"),
    ({"messages": router_pb2.ChatMessages()}, "messages is empty"),
    ({"token_ids": router_pb2.TokenIds()}, "token_ids is empty"),
    ({"token_ids": router_pb2.TokenIds(token_ids=[1, VOCAB, VOCAB + 5])},
     f"token_ids [{VOCAB}, {VOCAB + 5}] outside the vocabulary (size {VOCAB})"),
    ({"token_ids": router_pb2.TokenIds(token_ids=[1] * 64)},
     "prompt has 64 tokens but the model context holds 64 (prompt plus at least one "
     "generated token)"),
])
def test_bad_prompts(model: ServedModel, request_fields: dict[str, object], message: str) -> None:
    assert rejected(model, **request_fields) == message


@pytest.mark.parametrize(("params", "fragment"), [
    (sp(max_tokens=0), "max_tokens must be an integer in [1, 4294967295], got 0"),
    (sp(temperature=-1.0), "temperature must be in [0, 100], got -1.0"),
    (sp(temperature=float("nan")), "temperature must be a finite number"),
    (sp(top_p=0.0), "top_p must be in (0, 1], got 0.0"),
    (sp(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
    (sp(min_p=2.0), "min_p must be in [0, 1], got 2.0"),
    (sp(logprobs=True, top_logprobs=21), "logprobs must be in [0, 20], got 21"),
    (sp(top_logprobs=3), "top_logprobs needs logprobs=true"),
    (sp(stop=["ok", ""]), "stop strings must have 1 to 4096 characters"),
    (sp(stop_token_ids=[VOCAB]), f"stop_token_ids [{VOCAB}] outside the vocabulary"),
])
def test_bad_sampling_params(model: ServedModel, params: common_pb2.SamplingParams,
                             fragment: str) -> None:
    message = rejected(model, prompt="hi", sampling_params=params)
    assert message.startswith("invalid sampling_params: ")
    assert fragment in message


def test_unknown_model_is_not_found(model: ServedModel) -> None:
    message = rejected(model, grpc.StatusCode.NOT_FOUND, prompt="hi", model="gpt-9")
    assert message == "model 'gpt-9' is not served here; available: ['smollm2-135m']"
    assert ok(model, prompt="hi", model="smollm2-135m").prompt_len > 0


def test_a_resumed_request_carries_its_output_in_the_prompt(model: ServedModel) -> None:
    from splitserve.router.request import resumed_request

    req = ok(model, token_ids=router_pb2.TokenIds(token_ids=list(range(5, 40))),
             sampling_params=sp(max_tokens=20, temperature=0.7, seed=3))
    same = resumed_request(req, [], 1, 16)  # lost before any output: only a new id
    assert same.prompt_token_ids == req.prompt_token_ids and same.num_sampled == 0
    assert same.worker_request_id == req.worker_request_id + ".1"
    again = resumed_request(req, [7, 8, 9], 2, 16)
    assert again.prompt_token_ids == [*range(5, 40), 7, 8, 9]
    assert again.num_sampled == 3 and again.params.max_tokens == 17
    assert again.worker_params.max_tokens == 17 and again.worker_params.seed == 3
    assert again.block_hashes == compute_block_hashes(again.prompt_token_ids, 16)
    assert again.request_id == req.request_id and again.worker_request_id.endswith(".2")


def test_a_stream_pace_is_carried_and_a_bad_one_is_refused(model: ServedModel) -> None:
    assert ok(model, prompt="Hi", stream_pace_tokens_per_s=20.0).stream_pace_tokens_per_s == 20
    assert ok(model, prompt="Hi").stream_pace_tokens_per_s == 0.0
    for bad in (-1.0, float("nan"), float("inf"), 1001.0):
        assert "stream_pace_tokens_per_s" in rejected(model, prompt="Hi",
                                                      stream_pace_tokens_per_s=bad)
