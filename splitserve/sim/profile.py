"""A hardware profile (what `splitserve profile` measured) and the step-time model fitted
from it.

The JSON holds measured points, never fitted coefficients: the model interpolates them
piecewise-linearly and extrapolates past the ends along the last segment, so a profile
with more points is simply a finer model.

Step time of one engine step (milliseconds) that computes `num_prefill_tokens` prompt
tokens and `num_decodes` decode tokens whose sequences hold `context` tokens on average:
  decodes only:  decode(num_decodes, context)
  prompt only:   prefill(num_prefill_tokens)
  mixed:         prefill(num_prefill_tokens + num_decodes)
                 + decode(num_decodes, context) - decode(num_decodes, smallest context)
i.e. the decodes count as extra tokens of the forward pass (the linear layers' share) plus
their attention over context beyond the smallest one profiled. A prefill point is a fresh
prompt computed from position 0; chunk offsets beyond that are not modelled.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STEP_KINDS = ("prefill", "decode")  # a step with prompt tokens in it, or decodes only
PROFILE_KIND = "splitserve-profile"
PROFILE_VERSION = 1


def interpolate(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise-linear through (xs, ys), xs strictly increasing; past either end the
    nearest segment continues if it rises, and a falling one (timing noise: more work never
    takes less time) stays at its end point (one point: a constant). Never below 0."""
    if len(xs) != len(ys) or not xs:
        raise ValueError("interpolate needs equally many xs and ys, at least one")
    if len(xs) == 1:
        return max(0.0, ys[0])
    i = bisect.bisect_right(xs, x) - 1
    i = min(max(i, 0), len(xs) - 2)
    x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
    if y1 < y0 and x < x0:
        return max(0.0, y0)
    if y1 < y0 and x > x1:
        return max(0.0, y1)
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


@dataclass(frozen=True)
class ServingOverheads:
    """Costs of the serving path that the engine's step times do not hold, measured on a
    local deployment (zero when the profile was taken without one)."""

    ttft_local_ms: float = 0.0  # TTFT - prefill compute, prompt prefilled on its decode worker
    ttft_remote_ms: float = 0.0  # TTFT - prefill compute - KV transfer, prefill worker
    decode_step_ms: float = 0.0  # served TPOT at batch 1 - the engine's batch-1 decode step
    # A remote prefill's compute while its decode worker decodes another stream, over the
    # same prefill with that worker idle, in the deployment (0: not measured). The
    # deployment slows a prefill more than a bare second engine does (BENCHMARKS.md).
    prefill_under_decode: float = 0.0
    # The served TPOT of a stream on one worker of a colocated pair while the other worker
    # decodes a stream too, over a lone stream's (0: not measured). It holds the router's
    # and the client's work for both streams on cores both workers use, which the bare
    # engines' co-run factor does not see (BENCHMARKS.md, thirteenth session).
    decode_under_decode: float = 0.0
    # The decode worker's token gaps on a stream while remote prefills run (their compute,
    # their KV's sends and receives, their requests' serving) over its gaps before them, in
    # the disaggregated deployment (0: not measured). The bare engines' co-run factor holds
    # the prefill's compute alone (BENCHMARKS.md, thirty-first session). Like the factors
    # above it stands for any decode step under another worker's prompt step on the host,
    # a colocated replica's included. The window it is read over holds the five requests'
    # routing and KV transfer besides their prefills (~10% of it): a little diluted.
    decode_under_prefill: float = 0.0

    def __post_init__(self) -> None:
        for name in ("prefill_under_decode", "decode_under_decode", "decode_under_prefill"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0 (0: not measured), got "
                                 f"{getattr(self, name)!r}")


