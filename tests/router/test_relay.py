"""The router's token relay over a real tokenizer (SmolLM2's), and timings assembly."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitserve.common.sampling_params import SamplingParams
from splitserve.engine.tokenizer import Tokenizer
from splitserve.router.relay import RequestTrace, TokenRelay, usage
from splitserve.v1 import common_pb2, worker_pb2

TEXT = " The quick brown fox jumps over the lazy dog. Café 你好!"
MAX_MODEL_LEN = 8192


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(smollm2_dir)


@pytest.fixture(scope="module")
def prompt(tokenizer: Tokenizer) -> list[int]:
    return tokenizer.encode("Say:")


@pytest.fixture(scope="module")
def output(tokenizer: Tokenizer) -> list[int]:
    ids = tokenizer.encode(TEXT)
    assert tokenizer.decode(ids) == TEXT  # the test text survives a round trip
    return ids


def relay(tokenizer: Tokenizer, prompt: list[int], **params: object) -> TokenRelay:
    return TokenRelay(tokenizer, prompt, SamplingParams(**params), MAX_MODEL_LEN)  # type: ignore[arg-type]


def feed(r: TokenRelay, ids: list[int], batch: int) -> tuple[list[int], str, list[str | None]]:
    """Feed `ids` in batches; returns consumed tokens, text, and each step's finish reason."""
    tokens: list[int] = []
    text: list[str] = []
    reasons: list[str | None] = []
    for i in range(0, len(ids), batch):
        step = r.add(ids[i : i + batch])
        tokens += step.token_ids
        text.append(step.text)
        reasons.append(step.finish_reason)
        if step.finish_reason:
            break
    return tokens, "".join(text), reasons


@pytest.mark.parametrize("batch", [1, 3, 64])
def test_text_deltas_add_up_to_the_decode(tokenizer: Tokenizer, prompt: list[int],
                                          output: list[int], batch: int) -> None:
    r = relay(tokenizer, prompt, max_tokens=len(output) + 1)
    tokens, text, reasons = feed(r, output, batch)
    assert tokens == output
    assert text == TEXT
    assert set(reasons) == {None}
    assert r.num_tokens == len(output) and not r.finished


def test_incomplete_character_is_held_until_complete(tokenizer: Tokenizer, prompt: list[int],
                                                     output: list[int]) -> None:
    r = relay(tokenizer, prompt, max_tokens=100)
    start = output.index(216)  # ' ' before the 4 byte-level tokens of 你好
    r.add(output[:start + 1])
    assert r.add(output[start + 1 : start + 2]).text == ""  # half of 你
    assert r.add(output[start + 2 : start + 3]).text == "你"


def test_max_tokens_finishes_with_length(tokenizer: Tokenizer, prompt: list[int],
                                         output: list[int]) -> None:
    r = relay(tokenizer, prompt, max_tokens=4)
    step = r.add(output[:6])
    assert step.token_ids == output[:4]  # tokens after the finishing one are dropped
    assert step.text == " The quick brown fox"
    assert (step.finish_reason, step.stop_string) == ("length", "")
    with pytest.raises(RuntimeError):
        r.add(output[4:5])


def test_max_model_len_finishes_with_length(tokenizer: Tokenizer, prompt: list[int],
                                            output: list[int]) -> None:
    r = TokenRelay(tokenizer, prompt, SamplingParams(max_tokens=100), len(prompt) + 3)
    tokens, _, reasons = feed(r, output, 1)
    assert tokens == output[:3] and reasons[-1] == "length"


def test_stop_string_across_tokens(tokenizer: Tokenizer, prompt: list[int],
                                   output: list[int]) -> None:
    r = relay(tokenizer, prompt, max_tokens=100, stop=["fox jumps", "nothing"])
    tokens, text, reasons = feed(r, output, 2)
    assert tokens == output[:5]  # ' jumps' completes the stop string
    assert text == " The quick brown "
    assert reasons[-1] == "stop"
    assert r.stop_string == "fox jumps" and r.finish_reason == "stop"


def test_stop_string_prefix_is_held_back_then_released(tokenizer: Tokenizer, prompt: list[int],
                                                       output: list[int]) -> None:
    r = relay(tokenizer, prompt, max_tokens=100, stop=["lazy cat"])
    lazy = output.index(23790)  # ' lazy'
    _, text, _ = feed(r, output[: lazy + 1], 1)
    assert text == " The quick brown fox jumps over the "  # "lazy" may start "lazy cat"
    step = r.add(output[lazy + 1 : lazy + 2])  # ' dog': not a stop string after all
    assert step.text == "lazy dog" and step.finish_reason is None


def test_finish_releases_held_back_text(tokenizer: Tokenizer, prompt: list[int],
                                        output: list[int]) -> None:
    r = relay(tokenizer, prompt, max_tokens=100, stop=["lazy cat"])
    lazy = output.index(23790)
    _, text, _ = feed(r, output[: lazy + 1], 4)
    # The decode worker ended the request (e.g. its own length limit): nothing is held back.
    assert text + r.finish() == " The quick brown fox jumps over the lazy"
    assert r.finish() == ""


