"""The link faults of bench.netns on bare test hosts: `partition` stops only the path
between two hosts, `shape` sends a host's traffic to one peer through a rate-capped class
and drops the share of it asked for, and delay either works (netem) or says why not."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from splitserve.bench import netns

WHY_NOT = netns.available()
needs_hosts = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")
TC_MISSING = None if WHY_NOT else netns.tc_missing()
needs_tc = pytest.mark.skipif(TC_MISSING is not None, reason=TC_MISSING or "")
PORT = 9999

# Counts UDP datagrams (or TCP bytes) on ADDRESS:PORT until nothing came for 0.5 s.
RECEIVER = textwrap.dedent("""
    import socket, sys
    kind, address, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM)
    s.bind((address, port))
    if kind == "tcp":
        s.listen()
    print("ready", flush=True)
    s.settimeout(10)
    if kind == "tcp":
        s, _ = s.accept()
    n = 0
    try:
        while True:
            data = s.recv(65536)
            if not data and kind == "tcp":
                break
            n += 1 if kind == "udp" else len(data)
            s.settimeout(0.5)
    except TimeoutError:
        pass
    print(n)
""")
UDP_SENDER = textwrap.dedent("""
    import socket, sys, time
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(int(sys.argv[3])):
        s.sendto(b"x" * 64, (sys.argv[1], int(sys.argv[2])))
        time.sleep(0.0002)
""")
TCP_CONNECT = textwrap.dedent("""
    import errno, socket, sys
    try:
        with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1) as c:
            c.sendall(b"y" * int(sys.argv[3]))
        print("connected")
    except OSError as exc:
        print(errno.errorcode.get(exc.errno or 0, type(exc).__name__))
""")


@pytest.fixture(scope="module")
def hosts() -> Iterator[netns.TestHosts]:
    with netns.TestHosts(["a", "b", "c"]) as made:
        for src in ("a", "c"):  # a new bridge may drop the first packets for a moment
            for _ in range(20):
                receiver = _Receiver(made, "b", "tcp")
                if _tcp(made, src, "b") == "connected":
                    receiver.count()
                    break
                receiver.proc.kill()
                receiver.proc.wait()
        yield made


class _Receiver:
    def __init__(self, hosts: netns.TestHosts, name: str, kind: str) -> None:
        self.proc = subprocess.Popen(
            hosts.command(name, [sys.executable, "-c", RECEIVER, kind, hosts.address(name),
                                 str(PORT)]), stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    def count(self) -> int:
        out, _ = self.proc.communicate(timeout=20)
        return int(out.split()[-1])


def _tcp(hosts: netns.TestHosts, src: str, dst: str, nbytes: int = 1) -> str:
    argv = [sys.executable, "-c", TCP_CONNECT, hosts.address(dst), str(PORT), str(nbytes)]
    return hosts.run(src, argv).stdout.strip()


def _tc_stats(hosts: netns.TestHosts, name: str, what: str) -> str:
    return hosts.run(name, ["tc", "-s", what, "show", "dev", netns.IFNAME]).stdout


def test_loss_filter_is_a_classic_bpf_program_of_the_share_asked_for() -> None:
    rand = "32 0 0 4294963256"  # ld rand (SKF_AD_OFF + SKF_AD_RANDOM)
    assert netns.loss_filter_bytecode(25.0) == (
        f"4,{rand},53 1 0 1073741824,6 0 0 4294967295,6 0 0 0")
    # 10.231.7.2 == 0x0AE70702: the IPv4 destination (byte 30 from the Ethernet header)
    assert netns.loss_filter_bytecode(100.0, "10.231.7.2") == (
        f"6,32 0 0 30,21 0 3 182912770,{rand},53 1 0 4294967295,6 0 0 4294967295,6 0 0 0")
    for bad in (0.0, -1.0, 100.5):
        with pytest.raises(ValueError):
            netns.loss_filter_bytecode(bad)


@needs_hosts
def test_a_partition_stops_only_the_path_between_two_hosts(hosts: netns.TestHosts) -> None:
    receiver = _Receiver(hosts, "b", "tcp")
    assert _tcp(hosts, "a", "b") == "connected"
    receiver.count()
    hosts.partition("a", "b")
    try:
        assert _tcp(hosts, "a", "b") == "EINVAL"  # the blackhole route: nothing leaves
        receiver = _Receiver(hosts, "b", "tcp")
        assert _tcp(hosts, "c", "b", 1000) == "connected"  # b's other paths stay up
        assert receiver.count() == 1000
    finally:
        hosts.heal("a", "b")
    receiver = _Receiver(hosts, "b", "tcp")
    assert _tcp(hosts, "a", "b", 1000) == "connected"
    assert receiver.count() == 1000


@needs_hosts
@needs_tc
def test_shape_caps_and_thins_only_the_path_to_its_peer(hosts: netns.TestHosts) -> None:
    hosts.shape("a", "b", rate_kbit=4000, loss_pct=20.0)
    try:
        receivers = {name: _Receiver(hosts, name, "udp") for name in ("b", "c")}
        for name in receivers:
            hosts.run("a", [sys.executable, "-c", UDP_SENDER, hosts.address(name), str(PORT),
                            "1000"])
        got = {name: receiver.count() for name, receiver in receivers.items()}
        # 20% of 1,000 to b: 200 +- 13 (one standard deviation); nothing lost to c
        assert 120 < 1000 - got["b"] < 280, got
        assert got["c"] == 1000, got
        classes = _tc_stats(hosts, "a", "class")
        shaped = classes[classes.index("class htb 1:2"):].split("\n")[:2]
        assert "rate 4Mbit" in shaped[0] and " 0 pkt" not in shaped[1], classes
        assert "dropped 0," not in _tc_stats(hosts, "a", "qdisc").split("pfifo")[1]
    finally:
        hosts.unshape("a")
    receiver = _Receiver(hosts, "b", "udp")
    hosts.run("a", [sys.executable, "-c", UDP_SENDER, hosts.address("b"), str(PORT), "200"])
    assert receiver.count() == 200


@needs_hosts
@needs_tc
def test_delay_needs_netem_and_says_so_where_the_kernel_lacks_it(
        hosts: netns.TestHosts) -> None:
    missing = netns.netem_missing()
    try:
        if missing is not None:
            with pytest.raises(RuntimeError, match="netem"):
                hosts.shape("a", "b", delay_ms=20)
            return
        hosts.shape("a", "b", delay_ms=20)
        assert "delay 20ms" in _tc_stats(hosts, "a", "qdisc")
    finally:
        hosts.run("a", ["tc", "qdisc", "del", "dev", netns.IFNAME, "root"])
