"""The blocking Client against a scripted SplitServe server over real gRPC on loopback."""

from __future__ import annotations

import gc
import io
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from splitserve.client import (
    Chunk,
    Client,
    Completion,
    DeadlineExceeded,
    InvalidRequest,
    ModelInfo,
    Overloaded,
    SplitServeError,
    Timings,
    Unavailable,
    stream_to_terminal,
)
from splitserve.common.outputs import TokenLogprobs
from splitserve.v1 import common_pb2, router_pb2
from tests.client.conftest import (
    EXPECTED_TIMINGS,
    EXPECTED_USAGE,
    USAGE,
    Script,
    ScriptedRouter,
    Served,
    hello_partial,
    serve,
    spy_on_calls,
)


def _client(router: Served, **kwargs: object) -> Client:
    kwargs.setdefault("retry_backoff_s", 0.01)
    return Client(router.address, **kwargs)  # type: ignore[arg-type]


def test_generate_assembles_completion_and_sends_only_given_params(router: Served) -> None:
    with _client(router) as client:
        out = client.generate("Hi there", max_tokens=8, temperature=0.0, top_k=-1, stop=["\n"],
                              seed=7, request_id="req-1", model="smollm2-135m")
    assert out == Completion(request_id="req-1", text="Hello world", token_ids=[11, 12, 13, 14],
                             finish_reason="stop", usage=EXPECTED_USAGE,
                             timings=EXPECTED_TIMINGS, logprobs=None)
    (request,) = router.servicer.requests
    assert request.WhichOneof("input") == "prompt" and request.prompt == "Hi there"
    assert (request.request_id, request.model) == ("req-1", "smollm2-135m")
    sp = request.sampling_params
    assert (sp.max_tokens, sp.temperature, sp.seed, sp.top_k) == (8, 0.0, 7, 0)
    assert list(sp.stop) == ["\n"] and not sp.logprobs
    # Optional fields the caller did not pass stay unset: the router applies its defaults.
    assert not sp.HasField("top_p") and not sp.HasField("skip_special_tokens")


def test_generate_token_ids_with_logprobs(router: Served) -> None:
    lp = [common_pb2.TokenLogprob(token_id=11, logprob=-0.5,
                                  top_logprobs=[common_pb2.TopLogprob(token_id=11, logprob=-0.5),
                                                common_pb2.TopLogprob(token_id=3, logprob=-1.0)]),
          common_pb2.TokenLogprob(token_id=12, logprob=-0.25)]
    router.servicer.script = Script(chunks=[
        router_pb2.GenerateResponse(token_ids=[11, 12], text="ab", logprobs=lp),
        router_pb2.GenerateResponse(finish_reason=common_pb2.FINISH_REASON_LENGTH, usage=USAGE),
    ])
    with _client(router) as client:
        out = client.generate([1, 2, 3], logprobs=1, max_tokens=2)
    (request,) = router.servicer.requests
    assert request.WhichOneof("input") == "token_ids"
    assert list(request.token_ids.token_ids) == [1, 2, 3]
    assert request.sampling_params.logprobs and request.sampling_params.top_logprobs == 1
    assert out.request_id == "router-1"  # assigned by the server, echoed in chunks
    assert (out.text, out.token_ids, out.finish_reason) == ("ab", [11, 12], "length")
    assert out.timings == Timings()  # the server sent none
    assert out.logprobs == [TokenLogprobs(11, -0.5, [(11, -0.5), (3, -1.0)]),
                            TokenLogprobs(12, -0.25, [])]


def test_chat_sends_messages(router: Served) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    with _client(router, model="m") as client:
        out = client.chat(messages, max_tokens=4)
    (request,) = router.servicer.requests
    assert request.WhichOneof("input") == "messages"
    assert [(m.role, m.content) for m in request.messages.messages] == [
        ("system", "Be brief."), ("user", "Hi")]
    assert request.model == "m"  # the client's default model
    assert out.text == "Hello world" and out.usage == EXPECTED_USAGE


def test_stream_yields_chunks_in_order(router: Served) -> None:
    with _client(router) as client:
        chunks = list(client.stream("Hi", request_id="s1"))
    assert chunks == [
        Chunk([11, 12], "Hel", request_id="s1"),
        Chunk([13], "lo", request_id="s1"),
        Chunk([14], " world", request_id="s1"),
        Chunk([], "", "stop", EXPECTED_USAGE, EXPECTED_TIMINGS, request_id="s1"),
    ]


