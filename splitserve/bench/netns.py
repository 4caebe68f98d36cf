"""Test hosts on one machine: Linux network namespaces joined by a bridge (issue 11).

    with TestHosts(["router", "prefill", "decode"]) as hosts:
        hosts.address("router")                      # "10.231.7.1", private, this test's own
        hosts.command("router", ["python", ...])     # argv that runs inside that host

Each host is a network namespace with its own loopback and one interface, `eth0`, holding a
private address in a /24 chosen at random from 10.231.0.0/16; the other ends of the veth
pairs sit on a bridge in a separate "switch" namespace, so the machine's own network
namespace is never touched and nothing outside the machine is ever addressed. Needs root
and `ip` (iproute2); `available()` says whether this machine can. `cut`/`mend` take a
host's link down and up (a network partition); `partition`/`heal` cut only the path
between two hosts (a blackhole route in each); `shape`/`unshape` slow, thin out or delay
what a host sends (to one peer or to all) with `tc`: an HTB rate, random loss by a
classic-BPF filter into a class that queues nothing (pfifo limit 0), and delay with netem
where the kernel has it (`netem_missing()` says; many small VM kernels lack netem, prio,
gact and iptables' statistic match, so loss does not rely on them).
"""

from __future__ import annotations

import itertools
import os
import random
import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Sequence
from functools import cache
from types import TracebackType

SUBNET = "10.231"
IFNAME = "eth0"
_UNSHAPED = "10gbit"  # the rate of traffic `shape` leaves alone (a veth has no line rate)
_QUANTUM = "65536"  # bytes an HTB class may send per round: above any packet (quiets tc)


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


@cache
def tc_missing() -> str | None:
    """None when `shape` can cap and thin a path here (tc with HTB, pfifo and classic-BPF
    filters), else why not. Probed once per process in throwaway hosts."""
    if shutil.which("tc") is None:
        return "tc (iproute2) is not installed"
    try:
        with TestHosts(["probe", "peer"]) as hosts:
            hosts.shape("probe", "peer", rate_kbit=1000, loss_pct=1.0)
    except RuntimeError as exc:
        return f"cannot shape a test host's link here: {exc}"
    return None


@cache
def netem_missing() -> str | None:
    """None when `shape(..., delay_ms=...)` can work here (the kernel has netem), else why
    not. Probed once per process in a throwaway host."""
    if shutil.which("tc") is None:
        return "tc (iproute2) is not installed"
    with TestHosts(["probe"]) as hosts:
        result = hosts.run("probe", ["tc", "qdisc", "add", "dev", IFNAME, "root", "netem",
                                     "delay", "1ms"])
    return None if result.returncode == 0 else f"tc netem: {result.stderr.strip()}"


def loss_filter_bytecode(loss_pct: float, dst: str | None = None) -> str:
    """A classic-BPF program for `tc filter ... bpf bytecode` that matches (returns -1) a
    random `loss_pct` percent of IPv4 packets, only those to `dst` when given. tc runs it
    with the packet's data at the Ethernet header, so the IPv4 destination is at byte 30."""
    if not 0.0 < loss_pct <= 100.0:
        raise ValueError(f"loss_pct must be in (0, 100], got {loss_pct}")
    threshold = min(round(loss_pct / 100.0 * 2**32), 2**32 - 1)
    rand = 2**32 - 0x1000 + 56  # SKF_AD_OFF + SKF_AD_RANDOM: a fresh 32-bit random number
    program = [
        (0x20, 0, 0, rand),  # ld rand
        (0x35, 1, 0, threshold),  # jge #threshold: no match
        (0x06, 0, 0, 2**32 - 1),  # ret #-1: match (the filter's class)
        (0x06, 0, 0, 0),  # ret #0: no match
    ]
    if dst is not None:
        a, b, c, d = (int(part) for part in dst.split("."))
        program[:0] = [
            (0x20, 0, 0, 30),  # ld [30]: the IPv4 destination
            (0x15, 0, 3, (a << 24) | (b << 16) | (c << 8) | d),  # jeq #dst, else no match
        ]
    return ",".join([str(len(program)), *(f"{op} {jt} {jf} {k}" for op, jt, jf, k in program)])


