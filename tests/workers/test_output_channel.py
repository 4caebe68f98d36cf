"""decode_worker.output_channel on its own: the hello, the framing, a router that stops
reading, a worker that stops; the router side's endpoint handling (router.output_channel)
and its wait for a last output after the Admit stream's end (router.request)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import grpc
import pytest

from splitserve.cluster.memory import InMemoryClusterStore
from splitserve.cluster.store import WorkerInfo, WorkerRole
from splitserve.common import frames
from splitserve.common.frames import frame
from splitserve.decode_worker import output_channel as oc
from splitserve.router import output_channel as router_oc
from splitserve.router.cluster_io import AsyncStore
from splitserve.router.output_channel import (
    MAX_FRAME_BYTES,
    RETRY_S,
    ChannelLost,
    Mailbox,
    OutputChannel,
    OutputChannels,
)
from splitserve.router.policy import WorkerView
from splitserve.router.request import _watch_admit_stream
from splitserve.router.watch import SilenceWatch
from splitserve.router.workers import WorkerDirectory
from splitserve.v1 import worker_pb2


def _server(token: str | None = None) -> tuple[oc.OutputChannelServer, list[str]]:
    closed: list[str] = []
    return oc.OutputChannelServer("127.0.0.1", token, lambda c: closed.append(c.channel_id)), closed


def _connect(server: oc.OutputChannelServer, channel_id: str, token: str = "",
             rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(frame(worker_pb2.OutputChannelHello(channel_id=channel_id, token=token)))
    return sock


def _open(server: oc.OutputChannelServer, channel_id: str
          ) -> tuple[socket.socket, oc.OutputChannel]:
    """A router's end of a channel (its socket) and the worker's, once the worker has
    acknowledged the hello (its first frame: an empty ChannelOutput)."""
    sock = _connect(server, channel_id)
    sock.settimeout(5)
    assert worker_pb2.ChannelOutput.FromString(oc.read_frame(sock, 1024)) == (
        worker_pb2.ChannelOutput())
    channel = server.get(channel_id)
    assert channel is not None
    return sock, channel


def _wait_for(predicate, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def _with_fake_worker(serve: Callable[[socket.socket], None],
                      main: Callable[[int], Coroutine[Any, Any, None]]) -> None:
    """Run `main(port)` on an event loop while a thread plays a decode worker listening on
    `port`: its one connection goes to `serve`, which reads the hello itself."""
    listener = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            serve(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        asyncio.run(main(listener.getsockname()[1]))
    finally:
        thread.join(5)
        listener.close()


def _hello(conn: socket.socket, ack: bool = True,
           into: list[worker_pb2.OutputChannelHello] | None = None
           ) -> worker_pb2.OutputChannelHello:
    """Read the router's hello (appended to `into` before any answer: a router that sees
    the answer finds it there); `ack`: answer as a worker that holds the channel."""
    hello = worker_pb2.OutputChannelHello.FromString(oc.read_frame(conn, 4096))
    if into is not None:
        into.append(hello)
    if ack:
        conn.sendall(frame(worker_pb2.ChannelOutput()))
    return hello


async def _ready(channels: OutputChannels, address: str) -> OutputChannel:
    deadline = time.monotonic() + 5
    while (channel := channels.get(address)) is None:
        assert time.monotonic() < deadline, "the channel never became ready"
        await asyncio.sleep(0.002)
    return channel


def test_outputs_arrive_framed_in_order() -> None:
    server, _ = _server()
    try:
        sock, channel = _open(server, "c1")
        for i in range(50):
            output = worker_pb2.DecodeOutput(token_ids=[i], num_generated_tokens=i + 1)
            assert channel.send(frame(worker_pb2.ChannelOutput(request_id="r",
                                                                  output=output)))
        sock.settimeout(5)
        got = [worker_pb2.ChannelOutput.FromString(oc.read_frame(sock, 1 << 20))
               for _ in range(50)]
        assert [g.output.token_ids[0] for g in got] == list(range(50))
        sock.close()
        _wait_for(lambda: server.get("c1") is None)  # the router closed it
    finally:
        server.close()


def test_a_hello_without_the_cluster_token_is_refused() -> None:
    server, _ = _server(token="s3cret")
    try:
        bad = _connect(server, "c1", token="guess")
        bad.settimeout(5)
        assert bad.recv(1) == b""  # closed by the worker
        assert server.get("c1") is None
        good = _connect(server, "c2", token="s3cret")
        _wait_for(lambda: server.get("c2") is not None)
        good.close()
    finally:
        server.close()


def test_a_router_that_stops_reading_gets_its_channel_closed_not_the_engine_blocked(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oc, "MAX_BACKLOG_BYTES", 256 << 10)
    server, closed = _server()
    try:
        sock = _connect(server, "c1", rcvbuf=4096)  # and never reads
        _wait_for(lambda: server.get("c1") is not None)
        channel = server.get("c1")
        assert channel is not None
        payload = frame(worker_pb2.ChannelOutput(
            request_id="r", output=worker_pb2.DecodeOutput(token_ids=list(range(1000)))))
        started, sent = time.monotonic(), 0
        while channel.send(payload):
            sent += 1
            assert sent < 100_000
        assert time.monotonic() - started < 5.0  # send() never waited for the socket
        assert channel.closed and closed == ["c1"]
        assert not channel.send(payload)
        sock.close()
    finally:
        server.close()


def test_closing_the_server_closes_its_channels() -> None:
    server, closed = _server()
    sock, _ = _open(server, "c1")
    server.close()
    assert closed == ["c1"]
    sock.settimeout(5)
    assert sock.recv(1) == b""
    sock.close()


def test_the_router_connects_to_the_workers_host_for_a_wildcard_endpoint() -> None:
    """An endpoint on 0.0.0.0 is reached at the worker's gRPC host; a closed channel is not
    opened again within RETRY_S; a mailbox fails with the channel."""
    opened = threading.Event()
    hellos: list[worker_pb2.OutputChannelHello] = []

    def serve(conn: socket.socket) -> None:
        _hello(conn, into=hellos)
        opened.wait(5)
        conn.close()  # the worker goes away

    async def main(port: int) -> None:
        channels = OutputChannels("tok")
        channels.learn("127.0.0.1:5555", f"0.0.0.0:{port}")
        box = (await _ready(channels, "127.0.0.1:5555")).open("r1")
        assert box is not None
        assert hellos[0].token == "tok" and hellos[0].channel_id  # (the ack came after it)
        opened.set()
        with pytest.raises(ChannelLost):
            await asyncio.wait_for(box.get(), 5)
        assert channels.get("127.0.0.1:5555") is None
        channels.learn("127.0.0.1:5555", f"0.0.0.0:{port}")  # too soon: not reopened
        assert "127.0.0.1:5555" not in channels._channels
        channels.close()

    _with_fake_worker(serve, main)


def test_the_router_parses_frames_however_the_bytes_are_split() -> None:
    """Frames cut anywhere and many to a read reach their mailboxes whole and in order,
    a request's outputs in its own; outputs of a request that has no mailbox are dropped;
    an oversized frame header closes the channel and fails every mailbox."""
    outputs = [worker_pb2.ChannelOutput(
        request_id=("a", "b", "gone")[i % 3],
        output=worker_pb2.DecodeOutput(token_ids=[i] * (1 + i % 7), num_generated_tokens=i,
                                       error_message="x" * (i * 37 % 500)))
        for i in range(300)]
    stream = b"".join(frame(o) for o in outputs)
    ready = threading.Event()

    def serve(conn: socket.socket) -> None:
        _hello(conn)
        ready.wait(5)
        cuts = [0, 1, 2, 3, 4, 5, 9, 64, 65, 1000, 1001, 1003, 5000, 20000, len(stream)]
        for start, end in zip(cuts, cuts[1:], strict=False):
            conn.sendall(stream[start:end])
            time.sleep(0.002)  # each piece a read of its own
        conn.sendall((MAX_FRAME_BYTES + 1).to_bytes(4, "little"))
        time.sleep(0.5)

    async def main(port: int) -> None:
        channels = OutputChannels(None)
        channels.learn("127.0.0.1:1", f"127.0.0.1:{port}")
        channel = await _ready(channels, "127.0.0.1:1")
        boxes = {rid: channel.open(rid) for rid in ("a", "b")}
        ready.set()
        for rid, box in boxes.items():
            assert box is not None
            want = [o.output for o in outputs if o.request_id == rid]
            got = [await asyncio.wait_for(box.get(), 5) for _ in want]
            assert got == want
            with pytest.raises(ChannelLost, match="frame"):
                await asyncio.wait_for(box.get(), 5)
        assert channels.get("127.0.0.1:1") is None
        channels.close()

    _with_fake_worker(serve, main)


def test_a_mailbox_gives_its_outputs_then_its_failure_in_order() -> None:
    async def main() -> None:
        box = Mailbox()
        first = asyncio.ensure_future(box.get())
        await asyncio.sleep(0)
        assert not first.done()
        box.put(worker_pb2.DecodeOutput(token_ids=[1]))
        box.put(worker_pb2.DecodeOutput(token_ids=[2]))
        box.fail(ChannelLost("gone"))
        assert list((await first).token_ids) == [1]
        assert list((await box.get()).token_ids) == [2]
        with pytest.raises(ChannelLost, match="gone"):
            await box.get()

    asyncio.run(main())


def test_held_frames_leave_at_the_flush_in_order() -> None:
    """A step's frames (hold=True) wait for the server's flush(); a send without hold while
    frames are held goes out after them, not before; after the flush sends go at once."""
    server, _ = _server()
    try:
        sock, channel = _open(server, "c1")

        def out(i: int) -> bytes:
            return frame(worker_pb2.ChannelOutput(
                request_id="r", output=worker_pb2.DecodeOutput(token_ids=[i])))

        for i in range(3):
            assert channel.send(out(i), hold=True)
        assert channel.send(out(3))  # (another thread's send: it joins the held ones)
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(1)  # nothing before the flush
        server.flush()
        assert channel.send(out(4))
        sock.settimeout(5)
        got = [worker_pb2.ChannelOutput.FromString(oc.read_frame(sock, 1 << 20))
               for _ in range(5)]
        assert [g.output.token_ids[0] for g in got] == [0, 1, 2, 3, 4]
        assert channel.send(out(5), hold=True)
        channel.close("test")
        server.flush()  # a closed channel's held frames are dropped, not sent
        assert not channel.send(out(6), hold=True)
        sock.close()
    finally:
        server.close()


def test_a_request_waits_for_a_channel_that_is_opening_but_not_after_one_failed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """ready(): a channel learned a moment ago is awaited (the first burst after the router
    finds a worker goes over it); once a channel to that worker has closed, a new one that
    is still opening is not waited for."""
    monkeypatch.setattr(router_oc, "OPEN_WAIT_S", 5.0)  # (a loaded machine's connect)
    checked = threading.Event()

    def serve(conn: socket.socket) -> None:
        _hello(conn)
        checked.wait(5)
        conn.close()

    async def main(port: int) -> None:
        channels = OutputChannels(None)
        address = "127.0.0.1:1"
        channels.learn(address, f"127.0.0.1:{port}")
        assert channels.get(address) is None  # opening
        channel = await channels.ready(address)
        assert channel is not None and channel.ready
        box = channel.open("r")
        assert box is not None
        checked.set()
        with pytest.raises(ChannelLost):
            await asyncio.wait_for(box.get(), 5)  # the worker closed it
        assert await channels.ready(address) is None
        channels.learn(address, f"127.0.0.1:{port}")  # too soon after the close: not opened
        assert address not in channels._channels
        channels._closed_at[address] -= RETRY_S  # (as if RETRY_S had passed)
        channels.learn(address, f"127.0.0.1:{port}")
        assert address in channels._channels  # opening again
        started = time.monotonic()
        assert await channels.ready(address) is None  # not waited for
        assert time.monotonic() - started < router_oc.OPEN_WAIT_S / 2
        channels.close()

    _with_fake_worker(serve, main)


def test_a_channel_is_ready_only_once_the_worker_acknowledged_the_hello() -> None:
    """Until the worker's first frame (an empty ChannelOutput) the router names no request
    on the channel: the worker may not hold it yet, and would stream the request over its
    Admit stream instead."""
    hello, ack = threading.Event(), threading.Event()

    def serve(conn: socket.socket) -> None:
        _hello(conn, ack=False)
        hello.set()
        ack.wait(5)
        conn.sendall(frame(worker_pb2.ChannelOutput()))
        time.sleep(1)

    async def main(port: int) -> None:
        channels = OutputChannels(None)
        address = "127.0.0.1:1"
        channels.learn(address, f"127.0.0.1:{port}")
        assert await channels.ready(address) is None  # waited OPEN_WAIT_S: no ack yet
        assert hello.wait(5) and channels.get(address) is None
        ack.set()
        channel = await _ready(channels, address)
        assert await channels.ready(address) is channel
        channels.close()

    _with_fake_worker(serve, main)


def _against_a_worker(main: Callable[[oc.OutputChannelServer], Coroutine[Any, Any, None]]
                      ) -> None:
    """Run `main(server)` on an event loop with a worker's channel server beside it."""
    server, _ = _server()
    try:
        asyncio.run(main(server))
    finally:
        server.close()


