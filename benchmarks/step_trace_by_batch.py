"""Decode-only engine steps from step traces (SPLITSERVE_STEP_TRACE), by batch size and mean
context: the median step time per cell, one column per trace file. Tells whether one
deployment's decode worker steps slower than another's at the same batch and context (or
than a profile's grid: --profile P.json adds its interpolated step).

    PYTHONPATH=. .venv/bin/python benchmarks/step_trace_by_batch.py TRACE.jsonl [...]
        [--context-bucket 128] [--profile P.json] [--since UNIX_S] [--until UNIX_S]
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from splitserve.engine.step_trace import read
from splitserve.sim.profile import Profile, ProfiledStepTimes


def cells(records: list[dict[str, float]], bucket: int) -> dict[tuple[int, int], list[float]]:
    """(batch, mean-context bucket) -> the decode-only steps' milliseconds."""
    found: dict[tuple[int, int], list[float]] = defaultdict(list)
    for r in records:
        if r.get("prompt_tokens") or not r.get("decode") or "decode_context" not in r:
            continue
        batch = int(r["decode"])
        context = r["decode_context"] / batch
        found[(batch, int(context // bucket) * bucket)].append(r["ms"])
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("traces", nargs="+")
    ap.add_argument("--context-bucket", type=int, default=128)
    ap.add_argument("--profile", default=None)
    ap.add_argument("--since", type=float, default=0.0)
    ap.add_argument("--until", type=float, default=float("inf"))
    ap.add_argument("--min-steps", type=int, default=5)
    args = ap.parse_args()
    per_file = {}
    for path in args.traces:
        records = [r for r in read(Path(path)) if args.since <= r["t"] <= args.until]
        per_file[Path(path).name] = cells(records, args.context_bucket)
    model = ProfiledStepTimes(Profile.load(args.profile)) if args.profile else None
    keys = sorted({k for c in per_file.values() for k in c})
    head = "batch  context " + "".join(f"{name[:24]:>26s}" for name in per_file)
    print(head + ("   profile" if model else ""))
    for batch, ctx in keys:
        row = []
        for c in per_file.values():
            steps = c.get((batch, ctx), [])
            row.append(f"{statistics.median(steps):8.1f} ms ({len(steps):4d})"
                       if len(steps) >= args.min_steps else "")
        if not any(row):
            continue
        predicted = (f"{model.decode_ms(batch, ctx + args.context_bucket / 2):8.1f} ms"
                     if model else "")
        print(f"{batch:5d} {ctx:5d}+  " + "".join(f"{x:>26s}" for x in row) + predicted)


if __name__ == "__main__":
    main()
