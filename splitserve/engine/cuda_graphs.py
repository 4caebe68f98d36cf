"""CUDA graphs for decode steps: one captured forward per batch size of a ladder.

A decode step on a GPU is bound by the host: hundreds of small kernel launches for a few
milliseconds of GPU work. `DecodeGraphs` captures the model's forward (embedding to final
norm) once per size of `capture_sizes(max_num_seqs)` over static input buffers, and a step
of n decoding sequences replays the graph of the smallest captured size >= n:

    static ids, positions, slots:   int64 [3, max_size]
    static context lengths, tables: int32 [max_size] then [max_size, max_blocks_per_seq],
                                    one buffer (two copies in per step)
    row r < n:   the r-th sequence's token, position, slot, table and context length
    row r >= n:  padding: token 0 at position 0, slot -1 (the KV store skips it), context 1
                 (it attends to slot 0 of whatever block its stale table row names: finite
                 numbers, never written, rows discarded)

Graph safety: the inputs are written into pinned host buffers and copied to the static
buffers without blocking; the Triton decode kernel gets a split count fixed per size (for
the longest context a sequence may reach, so no launch reads the context lengths) and a
scratch from one flat buffer owned here; warm-up runs precede each capture so lazily built
tensors (Hadamard matrices, Triton compilations) exist before capture. Sizes are captured
largest first into one shared memory pool. Prefill and mixed steps, steps that exceed the
largest size or the table width, and steps with a layer hook (layer-wise KV streaming) run
eagerly. The logits and sampling stay outside the graph (one matmul on the sampled rows).

On a CPU the same class runs with `capture=False`: each step writes the static buffers and
runs the forward eagerly on them, so the padding and bucketing are exercised by the CPU
tests (tokens must equal the plain eager path's); only the capture itself needs a GPU.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.scheduler import ScheduledSequence
from splitserve.kernels.attention_plan import choose_num_splits, scratch_elements, scratch_view

__all__ = ["DecodeGraphs", "capture_sizes", "padded_size"]

_MAX_CAPTURE_SIZE = 512
_ROWS = 3  # ids, positions, slots: one int64 row each


def capture_sizes(max_num_seqs: int, limit: int = _MAX_CAPTURE_SIZE) -> list[int]:
    """The batch-size ladder: 1, 2, 4, 8, then every multiple of 8, up to max_num_seqs
    (itself included) and at most `limit`."""
    top = max(1, min(max_num_seqs, limit))
    sizes = [s for s in (1, 2, 4) if s < top]
    sizes += range(8, top, 8)
    return sorted({*sizes, top})


def padded_size(sizes: Sequence[int], num_seqs: int) -> int | None:
    """The smallest size of the (sorted) ladder that holds num_seqs, or None."""
    index = bisect.bisect_left(sizes, num_seqs)
    return sizes[index] if index < len(sizes) else None


@dataclass(frozen=True)
class DecodeRows:
    """One step's decode rows as host lists, in the scheduled order."""

    token_ids: list[int]
    positions: list[int]
    slots: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    sample_rows: list[int]  # rows that complete (sample) this step
    sampling: list[ScheduledSequence]

    @classmethod
    def of(cls, scheduled: list[ScheduledSequence], block_size: int) -> DecodeRows:
        ids, positions, slots, lens, tables, rows, sampling = [], [], [], [], [], [], []
        for row, item in enumerate(scheduled):
            seq = item.seq
            pos = seq.num_computed_tokens
            table = seq.block_table
            ids.append(seq.token_ids[pos])
            positions.append(pos)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
            lens.append(pos + 1)
            tables.append(table)
            if item.completes:
                rows.append(row)
                sampling.append(item)
        return cls(ids, positions, slots, lens, tables, rows, sampling)


# The model's forward: (input_ids, positions, meta) -> final hidden states [n, hidden].
Forward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]
# Per-step extras the attention backend needs that a graph cannot hold (the torch
# backend's decode plan, computed on the host): (meta) -> None, filling it in.
PlanHook = Callable[[AttentionMetadata], None]


