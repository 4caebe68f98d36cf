"""A worker's per-request state (pure Python).

Token accounting is explicit: `token_ids` holds prompt + output; `num_computed_tokens` of
them have KV in the cache; `num_cached_tokens` of those came from the prefix cache. The
tokens still to compute are token_ids[num_computed_tokens:]; a decode step computes one.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from splitserve.common.sampling_params import SamplingParams
from splitserve.engine.block_hash import compute_block_hashes
from splitserve.engine.pacing import PaceClock

_arrival_counter = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued (new, or preempted and waiting to recompute)
    RUNNING = "running"  # holds blocks and is scheduled every step
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    arrival_index: int = field(default_factory=lambda: next(_arrival_counter))
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    # The prompt's last tokens that are this request's own earlier output (a resumed or
    # migrated request): penalties count them as output.
    num_prior_outputs: int = 0
    # Scheduling class, lower first (the request's `priority`): a better class is admitted
    # first and may preempt a worse one's running sequence, never the reverse. Aging in the
    # scheduler lowers it by one per priority_aging_s waited (kept once earned).
    priority: int = 0
    # When the scheduler first queued it (its clock), and the classes aging has taken off.
    queued_since: float | None = None
    aged_classes: int = 0
    # Who sent it (the router's name for the client): fair share across clients in the
    # scheduler (engine/fair_share.py). "" for a caller that names none.
    client: str = ""
    # A paced stream's reader model (engine/pacing.py): the scheduler lets the sequence
    # sit out decode steps while it is far enough ahead. None: not paced.
    pace: PaceClock | None = None
    # Chained hashes of full blocks of token_ids, extended lazily (see block_hashes()).
    _block_hashes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def penalized_output_ids(self) -> list[int]:
        """The output so far as presence/frequency penalties see it (earlier output that
        came back inside the prompt included)."""
        return self.token_ids[len(self.prompt_token_ids) - self.num_prior_outputs:]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        """More than the newest token still lacks KV (a prompt, or a recompute after preemption)."""
        return self.num_uncomputed_tokens > 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def block_hashes(self, block_size: int) -> list[int]:
        """Hashes of every full block of token_ids (computed once, extended as tokens arrive)."""
        if len(self._block_hashes) < len(self.token_ids) // block_size:
            self._block_hashes = compute_block_hashes(
                self.token_ids, block_size, self._block_hashes
            )
        return self._block_hashes

    def reset_for_recompute(self) -> None:
        """Preemption by recompute: drop all KV; output tokens so far are kept and recomputed."""
        self.block_table = []
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.status = SequenceStatus.WAITING
        self.num_preemptions += 1
