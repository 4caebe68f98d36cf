"""Output channels: a router's requests' outputs over one TCP connection, written by the
engine thread.

Over gRPC every output of every request crosses the worker's Admit-stream thread (woken per
output, building and sending one message and waiting for the send, holding the GIL the
engine's Python needs), then the router's gRPC receive path: about 0.3 ms of CPU per token
on this side alone, on the cores the engine steps on. With an output channel the engine
thread frames each ChannelOutput (worker.proto) and hands it to the socket itself, as the
step's outputs are dispatched: a send() of tens of bytes (the GIL released), nothing woken
here, and the router's asyncio loop reads the frames straight off the connection. The
outputs of one engine step go out together: the sinks hold their frames (send(hold=True))
and the engine loop flushes every channel once the step's outputs are dispatched (one
send() per channel and step, so one read on the router, however large the batch).

A router opens one channel per worker (OutputChannelHello: its channel id, and the
cluster token when the cluster has one; the worker's first frame, an empty ChannelOutput,
says it holds the channel) and names it in its AdmitRequests; the Admit stream
then carries the Admission only and ends after the request's last output went out here.
send() never blocks the engine: what the socket does not take at once waits in the
channel's backlog for its I/O thread, and a backlog over MAX_BACKLOG_BYTES (the router
stopped reading) closes the channel. A channel that closes, from either end, aborts every
request still bound to it (its Admit stream ends with UNAVAILABLE), so the router resumes
them elsewhere and no KV block outlives them. A worker that stops or changes role ends its
channels gracefully (`OutputChannelServer.close(drain_s)`): what is held or backlogged goes
out first, so a request that ended here before (its Admit stream ended OK) gets its last
outputs rather than a lost channel. Both ends keep the connection alive with TCP keepalive
(common.frames), so a peer that vanished without a word is noticed. Not offered under
mutual TLS (the channel is plain TCP): requests then stream over gRPC.
"""

from __future__ import annotations

import hmac
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from splitserve.common.frames import FRAME_HEADER, frame, keep_alive
from splitserve.v1 import worker_pb2

log = logging.getLogger(__name__)
_ACCEPT_RETRY_S = 0.1  # after a failed accept (e.g. out of file descriptors)

MAX_HELLO_BYTES = 4096
HELLO_TIMEOUT_S = 5.0
MAX_BACKLOG_BYTES = 8 << 20  # unsent output bytes a channel holds before it gives up


def read_frame(sock: socket.socket, limit: int) -> bytes:
    """One framed message from a blocking socket (ConnectionError: closed, or over `limit`)."""
    (size,) = FRAME_HEADER.unpack(_read_exactly(sock, FRAME_HEADER.size))
    if size > limit:
        raise ConnectionError(f"a {size}-byte frame, over the {limit}-byte limit")
    return _read_exactly(sock, size)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the connection closed")
        data += chunk
    return bytes(data)