async def _learned(server: oc.OutputChannelServer) -> tuple[OutputChannels, OutputChannel]:
    """A router's channels, and its ready channel to `server` (a worker "at 127.0.0.1:1")."""
    channels = OutputChannels(None)
    channels.learn("127.0.0.1:1", server.endpoint)
    return channels, await _ready(channels, "127.0.0.1:1")


def _keepalive(sock: socket.socket) -> tuple[int, int]:
    return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE))


def test_both_ends_of_a_channel_keep_the_connection_alive() -> None:
    """The router sends nothing after its hello and a worker nothing between requests: a
    peer whose host died or restarted without a FIN is found by TCP keepalive, on both
    ends, with the channel's timings."""
    async def main(server: oc.OutputChannelServer) -> None:
        channels, router_end = await _learned(server)
        sock = router_end._transport.get_extra_info("socket")  # type: ignore[union-attr]
        assert _keepalive(sock) == (1, frames.KEEPALIVE_IDLE_S)
        _wait_for(lambda: server.num_open == 1)
        [worker_end] = server._channels.values()
        assert _keepalive(worker_end._sock) == (1, frames.KEEPALIVE_IDLE_S)
        channels.close()

    _against_a_worker(main)


def test_a_stopping_worker_sends_what_its_channels_hold_before_closing() -> None:
    """close(drain_s): the held frames and the backlog (a router reading slowly) go out
    before the channel closes, so requests that ended here get their last outputs."""
    server, closed = _server()
    sock = _connect(server, "c1", rcvbuf=4096)
    _wait_for(lambda: server.get("c1") is not None)
    channel = server.get("c1")
    assert channel is not None
    channel._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    outputs = [frame(worker_pb2.ChannelOutput(  # ~3 MB: more than the socket buffers hold
        request_id="r", output=worker_pb2.DecodeOutput(token_ids=[i] * 1000)))
        for i in range(1500)]
    for data in outputs[:-5]:
        assert channel.send(data)
    for data in outputs[-5:]:
        assert channel.send(data, hold=True)  # a step's outputs, not flushed yet
    assert channel._backlog  # the router has not read: the socket took only part
    stopper = threading.Thread(target=server.close, kwargs={"drain_s": 10.0})
    stopper.start()
    time.sleep(0.2)  # the router reads only now
    sock.settimeout(5)
    got = [worker_pb2.ChannelOutput.FromString(oc.read_frame(sock, 1 << 20))
           for _ in range(len(outputs) + 1)]  # the acknowledgement first
    assert [g.output.token_ids[0] for g in got[1:]] == list(range(1500))
    assert sock.recv(1) == b""  # then the close
    stopper.join(5)
    assert closed == ["c1"]
    sock.close()


