"""Latency-aware routing (`--route-policy latency`): the P/D pair with the best predicted
time to first token, from the step times each worker measures and publishes with its load
(common/step_time.py).

For a route, with the candidate workers' queued prompt tokens and running batches:
- TTFT: the prompt tokens ahead on the worker that prefills (its queue, plus this prompt
  less what its prefix cache holds), computed in chunks of its token budget, each step
  shared with its running sequences: StepTimeModel.prefill_ms. The first token comes from
  the prefilling worker, so a remote prefill's TTFT does not include the KV transfer.
- TPOT: one step of the decode worker with one more sequence in its batch and the prompt
  tokens it has queued (up to its budget) in the same step.
Each decode worker's routes are ranked by (TTFT, TPOT); the decode workers are tried in the
order of their best route's expected end-to-end time (expected_e2e_ms: TTFT + the request's
decode steps there, timed by the candidates' median fit), those whose TTFT meets the
request's SLO first. A request with a TTFT SLO that even the best route would miss is
refused at once (RESOURCE_EXHAUSTED naming the prediction), before any worker is called.
Workers whose step times are not known yet (just started) fall back to the load policy's
route. Pure functions, unit-tested with exact numbers.

`best_routes` is the reference; the router runs `best_routes_from`, the same routes read
from the prefill workers' index. A prefill worker's TTFT depends only on its own row (queued
tokens, running batch, step times) and its cached blocks of the prompt, so all of them are
one scan of the index's table, the same float operations in the same order as
StepTimeModel.prefill_ms (so the same doubles): in C (router/_route_table.c, built by
setup.py) or, where that is not built, one numpy expression. A decode worker's best remote
prefill is the least of them (its own row left out: the next least; ties to the least
worker_id).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from splitserve.common.step_time import StepTimeModel
from splitserve.router.policy import Route, WorkerView, cached_tokens
from splitserve.router.worker_index import Candidates

try:  # the scan in C (setup.py builds it; optional)
    from splitserve.router import _route_table  # type: ignore[attr-defined]
except ImportError:  # not built: numpy
    _route_table = None


class RoutePrediction(NamedTuple):
    route: Route
    ttft_ms: float
    tpot_ms: float

    @property
    def key(self) -> tuple[float, float, str, str]:
        prefill = self.route.prefill.worker_id if self.route.prefill is not None else ""
        return (self.ttft_ms, self.tpot_ms, self.route.decode.worker_id, prefill)


def predict_route(route: Route, prompt_len: int, overlap_blocks: Mapping[str, float],
                  block_size: int) -> RoutePrediction | None:
    """TTFT and TPOT of `route` for a prompt of `prompt_len` tokens; None when a worker's
    step times are unknown."""
    times = route_times(route.decode, route.prefill, prompt_len, overlap_blocks, block_size)
    return None if times is None else RoutePrediction(route, *times)


def route_times(decode: WorkerView, prefill: WorkerView | None, prompt_len: int,
                overlap_blocks: Mapping[str, float], block_size: int
                ) -> tuple[float, float] | None:
    """predict_route's (TTFT, TPOT) of the route (decode, prefill: None for its own), as
    floats (no Route made)."""
    decoder = decode.step_model
    prefiller = prefill.step_model if prefill is not None else decoder
    if decoder is None or prefiller is None:
        return None
    worker = prefill if prefill is not None else decode
    cached = cached_tokens(overlap_blocks.get(worker.worker_id, 0), block_size, prompt_len)
    ahead = worker.num_queued_tokens + max(1, round(prompt_len - cached))
    ttft = prefiller.prefill_ms(ahead, worker.num_running)
    queued_on_decode = decode.num_queued_tokens + (ahead if prefill is None else 0)
    tpot = decoder.step_ms(decode.num_running + 1,
                           min(queued_on_decode, decoder.token_budget))
    return ttft, tpot


def candidate_routes(decode: WorkerView, prefill_workers: Sequence[WorkerView],
                     local_only: bool) -> list[Route]:
    """Every way to serve a request decoded on `decode`: its own prefill, or any other
    prefill worker's."""
    routes = [Route(decode, None)]
    if not local_only:
        routes += [Route(decode, p) for p in prefill_workers if p.worker_id != decode.worker_id]
    return routes


def best_routes(decode_workers: Sequence[WorkerView], prefill_workers: Sequence[WorkerView],
                prompt_len: int, overlap_blocks: Mapping[str, float], block_size: int,
                local_only: bool = False) -> list[RoutePrediction] | None:
    """Per decode worker its best predicted route, best first; None when any candidate's
    step times are unknown (the caller then routes by load)."""
    best: list[RoutePrediction] = []
    for decode in decode_workers:
        predictions = []
        for route in candidate_routes(decode, prefill_workers, local_only):
            predicted = predict_route(route, prompt_len, overlap_blocks, block_size)
            if predicted is None:
                return None
            predictions.append(predicted)
        best.append(min(predictions, key=lambda p: p.key))
    return sorted(best, key=lambda p: p.key)


