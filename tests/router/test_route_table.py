"""The latency policy's prefill TTFT scan in C (router/_route_table.c) against its numpy
expression (router.latency.prefill_ttfts): the same two least rows and the same doubles, on
random tables with ties, cached prefixes (whole, partial, fractional from weighted tiers, at
a rounding half), rows left out, NaNs (no candidate) and prompts of 0 or 1 token; and clear
errors for tables and rows it cannot read."""

from __future__ import annotations

import random

import numpy as np
import pytest

from splitserve.router import latency

scan = latency._route_table


def test_the_scan_is_built() -> None:
    """setup.py builds it (optional there); the dev install must have it."""
    assert scan is not None


def _numpy_least_two(table: np.ndarray, row_of: dict[str, int], prompt_len: int,
                     overlap: dict[str, float], block_size: int,
                     skip: list[int]) -> tuple[int, float, int, float]:
    ttft = latency.prefill_ttfts(table, row_of, prompt_len, overlap, block_size, skip)
    first = int(ttft.argmin())
    first_ttft = float(ttft[first])
    ttft[first] = np.inf
    second = int(ttft.argmin())
    return first, first_ttft, second, float(ttft[second])


def _random_case(rng: random.Random) -> tuple[np.ndarray, dict[str, int], int,
                                              dict[str, float], int, list[int]]:
    n = rng.choice((1, 2, 3, 17, 500))
    rows = [(float(rng.choice((0, 0, 64, 128, 1000, rng.randrange(5000)))),
             rng.choice((2.0, 2.5, 3.0, rng.uniform(0.5, 40.0))),
             rng.choice((0.01, 0.1, 1 / 3, rng.uniform(0.0, 2.0))),
             float(rng.choice((1, 64, 100, 512, 2048))))
            for _ in range(n)]
    table = np.array(rows, dtype=np.float64)
    if rng.random() < 0.2:  # a NaN cost (cluster state's decoders refuse them; the scan too)
        table[rng.randrange(n), rng.randrange(4)] = np.nan
    ids = [f"w{i:04d}" for i in range(n)]
    row_of = {wid: i for i, wid in enumerate(ids)}
    block_size = rng.choice((1, 16, 32))
    prompt_len = rng.choice((0, 1, 2, 20, 64, 100, 513, 4096))
    # Cached runs: whole blocks, weighted (fractional) ones, past the prompt's end, one at
    # a rounding half (prompt - cached = k + 0.5), and workers that are not in the table.
    overlap: dict[str, float] = {}
    for wid in rng.sample(ids, k=min(n, rng.randrange(40))):
        overlap[wid] = rng.choice((0, 1, 2.75, 4.0, 40.0, 1000,
                                   (prompt_len - 2.5) / block_size, rng.uniform(0, 50),
                                   float("nan") if rng.random() < 0.1 else 1))
    overlap["decode-only"] = 3.0
    skip = rng.sample(range(n), k=min(n, rng.choice((0, 0, 1, 3))))
    return table, row_of, prompt_len, overlap, block_size, skip


@pytest.mark.parametrize("seed", range(40))
def test_the_scan_finds_numpys_two_least_rows_and_doubles(seed: int) -> None:
    assert scan is not None
    rng = random.Random(seed)
    for _ in range(25):
        table, row_of, prompt_len, overlap, block_size, skip = _random_case(rng)
        want = _numpy_least_two(table, row_of, prompt_len, overlap, block_size, skip)
        got = scan.least_two(table, prompt_len, block_size, overlap, row_of, skip)
        if want[1] == np.inf:  # every row left out: only the TTFTs mean anything
            assert got[1] == got[3] == np.inf
            continue
        assert got[:2] == want[:2]
        if want[3] == np.inf:
            assert got[3] == np.inf
        else:
            assert got[2:] == want[2:]


def test_ties_go_to_the_first_row_and_the_next_least_skips_only_the_first() -> None:
    assert scan is not None
    table = np.array([(0, 5.0, 0.0, 512)] * 4, dtype=np.float64)
    row_of = {f"w{i}": i for i in range(4)}
    assert scan.least_two(table, 100, 16, {}, row_of, []) == (0, 5.0, 1, 5.0)
    assert scan.least_two(table, 100, 16, {}, row_of, [0]) == (1, 5.0, 2, 5.0)
    # w3 caches the whole prompt: one token left, one step of 5 ms like the others: a tie.
    assert scan.least_two(table, 100, 16, {"w3": 7.0}, row_of, [1])[:2] == (0, 5.0)
    cheaper = table.copy()
    cheaper[:, 2] = 0.1  # 0.1 ms a prompt token: the cached prompt wins
    assert scan.least_two(cheaper, 100, 16, {"w3": 7.0}, row_of, [])[:2] == (3, 5.0 + 0.1 * 1)


def test_a_nan_row_is_no_candidate() -> None:
    assert scan is not None
    table = np.array([(0, 5.0, 0.0, 512), (0, np.nan, 0.0, 512), (0, 6.0, 0.0, 512)])
    row_of = {"a": 0, "b": 1, "c": 2}
    assert scan.least_two(table, 100, 16, {}, row_of, []) == (0, 5.0, 2, 6.0)
    assert scan.least_two(table, 100, 16, {"c": float("nan")}, row_of, [])[3] == np.inf
    assert _numpy_least_two(table, row_of, 100, {}, 16, []) == (0, 5.0, 2, 6.0)


def test_rows_may_be_numpy_integers() -> None:
    assert scan is not None
    table = np.array([(0, 5.0, 0.0, 512), (0, 4.0, 0.0, 512)])
    assert scan.least_two(table, 10, 16, {}, {}, [np.int64(1)]) == (0, 5.0, 1, np.inf)


def test_one_row() -> None:
    assert scan is not None
    table = np.array([(10.0, 2.0, 0.5, 64.0)], dtype=np.float64)
    first, first_ttft, _, second_ttft = scan.least_two(table, 54, 16, {}, {"w": 0}, [])
    assert (first, first_ttft, second_ttft) == (0, 2.0 + 0.5 * 64, np.inf)


@pytest.mark.parametrize(("table", "message"), [
    (np.zeros((3, 3)), "4 columns"),
    (np.zeros((3, 4), dtype=np.float32), "float64"),
    (np.zeros((0, 4)), "no rows"),
    (np.zeros(8), "4 columns"),
])
def test_tables_it_cannot_read_are_refused(table: np.ndarray, message: str) -> None:
    assert scan is not None
    with pytest.raises(ValueError, match=message):
        scan.least_two(table, 10, 16, {}, {}, [])


def test_rows_outside_the_table_are_refused() -> None:
    assert scan is not None
    table = np.zeros((2, 4)) + 1.0
    with pytest.raises(IndexError, match="row 2 outside a table of 2 rows"):
        scan.least_two(table, 10, 16, {"w": 1.0}, {"w": 2}, [])
    with pytest.raises(IndexError, match="row -1"):
        scan.least_two(table, 10, 16, {}, {}, [-1])
    with pytest.raises(TypeError):
        scan.least_two(table, 10, 16, {"w": "many"}, {"w": 0}, [])
    with pytest.raises(ValueError, match="not C-contiguous"):
        scan.least_two(np.zeros((2, 8))[:, ::2], 10, 16, {}, {}, [])
