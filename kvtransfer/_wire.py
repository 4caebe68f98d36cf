"""The message header that precedes every payload on a pair's process group.

Several requests share one (P, D) connection and their layers interleave, so each payload
is preceded by a fixed-size int64 header that tells the receiver where it goes:

    header: int64 [8] = [magic, kind, request_key, layer, num_blocks, dst_digest,
                         payload_nbytes, reason]
    payload (kind DATA only): uint8 [payload_nbytes], the bytes of a contiguous
                         [2, num_blocks, block_size, num_kv_heads, head_dim] buffer, or
                         with layer = -1 (ALL_LAYERS) [num_layers, 2, num_blocks, ...]:
                         every layer at once (KV computed already, e.g. a migration)

request_key and dst_digest are the stable 63-bit hashes of kvtransfer.state. No pickle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitserve.kvtransfer._tables import ABORT, DATA

HEADER_LEN = 8
MAGIC = 0x53534B5601  # "SSKV" + version 1

# reason codes carried by ABORT headers
REASON_ABORTED = 1
REASON_FAILED = 2
REASONS = {REASON_ABORTED: "aborted by the sender", REASON_FAILED: "the send failed"}


@dataclass(frozen=True, slots=True)
class Header:
    kind: int
    request_key: int
    layer: int = -1
    num_blocks: int = 0
    dst_digest: int = 0
    payload_nbytes: int = 0
    reason: int = 0

    def encode(self, out: torch.Tensor) -> torch.Tensor:
        """Write into `out` (int64 [HEADER_LEN], any device) and return it."""
        values = [
            MAGIC,
            self.kind,
            self.request_key,
            self.layer,
            self.num_blocks,
            self.dst_digest,
            self.payload_nbytes,
            self.reason,
        ]
        out.copy_(torch.tensor(values, dtype=torch.int64))
        return out

    @classmethod
    def decode(cls, tensor: torch.Tensor) -> Header:
        values = [int(v) for v in tensor.cpu().tolist()]
        if len(values) != HEADER_LEN or values[0] != MAGIC:
            raise ValueError(f"not a kvtransfer header: {values}")
        header = cls(*values[1:])
        if header.kind not in (DATA, ABORT) or header.payload_nbytes < 0:
            raise ValueError(f"bad kvtransfer header: {header}")
        return header

    @property
    def reason_text(self) -> str:
        return REASONS.get(self.reason, f"reason code {self.reason}")
