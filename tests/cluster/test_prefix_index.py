"""PrefixIndex's set-at-a-time lookups equal the worker-by-worker reference (store.tiered_run,
store.leading_run) on random caches: runs broken anywhere, blocks in several tiers or in the
device's alone, holes. Every test runs with the device lookup in C (cluster/_prefix_runs.c)
and with its Python loop."""

from __future__ import annotations

import random

import pytest

from splitserve.cluster import prefix_index
from splitserve.cluster.prefix_index import PrefixIndex
from splitserve.cluster.store import KV_TIERS, leading_run, tiered_run
from splitserve.common.cluster_types import WorkerIdUnion


@pytest.fixture(autouse=True, params=("c", "python"))
def device_lookup(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The device lookup in C (cluster/_prefix_runs.c), then the Python loop."""
    if request.param == "c":
        assert prefix_index._prefix_runs is not None, "setup.py did not build _prefix_runs"
    else:
        monkeypatch.setattr(prefix_index, "_prefix_runs", None)


def _random_index(rng: random.Random, num_workers: int, prompts: list[list[int]],
                  tiers: tuple[str, ...]) -> tuple[PrefixIndex, dict[str, dict[str, set[int]]]]:
    index = PrefixIndex()
    truth: dict[str, dict[str, set[int]]] = {}
    for w in range(num_workers):
        wid = f"w{w:03d}"
        truth[wid] = {t: set() for t in KV_TIERS}
        for prompt in rng.sample(prompts, k=rng.randrange(len(prompts) + 1)):
            cut = rng.randrange(len(prompt) + 1)
            for h in prompt[:cut]:
                tier = rng.choice(tiers)
                index.apply(wid, tier, [h], [])
                truth[wid][tier].add(h)
            holes = rng.sample(prompt, k=min(len(prompt), rng.randrange(3)))  # evicted
            tier = rng.choice(tiers)
            index.apply(wid, tier, [], holes)
            truth[wid][tier] -= set(holes)
    return index, truth


@pytest.mark.parametrize("seed", range(30))
def test_lookups_equal_the_reference(seed: int) -> None:
    rng = random.Random(seed)
    prompts = [[rng.getrandbits(64) for _ in range(rng.randrange(1, 12))] for _ in range(5)]
    tiers = ("device",) if seed % 3 == 0 else ("device", "device", "host", "disk")
    index, truth = _random_index(rng, rng.randrange(1, 40), prompts, tiers)
    dropped = rng.sample(sorted(truth), k=len(truth) // 4)
    for wid in dropped:
        index.drop(wid)
        del truth[wid]
    live = set(rng.sample(sorted(truth), k=len(truth) // 2))
    queries = [*prompts, [p[0] for p in prompts], [], [rng.getrandbits(64)]]
    for query in queries:
        tiers = {w: tiered_run(query, holds) for w, holds in sorted(truth.items())}
        expect_tiers = {w: run for w, run in tiers.items() if run.num_blocks}
        assert index.overlap_tiers(query) == expect_tiers
        assert list(index.overlap_tiers(query)) == sorted(expect_tiers)
        in_live = {w: r for w, r in expect_tiers.items() if w in live}
        assert index.overlap_tiers(query, frozenset(live)) == in_live
        assert index.overlap_tiers(query, set(live)) == in_live  # not cached: read afresh
        halves = sorted(live)[::2], sorted(live)[1::2]
        assert index.overlap_tiers(query, WorkerIdUnion(frozenset(halves[0]), set(halves[1]))
                                   ) == in_live
        weighted = {w: run.device_blocks + 0.75 * run.host_blocks + 0.5 * run.disk_blocks
                    for w, run in in_live.items()}
        assert index.weighted_runs(query, frozenset(live), 0.75, 0.5) == weighted
        assert index.weighted_runs(query, None, 0.75, 0.5) == {
            w: run.device_blocks + 0.75 * run.host_blocks + 0.5 * run.disk_blocks
            for w, run in expect_tiers.items()}
        device = {w: leading_run(query, holds["device"]) for w, holds in sorted(truth.items())}
        expect = {w: n for w, n in device.items() if n}
        assert index.overlap(query) == expect
        assert index.overlap(query, frozenset(live)) == {w: n for w, n in expect.items() if w in live}
    for wid in truth:
        for tier in KV_TIERS:
            assert index.held(wid, tier) == truth[wid][tier]
    assert not set(dropped) & set(index.workers())


def test_drop_forgets_every_tier() -> None:
    index = PrefixIndex()
    index.apply("a", "device", [1, 2], [])
    index.apply("a", "disk", [3], [])
    index.apply("b", "device", [1], [])
    index.drop("a")
    index.drop("nobody")
    assert "a" not in index and "b" in index
    assert index.overlap_tiers([1, 2, 3]) == {"b": tiered_run([1, 2, 3], {"device": {1}})}
    assert index._masks["disk"] == {}  # no empty holder masks left behind


def test_a_cached_scope_follows_workers_joining_and_slots_reused() -> None:
    """The device lookups keep a frozenset scope's bitmask: a worker of the scope that joins
    later is found, and a newcomer reusing a dropped worker's slot is not in the scope."""
    index = PrefixIndex()
    scope = frozenset({"a", "b"})
    index.apply("a", "device", [1, 2], [])
    assert index.overlap([1, 2], scope) == {"a": 2}
    index.apply("b", "device", [1], [])
    assert index.overlap([1, 2], scope) == {"a": 2, "b": 1}
    index.drop("a")
    index.apply("c", "device", [1, 2], [])  # takes the slot "a" had
    assert index.overlap([1, 2], scope) == {"b": 1}
    assert index.overlap([1, 2]) == {"b": 1, "c": 2}
    assert index.overlap([1, 2], {"c"}) == {"c": 2}  # a plain set is read afresh
    index.apply("c", "device", [], [1, 2])
    assert index.overlap([1, 2], frozenset({"c"})) == {}
    assert index._masks["device"] == {1: index._bit["b"]}  # no empty masks left behind


@pytest.mark.parametrize("seed", range(10))
def test_lookups_after_churn_equal_the_reference(seed: int) -> None:
    """Workers leave and others join (reusing their slots) between lookups over the same
    cached scopes."""
    rng = random.Random(1000 + seed)
    prompts = [[rng.getrandbits(64) for _ in range(rng.randrange(1, 12))] for _ in range(5)]
    index = PrefixIndex()
    truth: dict[str, set[int]] = {}
    scopes = [frozenset(f"w{w:03d}" for w in rng.sample(range(60), 30)) for _ in range(2)]
    for _ in range(40):
        wid = f"w{rng.randrange(60):03d}"
        if wid in truth and rng.random() < 0.4:
            index.drop(wid)
            del truth[wid]
        else:
            prompt = rng.choice(prompts)
            cut = rng.randrange(len(prompt) + 1)
            index.apply(wid, "device", prompt[:cut], [])
            truth.setdefault(wid, set()).update(prompt[:cut])
        for query in prompts:
            expect = {w: n for w, holds in sorted(truth.items())
                      if (n := leading_run(query, holds))}
            assert index.overlap(query) == expect
            for scope in scopes:
                assert index.overlap(query, scope) == {
                    w: n for w, n in expect.items() if w in scope}
