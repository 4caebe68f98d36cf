"""Seeded request streams for `splitserve bench serve`.

A workload is an endless iterator of BenchRequest; the runner takes as many as --num-requests
and --duration allow. The same WorkloadConfig (seed included) always yields the same requests,
so runs against different engines or rates send identical prompts. Prompt text comes from
`text.words` (~1 token per word, see text.py); `prompt_len` is that estimate.

| kind          | prompts                                                                   |
|---------------|---------------------------------------------------------------------------|
| synthetic     | lognormal lengths, ShareGPT-like: input median --input-len (200), output  |
|               | median --output-len (150), capped by --max-input-len / --max-output-len   |
| fixed         | exactly --input-len words, --output-len tokens                            |
| shared-prefix | one of --num-prefixes long system prompts (--prefix-len) + a distinct     |
|               | question of --question-len words                                          |
| multi-turn    | chat conversations of --num-turns turns; turn t carries turns 1..t-1      |
|               | (user + assistant) before its new user message                            |
| mixed         | --input-len prompts, a --long-fraction of them --long-input-len long      |
| dataset       | a JSONL file (--dataset): {"prompt": str} or {"messages": [...]} per line, |
|               | optional "max_tokens"; cycled in file order                               |
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from splitserve.bench.text import count_words, words

KINDS = ("synthetic", "fixed", "shared-prefix", "multi-turn", "mixed", "dataset")
_MIN_LEN = 4  # shortest synthetic input / output, in tokens
_SIGMA_INPUT = 1.0  # lognormal shape of synthetic input lengths (log-space std)
_SIGMA_OUTPUT = 0.8
_CONVERSATIONS_PER_GROUP = 8  # multi-turn: conversations interleaved turn by turn

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class BenchRequest:
    """One request to send: a text prompt or chat messages (exactly one)."""

    prompt: str | None = None
    messages: Messages | None = None
    max_tokens: int = 128
    prompt_len: int = 0  # estimated prompt tokens (words); the server's usage wins if given
    ignore_eos: bool = True
    tag: str = ""  # class within the workload ("long" / "short", "turn-2", ...)
    # Index (in the workload stream) of a request that must finish before this one is sent:
    # a conversation's previous turn.
    depends_on: int | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a request has exactly one of prompt and messages")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    def as_prompt(self) -> str:
        """Text for a completions endpoint; messages are joined by blank lines."""
        if self.prompt is not None:
            return self.prompt
        return "\n\n".join(m["content"] for m in self.messages or [])

    def as_messages(self) -> Messages:
        """Messages for a chat endpoint; a text prompt becomes one user message."""
        if self.messages is not None:
            return self.messages
        return [{"role": "user", "content": self.prompt or ""}]


@dataclass(frozen=True)
class WorkloadConfig:
    """What to send. Lengths are tokens (approximated by words); None means the kind's
    default (see the module table)."""

    kind: str = "synthetic"
    seed: int = 0
    input_len: int | None = None
    output_len: int | None = None
    max_input_len: int = 1024
    max_output_len: int = 512
    prefix_len: int = 1000
    num_prefixes: int = 1
    question_len: int = 24
    num_turns: int = 4
    long_input_len: int = 1000
    long_fraction: float = 0.2
    dataset: str | None = None
    ignore_eos: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown workload {self.kind!r}; expected one of {KINDS}")
        if (self.kind == "dataset") != (self.dataset is not None):
            raise ValueError("--dataset FILE goes with the dataset workload (and only it)")
        for name in ("max_input_len", "max_output_len", "prefix_len", "num_prefixes",
                     "question_len", "num_turns", "long_input_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("input_len", "output_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0.0 <= self.long_fraction <= 1.0:
            raise ValueError(f"long_fraction must be in [0, 1], got {self.long_fraction}")

    @property
    def input_tokens(self) -> int:
        """Input length (synthetic: the median)."""
        if self.input_len is not None:
            return self.input_len
        return {"synthetic": 200, "multi-turn": 64}.get(self.kind, 128)

    @property
    def output_tokens(self) -> int:
        """Output length (synthetic: the median; dataset: when a line gives none)."""
        if self.output_len is not None:
            return self.output_len
        return {"synthetic": 150, "multi-turn": 64}.get(self.kind, 128)


def make_workload(cfg: WorkloadConfig) -> Iterator[BenchRequest]:
    """The endless, seeded request stream of `cfg`."""
    rng = random.Random(cfg.seed)
    if cfg.kind == "synthetic":
        return _synthetic(cfg, rng)
    if cfg.kind == "fixed":
        return _fixed(cfg, rng)
    if cfg.kind == "shared-prefix":
        return _shared_prefix(cfg, rng)
    if cfg.kind == "multi-turn":
        return _multi_turn(cfg, rng)
    if cfg.kind == "mixed":
        return _mixed(cfg, rng)
    assert cfg.dataset is not None
    # Loaded now, so a bad file fails here rather than inside a run.
    return _cycle(load_dataset(cfg.dataset, cfg.output_tokens, cfg.ignore_eos))


def lognormal_len(rng: random.Random, median: int, sigma: float, cap: int) -> int:
    """A heavy-tailed length: lognormal with this median, clipped to [_MIN_LEN, cap]."""
    value = int(round(rng.lognormvariate(math.log(median), sigma)))
    return max(min(value, cap), min(_MIN_LEN, cap))


def _synthetic(cfg: WorkloadConfig, rng: random.Random) -> Iterator[BenchRequest]:
    while True:
        n_in = lognormal_len(rng, cfg.input_tokens, _SIGMA_INPUT, cfg.max_input_len)
        n_out = lognormal_len(rng, cfg.output_tokens, _SIGMA_OUTPUT, cfg.max_output_len)
        yield BenchRequest(prompt=words(rng, n_in), max_tokens=n_out, prompt_len=n_in,
                           ignore_eos=cfg.ignore_eos)


def _fixed(cfg: WorkloadConfig, rng: random.Random) -> Iterator[BenchRequest]:
    while True:
        yield BenchRequest(prompt=words(rng, cfg.input_tokens), max_tokens=cfg.output_tokens,
                           prompt_len=cfg.input_tokens, ignore_eos=cfg.ignore_eos)


def _shared_prefix(cfg: WorkloadConfig, rng: random.Random) -> Iterator[BenchRequest]:
    prefixes = [words(rng, cfg.prefix_len) for _ in range(cfg.num_prefixes)]
    while True:
        group = rng.randrange(cfg.num_prefixes)
        prompt = prefixes[group] + "\n\n" + words(rng, cfg.question_len)
        yield BenchRequest(prompt=prompt, max_tokens=cfg.output_tokens,
                           prompt_len=cfg.prefix_len + cfg.question_len,
                           ignore_eos=cfg.ignore_eos,
                           tag=f"prefix-{group}" if cfg.num_prefixes > 1 else "")


def _mixed(cfg: WorkloadConfig, rng: random.Random) -> Iterator[BenchRequest]:
    while True:
        is_long = rng.random() < cfg.long_fraction
        n_in = cfg.long_input_len if is_long else cfg.input_tokens
        yield BenchRequest(prompt=words(rng, n_in), max_tokens=cfg.output_tokens,
                           prompt_len=n_in, ignore_eos=cfg.ignore_eos,
                           tag="long" if is_long else "short")


def _multi_turn(cfg: WorkloadConfig, rng: random.Random) -> Iterator[BenchRequest]:
    """Groups of conversations, emitted turn-major (every conversation's turn 1, then every
    turn 2, ...) so a turn's predecessor always comes earlier in the stream. Earlier
    assistant turns are seeded text of --output-len words, not the server's replies, so every
    engine receives identical prompts."""
    index = 0
    while True:
        turns: list[list[tuple[str, str]]] = [
            [(words(rng, cfg.input_tokens), words(rng, cfg.output_tokens))
             for _ in range(cfg.num_turns)]
            for _ in range(_CONVERSATIONS_PER_GROUP)]
        first_index = index
        for t in range(cfg.num_turns):
            for c, conversation in enumerate(turns):
                messages: Messages = []
                for user, assistant in conversation[:t]:
                    messages += [{"role": "user", "content": user},
                                 {"role": "assistant", "content": assistant}]
                messages.append({"role": "user", "content": conversation[t][0]})
                previous = first_index + (t - 1) * _CONVERSATIONS_PER_GROUP + c
                yield BenchRequest(messages=messages, max_tokens=cfg.output_tokens,
                                   prompt_len=t * (cfg.input_tokens + cfg.output_tokens)
                                   + cfg.input_tokens,
                                   ignore_eos=cfg.ignore_eos, tag=f"turn-{t + 1}",
                                   depends_on=previous if t > 0 else None)
                index += 1


def load_dataset(path: str | Path, default_max_tokens: int, ignore_eos: bool = True
                 ) -> list[BenchRequest]:
    """Parse a JSONL dataset; ValueError naming the line for a malformed entry."""
    requests = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                requests.append(_dataset_entry(json.loads(line), default_max_tokens,
                                               ignore_eos))
            except (ValueError, TypeError, KeyError) as err:
                raise ValueError(f"{path}:{lineno}: {err}") from err
    if not requests:
        raise ValueError(f"{path}: no requests")
    return requests


def _dataset_entry(entry: dict, default_max_tokens: int, ignore_eos: bool) -> BenchRequest:
    if not isinstance(entry, dict):
        raise TypeError("each line must be a JSON object")
    max_tokens = int(entry.get("max_tokens", default_max_tokens))
    if "prompt" in entry:
        if not isinstance(entry["prompt"], str):
            raise TypeError('"prompt" must be a string')
        return BenchRequest(prompt=entry["prompt"], max_tokens=max_tokens,
                            prompt_len=count_words(entry["prompt"]), ignore_eos=ignore_eos)
    messages = entry["messages"]
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages):
        raise TypeError('"messages" must be a list of {"role": str, "content": str}')
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    return BenchRequest(messages=messages, max_tokens=max_tokens,
                        prompt_len=sum(count_words(m["content"]) for m in messages),
                        ignore_eos=ignore_eos)


def _cycle(requests: list[BenchRequest]) -> Iterator[BenchRequest]:
    while True:
        yield from requests
