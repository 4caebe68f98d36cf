"""The KV tiers below the device pool: host memory, then (optionally) disk.

When the prefix cache evicts a full block (BlockManager._take_free_block), its contents
are copied here under its chained block hash before the block is reused; a later prompt
whose leading blocks are gone from the device but found here gets them copied back into
fresh blocks instead of recomputing them (BlockManager.match_prefix / allocate_slots).

    host:  OrderedDict block hash -> tensor [num_layers, 2, block_size, num_kv_heads,
           head_dim] (all layers' K and V of one block), LRU first, at most
           host_capacity_bytes; pinned memory on CUDA.
    disk:  engine/kv_disk.py; what the host tier evicts goes there (with no host budget,
           evicted device blocks go straight to disk).

The tiers are inclusive: a block loaded back to the device keeps its host copy, so its
next eviction costs no copy. Disk writes happen on a writer thread of their own
(`_DiskWriter`): an eviction hands over a copy of the block and goes on, the blocks still
queued are found and loaded from memory, and a full queue drops the write (counted)
rather than stall the engine. Copies are synchronous on CPU (a block of SmolLM2-135M is
720 KiB, a fraction of a millisecond) and counted in `load_seconds`; on CUDA they are
enqueued non-blocking on the current stream from pinned memory, so they run before the
step's layers read the blocks without stalling the host (not pipelined layer by layer).
Used by the engine thread only; counters may be read from any thread.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from splitserve.engine.block_manager import PrefixEventLog
from splitserve.engine.config import EngineConfig
from splitserve.engine.kv_disk import DiskKVStore
from splitserve.kernels.kv_quant import FORMAT_VERSION, codec_of

TIERS = ("host", "disk")
log = logging.getLogger(__name__)


@dataclass(slots=True)
class TierStats:
    """Counters of one tier since start (blocks, bytes, seconds)."""

    hits: int = 0  # blocks loaded back to the device from this tier
    misses: int = 0  # lookups this tier could not serve (a run's end, or a failed load)
    stored: int = 0  # blocks written into this tier
    evicted: int = 0  # blocks this tier dropped (LRU, or damaged on disk)
    bytes_stored: int = 0  # bytes copied into this tier
    bytes_loaded: int = 0  # bytes copied from this tier to the device
    load_seconds: float = 0.0  # time spent loading blocks back (copy, disk read, checks)
    corrupt: int = 0  # disk entries that failed their checks (deleted, never loaded)
    used_bytes: int = 0  # held now (set by snapshot())
    capacity_bytes: int = 0  # the tier's budget (set by snapshot())


class KVTierStore:
    """Host tier with an optional disk tier below it; implements BlockManager's KVTier."""

    def __init__(self, kv_pool: torch.Tensor, host_capacity_bytes: int,
                 disk: DiskKVStore | None = None):
        # kv_pool: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
        self.kv_pool = kv_pool
        layers, two, _, block_size, heads, head_dim = kv_pool.shape
        self.block_shape = (layers, two, block_size, heads, head_dim)
        self.block_bytes = kv_pool[:, :, 0].numel() * kv_pool.element_size()
        self.host_capacity_bytes = host_capacity_bytes
        self.max_host_blocks = host_capacity_bytes // self.block_bytes
        self.disk = disk
        self._writer = _DiskWriter(disk) if disk is not None else None
        self._pin = kv_pool.device.type == "cuda"
        self._host: OrderedDict[int, torch.Tensor] = OrderedDict()  # LRU first
        self.host_events = PrefixEventLog()
        self.stats = {tier: TierStats() for tier in TIERS}

    @property
    def num_host_blocks(self) -> int:
        return len(self._host)

    @property
    def host_bytes(self) -> int:
        return len(self._host) * self.block_bytes

    # ---- BlockManager's KVTier ---------------------------------------------------------
    def offload(self, block_id: int, block_hash: int) -> None:
        if block_hash in self._host:
            self._host.move_to_end(block_hash)  # inclusive: the copy is already here
            return
        src = self.kv_pool[:, :, block_id]
        if self.max_host_blocks == 0:
            if self._writer is not None and not self._writer.contains(block_hash):
                self._writer.put(block_hash, src.to("cpu", copy=True))
            return
        buffer = self._spill_lru() if len(self._host) >= self.max_host_blocks else None
        if buffer is None:
            buffer = torch.empty(self.block_shape, dtype=self.kv_pool.dtype,
                                 pin_memory=self._pin)
        buffer.copy_(src, non_blocking=self._pin)
        self._host[block_hash] = buffer
        self.host_events.stored(block_hash)
        self.stats["host"].stored += 1
        self.stats["host"].bytes_stored += self.block_bytes

    def contains(self, block_hash: int) -> bool:
        if block_hash in self._host:
            self._host.move_to_end(block_hash)  # about to be loaded: not the next to go
            return True
        return self._writer is not None and self._writer.contains(block_hash)

    def load(self, block_hash: int, block_id: int) -> bool:
        start = time.perf_counter()
        tier = "host"
        block = self._host.get(block_hash)
        if block is not None:
            self._host.move_to_end(block_hash)
        else:
            self.stats["host"].misses += self.max_host_blocks > 0
            tier = "disk"
            block = self._writer.get(block_hash) if self._writer is not None else None
            if block is None:
                self._sync_disk_counts()
                self.stats["disk"].misses += self.disk is not None
                return False
        self.kv_pool[:, :, block_id].copy_(block, non_blocking=self._pin)
        stats = self.stats[tier]
        stats.hits += 1
        stats.bytes_loaded += self.block_bytes
        stats.load_seconds += time.perf_counter() - start
        return True

    def record_miss(self) -> None:
        self.stats["host"].misses += self.max_host_blocks > 0
        self.stats["disk"].misses += self.disk is not None

    def snapshot(self) -> dict[str, TierStats]:
        """Copies of the counters of each configured tier, with its bytes held now."""
        self._sync_disk_counts()
        out = {"host": replace(self.stats["host"], used_bytes=self.host_bytes,
                               capacity_bytes=self.host_capacity_bytes)}
        if self.disk is not None:
            out["disk"] = replace(self.stats["disk"], used_bytes=self.disk.used_bytes,
                                  capacity_bytes=self.disk.capacity_bytes)
        return out

    # ---- events for the cluster's prefix index ----------------------------------------
    def drain_events(self) -> dict[str, tuple[list[int], list[int]]]:
        """Net (stored, evicted) hashes per tier since the last call."""
        events = {"host": self.host_events.drain()}
        if self.disk is not None:
            events["disk"] = self.disk.drain_events()
        return events

    def flush(self) -> None:
        """Wait until every queued disk write is done (tests; shutdown)."""
        if self._writer is not None:
            self._writer.flush()

    # ---- internals ----------------------------------------------------------------------
    def _spill_lru(self) -> torch.Tensor:
        """Drop the least recently used host block (to disk when there is one); returns its
        buffer for reuse."""
        block_hash, buffer = self._host.popitem(last=False)
        self.host_events.evicted(block_hash)
        self.stats["host"].evicted += 1
        if self._writer is not None:
            if self._pin:
                torch.cuda.current_stream(self.kv_pool.device).synchronize()
            self._writer.put(block_hash, buffer.to("cpu", copy=True))  # the buffer is reused
        return buffer

    def _sync_disk_counts(self) -> None:
        if self.disk is not None and self._writer is not None:
            disk = self.stats["disk"]
            disk.corrupt, disk.evicted = self.disk.corrupt, self.disk.evicted
            disk.stored, disk.bytes_stored = self._writer.stored, self._writer.bytes_stored


