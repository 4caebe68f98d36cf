"""Network faults on the path between the prefill host P and the decode host D (issue 11),
on conftest.py's deployment; the router's paths to both stay up.

A cut: P's link to D is slowed (an HTB rate) so that the prompt's KV takes seconds to
cross; at a moment read from the workers' metrics the path is cut (a blackhole route both
ways, and what P's qdisc still held dropped), and healed once the request ended. Bounds,
from the deployment's settings (_deployment.py):
  * Mid-transfer (P computed the prompt: every layer packed and queued for D; D still waits
    for the KV): P's send waits at most P's --kv-timeout (8 s) from its start, so P's
    Prefill fails by then; the router loses P (ejected for 5 s, left out of this request)
    and resumes the request with the decode worker prefilling it itself (milliseconds
    here). D's receive, on its longer clock (10 s), is aborted by the router first.
  * After P's send is done (gloo writes a message once the receiver posted its receive, so
    P's last layer was in its kernel's hands) but before D got it: P answered the router,
    the client has the first token, and D gives up on the message at D's --kv-timeout
    (10 s after it began) or on the KV at --prefill-timeout-ms (12 s after admitting the
    request), whichever comes first, and ends the request with its reason; the router reads
    that as P's failure (common.outputs.is_prefill_kv_failure), leaves P out and resumes
    the request after the token already sent, the decode worker prefilling it itself.
Either way nothing waits longer, D frees the blocks it reserved for the KV, and once healed
the deployment sends KV from P to D again. (A request that cannot resume, its resumes used
up, fails closed: a last chunk with finish_reason "error" and D's reason.)

Delay and loss: random loss (and netem delay where the kernel has it) on both directions of
the P-D path: TCP retransmits, requests still complete over the same route with the
colocated engine's tokens; the test prints how much their TTFT grew.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from splitserve.bench import netns
from tests.multihost._deployment import (
    KV_TIMEOUT_S,
    PREFILL_TIMEOUT_MS,
    MetricsReader,
    client_argv,
    expected,
    generate,
    parse_results,
    worker_metrics,
)

WHY_NOT = netns.available() or netns.tc_missing()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")

# 400 tokens: 50 blocks, 100 KB of KV per layer (tiny llama: 2 layers, 2 KV heads x 16, fp32)
CUT_PROMPT = list(range(1000, 1400))
HEALED_TRIES = 20  # requests after the heal, 2 s apart, until one's KV crosses P-D again
SLOW_KBIT = 400  # P -> D while the cut is prepared: the 200 KB of KV take ~4 s to cross
# 16 tokens: 2 blocks, 4 KB of KV per layer. gloo writes a message once the receiver has
# posted its receive, so P's send is done when its last layer is in its kernel's hands, and
# at CRAWL_KBIT that layer then takes ~2 s to reach D.
SHORT_PROMPT = list(range(1500, 1516))
CRAWL_KBIT = 16
FINISHED = 'splitserve_worker_requests_finished_total{reason="length"}'  # P's prefills
WAITING = "splitserve_worker_requests_waiting"  # D: waiting for KV (or to be scheduled)
USED = "splitserve_worker_kv_blocks_used"
TRANSFERS = "splitserve_worker_kv_transfers_total"
FAILURES = "splitserve_worker_kv_transfer_failures_total"
Metrics = dict[str, float]  # one worker's, as _deployment.worker_metrics reads them


def wait_for(what: str, check: Callable[[], bool], timeout_s: float) -> float:
    """Seconds until `check()` held; fails the test after `timeout_s`."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout_s, f"{what} not within {timeout_s} s"
        time.sleep(0.05)
    return time.monotonic() - started