def test_a_router_that_hangs_up_at_once_leaves_no_channel_behind() -> None:
    """A channel whose router closes right after its hello may close before the worker
    has registered it: it must not stay registered."""
    server, _ = _server()
    try:
        for i in range(40):
            _connect(server, f"c{i}").close()
        _wait_for(lambda: not any(t.name == "output-channel-hello"  # every hello handled
                                  for t in threading.enumerate()))
        _wait_for(lambda: server.num_open == 0)  # (their I/O threads may still be closing)
        time.sleep(0.2)
        assert server.num_open == 0
    finally:
        server.close()


def test_a_closed_server_accepts_no_more_connections() -> None:
    server, _ = _server()
    port = server.port
    server.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_a_worker_back_at_its_address_with_another_endpoint_gets_a_new_channel(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker restarted at the same address advertises another channel endpoint: the
    router replaces its channel at once (the old one's requests fail: ChannelLost, each
    its own exception), and learning the same endpoint again changes nothing."""
    monkeypatch.setattr(router_oc, "OPEN_WAIT_S", 5.0)  # (a loaded machine's connect)
    old_server, _ = _server()
    new_server, _ = _server()

    async def main() -> None:
        channels = OutputChannels(None)
        address = "127.0.0.1:1"
        channels.learn(address, old_server.endpoint)
        old = await _ready(channels, address)
        boxes = [old.open("r1"), old.open("r2")]
        channels.learn(address, new_server.endpoint)
        assert old.closed
        errors = []
        for box in boxes:
            assert box is not None
            with pytest.raises(ChannelLost) as caught:
                await box.get()
            errors.append(caught.value)
        assert errors[0] is not errors[1]
        new = await channels.ready(address)  # waited for: a new worker's channel
        assert new is not None and new is not old and new.endpoint == new_server.endpoint
        channels.learn(address, new_server.endpoint)
        assert channels.get(address) is new
        channels.close()

    try:
        asyncio.run(main())
    finally:
        old_server.close()
        new_server.close()


def test_closed_channels_are_dropped_and_only_so_many_closes_remembered(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(router_oc, "MAX_CLOSED_REMEMBERED", 2)
    refusing = socket.create_server(("127.0.0.1", 0))
    port = refusing.getsockname()[1]
    refusing.close()  # nothing listens there: every channel fails at once

    async def main() -> None:
        channels = OutputChannels(None)
        for i in range(3):
            channels.learn(f"10.0.0.{i}:1", f"127.0.0.1:{port}")
        deadline = time.monotonic() + 5
        while channels._channels:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert list(channels._closed_at) == ["10.0.0.1:1", "10.0.0.2:1"]
        channels.close()

    asyncio.run(main())


class _EndedAdmitStream:
    """A stand-in for grpc's call: an Admit stream that D ended with OK (its outputs went
    over the output channel)."""

    def __init__(self) -> None:
        self.ended = False

    async def read(self) -> object:
        self.ended = True
        return grpc.aio.EOF

    def cancel(self) -> bool:
        return False

    def done(self) -> bool:
        return self.ended


async def _healthy() -> None:
    return None


def _watch_ended_stream(mailbox: Mailbox, channel: OutputChannel | None
                        ) -> tuple[asyncio.Task[None], SilenceWatch]:
    call = _EndedAdmitStream()
    worker = WorkerView("decode-x", address="127.0.0.1:1")
    watch = SilenceWatch(call, "decode", worker, _healthy,  # type: ignore[arg-type]
                         WorkerDirectory(None, "m", 16, refresh_s=1.0))  # type: ignore[arg-type]
    task = asyncio.get_running_loop().create_task(_watch_admit_stream(
        call, mailbox, watch, worker, worker.worker_id, channel))  # type: ignore[arg-type]
    return task, watch


def test_a_last_output_that_never_comes_over_the_channel_closes_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """D ended a request's Admit stream after putting its last output on the channel: if
    that output never arrives (a channel dead without closing), the router closes the
    channel after LAST_OUTPUT_WAIT_S, so every request on it resumes instead of waiting
    for ever; outputs that came before are read first."""
    monkeypatch.setattr(router_oc, "LAST_OUTPUT_WAIT_S", 0.1)
    async def main(server: oc.OutputChannelServer) -> None:
        channels, channel = await _learned(server)
        mailbox, other = channel.open("r1"), channel.open("r2")
        assert mailbox is not None and other is not None
        task, watch = _watch_ended_stream(mailbox, channel)
        mailbox.put(worker_pb2.DecodeOutput(token_ids=[1]))
        assert (await mailbox.get()).token_ids == [1]
        for box in (mailbox, other):
            with pytest.raises(ChannelLost, match="did not come over the output channel"):
                await asyncio.wait_for(box.get(), 5)
        assert channel.closed and channels.get("127.0.0.1:1") is None
        await task
        watch.stop()
        channels.close()

    _against_a_worker(main)


def test_a_last_output_that_comes_after_the_streams_end_is_read(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(router_oc, "LAST_OUTPUT_WAIT_S", 0.3)

    async def main() -> None:
        mailbox = Mailbox()
        task, watch = _watch_ended_stream(mailbox, None)
        await asyncio.sleep(0.05)  # the EOF came first, the last output a moment later
        mailbox.put(worker_pb2.DecodeOutput(token_ids=[7], finish_reason=1))
        assert (await mailbox.get()).token_ids == [7]
        task.cancel()  # the request leaves with its last output
        await asyncio.sleep(0.4)
        assert task.cancelled() and not mailbox._items  # nothing failed it
        watch.stop()

    asyncio.run(main())


def test_a_last_output_that_came_but_is_not_read_yet_keeps_the_channel(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A request relaying to a slow client reads its last output long after it came: that
    is no dead channel (closing it would resume every other request on it)."""
    monkeypatch.setattr(router_oc, "LAST_OUTPUT_WAIT_S", 0.1)
    async def main(server: oc.OutputChannelServer) -> None:
        channels, channel = await _learned(server)
        mailbox = channel.open("r1")
        assert mailbox is not None
        mailbox.put(worker_pb2.DecodeOutput(token_ids=[3]))
        mailbox.put(worker_pb2.DecodeOutput(token_ids=[4], finish_reason=1))
        task, watch = _watch_ended_stream(mailbox, channel)
        await asyncio.sleep(0.3)  # three times the wait, nothing read
        assert not channel.closed and task.done()
        assert [(await mailbox.get()).token_ids[0] for _ in range(2)] == [3, 4]
        watch.stop()
        channels.close()

    _against_a_worker(main)


