"""Bad input gets 4xx / INVALID_ARGUMENT with a message, before any real work, and the
service keeps serving: the malformed requests that used to reach 5xx (issue 13), request
size limits, undecodable gRPC messages, and a property-based fuzz of the HTTP API. A real
router with one decode worker (tiny random model) in this process."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitserve.bench.fuzz_cases import (
    BODIES,
    GENERATE_PATHS,
    MESSAGE,
    api_body,
    cap_max_tokens,
    generate_requests,
)
from splitserve.v1 import common_pb2, router_pb2, router_pb2_grpc
from tests.http._raw import call
from tests.service.deployment import Deployment, start_deployment

ENGINE = {"num_kv_blocks": 64, "block_size": 8, "max_num_batched_tokens": 128}
LIMIT = 256 * 1024  # max_request_bytes of the router under test


@pytest.fixture(scope="module")
def deployment(tiny_llama: Path) -> Iterator[Deployment]:
    d = start_deployment(str(tiny_llama), 0, 1, engine=ENGINE,
                         router={"http_port": 0, "max_request_bytes": LIMIT})
    yield d
    d.stop()


def post(d: Deployment, path: str, body: bytes) -> tuple[int, Any, float]:
    status, data, _, elapsed = call(d, "POST", path, body)
    return status, data, elapsed


def completion(d: Deployment, **fields: Any) -> tuple[int, Any, float]:
    body = {"prompt": "Hello there", "max_tokens": 2, **fields}
    return post(d, "/v1/completions", json.dumps(body).encode())


def chat(d: Deployment, messages: Any, **fields: Any) -> tuple[int, Any, float]:
    body = {"messages": messages, "max_tokens": 2, **fields}
    return post(d, "/v1/chat/completions", json.dumps(body).encode())


def assert_400(result: tuple[int, Any, float], *words: str) -> None:
    status, body, _ = result
    assert status == 400, (status, body)
    message = body["error"]["message"]
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("field", ["max_tokens", "top_k"])
def test_integers_past_the_wire_range_are_400(deployment: Deployment, field: str) -> None:
    assert_400(completion(deployment, **{field: 2**32}), field)
    assert_400(completion(deployment, **{field: 2**70}), field)


def test_a_lone_surrogate_is_400(deployment: Deployment) -> None:
    body = b'{"prompt": "bad \\ud800 text", "max_tokens": 2}'
    assert_400(post(deployment, "/v1/completions", body), "prompt", "Unicode")
    assert_400(chat(deployment, [{"role": "user", "content": "x\udfff"}]), "content")
    assert_400(completion(deployment, stop=["\ud800"]), "stop")


@pytest.mark.parametrize("depth", [33, 1000, 30_000])
def test_deep_json_is_400(deployment: Deployment, depth: int) -> None:
    nested = "[" * depth + "]" * depth
    body = f'{{"prompt": "hi", "max_tokens": 2, "extra": {nested}}}'.encode()
    assert_400(post(deployment, "/v1/completions", body), "deeper")


@pytest.mark.parametrize("role", ["hacker", "", "SYSTEM", "tool_result"])
def test_unknown_chat_roles_are_400(deployment: Deployment, role: str) -> None:
    assert_400(chat(deployment, [{"role": role, "content": "hi"}]), "role")


def test_a_tiny_top_p_samples_the_most_likely_token(deployment: Deployment) -> None:
    """1e-45 rounds to a float32 denormal (or 0 on the workers): it keeps the top token."""
    greedy = completion(deployment, temperature=0.0, max_tokens=4, ignore_eos=True)
    for top_p in (1e-45, 1e-30):
        status, body, _ = completion(deployment, temperature=1.0, top_p=top_p, max_tokens=4,
                                     ignore_eos=True)
        assert status == 200, body
        assert body["choices"][0]["text"] == greedy[1]["choices"][0]["text"]


def test_a_tiny_temperature_is_greedy(deployment: Deployment) -> None:
    greedy = completion(deployment, temperature=0.0, max_tokens=4, ignore_eos=True)
    status, body, _ = completion(deployment, temperature=1e-30, max_tokens=4, ignore_eos=True)
    assert status == 200, body
    assert body["choices"][0]["text"] == greedy[1]["choices"][0]["text"]


def test_a_body_over_the_limit_is_413_before_it_is_read(deployment: Deployment) -> None:
    big = json.dumps({"prompt": "x" * (4 * LIMIT), "max_tokens": 2}).encode()
    status, body, elapsed = post(deployment, "/v1/completions", big)
    assert status == 413, body
    assert elapsed < 2.0
    assert completion(deployment)[0] == 200


def _stub(d: Deployment) -> tuple[grpc.Channel, router_pb2_grpc.SplitServeStub]:
    channel = grpc.insecure_channel(d.address)
    return channel, router_pb2_grpc.SplitServeStub(channel)


def _grpc_error(d: Deployment, request: router_pb2.GenerateRequest) -> grpc.RpcError:
    channel, stub = _stub(d)
    with channel, pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(request, timeout=30))
    return info.value


def test_grpc_refuses_infinite_temperature_and_huge_request_ids(deployment: Deployment) -> None:
    err = _grpc_error(deployment, router_pb2.GenerateRequest(
        prompt="hi", sampling_params=common_pb2.SamplingParams(temperature=float("inf"))))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in err.details()
    err = _grpc_error(deployment, router_pb2.GenerateRequest(prompt="hi", request_id="r" * 20_000))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in err.details()
    err = _grpc_error(deployment, router_pb2.GenerateRequest(
        messages=router_pb2.ChatMessages(messages=[router_pb2.ChatMessage(role="root",
                                                                          content="hi")])))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "role" in err.details()


def test_grpc_refuses_an_overlong_prompt_before_tokenizing(deployment: Deployment) -> None:
    max_len = deployment.router.model.max_model_len  # type: ignore[union-attr]
    started = time.monotonic()
    err = _grpc_error(deployment, router_pb2.GenerateRequest(prompt="a" * (65 * max_len)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "characters" in err.details()
    assert time.monotonic() - started < 2.0


def test_grpc_refuses_messages_over_the_size_limit(deployment: Deployment) -> None:
    err = _grpc_error(deployment, router_pb2.GenerateRequest(prompt="a" * (2 * LIMIT)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_an_undecodable_grpc_message_is_invalid_argument(
        deployment: Deployment, caplog: pytest.LogCaptureFixture) -> None:
    with grpc.insecure_channel(deployment.address) as channel:
        raw = channel.unary_stream("/splitserve.v1.SplitServe/Generate",
                                   request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
        for garbage in (b"\xff\xff\xff\xff", b"\x12\x05\xc3\x28abc", b"\x0a"):
            with caplog.at_level("INFO"), pytest.raises(grpc.RpcError) as info:
                list(raw(garbage, timeout=10))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert completion(deployment)[0] == 200


# ---- fuzz --------------------------------------------------------------------------------

@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=BODIES, messages=st.lists(MESSAGE, max_size=3),
       path=st.sampled_from(GENERATE_PATHS))
def test_fuzzed_http_bodies_never_get_5xx(deployment: Deployment, body: dict[str, Any],
                                          messages: list[Any], path: str) -> None:
    # stream=False: an SSE body does not parse as one JSON document
    body = api_body(body, messages, path, stream=False)
    status, data, _ = post(deployment, path, json.dumps(body).encode())
    assert status < 500, (body, data)
    if status != 200:
        assert isinstance(data, dict) and data["error"]["message"], data


_EXPECTED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=generate_requests())
def test_fuzzed_grpc_requests_get_a_status_never_a_crash(deployment: Deployment,
                                                        request: router_pb2.GenerateRequest
                                                        ) -> None:
    cap_max_tokens(request, 4)  # keep accepted requests short
    channel, stub = _stub(deployment)
    with channel:
        try:
            chunks = list(stub.Generate(request, timeout=30))
        except grpc.RpcError as err:
            assert err.code() in _EXPECTED, (request, err.code(), err.details())
            assert err.details()
        else:
            assert chunks and chunks[-1].finish_reason


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.binary(max_size=64))
def test_fuzzed_grpc_bytes_get_a_status_never_a_crash(deployment: Deployment,
                                                     data: bytes) -> None:
    with grpc.insecure_channel(deployment.address) as channel:
        call = channel.unary_stream("/splitserve.v1.SplitServe/Generate",
                                    request_serializer=lambda b: b,
                                    response_deserializer=router_pb2.GenerateResponse.FromString)
        try:
            list(call(data, timeout=30))
        except grpc.RpcError as err:
            assert err.code() in _EXPECTED, (data, err.code(), err.details())


def test_a_choice_the_vocabulary_cannot_write_is_refused(deployment: Deployment) -> None:
    # The tiny model's tokenizer has no bytes for U+40000: its tokens read something else,
    # and the grammar would refuse every token its mask leaves (found by the fuzz test).
    body = {"messages": [{"role": "user", "content": ""}], "max_tokens": 2,
            "guided_choice": ["\U00040000"]}
    status, data, _ = post(deployment, "/v1/chat/completions", json.dumps(body).encode())
    assert status == 400, data
    assert "choice 0" in data["error"]["message"]
    assert "cannot be written in this model's vocabulary" in data["error"]["message"]
    ok = {"messages": [{"role": "user", "content": ""}], "max_tokens": 4,
          "guided_choice": ["yes", "no"]}
    status, data, _ = post(deployment, "/v1/chat/completions", json.dumps(ok).encode())
    assert status == 200, data  # the server keeps serving, and plain choices still pass