_HOST_SETS = itertools.count(random.randrange(100))


class TestHosts:
    """Namespaced hosts on one bridge; a context manager that removes them on exit."""

    def __init__(self, names: Sequence[str]) -> None:
        # Unique among the hosts of this process (a counter, not a random draw: two sets
        # alive at once in one test session once drew the same names), and of others (pid).
        self.tag = f"{os.getpid() % 10000}{next(_HOST_SETS) % 100:02d}"
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
            # One TCP segment per packet, as on a wire: otherwise a long-lived connection
            # sends 64 KB super-packets that `shape` would pace and drop whole. (Best effort:
            # an old kernel without the setting still makes a usable host.)
            subprocess.run(["ip", "-n", ns, "link", "set", IFNAME, "gso_max_segs", "1"],
                           capture_output=True)
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

    def partition(self, a: str, b: str) -> None:
        """Drop every packet between hosts `a` and `b`, both ways, until `heal`; their other
        paths stay up. A blackhole route to the other host in each: open connections stall
        (TCP retransmits into nothing), new ones fail at once (EINVAL). Packets already
        queued in a qdisc still leave: `unshape` drops those."""
        for here, there in ((a, b), (b, a)):
            _ip("route", "add", "blackhole", f"{self._addr[there]}/32", ns=self._ns[here])

    def heal(self, a: str, b: str) -> None:
        for here, there in ((a, b), (b, a)):
            _ip("route", "del", "blackhole", f"{self._addr[there]}/32", ns=self._ns[here])

    def shape(self, name: str, peer: str | None = None, *, rate_kbit: float | None = None,
              loss_pct: float = 0.0, delay_ms: float = 0.0) -> None:
        """Impair what host `name` sends (to host `peer` only, when given): at most
        `rate_kbit`, a random `loss_pct` percent dropped, `delay_ms` added (needs netem:
        RuntimeError where the kernel lacks it, see `netem_missing`). Replaces an earlier
        shape of this host; `unshape` removes it. The other direction is the peer's own."""
        dst = self._addr[peer] if peer is not None else None
        rate = f"{rate_kbit}kbit" if rate_kbit is not None else _UNSHAPED
        tc = self._tc(name)
        # Class 1:1 carries what is left alone, 1:2 the shaped path, 1:3 the lost packets.
        self.run(name, ["tc", "qdisc", "del", "dev", IFNAME, "root"])  # an earlier shape
        tc("qdisc", "add", "dev", IFNAME, "root", "handle", "1:", "htb",
           "default", "1" if dst else "2")
        for classid, class_rate in (("1:1", _UNSHAPED), ("1:2", rate), ("1:3", _UNSHAPED)):
            tc("class", "add", "dev", IFNAME, "parent", "1:", "classid", classid, "htb",
               "rate", class_rate, "ceil", class_rate, "quantum", _QUANTUM)
        tc("qdisc", "add", "dev", IFNAME, "parent", "1:3", "handle", "3:", "pfifo", "limit", "0")
        if delay_ms:
            tc("qdisc", "add", "dev", IFNAME, "parent", "1:2", "netem", "delay",
               f"{delay_ms}ms")
        if loss_pct:
            tc("filter", "add", "dev", IFNAME, "parent", "1:", "protocol", "ip", "prio", "1",
               "bpf", "bytecode", loss_filter_bytecode(loss_pct, dst),
               "classid", "1:3")
        if dst:
            tc("filter", "add", "dev", IFNAME, "parent", "1:", "protocol", "ip", "prio", "2",
               "u32", "match", "ip", "dst", f"{dst}/32", "flowid", "1:2")

    def unshape(self, name: str) -> None:
        """Remove host `name`'s shape; what it still held queued is dropped."""
        self._tc(name)("qdisc", "del", "dev", IFNAME, "root")

    def _tc(self, name: str) -> Callable[..., None]:
        def tc(*args: str) -> None:
            result = self.run(name, ["tc", *args])
            if result.returncode != 0:
                raise RuntimeError(f"tc {' '.join(args)} in {name}: {result.stderr.strip()}")

        return tc