def cut_during(hosts: netns.TestHosts, prompt: list[int], rate_kbit: float,
               ready: Callable[[dict[str, Metrics], dict[str, Metrics]], bool]
               ) -> tuple[dict[str, Any], float, dict[str, Metrics]]:
    """Run `prompt` with P -> D capped at `rate_kbit`; once `ready(before, now)` holds (each
    the workers' metrics by role), cut the P-D path and drop what P still held queued; heal
    once the request ended. Returns its result, the seconds from the cut to its end, and
    the metrics from before it."""
    before = worker_metrics(hosts)
    hosts.shape("prefill", "decode", rate_kbit=rate_kbit)
    shaped, cut = True, False
    proc = subprocess.Popen(client_argv(hosts, [prompt], timeout=120),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with MetricsReader(hosts) as metrics:  # polls ~10 ms apart, not a process start each
            wait_for("the moment to cut", lambda: ready(before, metrics.read()), 30)
        hosts.partition("prefill", "decode")
        cut = True
        hosts.unshape("prefill")  # what P's qdisc still held is lost with the link
        shaped = False
        cut_at = time.monotonic()
        out, err = proc.communicate(timeout=PREFILL_TIMEOUT_MS / 1000 + 30)
        ended_s = time.monotonic() - cut_at
    finally:
        if proc.poll() is None:
            proc.kill()
        if shaped:
            hosts.unshape("prefill")
        if cut:
            hosts.heal("prefill", "decode")
    assert proc.returncode == 0, err[-3000:]
    return parse_results(out)[0], ended_s, before


def healed_prompts(start: int) -> list[list[int]]:
    """Prompts for serve_until_kv_crosses: 60 tokens each, every one new to the prefix
    caches (a prompt D holds already it would prefill itself, with no KV to cross)."""
    return [list(range(start + 100 * i, start + 100 * i + 60)) for i in range(HEALED_TRIES)]


def serve_until_kv_crosses(hosts: netns.TestHosts, prompts: list[list[int]],
                           want: list[list[int]]) -> float:
    """Send `prompts` one by one, 2 s apart, until one is prefilled on P (its KV crossed
    P-D); each must have its colocated tokens `want`. Returns the seconds it took."""
    started = time.monotonic()
    for prompt, tokens in zip(prompts, want, strict=True):
        result = generate(hosts, [prompt], timeout=60)[0]
        assert result.get("tokens") == tokens, result
        if not result["local"]:
            return time.monotonic() - started
        time.sleep(2)
    raise AssertionError(f"no KV crossed from P to D in {len(prompts)} requests")


def check_the_cut_ended_cleanly(hosts: netns.TestHosts, result: dict[str, Any],
                                ended_s: float, before: dict[str, Metrics],
                                want: list[list[int]], healed: list[list[int]]) -> str:
    """The request resumed with the colocated tokens (`want[0]`) or failed closed with its
    reason; D's receive failed and every block the request held is free again; after the
    heal the deployment serves the `healed` prompts (their tokens `want[1:]`) until one goes
    with its KV across the P-D path. Returns how the request ended (the caller checks
    `ended_s` against its bound: the module's docstring)."""
    decode = worker_metrics(hosts)["decode"]
    assert decode[TRANSFERS] == before["decode"][TRANSFERS], decode  # D never got the KV
    assert decode[FAILURES] == before["decode"][FAILURES] + 1, decode
    if result.get("tokens") and result["finish_reason"] == "length":
        outcome = "resumed"  # P lost: the decode worker prefilled the prompt itself
        assert result["tokens"] == want[0], result
        assert result["resumes"] == 1 and result["local"], result
    else:
        outcome = "failed closed"
        tokens = result.get("tokens") or []  # P's first token may have gone out
        assert tokens == want[0][:len(tokens)], result
        message = str(result.get("error") or result.get("error_message"))
        assert "KV" in message or "prefill" in message, result
    wait_for("the blocks freed", partial(_blocks_used_are, hosts, before), 10)
    assert worker_metrics(hosts)["decode"][WAITING] == 0
    # Healed, the same deployment serves again: P's ejection (if any) ends, the KV path
    # reconnects; meanwhile a request may go local, with the same tokens.
    healed_s = serve_until_kv_crosses(hosts, healed, want[1:])
    print(f"{outcome} {ended_s:.1f} s after the cut: {result}; the KV crossed the healed "
          f"path again {healed_s:.1f} s after")
    return outcome


def test_a_cut_between_prefill_and_decode_mid_transfer_resumes_the_request(
        cluster: netns.TestHosts, tiny_llama: Path) -> None:
    warm, healed = healed_prompts(30_000), healed_prompts(10_000)
    want = expected(tiny_llama, [CUT_PROMPT, *healed, *warm])
    serve_until_kv_crosses(cluster, warm, want[-HEALED_TRIES:])  # P-D connected

    def in_flight(before: dict[str, Metrics], now: dict[str, Metrics]) -> bool:
        # P computed the prompt (every layer packed and queued for D); D waits for the KV
        return (now["prefill"][FINISHED] > before["prefill"][FINISHED]
                and now["decode"][WAITING] >= 1)

    result, ended_s, before = cut_during(cluster, CUT_PROMPT, SLOW_KBIT, in_flight)
    # P's send, blocked by the cut, times out: P is lost and the request resumes.
    outcome = check_the_cut_ended_cleanly(cluster, result, ended_s, before,
                                          want[:1 + HEALED_TRIES], healed)
    assert outcome == "resumed"
    assert ended_s < KV_TIMEOUT_S["prefill"] + 5, ended_s


def test_a_cut_after_the_prefill_worker_sent_the_kv_resumes_once_the_decode_worker_gives_up(
        cluster: netns.TestHosts, tiny_llama: Path) -> None:
    warm, healed = healed_prompts(40_000), healed_prompts(20_000)
    want = expected(tiny_llama, [SHORT_PROMPT, *healed, *warm])
    serve_until_kv_crosses(cluster, warm, want[-HEALED_TRIES:])  # P-D connected

    def sent(before: dict[str, Metrics], now: dict[str, Metrics]) -> bool:
        # P's transfer is done (every byte in its kernel's hands), D has not got the KV
        return (now["prefill"][TRANSFERS] > before["prefill"][TRANSFERS]
                and now["decode"][TRANSFERS] == before["decode"][TRANSFERS])

    result, ended_s, before = cut_during(cluster, SHORT_PROMPT, CRAWL_KBIT, sent)
    # P answered the router; D gives up waiting for the KV, the router resumes without P.
    outcome = check_the_cut_ended_cleanly(cluster, result, ended_s, before,
                                          want[:1 + HEALED_TRIES], healed)
    assert outcome == "resumed"
    assert ended_s < min(KV_TIMEOUT_S["decode"], PREFILL_TIMEOUT_MS / 1000) + 5, ended_s


def test_loss_and_delay_on_the_kv_path_keep_tokens_exact(
        cluster: netns.TestHosts, tiny_llama: Path) -> None:
    # Eight 300-token prompts (75 KB of KV per layer each), none sharing a block with another
    prompts = [list(range(3000 + 400 * i, 3300 + 400 * i)) for i in range(8)]
    want = expected(tiny_llama, prompts)
    clean = generate(cluster, prompts[:4])
    delay_ms = 25.0 if netns.netem_missing() is None else 0.0  # each way
    for here, there in (("prefill", "decode"), ("decode", "prefill")):
        cluster.shape(here, there, loss_pct=5.0, delay_ms=delay_ms)
    try:
        impaired = generate(cluster, prompts[4:], timeout=60)
        dropped = sum(_dropped(cluster, host) for host in ("prefill", "decode"))
    finally:
        for host in ("prefill", "decode"):
            cluster.unshape(host)
    results = clean + impaired
    assert [r.get("tokens") for r in results] == want, results
    assert not any(r["local"] or r["resumes"] for r in results), results  # same route
    assert dropped > 0
    ttft = [statistics.median(float(r["ttft_ms"]) for r in rs) for rs in (clean, impaired)]
    print(f"P<->D loss 5% each way, delay {delay_ms:g} ms each way"
          f"{'' if delay_ms else ' (no netem in this kernel)'}: {dropped} packets dropped; "
          f"TTFT p50 {ttft[0]:.0f} -> {ttft[1]:.0f} ms ({ttft[1] / ttft[0]:.2f}x)")


def _blocks_used_are(hosts: netns.TestHosts, before: dict[str, Metrics]) -> bool:
    """Both workers hold as many blocks as `before` (prefix-cached ones count as free)."""
    now = worker_metrics(hosts)
    return all(now[role][USED] == before[role][USED] for role in before)


def _dropped(hosts: netns.TestHosts, name: str) -> int:
    """Packets the loss class of host `name`'s shape dropped."""
    stats = hosts.run(name, ["tc", "-s", "qdisc", "show", "dev", netns.IFNAME]).stdout
    pfifo = stats[stats.index("qdisc pfifo 3:"):]
    return int(pfifo.split("dropped ")[1].split(",")[0])
