"""A record of every engine step, for finding where a deployment's time goes.

With SPLITSERVE_STEP_TRACE=DIR each engine appends one JSON line per step to
DIR/steps-<pid>-<n>.jsonl (n: the engine's number within its process), line-buffered so
that a worker stopped by a signal leaves every finished step on disk:

    {"t": wall-clock start (s), "ms": the forward pass and sampling, "seqs": sequences in
     the step, "prompt_tokens": prompt tokens computed, "decode": sequences decoding,
     "gap_ms": wall time since the previous step ended (the engine loop's own work between
     steps: commands, dispatching outputs, waiting for requests), "decode_context": the
     tokens the decoding sequences held before the step, summed (each attends over its
     own plus the one it decodes)}

`summarize` turns a window of records into the figures that tell a served run from an
offline one: how much of the wall time the engine spent stepping, in which kinds of step,
at what batch size.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from splitserve.common import envs

_engine_numbers = itertools.count()


class StepTrace:
    """Appends one line per step to a file of its own."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file: IO[str] | None = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self._last_end: float | None = None

    def record(self, started: float, seconds: float, num_seqs: int, prompt_tokens: int,
               num_decode: int, decode_context: int = 0) -> None:
        """One step that started at wall time `started` and took `seconds`."""
        if self._file is None:
            return
        gap = 0.0 if self._last_end is None else max(0.0, started - self._last_end)
        self._last_end = started + seconds
        self._file.write(json.dumps({
            "t": round(started, 6), "ms": round(seconds * 1e3, 3), "seqs": num_seqs,
            "prompt_tokens": prompt_tokens, "decode": num_decode,
            "gap_ms": round(gap * 1e3, 3), "decode_context": decode_context}) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def from_env() -> StepTrace | None:
    """The trace SPLITSERVE_STEP_TRACE asks for (a new file per engine), or None."""
    folder = envs.step_trace_dir()
    if folder is None:
        return None
    return StepTrace(folder / f"steps-{os.getpid()}-{next(_engine_numbers)}.jsonl")


def read(path: Path) -> list[dict[str, Any]]:
    """The records of one trace file (a torn last line, from a process killed mid-write,
    is skipped)."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


@dataclass(frozen=True)
class StepSummary:
    """One engine's steps within a window of time."""

    steps: int
    window_s: float  # the window asked for (its end less its start, when both are given)
    wall_s: float  # from the first step's start to the last step's end
    stepping_s: float  # the steps themselves
    decode_steps: int  # steps with no prompt token
    decode_step_ms: float  # their median
    decode_batch: float  # their mean number of sequences
    prompt_steps: int  # steps computing prompt tokens (alone or beside decodes)
    prompt_step_ms: float  # their median
    prompt_tokens_per_step: float  # their mean
    gap_ms: float  # the median wall time between two steps

    @property
    def stepping_share(self) -> float:
        """The share of the window the engine spent stepping."""
        return self.stepping_s / self.window_s if self.window_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "stepping_share": self.stepping_share}


def summarize(records: Iterable[dict[str, Any]], start: float = float("-inf"),
              end: float = float("inf")) -> StepSummary | None:
    """The steps that started within [start, end); None when there is none."""
    window = [r for r in records if start <= r["t"] < end]
    if not window:
        return None
    decode = [r for r in window if r["prompt_tokens"] == 0]
    prompt = [r for r in window if r["prompt_tokens"] > 0]
    last = max(window, key=lambda r: r["t"] + r["ms"] / 1e3)
    gaps = [r["gap_ms"] for r in window[1:]]
    wall_s = last["t"] + last["ms"] / 1e3 - window[0]["t"]
    return StepSummary(
        steps=len(window),
        window_s=end - start if math.isfinite(end - start) else wall_s,
        wall_s=wall_s,
        stepping_s=sum(r["ms"] for r in window) / 1e3,
        decode_steps=len(decode),
        decode_step_ms=statistics.median(r["ms"] for r in decode) if decode else 0.0,
        decode_batch=statistics.fmean(r["seqs"] for r in decode) if decode else 0.0,
        prompt_steps=len(prompt),
        prompt_step_ms=statistics.median(r["ms"] for r in prompt) if prompt else 0.0,
        prompt_tokens_per_step=(statistics.fmean(r["prompt_tokens"] for r in prompt)
                                if prompt else 0.0),
        gap_ms=statistics.median(gaps) if gaps else 0.0)
