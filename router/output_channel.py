"""The router's output channels: one TCP connection per decode worker that carries the
outputs of this router's requests there (decode_worker.output_channel says why: no gRPC
stream or thread per output on either side).

A worker's Admission names where it accepts channels (Admission.output_endpoint); the router
then connects in the background (OutputChannelHello with a random channel id and the
cluster token), and names the channel in the AdmitRequests of later requests to that
worker. Each such request reads its outputs from a Mailbox the channel's reader fills;
its Admit stream carries the Admission only and ends after the last output. A channel that
closes fails every mailbox on it (ChannelLost: the request resumes elsewhere, as for a lost
stream) and is opened again by a later Admission, not sooner than RETRY_S after.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from google.protobuf.message import DecodeError

from splitserve.common.frames import FRAME_HEADER, frame
from splitserve.v1 import worker_pb2

log = logging.getLogger(__name__)

MAX_FRAME_BYTES = 64 << 20
CONNECT_TIMEOUT_S = 5.0
RETRY_S = 5.0  # a channel that closed is not opened again sooner


class ChannelLost(ConnectionError):
    """The output channel carrying a request's outputs closed."""


class Mailbox:
    """One request's outputs from its channel, in order; or the channel's end."""

    __slots__ = ("_queue",)

    def __init__(self) -> None:
        self._queue: asyncio.Queue[worker_pb2.DecodeOutput | BaseException] = asyncio.Queue()

    def put(self, output: worker_pb2.DecodeOutput) -> None:
        self._queue.put_nowait(output)

    def fail(self, exc: BaseException) -> None:
        """The next get() raises `exc` (after the outputs already put)."""
        self._queue.put_nowait(exc)

    async def get(self) -> worker_pb2.DecodeOutput:
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item


class OutputChannel:
    """This router's channel to one decode worker at `host`:`port`."""

    def __init__(self, host: str, port: int, token: str | None) -> None:
        self.channel_id = uuid.uuid4().hex
        self.ready = False  # connected and greeted: requests may name it
        self.closed = False
        self._mailboxes: dict[str, Mailbox] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._task = asyncio.get_running_loop().create_task(self._run(host, port, token or ""))

    def open(self, request_id: str) -> Mailbox | None:
        """A mailbox for `request_id`'s outputs, before its Admit (None: not ready)."""
        if not self.ready or self.closed or request_id in self._mailboxes:
            return None
        mailbox = self._mailboxes[request_id] = Mailbox()
        return mailbox

    def release(self, request_id: str) -> None:
        self._mailboxes.pop(request_id, None)

    def close(self) -> None:
        self._task.cancel()
        self._end(ChannelLost("the router closed its output channel"))

    async def _run(self, host: str, port: int, token: str) -> None:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), CONNECT_TIMEOUT_S)
            self._writer = writer  # (a StreamWriter closes its transport when collected)
            writer.write(frame(worker_pb2.OutputChannelHello(channel_id=self.channel_id,
                                                             token=token)))
            await writer.drain()
            self.ready = True
            mailboxes = self._mailboxes
            while True:
                (size,) = FRAME_HEADER.unpack(await reader.readexactly(FRAME_HEADER.size))
                if size > MAX_FRAME_BYTES:
                    raise ConnectionError(f"a {size}-byte frame")
                received = worker_pb2.ChannelOutput.FromString(await reader.readexactly(size))
                mailbox = mailboxes.get(received.request_id)
                if mailbox is not None:  # (else: a request that left already)
                    mailbox.put(received.output)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever ends it, its readers must hear
            why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if not isinstance(exc, (OSError, EOFError, DecodeError, asyncio.TimeoutError)):
                log.exception("output channel to %s:%d failed", host, port)
            log.info("output channel to %s:%d closed: %s", host, port, why)
            self._end(ChannelLost(f"the output channel to {host}:{port} closed ({why})"))
        finally:
            if self._writer is not None:
                self._writer.close()

    def _end(self, exc: ChannelLost) -> None:
        self.closed, self.ready = True, False
        mailboxes, self._mailboxes = self._mailboxes, {}
        for mailbox in mailboxes.values():
            mailbox.fail(exc)


class OutputChannels:
    """The router's channels, by decode worker address."""

    def __init__(self, token: str | None, enabled: bool = True) -> None:
        self._token = token
        self.enabled = enabled
        self._channels: dict[str, OutputChannel] = {}
        self._closed_at: dict[str, float] = {}

    def get(self, address: str) -> OutputChannel | None:
        """The ready channel to the worker at `address`, if any."""
        channel = self._channels.get(address)
        return channel if channel is not None and channel.ready else None

    def learn(self, address: str, endpoint: str) -> None:
        """The worker at `address` accepts channels at `endpoint` (host:port; a wildcard
        host: `address`'s): open one, unless one is open or opening, or closed < RETRY_S ago."""
        if not self.enabled or not endpoint:
            return
        channel = self._channels.get(address)
        if channel is not None and not channel.closed:
            return
        now = time.monotonic()
        if channel is not None:
            del self._channels[address]
            self._closed_at[address] = now
        if now - self._closed_at.get(address, -RETRY_S) < RETRY_S:
            return
        host, _, port = endpoint.rpartition(":")
        host = host.strip("[]")
        if host in ("", "0.0.0.0", "::"):
            host = address.rpartition(":")[0].strip("[]")
        self._channels[address] = OutputChannel(host, int(port), self._token)

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
