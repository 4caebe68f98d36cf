"""Fair share across clients inside one engine's scheduler (virtual token counters, VTC).

The router shares its admission queue fairly (router.fairness), but a router that admits
freely leaves the choice to the workers: there a new request waits for a place in the
running batch, or takes one at once. This is the same rule at that level:

- Each client (Sequence.client: the router's name for it, e.g. its API key's) has a counter
  of the service its sequences got here, in weighted tokens: prompt tokens x1, decode
  tokens x OUTPUT_TOKEN_COST, as the steps compute them.
- The waiting sequence admitted next (within the best priority class) is the first of the
  least-served client's.
- A client that becomes active (no sequence of its own here) is lifted to the least counter
  among the active clients: idle time earns no credit.
- Clients may have weights (EngineConfig.client_weights, the router's --client-weights):
  a client's counter grows by its service divided by its weight, and its share of the
  batch is max_num_seqs x its weight / the active clients' total weight (default 1 each).
- When the batch is full (max_num_seqs), a client running fewer than its share of the batch
  while another runs more takes a place from that one's
  newest sequence (preempted by recompute, never a better priority class). A client cannot
  grow past its share this way, so the batch never thrashes between clients.
With one client none of this changes anything: the scheduler is FCFS as before.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

OUTPUT_TOKEN_COST = 2.0  # a decode token's charge relative to a prompt token (VTC's)
_PRUNE_FACTOR = 4  # counters kept for inactive clients: at most this many x active ones


class ClientShares:
    """Counters and active-sequence counts per client (the scheduler's thread only)."""

    def __init__(self, weights: Mapping[str, float] | None = None) -> None:
        self.counters: dict[str, float] = {}
        self.active: Counter[str] = Counter()  # client -> sequences held (waiting, running)
        self.weights = dict(weights or {})  # client -> weight (default 1)

    def weight(self, client: str) -> float:
        return self.weights.get(client, 1.0)

    def share(self, client: str, places: int) -> float:
        """`client`'s share of `places` among the active clients, by weight."""
        total = sum(self.weight(c) for c in self.active)
        return places * self.weight(client) / total if total else float(places)

    @property
    def contended(self) -> bool:
        """More than one client holds sequences here: fair share has something to decide."""
        return len(self.active) > 1

    def join(self, client: str) -> None:
        """A sequence of `client` arrives (not one coming back from a preemption)."""
        if self.active[client] == 0:
            others = [self.counters.get(c, 0.0) for c in self.active if c != client]
            floor = min(others, default=0.0)
            self.counters[client] = max(self.counters.get(client, 0.0), floor)
        self.active[client] += 1

    def leave(self, client: str) -> None:
        """A sequence of `client` left (finished, aborted, detached)."""
        self.active[client] -= 1
        if self.active[client] <= 0:
            del self.active[client]
            if len(self.counters) > _PRUNE_FACTOR * max(1, len(self.active)):
                self.counters = {c: v for c, v in self.counters.items() if c in self.active}

    def charge(self, client: str, prompt_tokens: int, decode_tokens: int) -> None:
        cost = prompt_tokens + OUTPUT_TOKEN_COST * decode_tokens
        self.counters[client] = self.counters.get(client, 0.0) + cost / self.weight(client)

    def service(self, client: str) -> float:
        return self.counters.get(client, 0.0)
