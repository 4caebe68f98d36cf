"""What the multi-host modules share about the deployment of conftest.py's `cluster`: its
settings, requests run from the client host, the colocated engine's tokens, and the
workers' Prometheus metrics read from the client host."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from splitserve.bench import netns

PORT = 50051
METRICS_PORT = 9100  # each worker's, on its own host's address
# --kv-timeout: P's bounds one request's KV send (and each message of it), D's each message
# it receives. D's is the longer, so that when the path between them breaks mid-transfer
# the sender gives up first (the router then resumes the request without P), rather than
# the two racing on equal clocks.
KV_TIMEOUT_S = {"prefill": 8.0, "decode": 10.0}
PREFILL_TIMEOUT_MS = 12000  # the router's --prefill-timeout-ms: D's wait for KV + 1st token
GREEDY = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}

CLIENT = textwrap.dedent("""
    import json, sys, time
    from splitserve.client import Client
    address, prompts, greedy, want = sys.argv[1], *map(json.loads, sys.argv[2:5])
    with Client(address, timeout=float(want.get("timeout", 60)), max_retries=0) as client:
        deadline = time.monotonic() + 60
        while True:
            info = client.list_models()[0]
            if (info.num_prefill_workers, info.num_decode_workers) == (1, 1):
                break
            assert time.monotonic() < deadline, "workers did not register"
            time.sleep(0.2)
        out = []
        for prompt in prompts:
            started = time.monotonic()
            try:
                c = client.generate(prompt, **greedy)
                out.append({"tokens": c.token_ids, "local": c.timings.prefill_local,
                            "ttft_ms": c.timings.ttft_ms, "resumes": c.timings.num_resumes,
                            "finish_reason": c.finish_reason, "error_message": c.error_message})
            except Exception as exc:
                out.append({"error": f"{type(exc).__name__}: {exc}"})
            out[-1]["seconds"] = time.monotonic() - started
    print(json.dumps(out))
""")
# Each worker's metrics page on every line of its input, in one process (MetricsReader);
# #END after each page, #READ after the last.
METRICS = ("import sys, urllib.request\n"
           "for _ in sys.stdin:\n"
           "    for url in sys.argv[1:]:\n"
           "        print(urllib.request.urlopen(url, timeout=5).read().decode())\n"
           "        print('#END')\n"
           "    print('#READ', flush=True)")
_ROLES = ("prefill", "decode")


def client_argv(hosts: netns.TestHosts, prompts: list[list[int]], **want: float) -> list[str]:
    """The client host's command that runs `prompts` one after another and prints a JSON
    list: per prompt its tokens, route, TTFT and resumes, or its error."""
    return hosts.command("client", [
        sys.executable, "-c", CLIENT, f"{hosts.address('router')}:{PORT}", json.dumps(prompts),
        json.dumps(GREEDY), json.dumps(want)])


def parse_results(stdout: str) -> list[dict[str, Any]]:
    return list(json.loads(stdout.strip().splitlines()[-1]))


def generate(hosts: netns.TestHosts, prompts: list[list[int]], **want: float
             ) -> list[dict[str, Any]]:
    result = subprocess.run(client_argv(hosts, prompts, **want), capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return parse_results(result.stdout)


def expected(model: Path, prompts: list[list[int]]) -> list[list[int]]:
    """The colocated engine's greedy tokens."""
    from splitserve import LLM, SamplingParams

    llm = LLM(model=str(model), block_size=8)
    return [o.token_ids for o in llm.generate(prompts, SamplingParams(**GREEDY))]


def worker_metrics(hosts: netns.TestHosts) -> dict[str, dict[str, float]]:
    """Each worker's metrics by role ("prefill", "decode"), read from the client host in one
    go: `name{label="value",...}` -> value, without the worker and role labels."""
    with MetricsReader(hosts) as reader:
        return reader.read()


def _metrics_urls(hosts: netns.TestHosts) -> list[str]:
    return [f"http://{hosts.address(role)}:{METRICS_PORT}/metrics" for role in _ROLES]


def _parse_metrics(text: str) -> dict[str, dict[str, float]]:
    found: dict[str, dict[str, float]] = {}
    for role, part in zip(_ROLES, text.split("#END"), strict=False):
        found[role] = {}
        for line in part.splitlines():
            if line.startswith("splitserve_"):
                key, value = line.rsplit(" ", 1)
                key = re.sub(r'(worker|role)="[^"]*",?', "", key).replace(",}", "}")
                found[role][key.replace("{}", "")] = float(value)
    return found


class MetricsReader:
    """Reads of worker_metrics from one process on the client host, kept running: a read
    costs two HTTP requests, not a Python start in the namespace (~0.1-0.3 s on a loaded
    machine), for tests that poll for a moment that lasts ~2 s."""

    def __init__(self, hosts: netns.TestHosts) -> None:
        self._proc = subprocess.Popen(
            hosts.command("client", [sys.executable, "-c", METRICS,
                                     *_metrics_urls(hosts)]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def read(self) -> dict[str, dict[str, float]]:
        stdin, stdout = self._proc.stdin, self._proc.stdout
        assert stdin is not None and stdout is not None
        stdin.write("\n")
        stdin.flush()
        lines = []
        for line in stdout:  # ends at #READ, or at EOF if the reader died
            if line.startswith("#READ"):
                return _parse_metrics("".join(lines))
            lines.append(line)
        raise AssertionError(f"the metrics reader ended (exit {self._proc.wait(5)})")

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def __enter__(self) -> MetricsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