@pytest.mark.parametrize("how", ["break", "close", "gc"])
def test_leaving_stream_early_cancels_rpc(router: Served, how: str) -> None:
    router.servicer.script = Script(chunks=hello_partial(), hold=True)
    with _client(router) as client:
        calls = spy_on_calls(client)
        if how == "break":
            for chunk in client.stream("Hi"):
                assert chunk.token_ids == [11, 12]
                break
        elif how == "close":
            stream = client.stream("Hi")
            next(stream)
            stream.close()
        else:
            stream = client.stream("Hi")
            next(stream)
            del stream
            gc.collect()
        assert router.servicer.cancelled.wait(1.0), "server did not see the cancellation"
        assert calls[0].code() == grpc.StatusCode.CANCELLED


def test_timeout_raises_deadline_exceeded(router: Served) -> None:
    router.servicer.script = Script(chunks=[], hold=True)
    with _client(router) as client:
        with pytest.raises(DeadlineExceeded) as info:
            client.generate("Hi", timeout=0.3)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    with _client(router, timeout=0.3) as client:  # the client's default deadline
        with pytest.raises(DeadlineExceeded):
            list(client.stream("Hi"))
    assert router.servicer.attempts == 2  # never retried


def test_invalid_argument_maps_to_invalid_request(router: Served) -> None:
    router.servicer.script = Script(fail_first=5, fail_code=grpc.StatusCode.INVALID_ARGUMENT,
                                    fail_message="prompt is longer than max_model_len (2048)")
    with _client(router) as client, pytest.raises(InvalidRequest) as info:
        client.generate("Hi")
    assert isinstance(info.value, ValueError)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details == "prompt is longer than max_model_len (2048)"
    assert "prompt is longer than max_model_len (2048)" in str(info.value)
    assert router.servicer.attempts == 1


@pytest.mark.parametrize("code, error", [
    (grpc.StatusCode.RESOURCE_EXHAUSTED, Overloaded),
    (grpc.StatusCode.NOT_FOUND, SplitServeError),
    (grpc.StatusCode.INTERNAL, SplitServeError),
])
def test_status_codes_map_to_errors_without_retry(router: Served, code: grpc.StatusCode,
                                                  error: type[SplitServeError]) -> None:
    router.servicer.script = Script(fail_first=5, fail_code=code, fail_message="nope")
    with _client(router) as client, pytest.raises(SplitServeError) as info:
        client.generate("Hi")
    assert type(info.value) is error
    assert (info.value.code, info.value.details) == (code, "nope")
    assert router.servicer.attempts == 1


def test_unavailable_before_first_chunk_is_retried(router: Served) -> None:
    router.servicer.script = Script(fail_first=2)
    with _client(router, max_retries=3) as client:
        out = client.generate("Hi")
    assert out.text == "Hello world"
    assert router.servicer.attempts == 3


def test_unavailable_gives_up_after_max_retries(router: Served) -> None:
    router.servicer.script = Script(fail_first=100)
    with _client(router, max_retries=2) as client, pytest.raises(Unavailable) as info:
        client.generate("Hi")
    assert info.value.details == "no live worker"
    assert router.servicer.attempts == 3


def test_unavailable_after_first_chunk_is_not_retried(router: Served) -> None:
    router.servicer.script = Script(abort_after=1)
    with _client(router, max_retries=3) as client:
        with pytest.raises(Unavailable):
            client.generate("Hi")
        assert router.servicer.attempts == 1
        received = []
        with pytest.raises(Unavailable):
            for chunk in client.stream("Hi"):
                received.append(chunk.text)
        assert received == ["Hel"]
    assert router.servicer.attempts == 2


def test_list_models_retries_unavailable(router: Served) -> None:
    router.servicer.script = Script(fail_first=1)
    with _client(router) as client:
        models = client.list_models()
    assert models == [ModelInfo("smollm2-135m", 2048, 16, 2, 1)]
    assert router.servicer.list_models_calls == 2


def test_bearer_token_reaches_server(router: Served) -> None:
    with _client(router, token="s3cret") as client:
        client.generate("Hi")
    with _client(router) as client:
        client.generate("Hi")
    assert router.servicer.metadata[0]["authorization"] == "Bearer s3cret"
    assert "authorization" not in router.servicer.metadata[1]


