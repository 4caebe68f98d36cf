"""A real peer process for the torch.distributed tests, and the pool helpers both sides share.

Run as `python kv_peer.py '<json spec>'`; it prints one JSON object per line on stdout:
{"event": "held"} when asked to stop part-way (the test then kills it), and finally
{"event": "result", ...}. Specs (all keys required unless noted):

    role: "send" | "recv", store: [host, port], worker, peer, layout: {KVLayout fields},
    requests: [{"id", "src", "dst"}], seed, timeout_s,
    hold_after_layers (optional): stop after this many layers of the first request and sleep,
    peer_endpoint (optional, sender): the receiver's KV endpoint (the store the pair meets at),
    device (optional, default "cpu"): where the pool lives ("cuda:N" uses NCCL).

Both sides derive the pools from the seed: the sender's pool is make_pool(seed), the
receiver's initial pool make_pool(seed + 1), so either side can check the other's data.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from splitserve.common.kv_layout import KVLayout  # noqa: E402
from splitserve.kvtransfer.base import KVBackend  # noqa: E402
from splitserve.kvtransfer.state import KVTransfer  # noqa: E402
from splitserve.kvtransfer.torch_dist import TorchDistBackend  # noqa: E402

POOL_BLOCKS = 24


def make_pool(
    layout: KVLayout, seed: int, device: str = "cpu"
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Random K and V caches, one [POOL_BLOCKS, block_size, kv_heads, head_dim] per layer
    (generated on the CPU, so every device gets the same values)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (POOL_BLOCKS, *layout.block_shape)

    def one() -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(device=device, dtype=layout.torch_dtype)

    ks, vs = [], []
    for _ in range(layout.num_layers):
        ks.append(one())
        vs.append(one())
    return ks, vs


def wait_all(handles: list[KVTransfer], limit_s: float) -> None:
    end = time.monotonic() + limit_s
    while not all(h.poll().finished for h in handles) and time.monotonic() < end:
        time.sleep(0.002)


def send_interleaved(
    backend: KVBackend,
    peer: str,
    layout: KVLayout,
    requests: list[dict[str, Any]],
    seed: int,
    timeout_s: float,
    layers: int | None = None,
    device: str = "cpu",
    peer_endpoint: str | None = None,
) -> list[KVTransfer]:
    """Start every request, then send layer by layer, interleaving the requests."""
    ks, vs = make_pool(layout, seed, device)
    handles = [
        backend.start_send(r["id"], peer, r["src"], r["dst"], timeout_s=timeout_s,
                           peer_endpoint=peer_endpoint)
        for r in requests
    ]
    for layer in range(layout.num_layers if layers is None else layers):
        for h in handles:
            backend.send_layer(h, layer, ks[layer], vs[layer])
    return handles


def check_received(
    layout: KVLayout,
    requests: list[dict[str, Any]],
    seed: int,
    ks: list[torch.Tensor],
    vs: list[torch.Tensor],
) -> tuple[bool, bool]:
    """(every dst block equals its src block bit-exactly, every other block is untouched)."""
    src_k, src_v = make_pool(layout, seed)
    init_k, init_v = make_pool(layout, seed + 1)
    exact, untouched = True, True
    ks, vs = [k.cpu() for k in ks], [v.cpu() for v in vs]
    written = {b for r in requests for b in r["dst"]}
    others = torch.tensor(sorted(set(range(POOL_BLOCKS)) - written), dtype=torch.long)
    for layer in range(layout.num_layers):
        for r in requests:
            src, dst = torch.tensor(r["src"]), torch.tensor(r["dst"])
            exact &= torch.equal(ks[layer][dst], src_k[layer][src])
            exact &= torch.equal(vs[layer][dst], src_v[layer][src])
        untouched &= torch.equal(ks[layer][others], init_k[layer][others])
        untouched &= torch.equal(vs[layer][others], init_v[layer][others])
    return bool(exact), bool(untouched)


def _emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def _result(handles: list[KVTransfer], backend: KVBackend, **extra: Any) -> None:
    _emit(
        event="result",
        states=[h.poll().value for h in handles],
        errors=[h.error for h in handles],
        stats=asdict(backend.stats()),
        **extra,
    )


def _hold(handle: KVTransfer, layers: int, limit_s: float) -> None:
    """Wait until `layers` layers of `handle` moved, say so, and wait to be killed."""
    end = time.monotonic() + limit_s
    while handle.layers_done < layers and time.monotonic() < end:
        time.sleep(0.002)
    _emit(event="held", layers_done=handle.layers_done)
    time.sleep(3600)


def main(spec: dict[str, Any]) -> None:
    layout = KVLayout(**spec["layout"])
    host, port = spec["store"]
    device, timeout_s = spec.get("device", "cpu"), spec["timeout_s"]
    backend = TorchDistBackend(
        spec["worker"], layout, host, port, device, default_timeout_s=timeout_s
    )
    requests, seed, hold = spec["requests"], spec["seed"], spec.get("hold_after_layers")
    if spec["role"] == "send":
        handles = send_interleaved(
            backend, spec["peer"], layout, requests, seed, timeout_s, hold, device,
            spec.get("peer_endpoint"),
        )
        if hold is not None:
            _hold(handles[0], hold, timeout_s)
        wait_all(handles, timeout_s + 5)
        _result(handles, backend)
    else:
        ks, vs = make_pool(layout, seed + 1, device)
        handles = [backend.expect(r["id"], spec["peer"], r["dst"], ks, vs) for r in requests]
        if hold is not None:
            _hold(handles[0], hold, timeout_s)
        wait_all(handles, timeout_s + 5)
        exact, untouched = check_received(layout, requests, seed, ks, vs)
        _result(handles, backend, exact=exact, untouched=untouched)
    backend.close()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