class DecodeGraphs:
    def __init__(
        self,
        forward: Forward,
        *,
        device: torch.device,
        sizes: list[int],
        block_size: int,
        max_blocks_per_seq: int,
        capture: bool,
        triton_launch: tuple[int, int, int, int, int] | None = None,
        plan_hook: PlanHook | None = None,
    ) -> None:
        """`triton_launch`: (num_heads, num_kv_heads, head_dim, max_context_len, num_sms)
        when the decode kernel is the Triton one (its split count and scratch are fixed per
        size); `capture`: record CUDA graphs (else replay eagerly on the static buffers)."""
        if not sizes or sizes != sorted(set(sizes)):
            raise ValueError(f"capture sizes must be sorted and distinct, got {sizes}")
        self.sizes = sizes
        self.block_size = block_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self.device = device
        self._forward = forward
        self._plan_hook = plan_hook
        top = sizes[-1]
        pin = device.type == "cuda"
        table_len = top + top * max_blocks_per_seq
        self._vectors = torch.zeros(_ROWS, top, dtype=torch.int64, device=device)
        self._int32 = torch.zeros(table_len, dtype=torch.int32, device=device)
        self._host_vectors = torch.zeros(_ROWS, top, dtype=torch.int64, pin_memory=pin)
        self._host_int32 = torch.zeros(table_len, dtype=torch.int32, pin_memory=pin)
        self._lens, self._tables = self._split_int32(self._int32)
        self._host_lens, self._host_tables = self._split_int32(self._host_int32)
        self._launch = self._launch_args(triton_launch)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays = 0  # steps served from the static buffers (graphs or not)
        if capture:
            self._capture_all()

    # ---- set-up ----------------------------------------------------------------------------
    def _split_int32(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top = self.sizes[-1]
        return flat[:top], flat[top:].view(top, self.max_blocks_per_seq)

    def _launch_args(self, triton_launch: tuple[int, int, int, int, int] | None
                     ) -> dict[int, dict[str, Any]]:
        """Per size: the Triton decode kernel's fixed split count and its scratch view."""
        if triton_launch is None:
            return {}
        num_heads, num_kv_heads, head_dim, max_context_len, num_sms = triton_launch
        splits = {n: choose_num_splits(n, num_kv_heads, max_context_len, num_sms)
                  for n in self.sizes}
        need = [scratch_elements(n, num_heads, head_dim, s) for n, s in splits.items()]
        flat = (torch.empty(max(o for o, _ in need), dtype=torch.float32, device=self.device),
                torch.empty(max(lse for _, lse in need), dtype=torch.float32, device=self.device))
        self._scratch = flat  # kept alive: the graphs hold pointers into it
        return {n: {"num_splits": s,
                    "scratch": scratch_view(*flat, n, num_heads, head_dim, s) if s > 1 else None}
                for n, s in splits.items()}

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):  # largest first: the smaller ones reuse its pool
            self._write_padding(0, size)
            self._copy_in(size)
            for _ in range(2):  # compile kernels, build cached tensors, settle cuBLAS
                self._run_forward(size)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self._run_forward(size)
            self._graphs[size] = (graph, hidden)
        torch.cuda.synchronize(self.device)

    # ---- one step --------------------------------------------------------------------------
    def can_run(self, scheduled: list[ScheduledSequence]) -> bool:
        """Whether this step is all single-token rows that fit a size and the table width."""
        if not scheduled or len(scheduled) > self.sizes[-1]:
            return False
        width = self.max_blocks_per_seq
        return all(s.num_tokens == 1 and len(s.seq.block_table) <= width for s in scheduled)

    def run(self, scheduled: list[ScheduledSequence]
            ) -> tuple[torch.Tensor, list[int], list[ScheduledSequence]]:
        """Run the step; returns the hidden states of its n rows [n, hidden], the rows that
        sample and their scheduled sequences."""
        rows = DecodeRows.of(scheduled, self.block_size)
        n = len(rows.token_ids)
        size = padded_size(self.sizes, n)
        assert size is not None, (n, self.sizes)
        self._write_rows(rows)
        self._write_padding(n, size)
        self._copy_in(size)
        graph = self._graphs.get(size)
        if graph is not None:
            graph[0].replay()
            hidden = graph[1]
        else:
            hidden = self._run_forward(size)
        self.replays += 1
        return hidden[:n], rows.sample_rows, rows.sampling

    def _write_rows(self, rows: DecodeRows) -> None:
        n = len(rows.token_ids)
        self._host_vectors[:, :n] = torch.tensor([rows.token_ids, rows.positions, rows.slots],
                                                 dtype=torch.int64)
        self._host_lens[:n] = torch.tensor(rows.context_lens, dtype=torch.int32)
        width = max(len(t) for t in rows.block_tables)
        padded = [t + [0] * (width - len(t)) for t in rows.block_tables]
        self._host_tables[:n, :width] = torch.tensor(padded, dtype=torch.int32)

    def _write_padding(self, start: int, stop: int) -> None:
        if start >= stop:
            return
        host = self._host_vectors
        host[0:2, start:stop] = 0  # token 0 at position 0
        host[2, start:stop] = -1  # no KV slot: the store skips the row
        self._host_lens[start:stop] = 1  # one token of context

    def _copy_in(self, size: int) -> None:
        """Host staging -> static device buffers, without blocking (pinned on CUDA). The
        staging is rewritten only after the previous step's sampled ids came back, which
        waited for these copies."""
        self._vectors.copy_(self._host_vectors, non_blocking=True)  # a few KiB
        used = self.sizes[-1] + size * self.max_blocks_per_seq  # the lens, then size rows
        self._int32[:used].copy_(self._host_int32[:used], non_blocking=True)

    def _run_forward(self, size: int) -> torch.Tensor:
        vectors = self._vectors
        meta = AttentionMetadata(
            slot_mapping=vectors[2, :size],
            num_decode_tokens=size,
            decode_block_tables=self._tables[:size],
            decode_context_lens=self._lens[:size],
            decode_launch=self._launch.get(size),
        )
        if self._plan_hook is not None:
            self._plan_hook(meta)
        return self._forward(vectors[0, :size], vectors[1, :size], meta)
