"""Ad hoc: a lone stream's TPOT with and without CPU pinning (engine master on cpu 0, the
OpenMP worker + router + client on cpu 1), alternating in one deployment."""
import json, os, subprocess, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, "/work/main/benchmarks")
from cpu_per_token import deployment_processes, thread_cpu_s
from splitserve.bench.procs import local_deployment

ALL = {0, 1}

def tids(pid):
    return [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]

def pin(pid, cpus):
    for t in tids(pid):
        try: os.sched_setaffinity(t, cpus)
        except OSError: pass

def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    modes = sys.argv[2].split(",") if len(sys.argv) > 2 else ["none", "pin"]
    worker_args = ("--dtype", "bfloat16", "--max-num-seqs", "16", "--num-kv-blocks", "2048")
    with tempfile.TemporaryDirectory() as tmp, local_deployment(
            "smollm2-135m", num_prefill=0, num_decode=1, local_prefill_threshold=1 << 20,
            threads=2, worker_args=worker_args) as addrs:
        out = Path(tmp) / "s.json"
        def bench(n, cpus):
            argv = [sys.executable, "-m", "splitserve.cli", "bench", "serve", "--target",
                    f"http://{addrs['http']}", "--workload", "fixed", "--input-len", "256",
                    "--output-len", "256", "--concurrency", "1", "--num-requests", str(n),
                    "--no-progress", "--out", str(out)]
            if cpus is not None:
                argv = ["taskset", "-c", ",".join(map(str, sorted(cpus)))] + argv
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            return json.loads(out.read_text())["summary"]["tpot_ms"]["p50"]
        bench(2, None)
        procs = deployment_processes()
        router = [p for p, r in procs.items() if r == "router"][0]
        worker = [p for p, r in procs.items() if r != "router"][0]
        # the two busiest worker threads: the engine master and the OpenMP worker
        import threading
        th = threading.Thread(target=bench, args=(2, None)); th.start(); time.sleep(6)
        t0 = thread_cpu_s(worker); time.sleep(1.0); t1 = thread_cpu_s(worker); th.join()
        busy = sorted(t1, key=lambda t: t1[t].cpu_s - t0.get(t, t1[t]).cpu_s, reverse=True)[:2]
        master, omp = sorted(busy)  # the master made the OpenMP worker: the lower tid
        print("router", router, "worker", worker, "master", master, "omp", omp, flush=True)
        for r in range(rounds):
            for mode in modes:
                if mode == "none":
                    pin(router, ALL); pin(worker, ALL); cpus = None
                elif mode == "pin":  # master alone on 0; everything else on 1
                    pin(worker, {1}); os.sched_setaffinity(master, {0}); pin(router, {1}); cpus = {1}
                elif mode == "pinomp":  # only the engine threads pinned (0, 1), rest free
                    pin(worker, ALL); os.sched_setaffinity(master, {0}); os.sched_setaffinity(omp, {1})
                    pin(router, ALL); cpus = None
                elif mode == "pinrouter":  # engine threads pinned, router on 1, client free
                    pin(worker, ALL); os.sched_setaffinity(master, {0}); os.sched_setaffinity(omp, {1})
                    pin(router, {1}); cpus = None
                tpot = bench(4, cpus)
                print(f"round {r} {mode}: TPOT p50 {tpot:.2f} ms", flush=True)
main()