@pytest.mark.parametrize("kwargs", [
    {"temperature": -1.0}, {"top_p": 0.0}, {"max_tokens": 0}, {"logprobs": 21},
    {"stop": [""]}, {"stop_token_ids": [-1]}, {"seed": -1}, {"min_p": 2.0},
    {"temperature": "hot"}, {"max_tokens": 2 ** 40},
])
def test_invalid_sampling_raises_before_any_rpc(router: Served, kwargs: dict) -> None:
    with _client(router) as client:
        with pytest.raises(ValueError):
            client.generate("Hi", **kwargs)
        with pytest.raises(ValueError):
            client.stream("Hi", **kwargs)  # eagerly, before iteration
        with pytest.raises(ValueError):
            client.chat([{"role": "user", "content": "Hi"}], **kwargs)
    assert router.servicer.attempts == 0


def test_bad_arguments_raise_before_any_rpc(router: Served) -> None:
    with _client(router) as client:
        with pytest.raises(TypeError, match="temprature"):
            client.generate("Hi", temprature=0.5)
        with pytest.raises(TypeError, match="extra"):
            client.generate("Hi", extra={})
        with pytest.raises(TypeError):
            client.generate(3.5)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            client.generate([1, -2])
        with pytest.raises(ValueError):
            client.chat([{"role": "user"}])
        with pytest.raises(ValueError):
            client.generate("Hi", timeout=0)
    assert router.servicer.attempts == 0
    with pytest.raises(ValueError):
        Client(router.address, max_retries=-1)
    with pytest.raises(ValueError):
        Client(router.address, timeout=-1.0)


def test_error_finish_reason_is_returned_with_message(router: Served) -> None:
    router.servicer.script = Script(chunks=[
        router_pb2.GenerateResponse(token_ids=[5], text="x"),
        router_pb2.GenerateResponse(finish_reason=common_pb2.FINISH_REASON_ERROR,
                                    error_message="decode worker d1 died"),
    ])
    with _client(router) as client:
        out = client.generate("Hi")
    assert (out.finish_reason, out.error_message, out.token_ids) == (
        "error", "decode worker d1 died", [5])


def test_stream_without_last_chunk_is_a_protocol_error(router: Served) -> None:
    router.servicer.script = Script(chunks=hello_partial())
    with _client(router) as client, pytest.raises(SplitServeError, match="finish_reason"):
        client.generate("Hi")


def test_stream_to_terminal_prints_deltas_and_stats(router: Served) -> None:
    router.servicer.script = Script(chunk_delay_s=0.01)
    out, stats = io.StringIO(), io.StringIO()
    with _client(router) as client:
        completion = stream_to_terminal(client, "Hi", False, file=out, stats_file=stats,
                                        max_tokens=4)
    assert out.getvalue() == "Hello world\n"
    assert completion.text == "Hello world"
    line = stats.getvalue()
    assert line.count("\n") == 1 and line.startswith("[stop] prompt 5 tokens (2 cached)")
    assert "client TTFT " in line and "TPOT " in line and "TPOT n/a" not in line
    assert "server TTFT 15.0 ms, E2E 42.0 ms" in line and "workers p0 -> d1" in line


def test_tls_with_bearer_token(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=30,
    )
    servicer = ScriptedRouter()
    server, address = serve(servicer, grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())]))
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with Client(address, credentials=creds, token="t0k") as client:
            assert client.generate("Hi").text == "Hello world"
    finally:
        server.stop(None)
    assert servicer.metadata[0]["authorization"] == "Bearer t0k"


def test_import_and_construct_without_torch() -> None:
    code = (
        "import asyncio, sys\n"
        "import splitserve.client as c\n"
        "from splitserve import Client, AsyncClient\n"
        "c.Client('127.0.0.1:1', token='x').close()\n"
        "async def main():\n"
        "    await AsyncClient('127.0.0.1:1').close()\n"
        "asyncio.run(main())\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_stream_pace_is_sent_as_tokens_per_s(router: Served) -> None:
    with _client(router) as client:
        client.generate("Hi", max_tokens=4, stream_pace="reading")
        client.generate("Hi", max_tokens=4, stream_pace=12.5)
        client.generate("Hi", max_tokens=4)
        for bad in ("sprint", -3, 5000):
            with pytest.raises(ValueError, match="stream_pace"):
                client.generate("Hi", stream_pace=bad)
    assert [r.stream_pace_tokens_per_s for r in router.servicer.requests] == [5.0, 12.5, 0.0]
