"""A measured colocated sweep's inter-token latency by what the two workers ran: how much a
decode step slows when the other worker of the pair decodes too, at each batch.

    python benchmarks/colocated_itl_by_batch.py RESULTS/colocated.json [...]

Reads a `splitserve bench disagg` (or `bench serve --sweep-rates`) result of two colocated
decode workers that prefill their own prompts. Every request's record holds its chunks'
arrival times and the worker that decoded it (server_timings.decode_worker_id). For each
gap between two of a request's chunks (one decode step of its worker, one token per chunk
at stream interval 1), at the gap's midpoint:
- its worker's batch: the requests of that worker between their first and last chunk;
- the other worker's state: its batch the same way, or "P" while one of its requests waits
  for its first token (its prompt being prefilled; mixed steps of the worker itself are left
  out the same way).
Prints the median gap (ms) and the count per (own batch, other's state), all rates pooled;
cells with fewer than --min-count gaps are left blank. Standard library only.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
from pathlib import Path
from typing import Any

Request = dict[str, Any]
OTHER_STATES: list[int | str] = [0, 1, 2, 3, 4, 5, "P"]  # 5: five or more


def _state(requests: list[Request], t: float) -> tuple[int, bool]:
    """(decoding requests, whether one is being prefilled) of one worker at time t."""
    decoding = sum(1 for r in requests if r["chunk_s"][0] <= t <= r["chunk_s"][-1])
    prefilling = any(r["send_s"] <= t < r["chunk_s"][0] for r in requests)
    return decoding, prefilling


def gaps_by_state(result: dict[str, Any]) -> dict[tuple[int, int | str], list[float]]:
    """Milliseconds between consecutive chunks, keyed by (own batch, other's state)."""
    table: dict[tuple[int, int | str], list[float]] = collections.defaultdict(list)
    for run in result["runs"]:
        by_worker: dict[str, list[Request]] = collections.defaultdict(list)
        for r in run["requests"]:
            if r["status"] == "ok" and len(r["chunk_s"]) > 1:
                by_worker[r["server_timings"]["decode_worker_id"]].append(r)
        if len(by_worker) != 2:
            raise SystemExit(f"rate {run['request_rate']}: requests decoded on "
                             f"{len(by_worker)} workers; this reads a colocated pair")
        for worker, requests in by_worker.items():
            other = next(w for w in by_worker if w != worker)
            for r in requests:
                chunks = r["chunk_s"]
                for a, b in zip(chunks, chunks[1:], strict=False):
                    t = (a + b) / 2
                    batch, prefilling = _state(requests, t)
                    if prefilling:
                        continue  # a step with prompt tokens in it
                    other_batch, other_prefilling = _state(by_worker[other], t)
                    state: int | str = "P" if other_prefilling else min(other_batch, 5)
                    table[(min(batch, 5), state)].append((b - a) * 1e3)
    return table


def print_table(table: dict[tuple[int, int | str], list[float]], min_count: int) -> None:
    print("own batch \\ other worker: " + " ".join(f"{str(s):>12}" for s in OTHER_STATES))
    for batch in sorted({key[0] for key in table}):
        cells = []
        for state in OTHER_STATES:
            gaps = table.get((batch, state), [])
            cells.append(f"{statistics.median(gaps):6.1f} ({len(gaps):3d})"
                         if len(gaps) >= min_count else " " * 12)
        print(f"{batch:>25} " + " ".join(cells))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", type=Path, help="colocated.json files")
    ap.add_argument("--min-count", type=int, default=15)
    args = ap.parse_args()
    for path in args.results:
        print(f"== {path}")
        print_table(gaps_by_state(json.loads(path.read_text(encoding="utf-8"))), args.min_count)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
