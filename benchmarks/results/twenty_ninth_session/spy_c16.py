import json, os, subprocess, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, "/work/main/benchmarks")
from cpu_per_token import deployment_processes
from splitserve.bench.procs import local_deployment
conc = int(sys.argv[1]); n = int(sys.argv[2]); out_prefix = sys.argv[3]
worker_args = ("--dtype", "bfloat16", "--max-num-seqs", "16", "--num-kv-blocks", "2048")
with tempfile.TemporaryDirectory() as tmp, local_deployment(
        "smollm2-135m", num_prefill=0, num_decode=1, local_prefill_threshold=1 << 20,
        threads=2, worker_args=worker_args) as addrs:
    out = Path(tmp) / "s.json"
    def bench(k):
        subprocess.run([sys.executable, "-m", "splitserve.cli", "bench", "serve", "--target",
                f"http://{addrs['http']}", "--workload", "fixed", "--input-len", "256",
                "--output-len", "256", "--concurrency", str(conc), "--num-requests", str(k),
                "--no-progress", "--out", str(out)], check=True, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
    bench(max(2, conc))
    router = [p for p, r in deployment_processes().items() if r == "router"][0]
    spy = subprocess.Popen(["/work/main/.venv/bin/py-spy", "record", "-p", str(router), "-r", "200",
                            "-d", "25", "-f", "raw", "-o", out_prefix + ".raw", "--nonblocking"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bench(n)
    spy.wait()
    print(json.loads(out.read_text())["summary"]["tpot_ms"])
