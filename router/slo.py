"""SLO-aware admission: refuse at once a request whose time to first token (TTFT) cannot
meet its SLO, instead of letting it wait and miss it (issue 17).

The prediction comes from what the router measures itself, no model of the hardware:

- `hold_s`: how long a request holds an admission slot (EWMA of admit -> end);
- `first_token_s`: how long an admitted request takes to its first token (EWMA of admit ->
  first token: prefill, KV transfer, relay).

A request that must queue behind `ahead` others, with `slots` slots each freeing on average
every `hold_s` seconds, is predicted to wait `(ahead + 1) * hold_s / slots`, then take
`first_token_s`. Until both averages have samples, nothing is refused. The error of each
prediction (actual TTFT of an admitted request minus its prediction) is reported as a
metric, so a deployment sees how far to trust it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

_ALPHA = 0.2  # EWMA weight of the newest sample


class SloUnmetError(Exception):
    """The request's TTFT SLO cannot be met; `retry_after_s`: when it likely could."""

    def __init__(self, predicted_s: float, slo_s: float, retry_after_s: float) -> None:
        super().__init__(
            f"predicted time to first token {predicted_s * 1e3:.0f} ms exceeds the request's "
            f"SLO of {slo_s * 1e3:.0f} ms at the current load; retry after "
            f"{retry_after_s:.1f} s")
        self.predicted_s = predicted_s
        self.slo_s = slo_s
        self.retry_after_s = retry_after_s


@dataclass
class _Ewma:
    value: float = math.nan

    def add(self, sample: float) -> None:
        self.value = sample if math.isnan(self.value) else (
            (1 - _ALPHA) * self.value + _ALPHA * sample)

    @property
    def known(self) -> bool:
        return not math.isnan(self.value)


class TtftPredictor:
    """Measured service times and the TTFT they predict (event-loop thread only)."""

    def __init__(self) -> None:
        self._hold = _Ewma()
        self._first_token = _Ewma()

    def observe_hold(self, seconds: float) -> None:
        self._hold.add(seconds)

    def observe_first_token(self, seconds: float) -> None:
        self._first_token.add(seconds)

    def predict(self, ahead: int, slots: int, free_slot: bool) -> float | None:
        """Predicted TTFT of a request arriving now; None until measured."""
        if not self._first_token.known:
            return None
        if free_slot:
            return self._first_token.value
        if not self._hold.known or slots <= 0:
            return None
        return (ahead + 1) * self._hold.value / slots + self._first_token.value

    def check(self, slo_s: float, ahead: int, slots: int, free_slot: bool) -> float | None:
        """The prediction; SloUnmetError when it exceeds `slo_s` (a request that would find a
        free slot is never refused: the router cannot do better for it)."""
        predicted = self.predict(ahead, slots, free_slot)
        if predicted is not None and not free_slot and predicted > slo_s:
            # Each slot that frees shortens the queue by one: wait until enough have.
            over = predicted - slo_s
            raise SloUnmetError(predicted, slo_s, max(over, 0.1))
        return predicted
