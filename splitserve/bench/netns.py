"""Test hosts on one machine: Linux network namespaces joined by a bridge (issue 11).

    with TestHosts(["router", "prefill", "decode"]) as hosts:
        hosts.address("router")                      # "10.231.7.1", private, this test's own
        hosts.command("router", ["python", ...])     # argv that runs inside that host

Each host is a network namespace with its own loopback and one interface, `eth0`, holding a
private address in a /24 chosen at random from 10.231.0.0/16; the other ends of the veth
pairs sit on a bridge in a separate "switch" namespace, so the machine's own network
namespace is never touched and nothing outside the machine is ever addressed. Needs root
and `ip` (iproute2); `available()` says whether this machine can. `cut`/`mend` take a
host's link down and up (a network partition); `delay` adds latency with `tc netem`.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
from collections.abc import Sequence
from types import TracebackType

SUBNET = "10.231"
IFNAME = "eth0"


def _ip(*args: str, ns: str | None = None) -> None:
    argv = ["ip", *(("-n", ns) if ns else ()), *args]
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip()}")


def available() -> str | None:
    """None when test hosts can be built here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    try:  # everything a test host needs: namespaces, a bridge, a veth pair, addresses
        with TestHosts(["probe"]):
            pass
    except RuntimeError as exc:
        return f"cannot build a test host here: {exc}"
    return None


class TestHosts:
    """Namespaced hosts on one bridge; a context manager that removes them on exit."""

    def __init__(self, names: Sequence[str]) -> None:
        self.tag = f"{os.getpid() % 10000}{random.randrange(100):02d}"
        self.subnet = f"{SUBNET}.{random.randrange(1, 255)}"
        self.switch = f"ss-sw-{self.tag}"
        self.names = list(names)
        self._ns = {name: f"ss-{i}-{self.tag}" for i, name in enumerate(self.names)}
        self._addr = {name: f"{self.subnet}.{i + 1}" for i, name in enumerate(self.names)}

    def __enter__(self) -> TestHosts:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _build(self) -> None:
        _ip("netns", "add", self.switch)
        _ip("link", "add", "br0", "type", "bridge", ns=self.switch)
        _ip("link", "set", "br0", "up", ns=self.switch)
        for i, name in enumerate(self.names):
            ns, port = self._ns[name], f"p{i}"
            _ip("netns", "add", ns)
            _ip("link", "set", "lo", "up", ns=ns)
            # Made inside the host, then one end moved to the switch: no root-namespace link.
            _ip("link", "add", IFNAME, "type", "veth", "peer", "name", port, ns=ns)
            _ip("link", "set", port, "netns", self.switch, ns=ns)
            _ip("addr", "add", f"{self._addr[name]}/24", "dev", IFNAME, ns=ns)
            _ip("link", "set", IFNAME, "up", ns=ns)
            _ip("link", "set", port, "master", "br0", ns=self.switch)
            _ip("link", "set", port, "up", ns=self.switch)

    def close(self) -> None:
        for name in self.names:  # a process left inside would keep its namespace alive
            self.kill_all(name)
        for ns in [*self._ns.values(), self.switch]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def pids(self, name: str) -> list[int]:
        """Every process inside host `name` (`ip netns pids`), whoever started it."""
        out = subprocess.run(["ip", "netns", "pids", self._ns[name]], capture_output=True,
                             text=True).stdout
        return [int(pid) for pid in out.split()]

    def kill_all(self, name: str) -> None:
        """SIGKILL every process still inside host `name` (only this object's hosts)."""
        for pid in self.pids(name):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def address(self, name: str) -> str:
        return self._addr[name]

    def namespace(self, name: str) -> str:
        return self._ns[name]

    def command(self, name: str, argv: Sequence[str]) -> list[str]:
        """`argv` run inside host `name`."""
        return ["ip", "netns", "exec", self._ns[name], *argv]

    def run(self, name: str, argv: Sequence[str], timeout_s: float = 60.0
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(name, argv), capture_output=True, text=True,
                              timeout=timeout_s)

    def listeners(self, name: str) -> list[str]:
        """Local addresses of the TCP listeners inside host `name` (`ss -Htln`), IPv4-mapped
        IPv6 ones ("[::ffff:10.0.0.1]:80", a dual-stack socket bound to an IPv4 address)
        written as IPv4."""
        out = self.run(name, ["ss", "-Htln"]).stdout
        found = [line.split()[3] for line in out.splitlines() if line.strip()]
        return [re.sub(r"^\[::ffff:([0-9.]+)\]:", r"\1:", addr) for addr in found]

    def cut(self, name: str) -> None:
        """Take host `name`'s link down: a partition (until `mend`)."""
        _ip("link", "set", IFNAME, "down", ns=self._ns[name])

    def mend(self, name: str) -> None:
        _ip("link", "set", IFNAME, "up", ns=self._ns[name])

    def delay(self, name: str, delay_ms: float, loss_pct: float = 0.0) -> None:
        """Add latency (and loss) to host `name`'s outgoing packets with `tc netem`."""
        argv = ["tc", "qdisc", "replace", "dev", IFNAME, "root", "netem", "delay",
                f"{delay_ms}ms", *(("loss", f"{loss_pct}%") if loss_pct else ())]
        result = self.run(name, argv)
        if result.returncode != 0:
            raise RuntimeError(f"tc netem in {name}: {result.stderr.strip()}")
