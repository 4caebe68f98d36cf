"""Client API keys on the router: HTTP and gRPC refuse a missing, wrong or non-Bearer key;
/health stays open; the SDK sends the key. A real router with
one decode worker (tiny random model) in this process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from splitserve.client import Client, SplitServeError
from splitserve.common.auth import ApiKeys, bearer_token
from splitserve.v1 import router_pb2, router_pb2_grpc
from tests.http._raw import call
from tests.service.deployment import Deployment, start_deployment

ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdef01"
ENGINE = {"num_kv_blocks": 64, "block_size": 8, "max_num_batched_tokens": 128}


@pytest.fixture(scope="module")
def deployment(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[Deployment]:
    keys = tmp_path_factory.mktemp("keys") / "api_keys"
    keys.write_text(f"# test clients\nalice:{ALICE}\n\nbob: {BOB}\n")
    d = start_deployment(str(tiny_llama), 0, 1, engine=ENGINE,
                         router={"http_port": 0, "api_keys_file": str(keys)})
    yield d
    d.stop()


def request(d: Deployment, method: str, path: str, auth: str | None = None,
            body: dict[str, Any] | None = None) -> tuple[int, Any, dict[str, str]]:
    headers = {"Authorization": auth} if auth is not None else None
    status, data, response_headers, _ = call(d, method, path,
                                             json.dumps(body).encode() if body else None, headers)
    return status, data, response_headers


COMPLETION = {"prompt": "Hello", "max_tokens": 2}


@pytest.mark.parametrize("auth", [None, "Bearer wrong-key-0123456789", f"Basic {ALICE}",
                                  ALICE, "Bearer", f"bearer  {ALICE}x"])
def test_http_without_a_valid_key_is_401(deployment: Deployment, auth: str | None) -> None:
    for method, path, body in (("POST", "/v1/completions", COMPLETION),
                               ("GET", "/v1/models", None), ("GET", "/metrics", None)):
        status, data, headers = request(deployment, method, path, auth, body)
        assert status == 401, (path, data)
        assert data["error"]["code"] == "invalid_api_key"
        assert headers.get("WWW-Authenticate") == "Bearer"


def test_http_with_a_key_is_served_and_health_is_open(deployment: Deployment) -> None:
    for key in (ALICE, BOB):
        status, data, _ = request(deployment, "POST", "/v1/completions", f"Bearer {key}",
                                  COMPLETION)
        assert status == 200, data
    assert request(deployment, "GET", "/v1/models", f"bearer {ALICE}")[0] == 200
    assert request(deployment, "GET", "/metrics", f"Bearer {ALICE}")[0] == 200
    assert request(deployment, "GET", "/health")[0] == 200


def test_grpc_without_a_valid_key_is_unauthenticated(deployment: Deployment) -> None:
    with grpc.insecure_channel(deployment.address) as channel:
        stub = router_pb2_grpc.SplitServeStub(channel)
        for metadata in ((), (("authorization", "Bearer nope-0123456789abcdef"),),
                         (("authorization", f"Basic {ALICE}"),)):
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Generate(router_pb2.GenerateRequest(prompt="hi"), timeout=10,
                                   metadata=metadata))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as info:
                stub.ListModels(router_pb2.ListModelsRequest(), timeout=10, metadata=metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_garbage_without_a_key_is_unauthenticated_and_not_decoded(
        deployment: Deployment, caplog: pytest.LogCaptureFixture) -> None:
    with grpc.insecure_channel(deployment.address) as channel, caplog.at_level("INFO"):
        raw = channel.unary_stream("/splitserve.v1.SplitServe/Generate",
                                   request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as info:
            list(raw(b"\xff\xff\xff\xff", timeout=10))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_the_sdk_sends_its_token(deployment: Deployment) -> None:
    with Client(deployment.address, token=BOB, timeout=60) as client:
        assert client.generate("Hello", max_tokens=2).finish_reason in ("stop", "length")
    with Client(deployment.address, timeout=60) as client, pytest.raises(SplitServeError) as info:
        client.generate("Hello", max_tokens=2)
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_key_files_are_checked() -> None:
    keys = ApiKeys.parse(f"a:{ALICE}\nb:{BOB}")
    assert keys.identify(ALICE) == "a" and keys.identify(BOB) == "b"
    assert keys.identify(ALICE[:-1]) is None and len(keys) == 2
    for bad in ("nokey", "a:short", f"a b:{ALICE}", f"a:{ALICE}\nb:{ALICE}", "# only\n"):
        with pytest.raises(ValueError):
            ApiKeys.parse(bad)
    assert ApiKeys.load(None, None) is None
    with pytest.raises(ValueError, match="no name:key entries"):
        ApiKeys.load(None, " , ")  # set but empty must not leave the API open
    assert ApiKeys.load(None, f"x:{ALICE}, y:{BOB}").identify(BOB) == "y"  # type: ignore[union-attr]
    assert bearer_token(f"Bearer {ALICE}") == ALICE
    assert bearer_token(f"Basic {ALICE}") is None and bearer_token("Bearer ") is None


def test_an_empty_keys_file_refuses_to_start(tmp_path: Path) -> None:
    empty = tmp_path / "keys"
    empty.write_text("# nobody yet\n\n")
    with pytest.raises(ValueError, match="no name:key entries"):
        ApiKeys.load(str(empty), None)


def _client_counts(d: Deployment) -> dict[tuple[str, str], float]:
    """(metric, labels) -> value of the per-client series in /metrics."""
    status, text, _, _ = call(d, "GET", "/metrics", None, {"Authorization": f"Bearer {ALICE}"})
    assert status == 200
    out: dict[tuple[str, str], float] = {}
    for line in str(text).splitlines():
        if line.startswith(("splitserve_client_requests_total", "splitserve_client_tokens_total")):
            series, value = line.rsplit(" ", 1)
            name, _, labels = series.partition("{")
            out[(name, labels.rstrip("}"))] = float(value)
    return out


def test_each_key_is_a_client_in_the_metrics(deployment: Deployment) -> None:
    """The key's name is the client's identity: requests and tokens are counted per client,
    over HTTP and gRPC alike."""
    before = _client_counts(deployment)
    status, data, _ = request(deployment, "POST", "/v1/completions", f"Bearer {ALICE}",
                              {"prompt": [5, 6, 7], "max_tokens": 3, "ignore_eos": True})
    assert status == 200, data
    with Client(deployment.address, token=BOB, timeout=60) as client:
        for _ in range(2):
            client.generate([5, 6, 7, 8], max_tokens=2, ignore_eos=True)
    after = _client_counts(deployment)

    def grew(metric: str, labels: str) -> float:
        key = (f"splitserve_{metric}_total", labels)
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert grew("client_requests", 'client="alice"') == 1
    assert grew("client_requests", 'client="bob"') == 2
    assert grew("client_tokens", 'client="alice",kind="output"') == 3
    assert grew("client_tokens", 'client="alice",kind="prompt"') == 3
    assert grew("client_tokens", 'client="bob",kind="output"') == 4
    assert grew("client_tokens", 'client="bob",kind="prompt"') == 8
    assert grew("client_requests", 'client="anonymous"') == 0
