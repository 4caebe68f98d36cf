"""The OpenAI-compatible HTTP API end to end, with the official `openai` package as the
client: a real router + prefill + decode workers in this process (real gRPC, gloo KV).
Greedy HTTP text equals the gRPC path's text for the same request."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest

from splitserve.v1 import router_pb2, router_pb2_grpc
from tests.http._raw import call
from tests.service.deployment import Deployment, start_deployment

ENGINE = {"num_kv_blocks": 128, "block_size": 8, "max_num_batched_tokens": 256}
PROMPT = "The quick brown fox jumps over the lazy dog, and then it runs far away."
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name three colors."}]
GREEDY = {"temperature": 0.0, "max_tokens": 12, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def deployment(tiny_llama: Path) -> Iterator[Deployment]:
    d = start_deployment(str(tiny_llama), 1, 1, engine=ENGINE,
                         router={"http_port": 0, "local_prefill_threshold": 8})
    yield d
    d.stop()


def grpc_generate(deployment: Deployment, request: router_pb2.GenerateRequest
                  ) -> tuple[str, list[router_pb2.GenerateResponse]]:
    sp = request.sampling_params
    sp.temperature, sp.max_tokens, sp.ignore_eos = 0.0, 12, True
    with grpc.insecure_channel(deployment.address) as channel:
        chunks = list(router_pb2_grpc.SplitServeStub(channel).Generate(request, timeout=60))
    return "".join(c.text for c in chunks), chunks


def raw(deployment: Deployment, method: str, path: str, body: bytes | None = None
        ) -> tuple[int, Any]:
    status, data, _, _ = call(deployment, method, path, body)
    return status, data


def test_completion_greedy_equals_grpc(deployment: Deployment, client: openai.OpenAI,
                                       model: str) -> None:
    expected, chunks = grpc_generate(deployment, router_pb2.GenerateRequest(prompt=PROMPT))
    out = client.completions.create(model=model, prompt=PROMPT, **GREEDY)
    assert out.id.startswith("cmpl-") and out.object == "text_completion"
    assert out.model == model
    choice = out.choices[0]
    assert (choice.index, choice.text, choice.finish_reason) == (0, expected, "length")
    usage = chunks[-1].usage
    assert out.usage is not None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        usage.prompt_tokens, 12, usage.prompt_tokens + 12)


def test_completion_stream_with_usage(client: openai.OpenAI, model: str) -> None:
    whole = client.completions.create(model=model, prompt=PROMPT, **GREEDY)
    events = list(client.completions.create(model=model, prompt=PROMPT, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert len({e.id for e in events}) == 1
    text_events, usage_event = events[:-1], events[-1]
    assert "".join(e.choices[0].text for e in text_events) == whole.choices[0].text
    assert [e.choices[0].finish_reason for e in text_events][-1] == "length"
    assert all(e.choices[0].finish_reason is None for e in text_events[:-1])
    assert all(e.usage is None for e in text_events)
    assert usage_event.choices == [] and usage_event.usage == whole.usage
    plain = list(client.completions.create(model=model, prompt=PROMPT, stream=True, **GREEDY))
    assert all(e.usage is None for e in plain) and plain[-1].choices[0].finish_reason == "length"


def test_chat_greedy_equals_grpc_streaming_and_not(deployment: Deployment,
                                                  client: openai.OpenAI, model: str) -> None:
    request = router_pb2.GenerateRequest()
    for m in MESSAGES:
        request.messages.messages.add(role=m["role"], content=m["content"])
    expected, chunks = grpc_generate(deployment, request)
    out = client.chat.completions.create(model=model, messages=MESSAGES, **GREEDY)  # type: ignore[arg-type]
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"
    message = out.choices[0].message
    assert (message.role, message.content, out.choices[0].finish_reason) == (
        "assistant", expected, "length")
    assert out.usage is not None and out.usage.prompt_tokens == chunks[-1].usage.prompt_tokens
    events = list(client.chat.completions.create(
        model=model, messages=MESSAGES, stream=True, stream_options={"include_usage": True},  # type: ignore[arg-type]
        **GREEDY))
    assert events[0].object == "chat.completion.chunk"
    assert events[0].choices[0].delta.role == "assistant"
    text = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    assert text == expected
    assert events[-1].usage == out.usage


def test_stop_string_ends_the_text(client: openai.OpenAI, model: str) -> None:
    full = client.completions.create(model=model, prompt=PROMPT, **GREEDY).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), full
    expected = full[: full.index(stop)]
    out = client.completions.create(model=model, prompt=PROMPT, stop=[stop, "\x00never"],
                                    **GREEDY)
    assert (out.choices[0].text, out.choices[0].finish_reason) == (expected, "stop")
    events = list(client.completions.create(model=model, prompt=PROMPT, stop=stop, stream=True,
                                            **GREEDY))
    assert "".join(e.choices[0].text for e in events) == expected
    assert events[-1].choices[0].finish_reason == "stop"


def test_logprobs_match_grpc(deployment: Deployment, client: openai.OpenAI,
                             model: str) -> None:
    request = router_pb2.GenerateRequest(prompt=PROMPT)
    request.sampling_params.logprobs, request.sampling_params.top_logprobs = True, 2
    _, chunks = grpc_generate(deployment, request)
    expected = [lp.logprob for c in chunks for lp in c.logprobs]
    out = client.completions.create(model=model, prompt=PROMPT, logprobs=2, **GREEDY)
    lp = out.choices[0].logprobs
    assert lp is not None and lp.token_logprobs == pytest.approx(expected)
    assert lp.tokens is not None and len(lp.tokens) == 12
    assert lp.top_logprobs is not None and all(1 <= len(t) <= 3 for t in lp.top_logprobs)
    chat = client.chat.completions.create(model=model, messages=MESSAGES, logprobs=True,  # type: ignore[arg-type]
                                          top_logprobs=2, **GREEDY)
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 12
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.logprob - 1e-6
               for c in content)
    assert "".join(c.token for c in content) == chat.choices[0].message.content


def test_models_and_health(deployment: Deployment, client: openai.OpenAI, model: str) -> None:
    models = client.models.list().data
    assert [(m.id, m.object, m.owned_by) for m in models] == [(model, "model", "splitserve")]
    status, body = raw(deployment, "GET", "/health")
    assert (status, body["status"], body["decode_workers"]) == (200, "ok", 1)
    retrieved = client.models.retrieve(model)
    assert (retrieved.id, retrieved.object, retrieved.owned_by) == (model, "model", "splitserve")
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_an_unknown_model_is_404(client: openai.OpenAI) -> None:
    for create in (lambda: client.completions.create(model="no-such-model", prompt=PROMPT,
                                                     max_tokens=2),
                   lambda: client.chat.completions.create(model="no-such-model",
                                                          messages=MESSAGES, max_tokens=2)):
        with pytest.raises(openai.NotFoundError) as info:
            create()
        error = info.value.body
        assert isinstance(error, dict) and (error["code"], error["param"]) == (
            "model_not_found", "model")


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"n": 0}, "n"),
    ({"n": 65}, "n"),
    ({"temperature": -1.0}, "temperature"),
    ({"extra_body": {"best_of": 2}}, "best_of"),
])
def test_unsupported_values_are_400(client: openai.OpenAI, model: str, kwargs: dict[str, Any],
                                    param: str) -> None:
    args = {"model": model, "prompt": PROMPT, "max_tokens": 2, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**args)
    assert info.value.status_code == 400
    error = info.value.body
    assert isinstance(error, dict) and (error["type"], error["param"]) == (
        "invalid_request_error", param)


def test_malformed_requests_are_400(deployment: Deployment, model: str) -> None:
    for path in ("/v1/completions", "/v1/chat/completions"):
        status, body = raw(deployment, "POST", path, b'{"model": "x", "prompt": ')
        assert status == 400 and body["error"]["type"] == "invalid_request_error"
        assert "not valid JSON" in body["error"]["message"]
    too_long = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": 10**6}).encode()
    status, body = raw(deployment, "POST", "/v1/completions", too_long)
    assert status == 400 and "max_tokens" in body["error"]["message"]
    status, body = raw(deployment, "GET", "/v1/nothing-here")
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}


def test_disconnect_mid_stream_frees_every_block(deployment: Deployment, model: str) -> None:
    before = _aborted(deployment)
    host, port = deployment.router.http_address.split(":")  # type: ignore[union-attr]
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = {"model": model, "prompt": PROMPT, "max_tokens": 1500, "temperature": 0.0,
            "ignore_eos": True, "stream": True}
    conn.request("POST", "/v1/completions", body=json.dumps(body),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    events = 0
    while events < 4:
        events += response.readline().startswith(b"data: ")
    conn.sock.close()  # type: ignore[union-attr]  # the client goes away mid-stream
    conn.close()
    state = deployment.wait_all_blocks_free()
    assert all(free == total for free, total in state.values()), state
    deadline = time.monotonic() + 10
    while _aborted(deployment) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _aborted(deployment) == before + 1
    assert deployment.router.num_inflight == 0
    assert deployment.decode[0].loop.load.num_running == 0


def _aborted(deployment: Deployment) -> float:
    value = deployment.router.metrics.registry.get_sample_value(
        "splitserve_requests_total", {"finish_reason": "abort"})
    return value or 0.0


def test_echo_prefixes_the_prompt(client: openai.OpenAI, model: str) -> None:
    plain = client.completions.create(model=model, prompt=PROMPT, **GREEDY).choices[0].text
    echoed = client.completions.create(model=model, prompt=PROMPT, echo=True, **GREEDY)
    assert echoed.choices[0].text == PROMPT + plain
    events = list(client.completions.create(model=model, prompt=PROMPT, echo=True, stream=True,
                                            **GREEDY))
    assert "".join(e.choices[0].text for e in events) == PROMPT + plain


SAMPLED = {"temperature": 1.0, "max_tokens": 8, "seed": 5, "extra_body": {"ignore_eos": True}}


def test_n_samples_and_a_batch_of_prompts(deployment: Deployment, client: openai.OpenAI,
                                          model: str) -> None:
    """n seeded samples: choice i uses seed + i (so a one-sample request with that seed is
    choice i again); a list of prompts gets choices p * n + i; usage counts each prompt
    once and every choice's tokens; streaming tags every chunk with its choice's index."""
    out = client.completions.create(model=model, prompt=PROMPT, n=3, **SAMPLED)
    assert [c.index for c in out.choices] == [0, 1, 2]
    for i, choice in enumerate(out.choices):
        alone = client.completions.create(model=model, prompt=PROMPT,
                                          **{**SAMPLED, "seed": 5 + i})
        assert choice.text == alone.choices[0].text and choice.finish_reason == "length"
    assert len({c.text for c in out.choices}) > 1
    one = client.completions.create(model=model, prompt=PROMPT, **SAMPLED)
    assert out.usage is not None and one.usage is not None
    assert out.usage.prompt_tokens == one.usage.prompt_tokens
    assert out.usage.completion_tokens == 3 * 8

    prompts = [PROMPT, "Another prompt entirely.", [5, 6, 7, 8, 9, 10, 11, 12, 13]]
    batch = client.completions.create(model=model, prompt=prompts, n=2, **GREEDY)
    assert [c.index for c in batch.choices] == list(range(6))
    singles = [client.completions.create(model=model, prompt=p, **GREEDY) for p in prompts]
    for p, single in enumerate(singles):
        assert batch.choices[2 * p].text == batch.choices[2 * p + 1].text == \
            single.choices[0].text
    assert batch.usage is not None
    assert batch.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles if s.usage)
    assert batch.usage.completion_tokens == 6 * 12

    texts = ["", ""]
    finished = set()
    usage = None
    for chunk in client.chat.completions.create(model=model, messages=MESSAGES, n=2,
                                                stream=True,
                                                stream_options={"include_usage": True},
                                                **SAMPLED):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
        usage = chunk.usage or usage
    assert finished == {0, 1} and usage is not None and usage.completion_tokens == 16
    whole = client.chat.completions.create(model=model, messages=MESSAGES, n=2, **SAMPLED)
    assert texts == [c.message.content for c in whole.choices]
    assert deployment.wait_all_blocks_free() == deployment.free_blocks()


def test_n_samples_compute_the_prompt_once(deployment: Deployment, client: openai.OpenAI,
                                           model: str) -> None:
    """The later samples of a prompt find its full blocks in the prefix cache (here: the
    prefill worker's). (On this fast tiny model they would also without _FirstSamples'
    gating, which its own test in test_openai_schema.py checks.)"""
    prompt = [900 + i for i in range(33)]  # 4 full blocks of 8, prefilled remotely
    registry = deployment.router.metrics.registry

    def cached() -> float:
        return registry.get_sample_value("splitserve_prompt_cached_tokens_total") or 0.0

    before = cached()
    out = client.completions.create(model=model, prompt=prompt, n=4, **SAMPLED)
    assert len(out.choices) == 4 and out.usage is not None
    assert out.usage.prompt_tokens_details is not None
    assert out.usage.prompt_tokens_details.cached_tokens == 0  # the first computed it
    assert cached() - before >= 3 * 32  # each sibling: 4 cached blocks
