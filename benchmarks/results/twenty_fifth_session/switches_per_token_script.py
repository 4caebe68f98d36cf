"""The ad-hoc script of the gRPC-poller A/B (BENCHMARKS.md, twenty-fifth session): a router
and one colocated bf16 decode worker, 6 requests at concurrency 1 after a 2-request warm-up;
prints the TPOT p50 and each process's context switches and CPU per streamed token.

    GRPC_EXPERIMENTS=... PYTHONPATH=. .venv/bin/python \
        benchmarks/results/twenty_fifth_session/switches_per_token_script.py grpc|http
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from splitserve.bench.procs import local_deployment

REQUESTS, OUTPUT_LEN = 6, 128


def thread_counts(pid: int) -> dict[int, tuple[int, int, float]]:
    """tid -> (voluntary switches, involuntary switches, CPU seconds) of `pid`'s threads."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
            stat = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        voluntary = int(status.split("\nvoluntary_ctxt_switches:")[1].split()[0])
        involuntary = int(status.split("nonvoluntary_ctxt_switches:")[1].split()[0])
        out[int(task.name)] = (voluntary, involuntary, (int(stat[11]) + int(stat[12])) / 100)
    return out


def main() -> None:
    api = sys.argv[1]
    worker_args = ("--dtype", "bfloat16", "--max-num-seqs", "16", "--num-kv-blocks", "2048")
    with local_deployment("smollm2-135m", num_prefill=0, num_decode=1,
                          local_prefill_threshold=1 << 20, threads=2,
                          worker_args=worker_args) as addrs:
        target = f"grpc://{addrs['router']}" if api == "grpc" else f"http://{addrs['http']}"

        def bench(n: int) -> list[str]:
            return [sys.executable, "-m", "splitserve.cli", "bench", "serve", "--target",
                    target, "--workload", "fixed", "--input-len", "256", "--output-len",
                    str(OUTPUT_LEN), "--concurrency", "1", "--num-requests", str(n),
                    "--no-progress"]

        subprocess.run(bench(2), check=True, capture_output=True)
        pids = {role: int(subprocess.check_output(
            ["pgrep", "-f", f"splitserve.cli {role}"]).split()[0]) for role in ("router", "decode")}
        before = {role: thread_counts(pid) for role, pid in pids.items()}
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "serve.json"
            subprocess.run([*bench(REQUESTS), "--out", str(result)], check=True,
                           capture_output=True)
            print("TPOT p50", json.loads(result.read_text())["summary"]["tpot_ms"]["p50"])
        after = {role: thread_counts(pid) for role, pid in pids.items()}
    tokens = REQUESTS * OUTPUT_LEN
    for role in pids:
        sums = [0.0, 0.0, 0.0]
        for tid, counts in after[role].items():
            start = before[role].get(tid, (0, 0, 0.0))
            for i in range(3):
                sums[i] += counts[i] - start[i]
        print(f"{role}: voluntary {sums[0] / tokens:.2f} involuntary {sums[1] / tokens:.2f} "
              f"per token, cpu {sums[2] * 1e3 / tokens:.3f} ms/token")


if __name__ == "__main__":
    main()