def prefill_row(w: WorkerView) -> tuple[float, ...]:
    """A prefill worker's row of the latency table: queued tokens, the cost of one of its
    steps before its prompt tokens (prefill_ms' base_ms + per_seq_ms * (running + 1), the
    same float operations), per_prompt_token_ms, token budget (at least 1)."""
    m = w.step_model
    if m is None:  # never read: such a worker makes best_routes_from return None
        return (w.num_queued_tokens, 0.0, 0.0, 1.0)
    return (w.num_queued_tokens, m.base_ms + m.per_seq_ms * (w.num_running + 1),
            m.per_prompt_token_ms, max(1, m.token_budget))


def best_routes_from(decode_workers: Sequence[WorkerView], candidates: Candidates,
                     prompt_len: int, overlap_blocks: Mapping[str, float], block_size: int,
                     local_only: bool = False) -> list[RoutePrediction] | None:
    """best_routes(decode_workers, the candidates, ...) read from the index."""
    if not decode_workers:
        return []
    if any(d.step_model is None for d in decode_workers):
        return None
    index = candidates.index
    if not local_only and any(candidates.get(wid) is not None
                              for wid in index.unknown_step_times):
        return None
    table, row_of = index.table(prefill_row)
    least = None if local_only or not len(index) else least_prefill_ttfts(
        table, row_of, candidates, prompt_len, overlap_blocks, block_size)
    ids = index.ids()
    best: list[RoutePrediction] = []
    for decode in decode_workers:
        # Its own prefill's route and, against it, the best remote prefill's, as floats:
        # one RoutePrediction built per decode worker.
        m = decode.step_model
        local = route_times(decode, None, prompt_len, overlap_blocks, block_size)
        assert m is not None and local is not None  # step times known
        ttft, tpot = local
        prefill = None
        if least is not None:
            i, remote_ttft = least[0], least[1]
            if row_of.get(decode.worker_id) == i:  # its own prefill row: the next least
                i, remote_ttft = least[2], least[3]
            # The key is (ttft, tpot, decode id, prefill id: "" for a local prefill): the
            # remote route wins on a lesser TTFT, or the same and a lesser TPOT.
            if remote_ttft != np.inf and remote_ttft <= ttft:
                remote_tpot = m.step_ms(decode.num_running + 1,
                                        min(decode.num_queued_tokens, m.token_budget))
                if remote_ttft < ttft or remote_tpot < tpot:
                    prefill = index.views[ids[i]]
                    ttft, tpot = remote_ttft, remote_tpot
        best.append(RoutePrediction(Route(decode, prefill), ttft, tpot))
    best.sort(key=_key)
    return best


def _key(p: RoutePrediction) -> tuple[float, float, str, str]:
    return p.key


def has_compiled_scan() -> bool:
    """Whether this install has the table scan in C (setup.py builds it; optional)."""
    return _route_table is not None


def least_prefill_ttfts(table: np.ndarray, row_of: Mapping[str, int], candidates: Candidates,
                        prompt_len: int, overlap_blocks: Mapping[str, float], block_size: int
                        ) -> tuple[int, float, int, float]:
    """(row, TTFT) of the prefill candidate with the least predicted TTFT for the prompt, then
    of the least among the others (each the first such row: the least worker_id), over
    `candidates.index`'s latency table and its rows (at least one). In C where the
    package's `_route_table` is built (router/_route_table.c), else numpy (prefill_ttfts);
    the same doubles either way."""
    skip = _skipped_rows(candidates, row_of)
    if _route_table is not None:
        overlap = overlap_blocks if type(overlap_blocks) is dict else dict(overlap_blocks)
        return _route_table.least_two(table, prompt_len, block_size, overlap, row_of, skip)
    ttft = prefill_ttfts(table, row_of, prompt_len, overlap_blocks, block_size, skip)
    first = int(ttft.argmin())  # the first least: least id
    first_ttft = float(ttft[first])
    ttft[first] = np.inf
    second = int(ttft.argmin())
    return first, first_ttft, second, float(ttft[second])


def _skipped_rows(candidates: Candidates, row_of: Mapping[str, int]) -> list[int]:
    """The table's rows that are not candidates (at an address left out, or the decode worker
    itself)."""
    skip = candidates.index.ids_at(candidates.out) if candidates.out else set()
    if candidates.skip_id in row_of:
        skip.add(candidates.skip_id)
    return [row_of[wid] for wid in skip]