class _DiskWriter:
    """Writes blocks to the disk store on a thread of its own, so that an eviction never
    waits for a file (~0.7 ms per SmolLM2 block here). Blocks still queued are visible to
    contains() and get(). At most `max_pending` blocks wait; beyond that a write is dropped
    (the block is simply not kept) and counted in `dropped`."""

    def __init__(self, disk: DiskKVStore, max_pending: int = 64) -> None:
        self.disk = disk
        self.max_pending = max_pending
        self.stored = 0  # blocks newly written
        self.bytes_stored = 0
        self.dropped = 0
        self._pending: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[int] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="kv-disk-writer", daemon=True)
        self._thread.start()

    def put(self, block_hash: int, block: torch.Tensor) -> None:
        """Queue a write of `block` (a CPU tensor the writer now owns)."""
        with self._lock:
            if block_hash in self._pending:
                return
            if len(self._pending) >= self.max_pending:
                self.dropped += 1
                return
            self._pending[block_hash] = block
        self._queue.put(block_hash)

    def contains(self, block_hash: int) -> bool:
        with self._lock:
            if block_hash in self._pending:
                return True
        return self.disk.contains(block_hash)

    def get(self, block_hash: int) -> torch.Tensor | None:
        with self._lock:
            block = self._pending.get(block_hash)
        return block if block is not None else self.disk.get(block_hash)

    def flush(self) -> None:
        self._queue.join()

    def _run(self) -> None:
        while True:
            block_hash = self._queue.get()
            try:
                with self._lock:
                    block = self._pending.get(block_hash)
                had = self.disk.contains(block_hash)
                if block is not None and self.disk.put(block_hash, block) and not had:
                    self.stored += 1
                    self.bytes_stored += self.disk.payload_bytes
            except Exception:  # noqa: BLE001 - a failed write only loses the block
                log.warning("KV disk write failed", exc_info=True)
            finally:
                with self._lock:
                    self._pending.pop(block_hash, None)
                self._queue.task_done()


def build_kv_tier(config: EngineConfig, kv_pool: torch.Tensor, model_id: str) -> KVTierStore | None:
    """The tier `config` asks for (None when neither a host budget nor a disk folder is
    set, or prefix caching is off). `model_id` keeps other models' disk entries apart."""
    if not config.enable_prefix_caching or not (config.host_kv_cache_bytes
                                                 or config.disk_kv_cache_dir):
        return None
    disk = None
    if config.disk_kv_cache_dir:
        shape = (kv_pool.shape[0], kv_pool.shape[1], *kv_pool.shape[3:])
        dtype = codec_of(kv_pool.dtype) or str(kv_pool.dtype).removeprefix("torch.")
        # The KV format's version, the model's dtype and the weights' identity keep stale
        # files out: a file of an older int8 format, of another codec (int8 vs fp8), of
        # other weights at the same path, or computed by the model in another dtype (a bf16
        # model's bf16 cache is not an fp32 model's bf16 cache), is never loaded.
        layout = (f"v{FORMAT_VERSION}|{dtype}|model {config.resolved_dtype}|"
                  f"{','.join(map(str, shape))}|{model_id}|{_weights_fingerprint(model_id)}")
        disk = DiskKVStore(config.disk_kv_cache_dir, layout, tuple(shape), kv_pool.dtype,
                           config.disk_kv_cache_bytes)
    return KVTierStore(kv_pool, config.host_kv_cache_bytes, disk)


def _weights_fingerprint(model_dir: str) -> str:
    """Names, sizes and modification times of a model directory's config and weights."""
    digest = hashlib.blake2b(digest_size=8)
    root = Path(model_dir)
    if root.is_dir():
        for path in sorted([*root.glob("*.safetensors"), *root.glob("*.json")]):
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()