def test_a_malformed_endpoint_opens_no_channel_and_breaks_no_discovery(
        caplog: pytest.LogCaptureFixture) -> None:
    """An endpoint the router cannot dial (another version's, a hand-made entry) leaves the
    worker's requests on gRPC, warns once, and does not stop the directory from placing
    the worker (or the workers after it) in the decode index."""
    async def main() -> None:
        channels = OutputChannels(None)
        for endpoint in ("host", "host:", "h:abc", "h:99999", "h:0"):
            channels.learn("10.0.0.1:1", endpoint)
            channels.learn("10.0.0.1:1", endpoint)
        assert not channels._channels
        warnings = [r for r in caplog.records if "malformed output channel" in r.getMessage()]
        assert len(warnings) == 5  # once each
        store = InMemoryClusterStore()
        for i, endpoint in enumerate(("host", "127.0.0.1:1")):
            store.register_worker(WorkerInfo(f"d{i}", WorkerRole.DECODE, f"10.0.0.{i}:1", "m",
                                             16, 64, output_endpoint=endpoint), ttl_s=60)

        def hook(info: WorkerInfo) -> None:
            channels.learn(info.address, info.output_endpoint)
            if info.worker_id == "d1":
                raise RuntimeError("a hook that fails")

        directory = WorkerDirectory(AsyncStore(store), "m", 16, refresh_s=1.0,
                                    on_decode_worker=hook)
        snapshot = await directory.snapshot(force=True)
        assert {w.worker_id for w in snapshot.decode} == {"d0", "d1"}
        assert "10.0.0.0:1" not in channels._channels  # d0's malformed endpoint
        await directory.close()
        channels.close()

    asyncio.run(main())


