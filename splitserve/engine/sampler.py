"""Per-request sampling within one batch.

Rows with logit_bias or penalties get them first (in that order: bias, repetition penalty
on prompt and output tokens, then frequency and presence penalties on output tokens, as
vLLM applies them); rows under a grammar (structured output) then lose every token their
bitmask forbids. Greedy rows take the argmax. Other rows apply temperature, top-k, top-p
and min-p, then draw with the exponential-race trick (argmax of probs / Exp(1) noise), the
noise coming from the request's own generator: a seeded request samples the same tokens
whatever else shares its batch. Logprobs are of the raw model distribution (before
penalties and temperature).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitserve.common.outputs import TokenLogprobs
from splitserve.common.sampling_params import SamplingParams
from splitserve.engine.grammar import allowed_tokens


@dataclass(frozen=True, slots=True)
class TokenHistory:
    """What a penalized row has seen: every token so far, and the output among them."""

    token_ids: list[int]
    output_ids: list[int]


@dataclass(slots=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    histories: list[TokenHistory | None] | None = None,
    token_mask: tuple[list[int], torch.Tensor] | None = None,
) -> SampleResult:
    """logits: fp32 [num_rows, vocab]; one params and one generator per row, and a history
    for each row whose params adjust the logits. `token_mask`: (rows, int32 bitmask rows)
    for the rows under a grammar (engine.grammar)."""
    num_rows = logits.shape[0]
    raw = logits
    adjusted = [i for i, p in enumerate(params) if p.adjusts_logits]
    if adjusted or token_mask is not None:
        logits = logits.clone()
        for i in adjusted:
            history = histories[i] if histories is not None else None
            if history is None:
                raise ValueError(f"row {i} has penalties or logit_bias but no token history")
            adjust_logits(logits[i], params[i], history)
    if token_mask is not None:
        rows, bitmask = token_mask
        index = torch.tensor(rows, device=logits.device)
        allowed = allowed_tokens(bitmask, logits.shape[1]).to(logits.device)
        logits.index_copy_(0, index, logits.index_select(0, index)
                           .masked_fill_(~allowed, float("-inf")))
    # max(dim).indices is argmax (first maximal index) but ~2.5x faster on CPU.
    chosen = logits.max(dim=-1).indices
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if random_rows:
        index = torch.tensor(random_rows, device=logits.device)
        probs = _filtered_probs(logits.index_select(0, index), [params[i] for i in random_rows])
        for row, source in enumerate(random_rows):
            noise = torch.empty_like(probs[row]).exponential_(generator=generators[source])
            chosen[source] = torch.argmax(probs[row] / noise)
    token_ids = chosen.tolist()
    logprobs: list[TokenLogprobs | None] = [None] * num_rows
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    if wanted:
        log_probs = torch.log_softmax(raw, dim=-1)
        for i in wanted:
            n = params[i].logprobs or 0
            top_values, top_ids = torch.topk(log_probs[i], n) if n else (log_probs[i][:0],) * 2
            logprobs[i] = TokenLogprobs(
                token_id=token_ids[i],
                logprob=float(log_probs[i, token_ids[i]]),
                top=list(zip(top_ids.tolist(), top_values.tolist(), strict=True)),
            )
    return SampleResult(token_ids, logprobs)


def adjust_logits(row: torch.Tensor, params: SamplingParams, history: TokenHistory) -> None:
    """Apply logit_bias and penalties to one row of logits [vocab], in place."""
    device, vocab = row.device, row.shape[0]
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias], device=device)
        bias = torch.tensor([b for _, b in params.logit_bias], device=device, dtype=row.dtype)
        keep = ids < vocab  # ids past this vocabulary cannot be sampled anyway
        row.index_add_(0, ids[keep], bias[keep])
    if params.repetition_penalty != 1.0 and history.token_ids:
        seen = torch.unique(torch.tensor(history.token_ids, device=device))
        values = row[seen]
        penalty = params.repetition_penalty
        row[seen] = torch.where(values > 0, values / penalty, values * penalty)
    if (params.frequency_penalty or params.presence_penalty) and history.output_ids:
        ids, counts = torch.unique(torch.tensor(history.output_ids, device=device),
                                   return_counts=True)
        row[ids] -= (params.frequency_penalty * counts.to(row.dtype)
                     + params.presence_penalty)


def skip_sample_draw(generator: torch.Generator, vocab_size: int) -> None:
    """Advance `generator` exactly as one sampled token does (see sample())."""
    torch.empty(vocab_size, device=generator.device).exponential_(generator=generator)


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p masks; returns probabilities [rows, vocab]."""
    device = logits.device
    temperatures = torch.tensor([p.temperature for p in params], device=device).unsqueeze(1)
    logits = logits / temperatures
    vocab = logits.shape[1]
    rows = [i for i, p in enumerate(params) if 0 < p.top_k < vocab]
    if rows:
        # The k-th largest logit of each row from one topk over the largest k asked for
        # (a full sort of [rows, vocab] costs ~50x more on CPU at a 49k vocabulary).
        index = torch.tensor(rows, device=device)
        k = torch.tensor([params[i].top_k for i in rows], device=device)
        sub = logits.index_select(0, index)
        kth = torch.topk(sub, int(k.max()), dim=-1).values.gather(1, (k - 1).unsqueeze(1))
        logits = logits.index_copy(0, index, sub.masked_fill(sub < kth, float("-inf")))
    top_ps = [p.top_p for p in params]
    if any(p < 1.0 for p in top_ps):
        sorted_logits, sorted_ids = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        top_p = torch.tensor(top_ps, device=device).unsqueeze(1)
        # The most likely token always survives; rows with top_p == 1 keep everything.
        drop_sorted = (mass_before >= top_p) & (top_p < 1.0)
        drop_sorted[:, 0] = False  # even when a tiny top_p rounds to 0 in float32
        drop = torch.zeros_like(drop_sorted).scatter(1, sorted_ids, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    min_ps = [p.min_p for p in params]
    if any(m > 0.0 for m in min_ps):
        min_p = torch.tensor(min_ps, device=device).unsqueeze(1)
        threshold = probs.max(dim=-1, keepdim=True).values * min_p
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs
