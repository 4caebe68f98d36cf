"""ClusterStore on Redis, shared by every router replica and worker of a deployment.

Key layout (`ns` = namespace, default "splitserve:"); every value is a plain string, no
pickle anywhere:

    {ns}worker:{worker_id}        hash   WorkerInfo fields + "load.*" fields; PEXPIRE = TTL
    {ns}workers                   set    ids ever registered and not yet purged
    {ns}prefix:{block_hash}       set    worker ids holding that block (hash in decimal)
    {ns}worker_prefix:{worker_id} set    block hashes a worker holds (to clean up after it)
    {ns}prefix_{tier}:{block_hash}, {ns}worker_prefix_{tier}:{worker_id}
                                  sets   the same for the host and disk tiers
    {ns}prefix_log                stream every change of the prefix sets, in order: fields
                                         n (from prefix_seq), w (worker id), then t (tier),
                                         s, e (stored, evicted hashes, space-separated) or
                                         drop; trimmed to about prefix_log_len entries
    {ns}prefix_seq                string the number of the last prefix_log entry
    {ns}ledger:{request_id}       hash   RequestLedgerEntry fields
    {ns}ledger_worker:{worker_id} set    request ids whose entry names that worker

A read of the live workers is one script whose reply is every worker hash as one JSON text
(1,000 workers: one reply to parse, not 30,000 strings), and decodes only the hashes that
changed since the previous read (codec.WorkerDecoder). The prefix log feeds a router's
mirror of the prefix index (cluster.prefix_mirror; `prefix_mirror()`).

Liveness is the worker hash's existence: Redis expires it when the TTL lapses. A dead
worker's prefix sets are purged lazily (by the next live_workers or prefix_overlap) in a
Lua script that re-checks death atomically. Scripts touch keys they derive from their
arguments, so this targets a single Redis (or a replicated primary), not Redis Cluster.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from typing import Any, cast

import redis

from splitserve.cluster.codec import (
    WorkerDecoder,
    decode_entry,
    encode_entry,
    encode_info,
    encode_load,
)
from splitserve.cluster.prefix_mirror import LogEntry, PrefixMirror
from splitserve.cluster.store import (
    KV_TIERS,
    ClusterStore,
    LiveWorker,
    PrefixOverlap,
    RequestLedgerEntry,
    WorkerInfo,
    WorkerLoadReport,
    WorkerRole,
    check_block_hashes,
    check_service_deltas,
    check_tier,
    tiered_run,
    ttl_to_ms,
)
from splitserve.common.cluster_types import ids_within


def _tier_part(tier: str) -> str:
    """The device tier keeps the original key names."""
    return "" if tier == "device" else f"_{tier}"

# KEYS: worker hash, workers set, prefix log, prefix seq, then the worker_prefix set of each
# tier. ARGV: worker id, "1" to drop only if the worker hash is gone (expired) or "0" to drop
# unconditionally, the log's length, then each tier's prefix-key stem (in KEYS' order).
_DROP_WORKER = """
if ARGV[2] == '1' and redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for i = 5, #KEYS do
  for _, h in ipairs(redis.call('SMEMBERS', KEYS[i])) do
    redis.call('SREM', ARGV[i - 1] .. h, ARGV[1])
  end
  redis.call('DEL', KEYS[i])
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
local n = redis.call('INCR', KEYS[4])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'n', n, 'w', ARGV[1], 'drop', '1')
return 1
"""

# KEYS: worker hash. ARGV: ttl in ms, then field, value pairs of the new load (maybe none).
_HEARTBEAT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if #ARGV > 1 then redis.call('HSET', KEYS[1], unpack(ARGV, 2)) end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""

# KEYS: worker hash, worker_prefix set, prefix log, prefix seq. ARGV: worker id, prefix-key
# stem, tier, the log's length, number of stored hashes, the stored hashes, then the evicted.
_PUBLISH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n_stored = tonumber(ARGV[5])
for i = 6, 5 + n_stored do
  redis.call('SADD', ARGV[2] .. ARGV[i], ARGV[1])
  redis.call('SADD', KEYS[2], ARGV[i])
end
for i = 6 + n_stored, #ARGV do
  redis.call('SREM', ARGV[2] .. ARGV[i], ARGV[1])
  redis.call('SREM', KEYS[2], ARGV[i])
end
local n = redis.call('INCR', KEYS[4])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'n', n, 'w', ARGV[1], 't', ARGV[3],
           's', table.concat(ARGV, ' ', 6, 5 + n_stored),
           'e', table.concat(ARGV, ' ', 6 + n_stored, #ARGV))
return 1
"""