@dataclass(frozen=True)
class Profile:
    """Measured points of one model on one machine with one engine setting."""

    model: str
    dtype: str
    threads: int
    hardware: dict[str, Any]
    prefill_tokens: list[int]  # prompt tokens computed in one step (increasing)
    prefill_ms: list[float]  # the step's time for each
    decode_batches: list[int]  # running sequences in a decode step (increasing)
    decode_contexts: list[int]  # tokens each sequence holds (increasing)
    decode_ms: list[list[float]]  # [batch index][context index]
    kv_bytes_per_token: int  # K and V of every layer for one token, as sent
    kv_bandwidth_bytes_per_s: float  # measured between two workers
    serving: ServingOverheads = field(default_factory=ServingOverheads)
    # factor[kind][other kind]: a step of `kind` ("prefill" | "decode") while another
    # worker on the same host runs steps of `other kind`, over the same step alone
    # (sim.corun; empty: not measured, no interference)
    corun: dict[str, dict[str, float]] = field(default_factory=dict)
    # The host's speed drift (sim.speed): the standard deviation of log(step time) between
    # periods of speed_period_s (0: not measured; the simulation is then deterministic)
    speed_sigma: float = 0.0
    speed_period_s: float = 2.0
    # The median of the same probe measurement (sim.probe: a batch-1 decode step at
    # PROBE_CONTEXT tokens): what a sweep's probes are compared with (0: not measured)
    speed_probe_ms: float = 0.0

    def __post_init__(self) -> None:
        for name in ("prefill_tokens", "decode_batches", "decode_contexts"):
            xs = getattr(self, name)
            if not xs or any(b <= a for a, b in zip(xs, xs[1:], strict=False)):
                raise ValueError(f"{name} must be non-empty and strictly increasing")
        if len(self.prefill_ms) != len(self.prefill_tokens):
            raise ValueError("prefill_ms needs one time per prefill_tokens entry")
        if len(self.decode_ms) != len(self.decode_batches) or any(
                len(row) != len(self.decode_contexts) for row in self.decode_ms):
            raise ValueError("decode_ms must be [len(decode_batches)][len(decode_contexts)]")
        if self.kv_bytes_per_token < 1 or not self.kv_bandwidth_bytes_per_s > 0:
            raise ValueError("kv_bytes_per_token and kv_bandwidth_bytes_per_s must be > 0")
        if not self.speed_sigma >= 0 or not self.speed_period_s > 0:
            raise ValueError(f"speed_sigma must be >= 0 and speed_period_s > 0, got "
                             f"{self.speed_sigma!r}, {self.speed_period_s!r}")
        if not self.speed_probe_ms >= 0:
            raise ValueError(f"speed_probe_ms must be >= 0 (0: not measured), got "
                             f"{self.speed_probe_ms!r}")
        for kind, row in self.corun.items():
            if kind not in STEP_KINDS or any(k not in STEP_KINDS or not f > 0
                                             for k, f in row.items()):
                raise ValueError(f"corun factors are {{kind: {{kind: factor > 0}}}} with kinds "
                                 f"{STEP_KINDS}, got {self.corun}")

    def to_json(self) -> dict[str, Any]:
        return {"kind": PROFILE_KIND, "version": PROFILE_VERSION, **asdict(self)}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Profile:
        if data.get("kind") != PROFILE_KIND or data.get("version") != PROFILE_VERSION:
            raise ValueError(f"not a {PROFILE_KIND} v{PROFILE_VERSION} file")
        fields = {k: v for k, v in data.items() if k not in ("kind", "version")}
        fields["serving"] = ServingOverheads(**fields.get("serving", {}))
        return cls(**fields)

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))


class ProfiledStepTimes:
    """Milliseconds of engine steps and KV transfers, interpolated from a Profile."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self._prefill_x = [float(t) for t in profile.prefill_tokens]
        self._batch_x = [float(b) for b in profile.decode_batches]
        self._context_x = [float(c) for c in profile.decode_contexts]
        # corun_factor's rows: the bare engines' factors, with prefill under decode, decode
        # under decode and decode under prefill as measured in the deployments where the
        # profile has them
        self._corun = {kind: dict(row) for kind, row in profile.corun.items()}
        serving = profile.serving
        for kind, other, factor in (("prefill", "decode", serving.prefill_under_decode),
                                    ("decode", "decode", serving.decode_under_decode),
                                    ("decode", "prefill", serving.decode_under_prefill)):
            if factor > 0:
                self._corun.setdefault(kind, {})[other] = factor

    def prefill_ms(self, num_tokens: int) -> float:
        return interpolate(self._prefill_x, self.profile.prefill_ms, num_tokens)

    def decode_ms(self, batch: int, context: float) -> float:
        """Bilinear: along context within each profiled batch, then along batch."""
        per_batch = [interpolate(self._context_x, row, context) for row in self.profile.decode_ms]
        return interpolate(self._batch_x, per_batch, batch)

    def step_ms(self, num_prefill_tokens: int, num_decodes: int, context: float) -> float:
        """One engine step (see the module docstring for the mixed case)."""
        if num_decodes == 0:
            return self.prefill_ms(num_prefill_tokens) if num_prefill_tokens else 0.0
        decode = self.decode_ms(num_decodes, context)
        if num_prefill_tokens == 0:
            return decode
        attention = decode - self.decode_ms(num_decodes, self._context_x[0])
        return self.prefill_ms(num_prefill_tokens + num_decodes) + max(0.0, attention)

    def corun_factor(self, kind: str, others: list[str]) -> float:
        """A step of `kind` starting while other workers of its host run steps of the kinds
        `others`: its time's factor (the most any one of them causes; 1 alone)."""
        row = self._corun.get(kind, {})
        return max((row.get(other, 1.0) for other in others), default=1.0)

    def transfer_ms(self, num_tokens: int) -> float:
        """Moving `num_tokens` tokens' KV at the measured bandwidth."""
        return (num_tokens * self.profile.kv_bytes_per_token
                / self.profile.kv_bandwidth_bytes_per_s * 1e3)
