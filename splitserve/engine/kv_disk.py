"""The disk tier of evicted KV blocks: one file per chained block hash, LRU by bytes.

File layout (little-endian), `<block hash as 16 hex digits>.kvb` in a folder per layout:

    magic          8 bytes  b"SSKVBLK1"
    block_hash     u64      must equal the file name's
    payload_bytes  u64      must equal the layout's block size in bytes
    layout_bytes   u32      length of the layout string that follows
    digest         32 bytes blake2b-256 of layout string + payload
    layout         utf-8    e.g. "float32|30,2,16,3,64|<model>" (see KVTierConfig)
    payload        the block: [num_layers, 2, block_size, num_kv_heads, head_dim]

A file is written to a temporary name and renamed into place, so a reader sees a whole
entry or none; a file that fails any check (a crash mid-write on a filesystem without
atomic rename, a bit flip, a truncation, another layout) is deleted, counted and never
loaded. Files left by an earlier process with the same layout are found at start-up and
served (oldest first out). Only the engine thread uses an instance.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from splitserve.engine.block_manager import PrefixEventLog

log = logging.getLogger(__name__)

_MAGIC = b"SSKVBLK1"
_HEADER = struct.Struct("<8sQQI32s")
_SUFFIX = ".kvb"


def _digest(layout: bytes, payload: bytes | memoryview) -> bytes:
    h = hashlib.blake2b(digest_size=32)
    h.update(layout)
    h.update(payload)
    return h.digest()


class DiskKVStore:
    """Block hash -> one block's KV in a file, at most `capacity_bytes` of files."""

    def __init__(self, directory: str | Path, layout: str, shape: tuple[int, ...],
                 dtype: torch.dtype, capacity_bytes: int):
        self.layout = layout.encode()
        self.shape = shape
        self.dtype = dtype
        self.payload_bytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        self.entry_bytes = _HEADER.size + len(self.layout) + self.payload_bytes
        self.capacity_bytes = capacity_bytes
        # One folder per layout: another model or dtype never even opens our files.
        self.dir = Path(directory) / hashlib.blake2b(self.layout, digest_size=8).hexdigest()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._index: OrderedDict[int, None] = OrderedDict()  # LRU first
        self.events = PrefixEventLog()
        self.corrupt = 0  # entries found damaged and deleted
        self.evicted = 0  # entries deleted (LRU, damaged, vanished)
        self._tmp_counter = 0
        # The index, the counters and the events are shared by the engine thread (contains,
        # get) and the tier's disk writer (put); files are read and written outside it.
        self._lock = threading.Lock()
        self._scan()

    @property
    def num_entries(self) -> int:
        return len(self._index)

    @property
    def used_bytes(self) -> int:
        return len(self._index) * self.entry_bytes

    def _path(self, block_hash: int) -> Path:
        return self.dir / f"{block_hash:016x}{_SUFFIX}"

    def _scan(self) -> None:
        found: list[tuple[float, int]] = []
        for path in self.dir.iterdir():
            if path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)  # a writer died before its rename
                continue
            if not path.name.endswith(_SUFFIX):
                continue
            try:
                block_hash = int(path.name[: -len(_SUFFIX)], 16)
                found.append((path.stat().st_mtime, block_hash))
            except (ValueError, OSError):
                continue
        for _, block_hash in sorted(found):
            self._index[block_hash] = None
            self.events.stored(block_hash)
        self._shrink()

    def contains(self, block_hash: int) -> bool:
        with self._lock:
            if block_hash in self._index:
                self._index.move_to_end(block_hash)
                return True
            return False

    def drain_events(self) -> tuple[list[int], list[int]]:
        with self._lock:
            return self.events.drain()

    def put(self, block_hash: int, block: torch.Tensor) -> bool:
        """Write one block (a CPU tensor of `shape`); False when it does not fit at all."""
        with self._lock:
            if block_hash in self._index:
                self._index.move_to_end(block_hash)
                return True
            self._tmp_counter += 1
            counter = self._tmp_counter
        if self.entry_bytes > self.capacity_bytes:
            return False
        payload = block.contiguous().reshape(-1).view(torch.uint8).numpy().data
        header = _HEADER.pack(_MAGIC, block_hash, self.payload_bytes, len(self.layout),
                              _digest(self.layout, payload))
        path = self._path(block_hash)
        tmp = self.dir / f".{path.name}.{os.getpid()}.{threading.get_ident()}.{counter}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(header)
                f.write(self.layout)
                f.write(payload)
            os.replace(tmp, path)
        except OSError:
            log.warning("writing KV block %016x to %s failed", block_hash, self.dir,
                        exc_info=True)
            tmp.unlink(missing_ok=True)
            return False
        with self._lock:
            self._index[block_hash] = None
            self.events.stored(block_hash)
            self._shrink()
        return True

    def get(self, block_hash: int) -> torch.Tensor | None:
        """The block, or None when absent or damaged (a damaged file is deleted)."""
        with self._lock:
            if block_hash not in self._index:
                return None
        try:
            data = self._path(block_hash).read_bytes()
        except OSError:
            with self._lock:
                self._drop(block_hash)
            return None
        payload = self._check(block_hash, data)
        with self._lock:
            if payload is None:
                self.corrupt += 1
                log.warning("KV block %016x in %s is damaged; deleted", block_hash, self.dir)
                self._drop(block_hash)
                return None
            if block_hash in self._index:
                self._index.move_to_end(block_hash)
        flat = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        return flat.view(self.dtype).view(self.shape)

    def _check(self, block_hash: int, data: bytes) -> memoryview | None:
        """The payload when every field checks out, else None."""
        if len(data) != self.entry_bytes:
            return None
        magic, stored_hash, payload_bytes, layout_bytes, digest = _HEADER.unpack_from(data)
        body = memoryview(data)[_HEADER.size:]
        if (magic != _MAGIC or stored_hash != block_hash
                or payload_bytes != self.payload_bytes or layout_bytes != len(self.layout)
                or bytes(body[:layout_bytes]) != self.layout):
            return None
        payload = body[layout_bytes:]
        return payload if _digest(self.layout, payload) == digest else None

    def _shrink(self) -> None:
        while self._index and self.used_bytes > self.capacity_bytes:
            oldest = next(iter(self._index))
            self._drop(oldest)

    def _drop(self, block_hash: int) -> None:
        """(Under the lock.)"""
        self._index.pop(block_hash, None)
        self.evicted += 1
        self._path(block_hash).unlink(missing_ok=True)
        self.events.evicted(block_hash)
