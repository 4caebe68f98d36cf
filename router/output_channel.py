"""The router's output channels: one TCP connection per decode worker that carries the
outputs of this router's requests there (decode_worker.output_channel says why: no gRPC
stream or thread per output on either side).

A worker's registration in cluster state and its Admissions name where it accepts channels
(WorkerInfo / Admission.output_endpoint); the router then connects in the background
(OutputChannelHello with a random channel id and the cluster token; the worker answers with
an empty ChannelOutput once it holds the channel), and names the channel in the
AdmitRequests of later requests to that worker. Each such request reads its outputs from a
Mailbox the channel's protocol fills; its Admit stream carries the Admission only and ends
after the last output. A channel that closes fails every mailbox on it (ChannelLost: the
request resumes elsewhere, as for a lost stream) and is opened again by a later Admission,
not sooner than RETRY_S after. TCP keepalive (common.frames) closes a channel whose worker
vanished without a word (its host died, froze or restarted); a worker that comes back at
the same address with another endpoint gets a new channel at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import Callable

from google.protobuf.message import DecodeError

from splitserve.common.frames import FRAME_HEADER, frame, keep_alive
from splitserve.v1 import worker_pb2

log = logging.getLogger(__name__)

MAX_FRAME_BYTES = 64 << 20
CONNECT_TIMEOUT_S = 5.0
# A worker that took the connection acknowledges the hello at once; without that within
# this long the channel is closed (retried after RETRY_S), never left opening for good.
ACK_TIMEOUT_S = 5.0
RETRY_S = 5.0  # a channel that closed is not opened again sooner
OPEN_WAIT_S = 0.2  # a request to a worker whose channel is opening waits this long for it
# A worker ends a request's Admit stream (OK) once its last output is on the channel: if
# that output has not come this long after, the channel is taken as dead (closed: its
# requests resume).
LAST_OUTPUT_WAIT_S = 30.0
MAX_CLOSED_REMEMBERED = 4096  # addresses whose channel closed, kept for RETRY_S and ready()


class ChannelLost(ConnectionError):
    """The output channel carrying a request's outputs closed."""


