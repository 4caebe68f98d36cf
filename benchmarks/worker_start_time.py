"""How long a router, a decode worker and a prefill worker take to start (to their READY
line), as processes, on a model folder.

    PYTHONPATH=. .venv/bin/python benchmarks/worker_start_time.py MODEL_DIR [--repeat 2]
"""

from __future__ import annotations

import argparse
import time

from splitserve.bench.procs import spawn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    for _ in range(args.repeat):
        started = time.monotonic()
        router, fields = spawn(["router", "--model", args.model, "--port", "0",
                                "--http-port", "0"])
        times = {"router": time.monotonic() - started}
        procs = [router]
        for role in ("decode", "prefill"):
            started = time.monotonic()
            proc, _ = spawn([role, "--model", args.model, "--cluster", fields[4],
                             "--num-kv-blocks", "64"])
            times[role] = time.monotonic() - started
            procs.append(proc)
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
        print("  ".join(f"{role} {seconds:.2f} s" for role, seconds in times.items()))


if __name__ == "__main__":
    main()
