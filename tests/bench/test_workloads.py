"""Workloads: seeded determinism, length distributions, shared prefixes, growing turns."""

from __future__ import annotations

import itertools
import json
import math
import statistics
from pathlib import Path

import pytest

from splitserve.bench.text import WORDS
from splitserve.bench.workloads import BenchRequest, WorkloadConfig, load_dataset, make_workload


def take(cfg: WorkloadConfig, n: int) -> list[BenchRequest]:
    return list(itertools.islice(make_workload(cfg), n))


def n_words(text: str) -> int:
    return len(text.split())


@pytest.mark.parametrize("kind", ["synthetic", "fixed", "shared-prefix", "multi-turn", "mixed"])
def test_same_seed_same_requests_other_seed_different(kind: str) -> None:
    a = take(WorkloadConfig(kind=kind, seed=7), 20)
    b = take(WorkloadConfig(kind=kind, seed=7), 20)
    c = take(WorkloadConfig(kind=kind, seed=8), 20)
    assert a == b
    assert [r.as_prompt() for r in a] != [r.as_prompt() for r in c]


def test_prompts_use_only_word_list_and_match_estimate() -> None:
    vocab = set(WORDS)
    for r in take(WorkloadConfig(kind="synthetic", seed=1), 50):
        tokens = r.as_prompt().split()
        assert set(tokens) <= vocab
        assert len(tokens) == r.prompt_len


def test_synthetic_lengths_are_heavy_tailed_and_capped() -> None:
    cfg = WorkloadConfig(kind="synthetic", seed=0, max_input_len=1024, max_output_len=512)
    reqs = take(cfg, 4000)
    inputs = [r.prompt_len for r in reqs]
    outputs = [r.max_tokens for r in reqs]
    # Lognormal medians 200 / 150 (sigma 1.0 / 0.8); the caps only touch the far tail.
    assert 185 <= statistics.median(inputs) <= 215
    assert 140 <= statistics.median(outputs) <= 160
    assert max(inputs) == 1024 and max(outputs) == 512
    assert min(inputs) >= 4 and min(outputs) >= 4
    # Heavy tail: the mean sits well above the median (lognormal: e^(sigma^2/2) ~ 1.65).
    assert statistics.mean(inputs) > 1.4 * statistics.median(inputs)
    # Log-space spread close to sigma = 1 (clipping shrinks it a little).
    assert 0.85 <= statistics.pstdev(math.log(x) for x in inputs) <= 1.05
    assert all(r.ignore_eos for r in reqs)


def test_fixed_lengths_exact() -> None:
    for r in take(WorkloadConfig(kind="fixed", input_len=37, output_len=11), 10):
        assert n_words(r.as_prompt()) == 37 == r.prompt_len
        assert r.max_tokens == 11


def test_shared_prefix_really_shared_and_questions_distinct() -> None:
    cfg = WorkloadConfig(kind="shared-prefix", prefix_len=300, question_len=10, seed=3)
    prompts = [r.as_prompt() for r in take(cfg, 30)]
    prefixes = {p.split("\n\n")[0] for p in prompts}
    assert len(prefixes) == 1 and n_words(prefixes.pop()) == 300
    questions = [p.split("\n\n")[1] for p in prompts]
    assert len(set(questions)) == 30 and all(n_words(q) == 10 for q in questions)


def test_shared_prefix_groups() -> None:
    cfg = WorkloadConfig(kind="shared-prefix", prefix_len=50, num_prefixes=3, seed=3)
    reqs = take(cfg, 60)
    by_tag: dict[str, set[str]] = {}
    for r in reqs:
        by_tag.setdefault(r.tag, set()).add(r.as_prompt().split("\n\n")[0])
    assert sorted(by_tag) == ["prefix-0", "prefix-1", "prefix-2"]
    assert all(len(p) == 1 for p in by_tag.values())  # one prefix per group
    assert len(set().union(*by_tag.values())) == 3  # groups differ


def test_multi_turn_grows_and_includes_previous_turns() -> None:
    cfg = WorkloadConfig(kind="multi-turn", num_turns=3, input_len=5, output_len=7, seed=2)
    reqs = take(cfg, 24)  # one group: 8 conversations x 3 turns, turn-major
    for index, r in enumerate(reqs):
        turn, conv = divmod(index, 8)
        assert r.messages is not None and r.tag == f"turn-{turn + 1}"
        assert len(r.messages) == 2 * turn + 1
        assert [m["role"] for m in r.messages] == ["user", "assistant"] * turn + ["user"]
        assert r.prompt_len == turn * 12 + 5 == sum(n_words(m["content"]) for m in r.messages)
        if turn == 0:
            assert r.depends_on is None
        else:
            prev = reqs[r.depends_on]
            assert r.depends_on == index - 8 < index
            assert r.messages[: len(prev.messages)] == prev.messages  # strict prefix
            assert r.messages[len(prev.messages)]["role"] == "assistant"
    assert reqs[24 - 1].as_prompt().startswith(reqs[7].as_prompt())
    nxt = take(cfg, 25)[24]  # the next group starts fresh
    assert nxt.depends_on is None and len(nxt.messages or []) == 1


def test_mixed_fraction_of_long_prompts() -> None:
    cfg = WorkloadConfig(kind="mixed", input_len=64, long_input_len=1000, long_fraction=0.2)
    reqs = take(cfg, 2000)
    long = [r for r in reqs if r.tag == "long"]
    assert 0.17 <= len(long) / len(reqs) <= 0.23
    assert all(r.prompt_len == 1000 for r in long)
    assert all(r.prompt_len == 64 for r in reqs if r.tag == "short")


def test_dataset_file(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    lines = [{"prompt": "hello there world", "max_tokens": 5},
             {"messages": [{"role": "system", "content": "be brief"},
                           {"role": "user", "content": "why is the sky blue"}]}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    cfg = WorkloadConfig(kind="dataset", dataset=str(path), output_len=9)
    reqs = take(cfg, 5)
    assert [r.max_tokens for r in reqs] == [5, 9, 5, 9, 5]  # cycles in file order
    assert reqs[0].prompt == "hello there world" and reqs[0].prompt_len == 3
    assert reqs[1].messages == lines[1]["messages"] and reqs[1].prompt_len == 7
    assert reqs[1].as_prompt() == "be brief\n\nwhy is the sky blue"


def test_dataset_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{"messages": "nope"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_dataset(path, 16)


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        WorkloadConfig(kind="nope")
    with pytest.raises(ValueError):
        WorkloadConfig(kind="dataset")  # no file
    with pytest.raises(ValueError):
        WorkloadConfig(kind="mixed", long_fraction=1.5)
    with pytest.raises(ValueError):
        BenchRequest(prompt="a", messages=[{"role": "user", "content": "a"}])
