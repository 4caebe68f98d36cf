"""The framing of an output channel (decode_worker.output_channel, router.output_channel):
each protobuf message preceded by its length, 4 bytes little-endian."""

from __future__ import annotations

import struct

from google.protobuf.message import Message

FRAME_HEADER = struct.Struct("<I")


def frame(message: Message) -> bytes:
    data = message.SerializeToString()
    return FRAME_HEADER.pack(len(data)) + data