def prefill_ttfts(table: np.ndarray, row_of: Mapping[str, int], prompt_len: int,
                  overlap_blocks: Mapping[str, float], block_size: int,
                  skip: Sequence[int] = ()) -> np.ndarray:
    """Per row of the latency table, the TTFT of the prompt prefilled there (inf: the rows
    in `skip`, and a NaN): predict_route's arithmetic, element by element."""
    queued, step_ms, per_token, budget = table.T
    ahead = queued + max(1, prompt_len)  # its cache holds none of the prompt
    rows: list[int] = []  # the rows of the workers caching some of the prompt
    blocks: list[float] = []
    for wid, num_blocks in overlap_blocks.items():
        row = row_of.get(wid)
        if row is not None:
            rows.append(row)
            blocks.append(num_blocks)
    if rows:
        at = np.array(rows, dtype=np.intp)
        cached_tokens = np.minimum(np.array(blocks, dtype=np.float64) * block_size, prompt_len)
        # np.rint rounds half to even like round() and np.round, without their overhead.
        ahead[at] = queued[at] + np.maximum(1, np.rint(prompt_len - cached_tokens))
    ttft = ahead / budget  # then ceil(ahead / budget) * step_ms + per_token * ahead, in place
    np.ceil(ttft, out=ttft)
    ttft *= step_ms
    ttft += per_token * ahead
    ttft[np.isnan(ttft)] = np.inf  # a NaN in the row or the cached run: no candidate
    if skip:
        ttft[list(skip)] = np.inf
    return ttft


def order_routes(routes: Sequence[RoutePrediction], num_blocks: int, max_tokens: int,
                 waited_s: float = 0.0, ttft_slo_s: float = 0.0) -> list[RoutePrediction]:
    """The decode workers' best routes in the order the router tries them: those with room
    for the request's `num_blocks` first, then those whose TTFT meets its SLO (`ttft_slo_s`
    after the `waited_s` it already waited; 0: none), then by expected_e2e_ms with the
    candidates' pooled fit, then by key."""
    pooled = pooled_step_model([p.route.decode.step_model for p in routes])
    decode_steps = max(0, max_tokens - 1)
    ranked = []
    for p in routes:
        decode = p.route.decode
        # expected_e2e_ms(p, max_tokens, pooled), written out (routes are ranked per request)
        per_token = pooled.step_ms(decode.num_running + 1) if pooled is not None else p.tpot_ms
        ranked.append(((decode.num_free_blocks < num_blocks,
                        waited_s + p.ttft_ms / 1e3 > ttft_slo_s if ttft_slo_s else False,
                        p.ttft_ms + decode_steps * per_token, *p.key), p))
    ranked.sort(key=_first)
    return [p for _, p in ranked]


def _first(pair: tuple[tuple[object, ...], RoutePrediction]) -> tuple[object, ...]:
    return pair[0]


def pooled_step_model(models: Sequence[StepTimeModel | None]) -> StepTimeModel | None:
    """The median of the known fits, field by field (None when none is known)."""
    known = [m for m in models if m is not None]
    if not known:
        return None
    if len(known) == 1:
        return known[0]
    return StepTimeModel(
        base_ms=_median([m.base_ms for m in known]),
        per_seq_ms=_median([m.per_seq_ms for m in known]),
        per_prompt_token_ms=_median([m.per_prompt_token_ms for m in known]),
        token_budget=int(_median([m.token_budget for m in known])))


def _median(values: list[float] | list[int]) -> float:
    """statistics.median's value (the middle one, or the mean of the middle two) without
    its checks and conversions: a handful of fits per request, four medians per decision
    (numpy's median costs about 11 us a call, statistics.median ~1 us)."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    return float(ordered[mid]) if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def expected_e2e_ms(prediction: RoutePrediction, max_tokens: int,
                    decode_model: StepTimeModel | None = None) -> float:
    """The request's predicted time to its last token on this route: its TTFT, then
    max_tokens - 1 decode steps of its decode worker with it in the batch, each timed by
    `decode_model` (default: the worker's own fit). Ranking decode workers by this, not by
    TTFT alone, charges a busy worker for the steps every token will take there: ranked by
    TTFT, the worker whose online fit came out a little faster per prompt token won every
    prompt however many sequences it already ran (BENCHMARKS.md, "Latency-aware routing
    against load routing"). The router passes the candidates' pooled fit (median): a
    worker's own fit comes only from the steps it ran, so one that got no requests keeps a
    stale fit that kept it idle."""
    decode = prediction.route.decode
    model = decode_model or decode.step_model
    per_token = (model.step_ms(decode.num_running + 1) if model is not None
                 else prediction.tpot_ms)
    return prediction.ttft_ms + max(0, max_tokens - 1) * per_token


class TtftUnmetError(Exception):
    """Even the best route is predicted to miss the request's TTFT SLO."""

    def __init__(self, predicted_s: float, slo_s: float) -> None:
        super().__init__(
            f"predicted time to first token {predicted_s * 1e3:.0f} ms on the best route "
            f"exceeds the request's SLO of {slo_s * 1e3:.0f} ms at the current load")
        self.predicted_s = predicted_s
        self.slo_s = slo_s
