"""Fair share across clients inside one engine's scheduler (virtual token counters, VTC).

The router shares its admission queue fairly (router.fairness), but a router that admits
freely leaves the choice to the workers: there a new request waits for a place in the
running batch, or takes one at once. This is the same rule at that level:

- Each client (Sequence.client: the router's name for it, e.g. its API key's) has a counter
  of the service its sequences got here, in weighted tokens: prompt tokens x1, decode
  tokens x OUTPUT_TOKEN_COST, as the steps compute them.
- The waiting sequence admitted next (within the best priority class) is the first of a
  client running fewer than its share of the batch (places are guaranteed up to the share),
  else of the least-served client's (the counters share what is left).
- A client that becomes active (no sequence of its own here) is lifted to the least counter
  among the active clients: idle time earns no credit.
- Clients may have weights (EngineConfig.client_weights, the router's --client-weights):
  a client's counter grows by its service divided by its weight, and its share of the
  batch is max_num_seqs x its weight / the active clients' total weight (default 1 each).
- When the batch is full (max_num_seqs), a client running fewer than its share of the batch
  while another runs more takes places from the one most above its share, newest sequence
  first (preempted by recompute, never a better priority class), as many as it is short and
  has waiting, in one step: a client that joins a saturated worker with several requests,
  or sends its next ones the moment its last ones end, waits one step, not one per place.
  A client cannot grow past its share this way and the one preempted stays at or above
  its own, so the batch never thrashes between clients.
- A place a client releases (a sequence of its own finished) stays held for it for LINGER_S
  while it is below its share (others are admitted only into what is left): its next
  request, sent as the last one ended, takes the place back without preempting anybody, so
  no work is thrown away.
With one client none of this changes anything: the scheduler is FCFS as before.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Mapping

OUTPUT_TOKEN_COST = 2.0  # a decode token's charge relative to a prompt token (VTC's)
_PRUNE_FACTOR = 4  # counters kept for inactive clients: at most this many x active ones
# A place a client released stays held for it this long: a closed-loop client's next
# request arrives within a few milliseconds of its last token.
LINGER_S = 0.1


class ClientShares:
    """Counters and active-sequence counts per client (the scheduler's thread only)."""

    def __init__(self, weights: Mapping[str, float] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 linger_s: float = LINGER_S) -> None:
        self.counters: dict[str, float] = {}
        self.active: Counter[str] = Counter()  # client -> sequences held (waiting, running)
        self.weights = dict(weights or {})  # client -> weight (default 1)
        self.clock = clock
        self.linger_s = linger_s
        # client -> until when each place it released recently stays held for it
        self._released: dict[str, list[float]] = {}

    def weight(self, client: str) -> float:
        return self.weights.get(client, 1.0)

    def _prune(self) -> None:
        if self._released:
            now = self.clock()
            kept = {c: [t for t in ts if t > now] for c, ts in self._released.items()}
            self._released = {c: ts for c, ts in kept.items() if ts}

    def present(self) -> list[str]:
        """The clients that share the batch: those holding sequences, and those whose last
        one left less than linger_s ago."""
        self._prune()
        return [*self.active, *(c for c in self._released if c not in self.active)]

    def shares(self, places: int) -> dict[str, float]:
        """Every present client's share of `places`, by weight (one pass: a step asks for
        many)."""
        present = self.present()
        total = sum(self.weight(c) for c in present)
        return {c: places * self.weight(c) / total for c in present}

    def held_places(self, places: int) -> int:
        """Places kept free for clients that released them less than linger_s ago, each
        client's up to its share (what it holds counted)."""
        if not self._released:
            return 0
        share = self.shares(places)  # (prunes what expired)
        return sum(min(len(ts), max(0, math.floor(share[c] + 1e-9) - self.active[c]))
                   for c, ts in self._released.items())

    @property
    def contended(self) -> bool:
        """More than one client is present: fair share has something to decide."""
        return len(self.active) > 1 or (bool(self._released) and len(self.present()) > 1)

    def join(self, client: str) -> None:
        """A sequence of `client` arrives (not one coming back from a preemption): it takes
        a place its client released, if one is held; a client that was not present is
        lifted to the least counter among those present."""
        present = self.present()
        if client not in present:
            others = [self.counters.get(c, 0.0) for c in present]
            self.counters[client] = max(self.counters.get(client, 0.0),
                                        min(others, default=0.0))
        held = self._released.get(client)
        if held:
            held.pop(0)
            if not held:
                del self._released[client]
        self.active[client] += 1

    def leave(self, client: str) -> None:
        """A sequence of `client` left (finished, aborted, detached). Its place stays held
        for the client for linger_s: a client that sends its next request as its last one
        ends finds its place, not another client's sequence it would have to preempt (and
        recompute) to get it back."""
        self.active[client] -= 1
        if self.active[client] <= 0:
            del self.active[client]
        if self.linger_s > 0:
            self._released.setdefault(client, []).append(self.clock() + self.linger_s)
        present = set(self.present())
        if len(self.counters) > _PRUNE_FACTOR * max(1, len(present)):
            self.counters = {c: v for c, v in self.counters.items() if c in present}

    def charge(self, client: str, prompt_tokens: int, decode_tokens: int) -> None:
        cost = prompt_tokens + OUTPUT_TOKEN_COST * decode_tokens
        self.counters[client] = self.counters.get(client, 0.0) + cost / self.weight(client)

    def service(self, client: str) -> float:
        return self.counters.get(client, 0.0)