def test_eos_stops_without_text_or_stop_string(tokenizer: Tokenizer, prompt: list[int],
                                               output: list[int]) -> None:
    eos = tokenizer.eos_token_id
    assert eos is not None
    r = relay(tokenizer, prompt, max_tokens=100, stop=["never"])
    step = r.add([*output[:3], eos, output[3]])
    assert step.token_ids == [*output[:3], eos]
    assert step.text == " The quick brown"
    assert (step.finish_reason, step.stop_string) == ("stop", "")


def test_ignore_eos_keeps_going(tokenizer: Tokenizer, prompt: list[int],
                                output: list[int]) -> None:
    eos = tokenizer.eos_token_id
    assert eos is not None
    r = relay(tokenizer, prompt, max_tokens=100, ignore_eos=True)
    step = r.add([*output[:2], eos, output[2]])
    assert step.token_ids == [*output[:2], eos, output[2]]
    assert step.finish_reason is None
    assert step.text == " The quick brown"  # EOS is a special token: skipped in the text


def test_stop_token_id_is_kept_in_tokens_not_in_text(tokenizer: Tokenizer, prompt: list[int],
                                                     output: list[int]) -> None:
    r = relay(tokenizer, prompt, max_tokens=100, stop_token_ids=[output[3]])
    step = r.add(output[:8])
    assert step.token_ids == output[:4]
    assert step.text == " The quick brown"
    assert (step.finish_reason, step.stop_string) == ("stop", "")


def test_logprobs_follow_the_consumed_tokens(tokenizer: Tokenizer, prompt: list[int],
                                             output: list[int]) -> None:
    r = relay(tokenizer, prompt, max_tokens=2)
    logprobs = [common_pb2.TokenLogprob(token_id=t, logprob=-0.5 * i)
                for i, t in enumerate(output[:3])]
    step = r.add(output[:3], logprobs)
    assert step.token_ids == output[:2]
    assert [lp.token_id for lp in step.logprobs] == output[:2]


# ---- timings and usage -----------------------------------------------------------------


def test_remote_prefill_timings() -> None:
    trace = RequestTrace(arrival=100.0, prefill_worker_id="p0", decode_worker_id="d0")
    trace.dispatched = 100.002
    trace.first_token = 100.150
    trace.finished = 100.5
    trace.add_prefill(worker_pb2.PrefillResponse(
        prefill_worker_id="p0", num_cached_tokens=32, queue_ms=1.5, compute_ms=20.0,
        kv_transfer_ms=3.0, kv_transfer_bytes=1000,
    ))
    trace.add_decode(worker_pb2.DecodeTimings(
        prefill_queue_ms=99.0, prefill_compute_ms=99.0, decode_queue_ms=4.0,
        kv_transfer_bytes=999,
    ))
    t = trace.timings()
    assert t.router_queue_ms == pytest.approx(2.0)
    assert t.ttft_ms == pytest.approx(150.0)
    assert t.e2e_ms == pytest.approx(500.0)
    assert (t.prefill_queue_ms, t.prefill_compute_ms, t.kv_transfer_ms) == (1.5, 20.0, 3.0)
    assert t.decode_queue_ms == 4.0
    assert (t.prefill_worker_id, t.decode_worker_id, t.prefill_local) == ("p0", "d0", False)
    assert t.kv_transfer_bytes == 1000  # the sender's count wins
    assert trace.num_cached_tokens == 32


def test_local_prefill_timings_come_from_the_decode_worker() -> None:
    trace = RequestTrace(arrival=10.0, prefill_worker_id="d0", decode_worker_id="d0",
                         prefill_local=True, kv_transfer_ms=7.0, kv_transfer_bytes=5)
    trace.dispatched = 10.001
    trace.first_token = 10.101
    trace.finished = 10.201
    trace.add_decode(worker_pb2.DecodeTimings(
        prefill_queue_ms=5.0, prefill_compute_ms=6.0, decode_queue_ms=0.5,
    ))
    t = trace.timings()
    assert (t.prefill_queue_ms, t.prefill_compute_ms, t.decode_queue_ms) == (5.0, 6.0, 0.5)
    assert (t.kv_transfer_ms, t.kv_transfer_bytes) == (0.0, 0)  # nothing moved
    assert t.prefill_local and t.prefill_worker_id == t.decode_worker_id == "d0"
    assert (t.router_queue_ms, t.ttft_ms, t.e2e_ms) == pytest.approx((1.0, 101.0, 201.0))


def test_timings_of_phases_never_reached_are_zero() -> None:
    trace = RequestTrace(arrival=1.0)
    trace.finished = 1.25
    t = trace.timings()
    assert (t.router_queue_ms, t.ttft_ms) == (0.0, 0.0)
    assert t.e2e_ms == pytest.approx(250.0)


def test_usage_caps_cached_tokens_at_the_prompt() -> None:
    u = usage(prompt_tokens=40, completion_tokens=7, cached_tokens=48)
    assert (u.prompt_tokens, u.completion_tokens, u.cached_tokens) == (40, 7, 40)
