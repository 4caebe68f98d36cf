"""Turns sampled tokens into text deltas and finish decisions for one request.

Stop strings are matched on the detokenized text and never emitted: text that could still
be the beginning of a stop string is held back until it is known not to be one.
"""

from __future__ import annotations

from collections.abc import Collection

from splitserve.common.sampling_params import SamplingParams
from splitserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer


class StopChecker:
    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: Collection[int],
        max_model_len: int,
    ):
        self.params = params
        self.detokenizer = IncrementalDetokenizer(
            tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens
        )
        self._eos = frozenset() if params.ignore_eos else frozenset(eos_token_ids)
        self._stop_ids = frozenset(params.stop_token_ids)
        self._max_total = max_model_len
        self._num_prompt = len(prompt_token_ids)
        self._num_output = 0
        self._text = ""  # all output text, stop-string truncation applied
        self._emitted = 0  # characters of _text already returned
        self._stopped_on_string = False

    @property
    def text(self) -> str:
        return self._text

    def add(self, token_id: int, finish: str | None = None) -> tuple[str, str | None]:
        """Account one sampled token. Returns (text delta to emit, finish reason or None).
        `finish`: a reason decided elsewhere for this token (a grammar that is complete or
        refused it); a stop token or stop string still takes precedence."""
        self._num_output += 1
        reason: str | None = None
        if token_id in self._eos or token_id in self._stop_ids:
            reason = "stop"
        else:
            self._text += self.detokenizer.add([token_id])
            if self.params.stop and self._truncate_at_stop():
                reason = "stop"
        if reason is None:
            reason = finish
        if reason is None:
            if self._num_output >= self.params.max_tokens:
                reason = "length"
            elif self._num_prompt + self._num_output >= self._max_total:
                reason = "length"
        if reason is not None and not self._stopped_on_string:
            self._text += self.detokenizer.flush()
        return self._take_delta(final=reason is not None), reason

    def _truncate_at_stop(self) -> bool:
        longest = max(len(s) for s in self.params.stop)
        search_from = max(0, self._emitted - longest)
        positions = [self._text.find(s, search_from) for s in self.params.stop]
        hits = [p for p in positions if p >= 0]
        if not hits:
            return False
        self._text = self._text[: min(hits)]
        self._stopped_on_string = True
        return True

    def _take_delta(self, final: bool) -> str:
        end = len(self._text)
        if not final and self.params.stop:
            end -= held_back_length(self._text, self.params.stop)
        end = max(end, self._emitted)
        delta = self._text[self._emitted : end]
        self._emitted = end
        return delta


def held_back_length(text: str, markers: Collection[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some marker: what a
    stream must hold back until it knows whether a marker (a stop string, a tag) begins."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best
