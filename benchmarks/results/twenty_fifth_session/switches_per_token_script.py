import subprocess, sys, time, os
from pathlib import Path
from splitserve.bench.procs import local_deployment
api = sys.argv[1]
def ctx(pid):
    out = {}
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            st = (t / "status").read_text(); name = (t / "comm").read_text().strip()
        except OSError: continue
        v = int(st.split("voluntary_ctxt_switches:")[1].split()[0])
        nv = int(st.split("nonvoluntary_ctxt_switches:")[1].split()[0])
        f = (t / "stat").read_text().rsplit(")", 1)[1].split()
        out[int(t.name)] = (name, v, nv, (int(f[11]) + int(f[12])) / 100)
    return out
worker_args = ("--dtype", "bfloat16", "--max-num-seqs", "16", "--num-kv-blocks", "2048")
with local_deployment("smollm2-135m", num_prefill=0, num_decode=1, local_prefill_threshold=1 << 20,
                      threads=2, worker_args=worker_args) as addrs:
    target = f"grpc://{addrs['router']}" if api == "grpc" else f"http://{addrs['http']}"
    def bench(n):
        return [sys.executable, "-m", "splitserve.cli", "bench", "serve", "--target", target,
                "--workload", "fixed", "--input-len", "256", "--output-len", "128",
                "--concurrency", "1", "--num-requests", str(n), "--no-progress"]
    subprocess.run(bench(2), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pids = {r: int(subprocess.check_output(["pgrep", "-f", "splitserve.cli " + r]).split()[0]) for r in ("router", "decode")}
    before = {r: ctx(p) for r, p in pids.items()}
    import json, tempfile
    res = tempfile.mktemp()
    subprocess.run(bench(6) + ["--out", res], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print("TPOT p50", json.load(open(res))["summary"]["tpot_ms"]["p50"])
    after = {r: ctx(p) for r, p in pids.items()}
    tokens = 6 * 128
    for r in pids:
        tv = tn = 0; cpu = 0.0
        for tid, (name, v, nv, c) in after[r].items():
            b = before[r].get(tid, (name, 0, 0, 0.0))
            cpu += c - b[3]
            dv, dn = v - b[1], nv - b[2]
            tv += dv; tn += dn
            if dv + dn > tokens * 0.2: print(f"  {r} {name} {tid}: vol {dv/tokens:.2f} invol {dn/tokens:.2f} per token")
        print(f"{r}: voluntary {tv/tokens:.2f} involuntary {tn/tokens:.2f} per token, cpu {cpu*1e3/tokens:.3f} ms/token")
