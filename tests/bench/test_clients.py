"""`bench serve --client ...`: several clients at once, each with its own load, key and
request fields, reported per client with the fairness gap (against the stand-in server)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitserve.bench import serve
from splitserve.bench.clients import ClientSpec, fairness, parse_client
from splitserve.bench.metrics import RequestRecord
from tests.bench.fake_openai import FakeOpenAI


@pytest.fixture
def fake() -> Iterator[tuple[FakeOpenAI, str]]:
    server = FakeOpenAI(token_delay_s=0.001)
    url = server.start()
    yield server, url
    server.stop()


def test_two_clients_run_at_once_with_their_own_keys_and_fields(
        fake: tuple[FakeOpenAI, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server, url = fake
    out = tmp_path / "clients.json"
    rc = serve.main(["--target", url, "--workload", "fixed", "--input-len", "10",
                     "--output-len", "5", "--num-requests", "6", "--seed", "3",
                     "--client", "name=flood,concurrency=4,num_requests=12,api_key=K1,priority=5",
                     "--client", "name=light,concurrency=1,api_key=K2,ttft_slo_ms=900,weight=2",
                     "--no-progress", "--out", str(out)])
    assert rc == 0
    sent = list(zip(server.authorizations, server.bodies, strict=True))
    flood = [body for auth, body in sent if auth == "Bearer K1"]
    light = [body for auth, body in sent if auth == "Bearer K2"]
    assert (len(flood), len(light)) == (12, 6)
    assert all(b["priority"] == 5 and "ttft_slo_ms" not in b for b in flood)
    assert all(b["ttft_slo_ms"] == 900 and "priority" not in b for b in light)
    # Each client draws its own prompts.
    assert {b["prompt"] for b in flood}.isdisjoint({b["prompt"] for b in light})
    data = json.loads(out.read_text())
    assert data["summary"]["completed"] == 18
    assert {k: v["completed"] for k, v in data["by_tag"].items()} == {"flood": 12, "light": 6}
    per = data["clients"]["clients"]
    assert per["flood"]["output_tokens"] == 60 and per["light"]["output_tokens"] == 30
    assert per["flood"]["service"] == pytest.approx(12 * (10 + 2 * 5))
    assert per["light"]["service"] == pytest.approx(6 * (10 + 2 * 5) / 2)
    assert data["clients"]["fairness_gap"] == pytest.approx(4.0)
    assert all(spec["api_key"] is None for spec in data["clients"]["specs"])  # no secrets
    assert "fairness gap (most / least served, weighted): 4.00x" in capsys.readouterr().out


@pytest.mark.parametrize(("text", "message"), [
    ("rate=2", "name=... is required"),
    ("name=a,rate=fast", "could not convert"),
    ("name=a,colour=red", "unknown key 'colour'"),
    ("name=a,name=b", "name given twice"),
    ("name=a,weight=0", "weight must be a positive number"),
    ("name=a,rate", "expected key=value pairs"),
])
def test_bad_client_specs_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_client(text)


def test_bad_client_combinations_exit_2(fake: tuple[FakeOpenAI, str],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    _, url = fake
    base = ["--target", url, "--num-requests", "2", "--no-progress"]
    assert serve.main([*base, "--client", "name=a", "--client", "name=a"]) == 2
    assert "client names must differ" in capsys.readouterr().err
    assert serve.main([*base, "--client", "name=a,concurrency=0"]) == 2
    assert "concurrency must be >= 1" in capsys.readouterr().err
    assert serve.main([*base, "--client", "name=a", "--sweep-rates", "1,2"]) == 2


def test_fairness_counts_what_was_served_even_when_a_request_failed() -> None:
    done = RequestRecord(index=0, tag="a", prompt_tokens=10, output_tokens=4, status="ok")
    cut = RequestRecord(index=1, tag="b", prompt_tokens=10, status="error",
                        chunk_tokens=[1, 1])
    refused = RequestRecord(index=2, tag="b", prompt_tokens=10, status="error")
    result = fairness([done, cut, refused], [ClientSpec("a"), ClientSpec("b")])
    assert result["clients"]["a"]["service"] == 18
    assert result["clients"]["b"]["service"] == 14  # the refused prompt was not served
    assert result["fairness_gap"] == pytest.approx(18 / 14)
