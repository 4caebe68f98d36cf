"""What both ends of an output channel share (decode_worker.output_channel,
router.output_channel): the framing, each protobuf message preceded by its length, 4 bytes
little-endian; and the connection's TCP keepalive."""

from __future__ import annotations

import socket
import struct

from google.protobuf.message import Message

FRAME_HEADER = struct.Struct("<I")

# A channel is quiet from the router's side (it sends nothing after its hello) and from the
# worker's between requests, so a peer whose host died, froze or restarted (no FIN, no RST)
# would go unnoticed: each end probes after KEEPALIVE_IDLE_S of silence and gives the
# connection up after KEEPALIVE_COUNT unanswered probes KEEPALIVE_INTERVAL_S apart.
KEEPALIVE_IDLE_S = 10
KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_COUNT = 3


def frame(message: Message) -> bytes:
    data = message.SerializeToString()
    return FRAME_HEADER.pack(len(data)) + data


def keep_alive(sock: socket.socket) -> None:
    """Turn on TCP keepalive with the channel's timings (where the platform has them)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S),
                          ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
                          ("TCP_KEEPCNT", KEEPALIVE_COUNT)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