# KEYS: workers set. ARGV: worker-key stem. Per member of the set, [id, its hash as field,
# value, ...] (empty when the hash is gone), as one JSON text: a read of 1,000 workers is one
# reply to parse instead of 30,000 strings.
_LIVE_WORKERS = """
local out = {}
for _, wid in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  out[#out + 1] = {wid, redis.call('HGETALL', ARGV[1] .. wid)}
end
return cjson.encode(out)
"""


class RedisClusterStore(ClusterStore):
    """A ClusterStore backed by the Redis server at `url` ("redis://host:port/db")."""

    def __init__(
        self, url: str, namespace: str = "splitserve:", socket_timeout_s: float = 5.0,
        prefix_log_len: int = 10_000,
    ) -> None:
        self._ns = namespace
        self._log_len = prefix_log_len  # entries kept, about (Redis trims whole nodes)
        self._redis: redis.Redis = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
        )
        self._drop_script = self._redis.register_script(_DROP_WORKER)
        self._heartbeat_script = self._redis.register_script(_HEARTBEAT)
        self._publish_script = self._redis.register_script(_PUBLISH)
        self._live_script = self._redis.register_script(_LIVE_WORKERS)
        self._decoder = WorkerDecoder()
        self._decoder_lock = threading.Lock()

    # ---- keys -------------------------------------------------------------------------

    def _worker_key(self, worker_id: str) -> str:
        return f"{self._ns}worker:{worker_id}"

    def _worker_prefix_key(self, worker_id: str, tier: str = "device") -> str:
        return f"{self._ns}worker_prefix{_tier_part(tier)}:{worker_id}"

    def _ledger_key(self, request_id: str) -> str:
        return f"{self._ns}ledger:{request_id}"

    def _ledger_worker_key(self, worker_id: str) -> str:
        return f"{self._ns}ledger_worker:{worker_id}"

    @property
    def _service_key(self) -> str:
        return f"{self._ns}service"

    @property
    def _workers_key(self) -> str:
        return f"{self._ns}workers"

    @property
    def prefix_log_key(self) -> str:
        return f"{self._ns}prefix_log"

    @property
    def prefix_seq_key(self) -> str:
        return f"{self._ns}prefix_seq"

    def _prefix_stem(self, tier: str = "device") -> str:
        return f"{self._ns}prefix{_tier_part(tier)}:"

    # redis-py types replies as bytes | str; decode_responses=True makes them str.
    def _members(self, key: str) -> set[str]:
        return cast(set[str], self._redis.smembers(key))

    def _fields(self, key: str) -> dict[str, str]:
        return cast(dict[str, str], self._redis.hgetall(key))

    # ---- registry ---------------------------------------------------------------------

    def register_worker(self, info: WorkerInfo, ttl_s: float) -> None:
        ttl_ms = ttl_to_ms(ttl_s)
        self._drop(info.worker_id, only_if_expired=False)
        key = self._worker_key(info.worker_id)
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.hset(key, mapping=cast(dict[Any, Any], encode_info(info)))
            pipe.pexpire(key, ttl_ms)
            pipe.sadd(self._workers_key, info.worker_id)
            pipe.execute()

    def heartbeat(self, worker_id: str, load: WorkerLoadReport | None, ttl_s: float) -> bool:
        args: list[Any] = [ttl_to_ms(ttl_s)]
        if load is not None:
            for name, value in encode_load(load).items():
                args += [name, value]
        return bool(self._heartbeat_script(keys=[self._worker_key(worker_id)], args=args))

    def deregister_worker(self, worker_id: str) -> None:
        self._drop(worker_id, only_if_expired=False)

    def live_workers(self, role: WorkerRole | None = None) -> list[LiveWorker]:
        reply = self._live_script(keys=[self._workers_key], args=[self._worker_key("")])
        hashes = sorted((wid, flat or []) for wid, flat in json.loads(reply))
        with self._decoder_lock:
            workers, gone = self._decoder.decode(hashes)
        for wid in gone:
            self._drop(wid, only_if_expired=True)
        return [w for w in workers if role is None or w[0].role.can_serve(role)]

    def _live_ids(self) -> set[str]:
        ids = sorted(self._members(self._workers_key))
        with self._redis.pipeline(transaction=False) as pipe:
            for wid in ids:
                pipe.exists(self._worker_key(wid))
            exists = pipe.execute()
        live = set()
        for wid, alive in zip(ids, exists, strict=True):
            if alive:
                live.add(wid)
            else:
                self._drop(wid, only_if_expired=True)
        return live

    def _drop(self, worker_id: str, only_if_expired: bool) -> None:
        keys = [self._worker_key(worker_id), self._workers_key, self.prefix_log_key,
                self.prefix_seq_key, *(self._worker_prefix_key(worker_id, t) for t in KV_TIERS)]
        flag = "1" if only_if_expired else "0"
        self._drop_script(keys=keys, args=[worker_id, flag, self._log_len,
                                           *(self._prefix_stem(t) for t in KV_TIERS)])

    # ---- prefix index -----------------------------------------------------------------

    def publish_prefix_events(
        self, worker_id: str, stored_hashes: list[int], evicted_hashes: list[int],
        tier: str = "device",
    ) -> None:
        check_tier(tier)
        check_block_hashes(stored_hashes)
        check_block_hashes(evicted_hashes)
        if not stored_hashes and not evicted_hashes:
            return
        keys = [self._worker_key(worker_id), self._worker_prefix_key(worker_id, tier),
                self.prefix_log_key, self.prefix_seq_key]
        args: list[str | int] = [worker_id, self._prefix_stem(tier), tier, self._log_len,
                                 len(stored_hashes), *stored_hashes, *evicted_hashes]
        self._publish_script(keys=keys, args=args)

    def prefix_mirror(self) -> PrefixMirror:
        return PrefixMirror(self)

    def prefix_log_after(self, entry_id: str, count: int) -> list[LogEntry]:
        reply = cast(list[Any], self._redis.xread({self.prefix_log_key: entry_id}, count=count))
        return cast(list[LogEntry], reply[0][1]) if reply else []

    def prefix_sets(self) -> tuple[int, str, dict[str, dict[str, set[int]]]]:
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.get(self.prefix_seq_key)
            pipe.xrevrange(self.prefix_log_key, count=1)
            seq, last = pipe.execute()
        worker_ids = sorted(self._members(self._workers_key))
        with self._redis.pipeline(transaction=False) as pipe:
            for wid in worker_ids:
                for tier in KV_TIERS:
                    pipe.smembers(self._worker_prefix_key(wid, tier))
            held: list[set[str]] = pipe.execute()
        per_worker = {wid: {tier: {int(h) for h in held[i * len(KV_TIERS) + j]}
                            for j, tier in enumerate(KV_TIERS)}
                      for i, wid in enumerate(worker_ids)}
        return int(seq or 0), last[0][0] if last else "0-0", per_worker

    def _holders(self, block_hashes: list[int], tiers: tuple[str, ...]) -> list[list[set[str]]]:
        """Per tier, per block: the ids of workers holding it there."""
        with self._redis.pipeline(transaction=False) as pipe:
            for tier in tiers:
                stem = self._prefix_stem(tier)
                for h in block_hashes:
                    pipe.smembers(f"{stem}{h}")
            flat: list[set[str]] = pipe.execute()
        n = len(block_hashes)
        return [flat[i * n:(i + 1) * n] for i in range(len(tiers))]

    def prefix_overlap(self, block_hashes: list[int]) -> dict[str, int]:
        check_block_hashes(block_hashes)
        if not block_hashes:
            return {}
        live = self._live_ids()
        [holders_per_block] = self._holders(block_hashes, ("device",))
        overlap: dict[str, int] = {}
        running = holders_per_block[0] & live  # workers whose run has not broken yet
        for i, holders in enumerate(holders_per_block):
            for wid in running - holders:
                overlap[wid] = i
            running &= holders
            if not running:
                break
        for wid in running:
            overlap[wid] = len(block_hashes)
        return {wid: n for wid, n in sorted(overlap.items()) if n > 0}

    def prefix_overlap_tiers(self, block_hashes: list[int], among: AbstractSet[str] | None = None
                             ) -> dict[str, PrefixOverlap]:
        check_block_hashes(block_hashes)
        if not block_hashes:
            return {}
        live = self._live_ids()
        per_tier = self._holders(block_hashes, KV_TIERS)
        candidates = set().union(*(blocks[0] for blocks in per_tier)) & live
        if among is not None:
            candidates = ids_within(candidates, among)
        result = {}
        for wid in sorted(candidates):
            holds = {tier: {h for h, holders in zip(block_hashes, blocks, strict=True)
                            if wid in holders}
                     for tier, blocks in zip(KV_TIERS, per_tier, strict=True)}
            result[wid] = tiered_run(block_hashes, holds)
        return result

    # ---- request ledger ---------------------------------------------------------------

    def ledger_put(self, entry: RequestLedgerEntry) -> None:
        key = self._ledger_key(entry.request_id)
        new_workers = {w for w in (entry.prefill_worker_id, entry.decode_worker_id) if w}

        def write(pipe: Any) -> None:
            old_workers = {w for w in pipe.hmget(key, "prefill_worker_id", "decode_worker_id") if w}
            pipe.multi()
            pipe.delete(key)
            pipe.hset(key, mapping=cast(dict[Any, Any], encode_entry(entry)))
            for wid in old_workers - new_workers:
                pipe.srem(self._ledger_worker_key(wid), entry.request_id)
            for wid in new_workers:
                pipe.sadd(self._ledger_worker_key(wid), entry.request_id)

        self._redis.transaction(write, key)

    def ledger_get(self, request_id: str) -> RequestLedgerEntry | None:
        fields = self._fields(self._ledger_key(request_id))
        return decode_entry(fields) if fields else None

    def add_service(self, deltas: Mapping[str, float]) -> dict[str, float]:
        check_service_deltas(deltas)
        pipe = self._redis.pipeline(transaction=True)
        for client, delta in deltas.items():
            pipe.hincrbyfloat(self._service_key, client, delta)
        pipe.hgetall(self._service_key)
        totals = cast(dict[Any, Any], pipe.execute()[-1])
        return {str(k): float(v) for k, v in totals.items()}  # decode_responses: str keys

    def ledger_delete(self, request_id: str) -> bool:
        key = self._ledger_key(request_id)

        def delete(pipe: Any) -> None:
            workers = [w for w in pipe.hmget(key, "prefill_worker_id", "decode_worker_id") if w]
            pipe.multi()
            pipe.delete(key)
            for wid in workers:
                pipe.srem(self._ledger_worker_key(wid), request_id)

        results = cast(list[Any], self._redis.transaction(delete, key))  # MULTI's replies
        return bool(results[0])

    def ledger_by_worker(self, worker_id: str) -> list[RequestLedgerEntry]:
        request_ids = sorted(self._members(self._ledger_worker_key(worker_id)))
        with self._redis.pipeline(transaction=False) as pipe:
            for rid in request_ids:
                pipe.hgetall(self._ledger_key(rid))
            all_fields: list[dict[str, str]] = pipe.execute()
        entries = [decode_entry(f) for f in all_fields if f]
        return [e for e in entries if e.names_worker(worker_id)]

    def close(self) -> None:
        self._redis.close()