class Mailbox:
    """One request's outputs from its channel, in order; or the channel's end.

    One reader (the request's task) and one writer (the channel's protocol), both on the
    event loop: a deque and the reader's waiting future (no asyncio.Queue: its getters'
    list and put's wake-up cost more than the rest of a channel's receive path)."""

    __slots__ = ("_items", "_waiter", "got_last")

    def __init__(self) -> None:
        self._items: collections.deque[worker_pb2.DecodeOutput | BaseException] = (
            collections.deque())
        self._waiter: asyncio.Future[None] | None = None
        self.got_last = False  # an output with a finish reason came (read or not)

    def put(self, output: worker_pb2.DecodeOutput) -> None:
        self._items.append(output)
        if output.finish_reason:
            self.got_last = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        """The next get() raises `exc` (after the outputs already put)."""
        self._items.append(exc)
        self._wake()

    async def get(self) -> worker_pb2.DecodeOutput:
        items = self._items
        while not items:
            if self._waiter is not None:
                raise RuntimeError("Mailbox.get: another reader is waiting")
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        item = items.popleft()
        if isinstance(item, BaseException):
            raise item
        return item

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class OutputChannel:
    """This router's channel to one decode worker at `host`:`port`.

    The connection's protocol parses frames as their bytes arrive and puts each output in
    its request's mailbox there and then: one event-loop pass per read, however many frames
    it holds (a reader task would add a pass per read and two awaits per frame)."""

    def __init__(self, host: str, port: int, token: str | None,
                 on_closed: Callable[[OutputChannel], None] | None = None,
                 endpoint: str = "") -> None:
        self.channel_id = uuid.uuid4().hex
        self.endpoint = endpoint  # as the worker advertised it
        self.ready = False  # the worker acknowledged the hello: requests may name it
        self.closed = False
        # Once it closed: whether its worker answered a health check as SERVING (one check
        # for all the requests it carried; router.request starts it).
        self.serving_check: asyncio.Future[bool] | None = None
        self._on_closed = on_closed
        self._where = f"{host}:{port}"
        self._mailboxes: dict[str, Mailbox] = {}
        self._transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self._opened: asyncio.Future[None] = loop.create_future()  # done: ready or closed
        self._task = loop.create_task(self._connect(host, port, token or ""))

    async def wait_ready(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for the channel to open; whether it is ready."""
        if not self.ready and not self.closed:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._opened), timeout_s)
        return self.ready

    def open(self, request_id: str) -> Mailbox | None:
        """A mailbox for `request_id`'s outputs, before its Admit (None: not ready)."""
        if not self.ready or self.closed or request_id in self._mailboxes:
            return None
        mailbox = self._mailboxes[request_id] = Mailbox()
        return mailbox

    def release(self, request_id: str) -> None:
        self._mailboxes.pop(request_id, None)

    def close(self, why: str = "the router closed its output channel") -> None:
        self._task.cancel()
        if self._transport is not None:
            self._transport.abort()
        self._end(why)

    async def _connect(self, host: str, port: int, token: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(lambda: _ChannelProtocol(self), host, port),
                CONNECT_TIMEOUT_S)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever ends it, its readers must hear
            self._lost(exc)
            return
        if self.closed:  # lost or closed while connecting
            transport.abort()
            return
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            keep_alive(sock)
        transport.write(frame(worker_pb2.OutputChannelHello(channel_id=self.channel_id,
                                                            token=token)))
        # Ready once the worker's first frame (an empty ChannelOutput) says it has taken
        # the channel: an Admit naming it before then would find no channel there.
        try:
            await asyncio.wait_for(asyncio.shield(self._opened), ACK_TIMEOUT_S)
        except asyncio.TimeoutError:
            self._lost(asyncio.TimeoutError(
                f"no acknowledgement of the hello within {ACK_TIMEOUT_S:g} s"))

    def _accepted(self) -> None:
        if not self.closed and not self.ready:
            self.ready = True
            if not self._opened.done():
                self._opened.set_result(None)

    def _deliver(self, received: worker_pb2.ChannelOutput) -> None:
        if not received.request_id:
            self._accepted()  # the worker's acknowledgement of the hello
            return
        mailbox = self._mailboxes.get(received.request_id)
        if mailbox is not None:  # (else: a request that left already)
            mailbox.put(received.output)

    def _lost(self, exc: BaseException | None) -> None:
        """The connection ended (`exc`: why; None: the worker closed it)."""
        if self.closed:
            return
        if exc is None:
            why = "EOFError"
        else:
            why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if not isinstance(exc, (OSError, EOFError, DecodeError, asyncio.TimeoutError)):
                log.error("output channel to %s failed", self._where, exc_info=exc)
        log.info("output channel to %s closed: %s", self._where, why)
        if self._transport is not None:
            self._transport.abort()
        self._end(f"the output channel to {self._where} closed ({why})")

    def _end(self, why: str) -> None:
        if self.closed:
            return
        self.closed, self.ready = True, False
        if not self._opened.done():
            self._opened.set_result(None)
        mailboxes, self._mailboxes = self._mailboxes, {}
        for mailbox in mailboxes.values():  # (an exception each: each is raised in its task)
            mailbox.fail(ChannelLost(why))
        if self._on_closed is not None:
            self._on_closed(self)


class _ChannelProtocol(asyncio.Protocol):
    """The channel's bytes -> frames -> mailboxes."""

    def __init__(self, channel: OutputChannel) -> None:
        self._channel = channel
        self._rest = bytearray()  # the start of a frame whose end has not come yet

    def data_received(self, data: bytes) -> None:
        if self._rest:
            self._rest += data
            data = self._rest  # type: ignore[assignment]
        header, parse = FRAME_HEADER.size, worker_pb2.ChannelOutput.FromString
        deliver = self._channel._deliver
        start, end = 0, len(data)
        try:
            with memoryview(data) as view:
                while end - start >= header:
                    (size,) = FRAME_HEADER.unpack_from(view, start)
                    if size > MAX_FRAME_BYTES:
                        raise ConnectionError(f"a {size}-byte frame")
                    body = start + header
                    if end - body < size:
                        break
                    deliver(parse(view[body:body + size]))
                    start = body + size
        except Exception as exc:  # noqa: BLE001 - a bad frame ends the channel
            self._rest = bytearray()
            self._channel._lost(exc)
            return
        if start == end:
            self._rest = bytearray()
        elif start or data is not self._rest:
            self._rest = bytearray(data[start:])

    def eof_received(self) -> bool:
        self._channel._lost(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._channel._lost(exc)


class OutputChannels:
    """The router's channels, by decode worker address."""

    def __init__(self, token: str | None, enabled: bool = True) -> None:
        self._token = token
        self.enabled = enabled
        self._channels: dict[str, OutputChannel] = {}
        self._closed_at: dict[str, float] = {}
        self._malformed: set[str] = set()  # endpoints warned of

    def get(self, address: str) -> OutputChannel | None:
        """The ready channel to the worker at `address`, if any."""
        channel = self._channels.get(address)
        return channel if channel is not None and channel.ready else None

    async def ready(self, address: str) -> OutputChannel | None:
        """The ready channel to the worker at `address`; one that is opening, once it is
        (waiting up to OPEN_WAIT_S: a burst right after the router found the worker goes
        over it too), unless a channel to it closed before (one that cannot connect would
        cost each request the wait); else None."""
        channel = self._channels.get(address)
        if channel is None or channel.ready:
            return channel
        if address in self._closed_at:  # a channel to it failed before: no wait on this one
            return None
        return channel if await channel.wait_ready(OPEN_WAIT_S) else None

    def learn(self, address: str, endpoint: str) -> None:
        """The worker at `address` accepts channels at `endpoint` (host:port; a wildcard
        host: `address`'s): open one, unless one to that endpoint is open or opening, or a
        channel to `address` closed < RETRY_S ago. A channel to another endpoint (the
        worker restarted at the same address) is closed and replaced."""
        if not self.enabled or not endpoint:
            return
        channel = self._channels.get(address)
        if channel is not None:
            if channel.endpoint == endpoint:
                return
            channel.close()  # (its requests were on a worker that is gone)
            self._closed_at.pop(address, None)  # a new worker: no wait, as for any new one
        elif time.monotonic() - self._closed_at.get(address, -RETRY_S) < RETRY_S:
            return
        host, _, port = endpoint.rpartition(":")
        host = host.strip("[]")
        if host in ("", "0.0.0.0", "::"):
            host = address.rpartition(":")[0].strip("[]")
        if not (port.isdigit() and 0 < int(port) < 65536):
            if endpoint not in self._malformed:  # (once: each Admission names it again)
                self._malformed.add(endpoint)
                log.warning("the worker at %s names a malformed output channel endpoint "
                            "%r: its requests stream over gRPC", address, endpoint)
            return
        self._channels[address] = OutputChannel(
            host, int(port), self._token,
            on_closed=lambda closed: self._forget(address, closed), endpoint=endpoint)

    def _forget(self, address: str, channel: OutputChannel) -> None:
        """`channel` to `address` closed: drop it and remember when (the oldest such
        memories go beyond MAX_CLOSED_REMEMBERED addresses)."""
        if self._channels.get(address) is channel:
            del self._channels[address]
        self._closed_at.pop(address, None)
        self._closed_at[address] = time.monotonic()
        while len(self._closed_at) > MAX_CLOSED_REMEMBERED:
            del self._closed_at[next(iter(self._closed_at))]

    def close(self) -> None:
        for channel in list(self._channels.values()):
            channel.close()
        self._channels.clear()
