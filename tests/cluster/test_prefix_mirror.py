"""PrefixMirror: a router's copy of a Redis store's prefix index, from the store's prefix log.

On a real redis-server: after sync() the mirror answers what the store answers, through
random stores, evictions, tiers, registrations and deregistrations; a log trimmed past
what the mirror read, or a store that starts counting again, makes it reload. With a fake
log: a reload whose set reads are newer than the entry it noted replays to the truth.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator

import pytest
import redis

from splitserve.cluster.prefix_mirror import LogEntry, PrefixMirror
from splitserve.cluster.redis_store import RedisClusterStore
from splitserve.cluster.store import KV_TIERS, WorkerInfo, WorkerRole, tiered_run


@pytest.fixture
def redis_store(redis_url: str) -> Iterator[RedisClusterStore]:
    namespace = f"mirror-{uuid.uuid4().hex[:8]}:"
    store = RedisClusterStore(redis_url, namespace=namespace)
    try:
        yield store
    finally:
        raw = redis.Redis.from_url(redis_url)
        keys = list(raw.scan_iter(match=f"{namespace}*"))
        if keys:
            raw.delete(*keys)
        raw.close()
        store.close()


def _register(store: RedisClusterStore, wid: str) -> None:
    store.register_worker(WorkerInfo(wid, WorkerRole.BOTH, f"{wid}:1", "m", 16, 100), 60.0)


def _churn(store: RedisClusterStore, rng: random.Random, prompts: list[list[int]], steps: int) -> None:
    workers = [f"w{i}" for i in range(8)]
    for _ in range(steps):
        wid, action = rng.choice(workers), rng.random()
        prompt = rng.choice(prompts)
        if action < 0.5:
            store.publish_prefix_events(wid, prompt[: rng.randrange(len(prompt) + 1)], [],
                                        rng.choice(KV_TIERS))
        elif action < 0.75:
            store.publish_prefix_events(wid, [], rng.sample(prompt, k=2), rng.choice(KV_TIERS))
        elif action < 0.9:
            _register(store, wid)  # again: its cache starts empty
        else:
            store.deregister_worker(wid)


def _assert_mirrors(mirror: PrefixMirror, store: RedisClusterStore, prompts: list[list[int]]) -> None:
    for prompt in prompts:
        assert mirror.overlap_tiers(prompt) == store.prefix_overlap_tiers(prompt)
        assert mirror.weighted_runs(prompt, None, 0.75, 0.5) == {
            w: run.device_blocks + 0.75 * run.host_blocks + 0.5 * run.disk_blocks
            for w, run in store.prefix_overlap_tiers(prompt).items()}


def test_the_mirror_answers_what_the_store_answers(redis_store: RedisClusterStore) -> None:
    rng = random.Random(0)
    prompts = [[rng.getrandbits(64) for _ in range(6)] for _ in range(4)]
    for i in range(8):
        _register(redis_store, f"w{i}")
    mirror = redis_store.prefix_mirror()
    _churn(redis_store, rng, prompts, 40)
    assert mirror.sync() == 0  # the first loads the sets
    _assert_mirrors(mirror, redis_store, prompts)
    for _ in range(6):
        _churn(redis_store, rng, prompts, 40)
        assert mirror.sync() > 0
        _assert_mirrors(mirror, redis_store, prompts)
    assert mirror.sync() == 0 and mirror.num_reloads == 1  # only the first sync loaded


def test_a_trimmed_log_or_a_restarted_count_reloads(redis_store: RedisClusterStore) -> None:
    rng = random.Random(1)
    prompts = [[rng.getrandbits(64) for _ in range(5)] for _ in range(3)]
    for i in range(8):
        _register(redis_store, f"w{i}")
    mirror = redis_store.prefix_mirror()
    mirror.sync()
    raw = redis_store._redis
    _churn(redis_store, rng, prompts, 30)
    raw.xtrim(redis_store.prefix_log_key, maxlen=2, approximate=False)  # lost entries
    mirror.sync()
    assert mirror.num_reloads == 2
    _assert_mirrors(mirror, redis_store, prompts)
    raw.delete(redis_store.prefix_seq_key)  # Redis lost its count
    _churn(redis_store, rng, prompts, 30)
    mirror.sync()
    assert mirror.num_reloads == 3
    _assert_mirrors(mirror, redis_store, prompts)


class _FakeLog:
    """A prefix log whose set reads happen `late` entries after the entry a reload notes."""

    def __init__(self, late: int) -> None:
        self.entries: list[LogEntry] = []
        self.late = late

    def add(self, fields: dict[str, str]) -> None:
        n = len(self.entries) + 1
        self.entries.append((f"{n}-0", {"n": str(n), **fields}))

    def prefix_log_after(self, entry_id: str, count: int) -> list[LogEntry]:
        after = int(entry_id.split("-")[0])
        return self.entries[after:after + count]

    def truth(self, upto: int) -> dict[str, dict[str, set[int]]]:
        held: dict[str, dict[str, set[int]]] = {}
        for _, f in self.entries[:upto]:
            if "drop" in f:
                held.pop(f["w"], None)
                continue
            tier = held.setdefault(f["w"], {t: set() for t in KV_TIERS})[f["t"]]
            tier |= {int(h) for h in f["s"].split()}
            tier -= {int(h) for h in f["e"].split()}
        return held

    def prefix_sets(self) -> tuple[int, str, dict[str, dict[str, set[int]]]]:
        noted = max(0, len(self.entries) - self.late)
        return noted, f"{noted}-0" if noted else "0-0", self.truth(len(self.entries))


@pytest.mark.parametrize("late", [0, 1, 7, 50])
def test_a_reload_newer_than_its_noted_entry_replays_to_the_truth(late: int) -> None:
    rng = random.Random(late)
    log = _FakeLog(late)
    hashes = [rng.getrandbits(64) for _ in range(12)]
    for _ in range(60):
        wid = rng.choice(("a", "b", "c"))
        if rng.random() < 0.1:
            log.add({"w": wid, "drop": "1"})
        else:
            stored, evicted = rng.sample(hashes, k=4), rng.sample(hashes, k=2)
            log.add({"w": wid, "t": rng.choice(KV_TIERS), "s": " ".join(map(str, stored)),
                     "e": " ".join(map(str, evicted))})
    mirror = PrefixMirror(log)
    mirror.sync()
    truth = log.truth(len(log.entries))
    for start in range(len(hashes)):
        query = hashes[start:]
        want = {w: tiered_run(query, tiers) for w, tiers in sorted(truth.items())}
        assert mirror.overlap_tiers(query) == {w: r for w, r in want.items() if r.num_blocks}
