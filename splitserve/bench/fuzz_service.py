"""The deployment `splitserve bench fuzz` hits, and what it reads off it: a router and one
decode worker as plain processes on 127.0.0.1 (as splitserve.bench.procs starts them), each
with its stdout and stderr in files, so the bench can count tracebacks and heartbeat
warnings, read the router's RSS, and see whether a process exited."""

from __future__ import annotations

import re
import signal
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

from splitserve.bench.procs import free_port, spawn, wait_for_workers

WORKERS = ("decode-0",)
HEARTBEAT_TTL_S = 3.0  # the workers' --heartbeat-ttl (they beat every third of it)
# What WorkerPresence logs when a heartbeat failed, or came too late (the store forgot it).
_HEARTBEAT_TROUBLE = re.compile(r"heartbeat of \S+ failed|was not live in the store")


def rss_bytes(pid: int) -> int:
    """The process's resident set (VmRSS), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class FuzzService:
    """The running processes (router first), their READY words and log folder."""

    log_dir: Path
    procs: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    words: dict[str, list[str]] = field(default_factory=dict)

    @property
    def grpc_address(self) -> str:
        return self.words["router"][2]

    @property
    def http_address(self) -> str:
        return self.words["router"][6]

    @property
    def router_pid(self) -> int:
        return self.procs["router"].pid

    def start(self, model: str, max_request_bytes: int) -> None:
        self._spawn("router", ["router", "--model", model, "--port", str(free_port()),
                               "--http-port", str(free_port()),
                               "--max-request-bytes", str(max_request_bytes)])
        for name in WORKERS:
            self._spawn(name, [name.split("-")[0], "--model", model, "--cluster",
                               self.words["router"][4], "--worker-id", name, "--threads", "1",
                               "--num-kv-blocks", "256",
                               "--heartbeat-ttl", str(HEARTBEAT_TTL_S)])
        wait_for_workers(self.grpc_address, len(WORKERS))

    def _spawn(self, name: str, args: list[str]) -> None:
        # the bench sends no API key: the processes must not require one
        self.procs[name], self.words[name] = spawn(args, log_dir=self.log_dir, name=name,
                                                   env_drop=("SPLITSERVE_API_KEYS",))

    def exited(self) -> dict[str, int]:
        """Processes that are gone, with their exit status."""
        return {name: proc.returncode for name, proc in self.procs.items()
                if proc.poll() is not None}

    def _logs(self, name: str) -> str:
        return "".join((self.log_dir / f"{name}{ext}").read_text(errors="replace")
                       for ext in (".out", ".err"))

    def tracebacks(self) -> dict[str, int]:
        """"Traceback" lines each process has written so far."""
        return {name: sum(line.lstrip().startswith("Traceback")
                          for line in self._logs(name).splitlines())
                for name in self.procs}

    def traceback_excerpts(self, limit: int = 3, max_lines: int = 40) -> list[str]:
        """The first `limit` tracebacks in the logs, each from its "Traceback" line to the
        exception line (the first one not indented), named by process."""
        found: list[str] = []
        for name in self.procs:
            lines = self._logs(name).splitlines()
            for i, line in enumerate(lines):
                if len(found) < limit and line.lstrip().startswith("Traceback"):
                    end = next((j for j in range(i + 1, len(lines))
                                if lines[j] and not lines[j][0].isspace()), len(lines) - 1)
                    found.append("\n".join([f"[{name}]", *lines[i:min(end + 1,
                                                                      i + max_lines)]]))
        return found

    def heartbeat_trouble(self) -> int:
        """Heartbeat failures and re-registrations the workers have logged so far."""
        return sum(len(_HEARTBEAT_TROUBLE.findall(self._logs(name))) for name in WORKERS)

    def live_workers(self) -> list[str]:
        """Worker ids the router's cluster state holds live now."""
        from splitserve.cluster.remote import RemoteClusterStore
        from splitserve.common import envs

        store = RemoteClusterStore(self.grpc_address, token=envs.cluster_token())
        try:
            return sorted(info.worker_id for info, _ in store.live_workers())
        finally:
            store.close()

    def stop(self) -> None:
        """SIGTERM, workers first (they deregister from the router's cluster state)."""
        for proc in reversed(self.procs.values()):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)



class RssSampler:
    """The highest RSS of a process, sampled every `interval_s` on a thread of its own
    until `stop`."""

    def __init__(self, pid: int, interval_s: float = 0.01) -> None:
        self.pid = pid
        self.peak = rss_bytes(pid)
        self._interval_s = interval_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(self._interval_s):
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
            except (OSError, RuntimeError):
                return  # the process is gone

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return self.peak
