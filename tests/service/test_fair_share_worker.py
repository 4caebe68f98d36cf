"""Fair share inside the decode worker (issue 17): with the router admitting freely, a
light client's request takes its share of a full running batch at once instead of waiting
behind a flooding client's queue; with fair share off it waits (FCFS). A real router with
API keys and one decode worker (tiny random model) in this process; clients over gRPC."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from splitserve.client import Client
from tests.service.deployment import start_deployment

KEYS = {"flood": "flood-key-0123456789abcdef", "light": "light-key-0123456789abcdef"}


def _light_finishes_before_flood(tiny_llama: Path, tmp: Path, fair_share: bool) -> bool:
    keys = tmp / f"keys-{fair_share}"
    keys.write_text("".join(f"{name}:{key}\n" for name, key in KEYS.items()))
    d = start_deployment(str(tiny_llama), 0, 1, engine={
        "num_kv_blocks": 512, "block_size": 8, "max_num_seqs": 2, "fair_share": fair_share},
        router={"api_keys_file": str(keys), "max_inflight": 64})
    flood_done: list[float] = []
    lock = threading.Lock()
    try:
        def flood_one(i: int) -> None:
            with Client(d.address, token=KEYS["flood"], timeout=120) as client:
                client.generate(list(range(100 + i, 140 + i)), max_tokens=400,
                                temperature=0.0, ignore_eos=True)
            with lock:
                flood_done.append(time.monotonic())

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(flood_one, i) for i in range(8)]
            # The batch full of flood, six more queued on the worker (not a fixed sleep: on a
            # loaded machine 8 clients take a while to connect).
            deadline = time.monotonic() + 30
            while d.decode[0].loop.call(
                    lambda e: (len(e.scheduler.running), len(e.scheduler.waiting))) != (2, 6):
                assert time.monotonic() < deadline, "the flood never filled the worker"
                time.sleep(0.01)
            with Client(d.address, token=KEYS["light"], timeout=120) as client:
                out = client.generate([5, 6, 7, 8], max_tokens=4, temperature=0.0,
                                      ignore_eos=True)
            light_done = time.monotonic()
            assert len(out.token_ids) == 4
            for future in futures:
                future.result()
        state = d.wait_all_blocks_free()
        assert all(free == total for free, total in state.values()), state
        return light_done < min(flood_done)
    finally:
        d.stop()


@pytest.mark.parametrize("fair_share", [True, False])
def test_a_light_client_is_not_queued_behind_a_flood(tiny_llama: Path, tmp_path: Path,
                                                    fair_share: bool) -> None:
    assert _light_finishes_before_flood(tiny_llama, tmp_path, fair_share) is fair_share