def test_a_hello_never_acknowledged_closes_the_channel_and_a_later_one_opens(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that took the connection but never answers the hello (its accept thread
    gone, its host frozen): the router closes the channel after ACK_TIMEOUT_S, so that no
    request keeps waiting OPEN_WAIT_S for it, and opens a new one once RETRY_S passed."""
    monkeypatch.setattr(router_oc, "ACK_TIMEOUT_S", 0.3)
    monkeypatch.setattr(router_oc, "RETRY_S", 0.2)
    hellos: list[worker_pb2.OutputChannelHello] = []
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:  # the first connection gets no answer; the second is acknowledged
        first, _ = listener.accept()
        with first:
            first.settimeout(5)
            _hello(first, ack=False, into=hellos)
            second, _ = listener.accept()
            with second:
                second.settimeout(5)
                _hello(second, into=hellos)
                time.sleep(1)

    async def main() -> None:
        channels = OutputChannels(None)
        address = "127.0.0.1:1"
        channels.learn(address, f"127.0.0.1:{port}")
        opening = channels._channels[address]
        deadline = time.monotonic() + 5
        while not opening.closed:
            assert time.monotonic() < deadline, "the unacknowledged channel stayed open"
            await asyncio.sleep(0.01)
        started = time.monotonic()
        assert await channels.ready(address) is None
        assert time.monotonic() - started < router_oc.OPEN_WAIT_S / 2  # no wait for it
        await asyncio.sleep(0.25)  # RETRY_S
        channels.learn(address, f"127.0.0.1:{port}")  # a later Admission names it again
        channel = await _ready(channels, address)
        assert channel is not opening
        channels.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        asyncio.run(main())
    finally:
        thread.join(5)
        listener.close()
    assert len(hellos) == 2 and hellos[0].channel_id != hellos[1].channel_id


def test_a_failed_accept_does_not_stop_the_worker_accepting(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """accept() failing (out of file descriptors: EMFILE) leaves the listener open and the
    kernel queueing connections: the worker goes on accepting, or routers connected meanwhile
    would wait for an acknowledgement that never comes."""
    server, _ = _server()
    try:
        real = server._listener
        failures = [OSError(24, "Too many open files")]

        class Flaky:
            def accept(self):  # type: ignore[no-untyped-def]
                if failures:
                    raise failures.pop()
                return real.accept()

            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

        monkeypatch.setattr(oc, "_ACCEPT_RETRY_S", 0.01)
        server._listener = Flaky()  # type: ignore[assignment]
        sock = _connect(server, "after-emfile")  # the accept thread is blocked in accept():
        sock.close()  # it takes this connection, then the patched listener fails once
        sock, channel = _open(server, "after-emfile-2")
        assert not failures and channel.channel_id == "after-emfile-2"
        sock.close()
    finally:
        server.close()