class OutputChannel:
    """One router's connection: send() from any thread, never blocking; the requests bound
    to it. Its I/O thread owns the socket and the wake-up pipe (and closes them)."""

    def __init__(self, channel_id: str, sock: socket.socket,
                 on_closed: Callable[[OutputChannel], None],
                 server: OutputChannelServer | None = None) -> None:
        self.channel_id = channel_id
        self._sock = sock
        sock.setblocking(False)
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)  # the backlog emptied, or closed
        self._backlog = bytearray()
        self._held: list[bytes] = []  # this step's frames, until flush()
        self._server = server
        self._closed = False
        self._requests: dict[str, Any] = {}
        self._on_closed = on_closed
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)  # (a full pipe already wakes the I/O thread)
        self._thread = threading.Thread(target=self._io, name=f"output-channel-{channel_id[:8]}",
                                        daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self._closed

    def bind(self, request_id: str, request: Any) -> bool:
        """Count `request` as sent over this channel (False: it is closed)."""
        with self._lock:
            if self._closed:
                return False
            self._requests[request_id] = request
            return True

    def unbind(self, request_id: str) -> None:
        with self._lock:
            self._requests.pop(request_id, None)

    def unbind_all(self) -> list[Any]:
        with self._lock:
            requests = list(self._requests.values())
            self._requests.clear()
        return requests

    def send(self, data: bytes, hold: bool = False) -> bool:
        """Queue `data` for the router; False when the channel is closed (or closes now, its
        backlog over MAX_BACKLOG_BYTES, or the socket failed). `hold` (the engine thread
        dispatching a step's outputs): keep it until the server's flush(); a send while
        data is held joins it, so a request's outputs leave in order from any thread."""
        hold = hold and self._server is not None  # (a channel of no server: no one flushes)
        with self._lock:
            if self._closed:
                return False
            if hold or self._held:
                if not self._held:
                    self._server.held(self)  # type: ignore[union-attr]  # (hold: a server)
                self._held.append(data)
                return True
            failed = self._send_locked(data)
        if failed:
            self.close(failed)
            return False
        return True

    def flush(self) -> None:
        """Send what is held, as one write."""
        with self._lock:
            if self._closed or not self._held:
                self._held.clear()
                return
            data = self._held[0] if len(self._held) == 1 else b"".join(self._held)
            self._held.clear()
            failed = self._send_locked(data)
        if failed:
            self.close(failed)

    def _send_locked(self, data: bytes) -> str:
        """Write `data` or queue it behind the backlog (under the lock): why it failed, or ""."""
        if self._backlog:
            self._backlog += data
            if len(self._backlog) > MAX_BACKLOG_BYTES:
                return f"the router left over {MAX_BACKLOG_BYTES} bytes unread"
            return ""
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            return f"{type(exc).__name__}: {exc}"
        if sent < len(data):
            self._backlog += memoryview(data)[sent:]
            self._wake()  # the I/O thread now waits to write
        return ""

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"w")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already

    def finish(self, why: str, timeout_s: float) -> None:
        """Close the channel gracefully: send what is held, wait up to `timeout_s` for the
        backlog to go out (the router reading it), then close."""
        self.flush()
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._backlog and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._drained.wait(left)
        self.close(why)

    def close(self, why: str = "closed") -> None:
        """Close the channel (idempotent); on_closed runs once, on the calling thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._backlog.clear()
            self._held.clear()
            self._drained.notify_all()
            self._wake()  # the I/O thread closes the socket and the pipe
        log.info("output channel %s closed: %s", self.channel_id, why)
        self._on_closed(self)

    def _io(self) -> None:
        """Watch the connection (the router sends nothing after its hello: readable means
        closed) and drain the backlog while the socket takes it."""
        try:
            while not self._closed:
                with self._lock:
                    pending = bool(self._backlog)
                readable, writable, _ = select.select(
                    [self._sock.fileno(), self._wake_r],
                    [self._sock.fileno()] if pending else [], [])
                if self._wake_r in readable:
                    os.read(self._wake_r, 64)
                if self._closed:
                    break
                if self._sock.fileno() in readable:
                    self.close("the router closed it")
                    break
                if writable:
                    self._write_backlog()
        except Exception as exc:  # noqa: BLE001 - its requests must end whatever happened
            self.close(f"{type(exc).__name__}: {exc}")
        finally:
            with self._lock:  # (no send() writes to the pipe once closed is set)
                self._closed = True
                for fd in (self._wake_r, self._wake_w):
                    os.close(fd)
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()

    def _write_backlog(self) -> None:
        with self._lock:
            if self._closed or not self._backlog:
                return
            try:
                sent = self._sock.send(self._backlog)
            except BlockingIOError:
                return
            except OSError:
                sent = -1
            if sent >= 0:
                del self._backlog[:sent]
                if not self._backlog:
                    self._drained.notify_all()
        if sent < 0:
            self.close("the connection failed")


class OutputChannelServer:
    """Accepts routers' output channels on `host` (an ephemeral port, beside the worker's
    gRPC port); `on_closed(channel)` runs when one closes."""

    def __init__(self, host: str, token: str | None,
                 on_closed: Callable[[OutputChannel], None]) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, 0), family=family)
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        self._token = token or ""
        self._on_closed = on_closed
        self._channels: dict[str, OutputChannel] = {}
        self._lock = threading.Lock()
        self._stopped = False
        self._holding: list[OutputChannel] = []  # channels with held frames
        self._holding_lock = threading.Lock()  # (the engine thread's alone, but cheap)
        threading.Thread(target=self._accept, name="output-channels", daemon=True).start()

    def get(self, channel_id: str) -> OutputChannel | None:
        """The open channel of that id, if any."""
        with self._lock:
            channel = self._channels.get(channel_id)
        return channel if channel is not None and not channel.closed else None

    def held(self, channel: OutputChannel) -> None:
        """`channel` holds frames now (its send(hold=True), from the engine thread)."""
        with self._holding_lock:
            self._holding.append(channel)

    def flush(self) -> None:
        """Send every channel's held frames (the engine thread, after a step's outputs)."""
        if self._holding:
            with self._holding_lock:
                holding, self._holding = self._holding, []
            for channel in holding:
                channel.flush()

    @property
    def num_open(self) -> int:
        with self._lock:
            return len(self._channels)

    def close_channels(self, why: str) -> None:
        """Close every open channel at once (their requests end: on_closed)."""
        with self._lock:
            channels = list(self._channels.values())
        for channel in channels:
            channel.close(why)

    def close(self, drain_s: float = 0.0) -> None:
        """Stop accepting and close every channel (the requests still on them end:
        on_closed), each after its held and backlogged frames went out, within `drain_s` in
        all (0: at once)."""
        self._stopped = True
        try:  # (shutdown wakes the accept thread; close alone leaves it blocked)
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            channels = list(self._channels.values())
        deadline = time.monotonic() + drain_s
        for channel in channels:
            channel.finish("the worker stops", max(0.0, deadline - time.monotonic()))

    def _accept(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self._listener.accept()
            except OSError as exc:
                if self._stopped:
                    return  # closed
                # Out of file descriptors (EMFILE), a connection reset while queued: the
                # listener is still open and the kernel still queues connections; a router
                # would wait for an acknowledgement that never comes. Go on accepting.
                log.warning("output channel listener: accept failed (%s); retrying", exc)
                time.sleep(_ACCEPT_RETRY_S)
                continue
            threading.Thread(target=self._handshake, args=(conn,), daemon=True,
                             name="output-channel-hello").start()

    def _handshake(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(HELLO_TIMEOUT_S)
            hello = worker_pb2.OutputChannelHello.FromString(read_frame(conn, MAX_HELLO_BYTES))
            if not hello.channel_id:
                raise ConnectionError("a hello without a channel id")
            if not hmac.compare_digest(hello.token.encode(), self._token.encode()):
                raise ConnectionError("a hello without the cluster token")
        except (OSError, ConnectionError, ValueError) as exc:  # (DecodeError is a ValueError)
            log.warning("output channel refused: %s", exc)
            conn.close()
            return
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        keep_alive(conn)
        channel = OutputChannel(hello.channel_id, conn, self._closed, self)
        with self._lock:
            old = self._channels.get(hello.channel_id)
            self._channels[hello.channel_id] = channel
        if old is not None:
            old.close("replaced by a new connection")
        if channel.closed:  # the router hung up before it was registered: _closed missed it
            with self._lock:
                if self._channels.get(hello.channel_id) is channel:
                    del self._channels[hello.channel_id]
            return
        if self._stopped:
            channel.close("the worker stops")
            return
        channel.send(frame(worker_pb2.ChannelOutput()))  # the router may name it now

    def _closed(self, channel: OutputChannel) -> None:
        with self._lock:
            if self._channels.get(channel.channel_id) is channel:
                del self._channels[channel.channel_id]
        self._on_closed(channel)
