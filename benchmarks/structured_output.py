"""Structured output (issue 14): do generated JSON outputs validate, and what does the grammar
cost a batch?

    PYTHONPATH=. .venv/bin/python benchmarks/structured_output.py [--num 200] [--repeats 3]

1. Validity: `--num` requests over eight JSON schemas (nested objects, arrays, enums,
   number ranges, patterns, anyOf, a date format), sampled (temperature 0.8, a seed each),
   on a random-weight model and on SmolLM2-135M-Instruct (asked for JSON in a chat turn).
   Every output must parse and validate (jsonschema, formats checked); a request that
   runs out of max_tokens counts as a failure. Strings carry maxLength: a random-weight
   model never closes an unbounded string by itself.
2. Cost: SmolLM2, 32 requests decoding together for `--tokens` tokens each, all free text
   vs half of them under a grammar (an array of >= 50 records, so none finishes early);
   output tok/s of each, `--repeats` times in alternating order, medians and the ratio. Also the
   mask fill time per constrained row and the time the engine waited for masks.
Offline engine (splitserve.llm.LLM): the same engine the workers run, without the network.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import jsonschema

from splitserve.common.sampling_params import SamplingParams
from splitserve.common.structured_output import StructuredOutput
from splitserve.engine.tiny_model import write_tiny_model
from splitserve.llm import LLM

NAME = {"type": "string", "maxLength": 24}
PERSON = {"type": "object", "properties": {
    "name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
    "member": {"type": "boolean"}},
    "required": ["name", "age", "pets", "member"], "additionalProperties": False}
SCHEMAS: list[dict[str, Any]] = [
    PERSON,
    {"type": "object", "properties": {
        "street": NAME, "city": NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
        "country": {"enum": ["FR", "DE", "US", "JP"]}, "floor": {"type": "integer"}},
     "required": ["city", "country", "zip"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 4,
                                                "items": {"type": "object", "properties": {
                                                    "sku": NAME,
                                                    "qty": {"type": "integer", "minimum": 1}},
                                                    "required": ["sku", "qty"],
                                                    "additionalProperties": False}}},
     "required": ["items"], "additionalProperties": False},
    {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
        "price": {"type": "number", "minimum": 0, "maximum": 1000}},
     "required": ["code", "price"], "additionalProperties": False},
    {"anyOf": [
        {"type": "object", "properties": {"status": {"const": "ok"},
                                          "value": {"type": "integer"}},
         "required": ["status", "value"], "additionalProperties": False},
        {"type": "object", "properties": {"status": {"const": "error"}, "message": NAME},
         "required": ["status", "message"], "additionalProperties": False}]},
    {"type": "object", "properties": {"event": NAME, "date": {"type": "string", "format": "date"},
                                      "attendees": {"type": "array", "items": PERSON,
                                                    "maxItems": 2}},
     "required": ["event", "date", "attendees"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5},
     "minItems": 2, "maxItems": 6},
    {"type": "object", "properties": {"title": NAME, "rating": {"enum": [1, 2, 3, 4, 5]},
                                      "tags": {"type": "array", "items": NAME, "maxItems": 3},
                                      "meta": {"type": "object", "properties": {
                                          "draft": {"type": "boolean"}},
                                               "required": ["draft"],
                                               "additionalProperties": False}},
     "required": ["title", "rating", "meta"], "additionalProperties": False},
]
QUESTIONS = ["Describe a person.", "Give me a shipping address.", "Write an order.",
             "Quote a product code and its price.", "Report the result of the job.",
             "Plan a small event.", "Pick a few small numbers.", "Review a book."]
RECORDS = {"type": "array", "items": PERSON, "minItems": 50}


def _prompt(llm: LLM, i: int, chat: bool) -> list[int]:
    schema = SCHEMAS[i % len(SCHEMAS)]
    question = QUESTIONS[i % len(QUESTIONS)]
    tok = llm.engine.tokenizer
    if not chat:
        return tok.encode(f"{question} JSON:")
    text = f"{question} Answer with JSON matching this schema: {json.dumps(schema)}"
    return tok.apply_chat_template([{"role": "user", "content": text}])


def validity(llm: LLM, num: int, chat: bool) -> dict[str, Any]:
    prompts = [_prompt(llm, i, chat) for i in range(num)]
    params = [SamplingParams(max_tokens=384, temperature=0.8, top_k=50, seed=i,
                             structured_output=StructuredOutput.json_schema(
                                 SCHEMAS[i % len(SCHEMAS)]))
              for i in range(num)]
    started = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - started
    checker = jsonschema.FormatChecker()
    ok, failures = 0, []
    for i, out in enumerate(outs):
        try:
            jsonschema.validate(json.loads(out.text), SCHEMAS[i % len(SCHEMAS)],
                                format_checker=checker)
            ok += 1
        except (ValueError, jsonschema.ValidationError) as exc:
            failures.append({"index": i, "finish": out.finish_reason, "text": out.text[:200],
                             "error": str(exc)[:200]})
    tokens = sum(len(o.token_ids) for o in outs)
    return {"requests": num, "valid": ok, "failures": failures[:5],
            "output_tokens": tokens, "seconds": round(elapsed, 1)}


def _cost_run(llm: LLM, prompts: list[list[int]], tokens: int, constrained: bool
              ) -> tuple[float, float, float, int]:
    """(output tok/s, mask fill s, mask wait s, constrained rows) of one batch."""
    spec = StructuredOutput.json_schema(RECORDS)
    params = [SamplingParams(max_tokens=tokens, temperature=0.8, top_k=50, seed=i,
                             ignore_eos=True,
                             structured_output=spec if constrained and i % 2 else None)
              for i in range(len(prompts))]
    stats = llm.engine.grammars.stats
    fill0, wait0, rows0 = stats.fill_s, stats.wait_s, stats.rows
    started = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - started
    assert all(len(o.token_ids) == tokens for o in outs), "a request finished early"
    return (sum(len(o.token_ids) for o in outs) / elapsed, stats.fill_s - fill0,
            stats.wait_s - wait0, stats.rows - rows0)


def cost(llm: LLM, tokens: int, repeats: int) -> dict[str, Any]:
    prompts = [_prompt(llm, i, chat=True) for i in range(32)]
    _cost_run(llm, prompts[:4], 8, True)  # warm up (the grammar tokenizer, kernels)
    free, half, fills, waits = [], [], [], []
    for i in range(repeats):
        for constrained in ((False, True) if i % 2 == 0 else (True, False)):  # alternate
            rate, fill, wait, rows = _cost_run(llm, prompts, tokens, constrained)
            if not constrained:
                free.append(rate)
                continue
            half.append(rate)
            fills.append(fill / max(rows, 1) * 1e6)
            waits.append(wait)
    return {"free_tok_s": [round(x, 1) for x in free],
            "half_constrained_tok_s": [round(x, 1) for x in half],
            "ratio_of_medians": round(statistics.median(half) / statistics.median(free), 3),
            "mask_fill_us_per_row_median": round(statistics.median(fills), 1),
            "engine_wait_for_masks_s_median": round(statistics.median(waits), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-validity", action="store_true")
    args = ap.parse_args()
    report: dict[str, Any] = {}
    smollm2 = LLM(model="smollm2-135m")
    if not args.skip_validity:
        with tempfile.TemporaryDirectory() as tmp:
            tiny = Path(tmp) / "tiny"
            write_tiny_model(tiny, num_heads=4, num_kv_heads=2)
            report["random_weights"] = validity(LLM(model=str(tiny)), args.num, chat=False)
        report["smollm2"] = validity(smollm2, args.num, chat=True)
        print(json.dumps(report, indent=1), flush=True)
    report["cost_batch32"] = cost(smollm2, args.tokens, args.repeats)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
