"""The prefix index's device lookup in C (cluster/_prefix_runs.c) against its Python loop
(cluster.prefix_index.device_ends): the same dict in the same order on random masks (slots
around the int's digit and byte boundaries, freed slots, blocks nobody holds, a scope
narrower than the first block's holders, up to 1,000 workers), and clear errors for masks it
cannot read."""

from __future__ import annotations

import random

import pytest

from splitserve.cluster import prefix_index

runs = prefix_index._prefix_runs


def test_the_lookup_is_built() -> None:
    """setup.py builds it (optional there); the dev install must have it."""
    assert runs is not None


def _random_case(rng: random.Random) -> tuple[dict[int, int], list[int], int, list[str | None]]:
    num_slots = rng.choice((1, 2, 8, 29, 30, 31, 60, 61, 64, 65, 200, 1000))
    slot_ids: list[str | None] = [f"w{i:04d}" for i in range(num_slots)]
    for slot in rng.sample(range(num_slots), k=num_slots // 10):  # freed slots
        slot_ids[slot] = None
    taken = [slot for slot, wid in enumerate(slot_ids) if wid is not None]
    hashes = [rng.getrandbits(64) - (1 << 63) for _ in range(rng.randrange(1, 40))]
    masks: dict[int, int] = {}
    keep = rng.choice((0.5, 0.9, 0.99, 1.0))
    for h in hashes:
        if rng.random() < 0.05:
            continue  # nobody holds it
        mask = 0
        for slot in taken:
            if rng.random() < keep:
                mask |= 1 << slot
        if mask:
            masks[h] = mask
    running = masks.get(hashes[0], 0)
    if rng.random() < 0.3:  # a scope: the workers of some slots only
        scope = 0
        for slot in rng.sample(taken, k=rng.randrange(len(taken) + 1)) if taken else ():
            scope |= 1 << slot
        running &= scope
    return masks, hashes, running, slot_ids


@pytest.mark.parametrize("seed", range(4))
def test_the_same_runs_as_the_python_loop(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(500):
        masks, hashes, running, slot_ids = _random_case(rng)
        expected = prefix_index.device_ends(masks, hashes, running, slot_ids)
        got = runs.device_ends(masks, hashes, running, slot_ids)
        assert list(got.items()) == list(expected.items())  # the same order too


def test_every_worker_runs_to_the_end_or_to_its_first_gap() -> None:
    slot_ids = ["a", "b", "c", "d"]
    masks = {10: 0b1111, 11: 0b1011, 12: 0b0011, 13: 0b0001}
    assert runs.device_ends(masks, [10, 11, 12, 13], 0b1111, slot_ids) == {
        "c": 1, "d": 2, "b": 3, "a": 4}
    assert runs.device_ends(masks, [10, 99, 12], 0b0110, slot_ids) == {"c": 1, "b": 1}
    assert runs.device_ends(masks, [10], 0b1000, slot_ids) == {"d": 1}
    assert runs.device_ends(masks, [10, 11], 0, slot_ids) == {}


def test_masks_it_cannot_read_are_refused() -> None:
    with pytest.raises(IndexError, match="slot 5 has no worker"):
        runs.device_ends({}, [1, 2], 1 << 5, ["a"])
    with pytest.raises(TypeError):
        runs.device_ends({2: "x"}, [1, 2], 1, ["a"])
    with pytest.raises((TypeError, ValueError, OverflowError)):
        runs.device_ends({}, [1, 2], -1, ["a"])
    with pytest.raises(TypeError):
        runs.device_ends({}, 5, 1, ["a"])


def test_worker_ids_whose_hash_changes_the_masks_mid_lookup() -> None:
    """A worker id's __hash__ runs on each insertion into the result; one that empties the
    masks then (freeing the block being read, its memory reused at once by ints of the same
    size) must not make the C lookup read freed memory: it sees what the Python loop sees."""
    high = 1000  # masks over 1,000 bits: ints that are freed, not cached small ones
    junk: list[int] = []

    def lookup(fn: object) -> dict[str, int]:
        masks = {h: bits << high for h, bits in ((10, 0b1111), (11, 0b0111), (12, 0b0011),
                                                 (13, 0b0001))}

        class Meddling(str):
            def __hash__(self) -> int:
                if masks:
                    masks.clear()
                    junk.extend(1 << (high + 3) for _ in range(1000))  # slots 1000-1002 clear
                return str.__hash__(self)

        slot_ids: list[str | None] = [None] * high + [Meddling(f"w{i}") for i in range(4)]
        return fn(masks, [10, 11, 12, 13], 0b1111 << high, slot_ids)  # type: ignore[operator, no-any-return]

    expected = lookup(prefix_index.device_ends)
    assert lookup(runs.device_ends) == expected == {"w3": 1, "w2": 2, "w1": 2, "w0": 2}
