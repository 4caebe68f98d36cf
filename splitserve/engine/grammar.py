"""Structured output in the engine: one grammar matcher per constrained request, and the
token masks of a step, filled off the critical path.

The constraint library is llguidance (chosen by measurement over xgrammar, see
BENCHMARKS.md "Structured output"). Its matcher lives with the request (RequestState), and
its state is a function of the output tokens only: preemption by recompute keeps it as is;
a request resumed or handed over (the prefill worker samples the first token) replays its
earlier output into a fresh matcher (`new_matcher(replay=...)`).

Per step, `StepMasks.start()` fills the bitmasks of every constrained request that samples
this step on a helper thread (llguidance drops the GIL while it computes) while the model's
forward runs; the sampler waits for them only after the logits exist. A bitmask row holds
one bit per vocabulary id (1: allowed), 32 ids per int32.
"""

from __future__ import annotations

import functools
import time
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from splitserve.common.structured_output import StructuredOutput
from splitserve.engine.sequence import Sequence
from splitserve.engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    from llguidance import LLMatcher


# Compiled grammars kept per engine (a deployment sees the same few schemas over and over;
# compiling a large one takes up to ~0.3 s, a copy of a compiled matcher well under 1 ms).
_COMPILED_GRAMMARS = 64


class GrammarCompiler:
    """Builds matchers for one engine's tokenizer and vocabulary (the llguidance tokenizer is
    built on first use: ~0.3 s for a 49k vocabulary). Compiled matchers are kept by grammar
    text, LRU, and each request gets a copy."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._pool: ThreadPoolExecutor | None = None
        self._compiled: OrderedDict[str, LLMatcher] = OrderedDict()
        self.stats = MaskStats()

    @functools.cached_property
    def _ll_tokenizer(self):  # type: ignore[no-untyped-def]
        import llguidance

        eos = sorted(self._tokenizer.eos_token_ids)
        return llguidance.LLTokenizer(self._tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                                      eos_token=eos or None)

    @functools.cached_property
    def _ll_executor(self):  # type: ignore[no-untyped-def]
        import llguidance

        # One thread: the model's forward owns the other cores while masks are filled.
        return llguidance.LLExecutor(num_threads=1)

    def new_matcher(self, spec: StructuredOutput, replay: Iterable[int] = ()) -> LLMatcher:
        """A matcher at the start of `spec`'s grammar, advanced over `replay` (output this
        request sampled before). ValueError when the grammar or the replay is refused."""
        matcher = self._fresh_matcher(spec.grammar())
        replay = list(replay)
        if replay and not matcher.consume_tokens(replay):
            raise ValueError("structured output: the request's earlier output does not "
                             f"follow its grammar ({matcher.get_error()})")
        return matcher

    def _fresh_matcher(self, grammar: str) -> LLMatcher:
        import llguidance

        pristine = self._compiled.get(grammar)
        if pristine is None:
            pristine = llguidance.LLMatcher(self._ll_tokenizer, grammar, log_level=0)
            if pristine.is_error():
                raise ValueError(f"structured output: {pristine.get_error()}")
            self._compiled[grammar] = pristine
            if len(self._compiled) > _COMPILED_GRAMMARS:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(grammar)
        return pristine.deep_copy()

    def start_masks(self, matchers: list[tuple[Sequence, LLMatcher]]) -> StepMasks:
        """Begin filling one bitmask row per (sequence, matcher), in that order."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
        bitmask = torch.full((len(matchers), (self.vocab_size + 31) // 32), -1,
                             dtype=torch.int32)
        rows = {seq.request_id: i for i, (seq, _) in enumerate(matchers)}
        pairs = [(m, i) for i, (_, m) in enumerate(matchers)]
        future = self._pool.submit(self._fill, pairs, bitmask)
        return StepMasks(rows, future, self.stats)

    def _fill(self, pairs: list[tuple[LLMatcher, int]], bitmask: torch.Tensor) -> torch.Tensor:
        # What llguidance.torch.fill_next_token_bitmask_par does, without importing that
        # module (its torch.compile decorator pulls in torch._dynamo: seconds, ~200 MB).
        started = time.perf_counter()
        self._ll_executor.unsafe_compute_mask_ptr(pairs, bitmask.data_ptr(),
                                                  bitmask.shape[1] * 4, bitmask.shape[0])
        self.stats.fill_s += time.perf_counter() - started
        self.stats.rows += len(pairs)
        return bitmask

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


@dataclass(slots=True)
class MaskStats:
    """Where structured output spends time: filling masks (on the helper thread) and
    waiting for them (on the engine thread, after the forward pass)."""

    steps: int = 0
    rows: int = 0
    fill_s: float = 0.0
    wait_s: float = 0.0


@dataclass(frozen=True)
class StepMasks:
    """The bitmasks of one step's constrained requests, being filled."""

    rows: dict[str, int]  # request id -> row of the bitmask
    future: Future[torch.Tensor]
    stats: MaskStats

    def for_batch(self, request_ids: list[str]) -> tuple[list[int], torch.Tensor] | None:
        """(positions in `request_ids` that are constrained, their bitmask rows), waiting for
        the fill; None when none of them is constrained."""
        positions = [i for i, rid in enumerate(request_ids) if rid in self.rows]
        if not positions:
            return None
        started = time.perf_counter()
        bitmask = self.future.result()
        self.stats.wait_s += time.perf_counter() - started
        self.stats.steps += 1
        index = torch.tensor([self.rows[request_ids[i]] for i in positions])
        return positions, bitmask.index_select(0, index)


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool [rows, vocab_size] from int32 bitmask rows [rows, ceil(vocab / 32)] (CPU; bit
    i of word w is token 32 w + i, little-endian as llguidance writes it)."""
    packed = bitmask.contiguous().numpy().view(np.uint8)
    bits = np.unpackbits(packed, axis=-1, bitorder="little")[:, :vocab_size]
    return torch.from_numpy(bits).bool()
