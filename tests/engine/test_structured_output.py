"""Structured output in the engine: every output follows its grammar (JSON schema, JSON
object, regex, choice, Lark), sampled or greedy, batched with free-text requests that stay
exactly as they were; the grammar survives a resume and a preemption; bad specs are clear
ValueErrors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch

from splitserve.common.sampling_params import SamplingParams
from splitserve.common.structured_output import OutputKind, StructuredOutput
from splitserve.engine.grammar import allowed_tokens
from splitserve.llm import LLM

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
        "member": {"type": "boolean"},
    },
    "required": ["name", "age", "pets", "member"],
    "additionalProperties": False,
}
PROMPTS = ["Describe a person as JSON:", "Here is a record:", "Output:", "x y z", "{"]


def _params(spec: StructuredOutput, **kw: object) -> SamplingParams:
    base: dict[str, object] = {"max_tokens": 120, "temperature": 0.8, "top_k": 50}
    base.update(kw)
    return SamplingParams(structured_output=spec, **base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def llm(tiny_llama: Path) -> LLM:
    return LLM(model=str(tiny_llama), num_kv_blocks=256, block_size=8)


def test_bitmask_unpacks_to_the_allowed_ids() -> None:
    bitmask = torch.tensor([[0b1011, -1], [-(1 << 31), 0]], dtype=torch.int32)
    allowed = allowed_tokens(bitmask, 40)
    assert allowed[0].nonzero().flatten().tolist() == [0, 1, 3, *range(32, 40)]
    assert allowed[1].nonzero().flatten().tolist() == [31]


def test_json_schema_outputs_validate(llm: LLM) -> None:
    spec = StructuredOutput.json_schema(SCHEMA)
    params = [_params(spec, seed=seed) for seed in range(16)]
    outs = llm.generate([PROMPTS[i % len(PROMPTS)] for i in range(16)], params)
    for out in outs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)


def test_a_grammar_is_compiled_once_and_each_request_gets_its_own_matcher(llm: LLM) -> None:
    spec = StructuredOutput(OutputKind.REGEX, r"[a-z]{2,6}-[0-9]{2,6}")
    before = len(llm.engine.grammars._compiled)
    outs = llm.generate(PROMPTS, [_params(spec, seed=i) for i in range(len(PROMPTS))])
    assert len(llm.engine.grammars._compiled) == before + 1
    assert all(re.fullmatch(r"[a-z]{2,6}-[0-9]{2,6}", o.text) for o in outs)
    assert len({o.text for o in outs}) > 1  # independent matchers, different samples


def test_regex_choice_and_lark(llm: LLM) -> None:
    cases = [
        (StructuredOutput(OutputKind.REGEX, r"[0-9]{3}-[a-z]{2,4}"),
         lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t) is not None),
        (StructuredOutput.choice(["red", "green", "light blue"]),
         lambda t: t in ("red", "green", "light blue")),
        (StructuredOutput(OutputKind.GRAMMAR, 'start: "x=" NUM ";"\nNUM: /[1-9][0-9]?/'),
         lambda t: re.fullmatch(r"x=[1-9][0-9]?;", t) is not None),
    ]
    for spec, ok in cases:
        outs = llm.generate(PROMPTS, [_params(spec, seed=i) for i in range(len(PROMPTS))])
        for out in outs:
            assert out.finish_reason == "stop" and ok(out.text), (spec.kind, out.text)


def test_greedy_constrained_rows_leave_free_rows_unchanged(llm: LLM) -> None:
    free = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    alone = [o.token_ids for o in llm.generate(PROMPTS[:2], free)]
    spec = StructuredOutput.json_schema(SCHEMA)
    mixed = llm.generate(PROMPTS[:2] * 2, [free, free, _params(spec, temperature=0.0),
                                           _params(spec, temperature=0.0)])
    assert [o.token_ids for o in mixed[:2]] == alone
    for out in mixed[2:]:
        jsonschema.validate(json.loads(out.text), SCHEMA)


def test_a_resumed_request_continues_its_grammar(llm: LLM) -> None:
    """The prompt's last k tokens are the request's earlier output (num_sampled=k): the
    matcher replays them, so the continuation equals the uninterrupted run."""
    spec = StructuredOutput.json_schema(SCHEMA)
    prompt = llm.engine.tokenizer.encode(PROMPTS[0])
    whole = llm.generate([prompt], _params(spec, seed=7))[0].token_ids
    k = 6
    engine = llm.engine
    engine.add_request([*prompt, *whole[:k]], _params(spec, seed=7, max_tokens=120 - k),
                       "resumed", num_sampled=k)
    got: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            got.extend(out.new_token_ids)
    assert got == whole[k:]


def test_output_that_breaks_the_grammar_is_refused_on_resume(llm: LLM) -> None:
    spec = StructuredOutput(OutputKind.REGEX, "[0-9]+")
    prompt = llm.engine.tokenizer.encode("abc")
    letters = llm.engine.tokenizer.encode("hello")
    with pytest.raises(ValueError, match="does not follow its grammar"):
        llm.engine.add_request([*prompt, *letters], _params(spec), num_sampled=len(letters))
    assert not llm.engine.has_unfinished()


def test_a_token_outside_the_grammar_ends_the_request_with_a_message(llm: LLM) -> None:
    """Masked sampling never yields such a token; one from elsewhere (a peer that sampled
    unmasked) ends the request with "error" and says why, and frees its blocks."""
    engine = llm.engine
    free_blocks = engine.block_manager.num_free_blocks
    engine.add_request(engine.tokenizer.encode("abc"),
                       _params(StructuredOutput(OutputKind.REGEX, "[0-9]+")), "unmasked")
    first = engine.step()  # the prompt, and its first token sampled under the mask
    assert [o.request_id for o in first] == ["unmasked"] and not first[0].finished
    seq = next(s for s in engine.scheduler.running if s.request_id == "unmasked")
    letter = engine.tokenizer.encode("hello")[0]
    out = engine._process_token(seq, letter, None)
    assert (out.finished, out.finish_reason) == (True, "error")
    assert f"token {letter} does not follow the request's grammar" in out.error
    assert not engine.has_unfinished()
    assert engine.block_manager.num_free_blocks == free_blocks


def test_preemption_keeps_the_grammar(tiny_llama: Path) -> None:
    """A pool too small for the batch preempts (recompute); outputs still validate and equal
    the unpreempted run's (seeded)."""
    spec = StructuredOutput.json_schema(SCHEMA)
    params = [_params(spec, seed=s) for s in range(6)]
    roomy = LLM(model=str(tiny_llama), num_kv_blocks=256, block_size=8)
    tight = LLM(model=str(tiny_llama), num_kv_blocks=12, block_size=8)
    want = [o.token_ids for o in roomy.generate(PROMPTS[:1] * 6, params)]
    preempted = []
    original = tight.engine.scheduler._preempt

    def counting_preempt(seq, *args, **kwargs):  # type: ignore[no-untyped-def]
        preempted.append(seq.request_id)
        return original(seq, *args, **kwargs)

    tight.engine.scheduler._preempt = counting_preempt  # type: ignore[method-assign]
    got = tight.generate(PROMPTS[:1] * 6, params)
    assert preempted
    assert [o.token_ids for o in got] == want


