"""Chained hashes of full KV blocks (torch-free; the router hashes prompts the same way).

The hash of block i covers every token of blocks 0..i, so equal hashes mean equal prefixes.
blake2b keeps the value stable across processes and machines (Python's hash() is not).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

NONE_HASH = 0


def hash_block_tokens(parent_hash: int, token_ids: Sequence[int]) -> int:
    """A 63-bit hash of one full block given its parent's hash (NONE_HASH for block 0)."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(struct.pack("<q", parent_hash))
    digest.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return int.from_bytes(digest.digest(), "little") >> 1


def compute_block_hashes(
    token_ids: Sequence[int], block_size: int, start_hashes: Sequence[int] = ()
) -> list[int]:
    """Hashes of every full block of `token_ids`, extending `start_hashes` (already computed)."""
    hashes = list(start_hashes)
    parent = hashes[-1] if hashes else NONE_HASH
    for start in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes
