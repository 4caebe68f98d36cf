"""Prometheus metrics shared by the router and the workers (torch-free).

Every metric name starts with `splitserve_`. Each component owns a `CollectorRegistry`
(never prometheus_client's global one), so several routers and workers in one process,
as in the in-process tests, never clash.

Workers: `WorkerCollector` reads the worker's cumulative stats at scrape time (engine load
snapshot, prefix-cache stats, KV transfer stats, finished-request counts), so counters are
monotonic by construction and nothing is added to the engine's hot path. A worker serves
its registry over HTTP (`MetricsServer`, a prometheus_client WSGI server on a daemon
thread) on `WorkerOptions.metrics_port`: every process is its own scrape target, as
Prometheus expects, and needs no router to be scraped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

PREFIX = "splitserve_"

# Histogram buckets, in seconds. Latencies of LLM serving span ~1 ms (a decode step of a
# tiny model) to minutes (a long generation queued behind others).
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                  2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
TOKEN_LATENCY_BUCKETS_S = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
                           0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0,
                           40.0, 80.0)
E2E_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0)
PHASE_BUCKETS_S = TTFT_BUCKETS_S

# Finish reasons as the engine and the router name them (splitserve.common.convert.common).
FINISH_REASONS = ("stop", "length", "abort", "error")


class MetricsServer:
    """A registry served over HTTP (GET /metrics, or any path) on a daemon thread."""

    def __init__(self, registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0):
        self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        self.host = host
        self.port = int(self._httpd.server_port)

    @property
    def address(self) -> str:
        """host:port to scrape."""
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5.0)


# ---- workers ------------------------------------------------------------------------------


class _Load(Protocol):
    num_waiting: int
    num_running: int
    num_free_blocks: int
    num_total_blocks: int
    num_queued_tokens: int


class WorkerSource(Protocol):
    """What WorkerCollector reads (splitserve.worker.runtime.WorkerRuntime provides it)."""

    @property
    def worker_id(self) -> str: ...
    @property
    def role(self) -> str: ...

    def load_proto(self) -> _Load: ...
    def metrics_snapshot(self) -> WorkerStatsSnapshot: ...


class KVTierCounters(Protocol):
    """One KV tier's counters since start (engine.kv_tier.TierStats)."""

    hits: int
    misses: int
    stored: int
    evicted: int
    bytes_stored: int
    bytes_loaded: int
    load_seconds: float
    corrupt: int
    used_bytes: int
    capacity_bytes: int


@dataclass(frozen=True, slots=True)
class WorkerStatsSnapshot:
    """Cumulative counters of one worker since it started, read at one instant."""

    kv_bytes_sent: int
    kv_bytes_received: int
    kv_seconds: float  # lifetimes of successful transfers, summed
    kv_transfers_ok: int
    kv_transfers_failed: int
    prefix_queried_tokens: int
    prefix_hit_tokens: int
    generated_tokens: int
    engine_steps: int
    finished: Mapping[str, int]  # finish reason -> requests
    draining: bool
    prefix_tier_hit_tokens: int = 0  # of prefix_hit_tokens, loaded from a KV tier
    kv_tiers: Mapping[str, KVTierCounters] = field(default_factory=dict)  # host, disk
    paced_requests: int = 0  # paced streams (Andes) admitted to the engine
    output_channel_streams: int = 0  # requests whose outputs went over an output channel
    paced_sit_outs: int = 0  # (request, step) pairs a paced stream sat out


class WorkerCollector(Collector):
    """The metrics of one prefill or decode worker, labelled worker=<id>, role=<role>."""

    def __init__(self, worker: WorkerSource) -> None:
        self._worker = worker

    def collect(self) -> Iterator[Metric]:
        w = self._worker
        labels = ["worker", "role"]
        ids = [w.worker_id, w.role]
        load = w.load_proto()
        stats = w.metrics_snapshot()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
            family.add_metric(ids, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(PREFIX + name, doc, labels=labels)
            family.add_metric(ids, value)
            return family

        used = load.num_total_blocks - load.num_free_blocks
        yield gauge("worker_requests_waiting", "Requests waiting to be scheduled (incl. "
                    "those waiting for their KV).", load.num_waiting)
        yield gauge("worker_requests_running", "Requests in the running batch.",
                    load.num_running)
        yield gauge("worker_queued_prompt_tokens", "Prompt tokens waiting to be prefilled.",
                    load.num_queued_tokens)
        yield gauge("worker_kv_blocks_total", "KV blocks in the cache.", load.num_total_blocks)
        yield gauge("worker_kv_blocks_used", "KV blocks held by requests (evictable "
                    "prefix-cache blocks count as free).", used)
        yield gauge("worker_kv_cache_usage_ratio", "Used / total KV blocks.",
                    used / load.num_total_blocks if load.num_total_blocks else 0.0)
        yield gauge("worker_draining", "1 once the worker is draining.", float(stats.draining))
        yield counter("worker_prefix_cache_queried_tokens", "Prompt tokens looked up in the "
                      "prefix cache.", stats.prefix_queried_tokens)
        yield counter("worker_prefix_cache_hit_tokens", "Prompt tokens found in the prefix "
                      "cache.", stats.prefix_hit_tokens)
        yield counter("worker_prefix_cache_tier_hit_tokens", "Prompt tokens found in the "
                      "prefix cache's host or disk tier (loaded, not computed).",
                      stats.prefix_tier_hit_tokens)
        yield from _tier_metrics(labels, ids, stats.kv_tiers)
        kv_bytes = CounterMetricFamily(PREFIX + "worker_kv_transfer_bytes", "KV bytes moved "
                                       "between workers.", labels=[*labels, "direction"])
        kv_bytes.add_metric([*ids, "sent"], stats.kv_bytes_sent)
        kv_bytes.add_metric([*ids, "received"], stats.kv_bytes_received)
        yield kv_bytes
        yield counter("worker_kv_transfer_seconds", "Wall-clock seconds of successful KV "
                      "transfers, summed over requests.", stats.kv_seconds)
        yield counter("worker_kv_transfers", "KV transfers that completed.",
                      stats.kv_transfers_ok)
        yield counter("worker_kv_transfer_failures", "KV transfers that failed or timed out.",
                      stats.kv_transfers_failed)
        yield counter("worker_generated_tokens", "Tokens sampled by this worker's engine.",
                      stats.generated_tokens)
        yield counter("worker_engine_steps", "Engine steps run.", stats.engine_steps)
        yield counter("worker_paced_requests", "Paced streams (stream_pace_tokens_per_s) "
                      "admitted to the engine.", stats.paced_requests)
        yield counter("worker_output_channel_streams", "Requests whose outputs went over "
                      "a router's output channel instead of their Admit stream.",
                      stats.output_channel_streams)
        yield counter("worker_paced_skipped_steps", "Decode steps paced streams sat out, "
                      "ahead of their readers (one per request per step).", stats.paced_sit_outs)
        finished = CounterMetricFamily(
            PREFIX + "worker_requests_finished", "Requests that left this worker's engine, by "
            "finish reason (a prefill worker's prefills end 'length': one token each).",
            labels=[*labels, "reason"])
        for reason in sorted({*FINISH_REASONS, *stats.finished}):
            finished.add_metric([*ids, reason], stats.finished.get(reason, 0))
        yield finished


_TIER_METRICS = (  # (name, kind, doc, attribute)
    ("worker_kv_tier_hit_blocks", "counter", "KV blocks loaded back to the device from a "
     "tier.", "hits"),
    ("worker_kv_tier_miss_blocks", "counter", "Lookups a tier could not serve (a prompt's "
     "run ended there, or an entry failed to load).", "misses"),
    ("worker_kv_tier_stored_blocks", "counter", "KV blocks written into a tier.", "stored"),
    ("worker_kv_tier_evicted_blocks", "counter", "KV blocks a tier dropped (LRU, damaged).",
     "evicted"),
    ("worker_kv_tier_loaded_bytes", "counter", "Bytes copied from a tier to the device.",
     "bytes_loaded"),
    ("worker_kv_tier_stored_bytes", "counter", "Bytes copied into a tier.", "bytes_stored"),
    ("worker_kv_tier_load_seconds", "counter", "Seconds spent loading blocks back from a "
     "tier (copies, disk reads, checksums).", "load_seconds"),
    ("worker_kv_tier_corrupt_entries", "counter", "Disk entries that failed their checksum "
     "or layout checks (deleted, never loaded).", "corrupt"),
    ("worker_kv_tier_used_bytes", "gauge", "Bytes a tier holds now.", "used_bytes"),
    ("worker_kv_tier_capacity_bytes", "gauge", "A tier's byte budget.", "capacity_bytes"),
)


def _tier_metrics(labels: list[str], ids: list[str],
                  tiers: Mapping[str, KVTierCounters]) -> Iterator[Metric]:
    """One family per counter, labelled tier=host|disk (nothing without a KV tier)."""
    if not tiers:
        return
    for name, kind, doc, attr in _TIER_METRICS:
        family_type = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        family = family_type(PREFIX + name, doc, labels=[*labels, "tier"])
        for tier, counters in sorted(tiers.items()):
            family.add_metric([*ids, tier], getattr(counters, attr))
        yield family


def worker_registry(worker: WorkerSource) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WorkerCollector(worker))
    return registry