@pytest.mark.parametrize("spec, message", [
    (StructuredOutput(OutputKind.JSON_SCHEMA, "{not json"), "not valid JSON"),
    (StructuredOutput(OutputKind.JSON_SCHEMA, '{"type": "frobnicate"}'), "invalid json_schema"),
    (StructuredOutput(OutputKind.REGEX, "a("), "invalid regex"),
    (StructuredOutput(OutputKind.CHOICE, "[]"), "choice must be a list"),
    (StructuredOutput(OutputKind.CHOICE, '["a", 3]'), "choice must be a list"),
    (StructuredOutput(OutputKind.GRAMMAR, "start: missing_rule"), "invalid grammar"),
    (StructuredOutput(OutputKind.REGEX, "a" * 70000), "at most"),
])
def test_bad_specs_are_clear_errors(spec: StructuredOutput, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(structured_output=spec)


def test_json_object_with_smollm2(smollm2_dir: Path) -> None:
    """Any JSON object (a random-weight model would write one string forever)."""
    llm = LLM(model=str(smollm2_dir), num_kv_blocks=128)
    tok = llm.engine.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in (
        "Give me a JSON object describing a cat.",
        "List three fruits with their colours, in JSON.",
        "What is the capital of France? Answer in JSON.")]
    spec = StructuredOutput(OutputKind.JSON_OBJECT)
    outs = llm.generate(prompts, [_params(spec, seed=s, max_tokens=200) for s in range(3)])
    for out in outs:
        assert out.finish_reason == "stop", out.text
        assert isinstance(json.loads(out.text), dict)
