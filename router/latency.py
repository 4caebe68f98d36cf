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
Routes are ranked by (TTFT, TPOT); a request with a TTFT SLO that even the best route would
miss is refused at once (RESOURCE_EXHAUSTED naming the prediction), before any worker is
called. Workers whose step times are not known yet (just started) fall back to the load
policy's route. Pure functions, unit-tested with exact numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from splitserve.router.policy import Route, WorkerView, cached_tokens


@dataclass(frozen=True, slots=True)
class RoutePrediction:
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
    decode = route.decode
    decoder = decode.step_model
    prefiller = route.prefill.step_model if route.prefill is not None else decoder
    if decoder is None or prefiller is None:
        return None
    worker = route.prefill if route.prefill is not None else decode
    cached = cached_tokens(overlap_blocks.get(worker.worker_id, 0), block_size, prompt_len)
    ahead = worker.num_queued_tokens + max(1, round(prompt_len - cached))
    ttft = prefiller.prefill_ms(ahead, worker.num_running)
    queued_on_decode = decode.num_queued_tokens + (ahead if route.prefill is None else 0)
    tpot = decoder.step_ms(decode.num_running + 1,
                           min(queued_on_decode, decoder.token_budget))
    return RoutePrediction(route, ttft, tpot)


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


class TtftUnmetError(Exception):
    """Even the best route is predicted to miss the request's TTFT SLO."""

    def __init__(self, predicted_s: float, slo_s: float) -> None:
        super().__init__(
            f"predicted time to first token {predicted_s * 1e3:.0f} ms on the best route "
            f"exceeds the request's SLO of {slo_s * 1e3:.0f} ms at the current load")
        self.predicted_s = predicted_s
        self.slo_s = slo_s
