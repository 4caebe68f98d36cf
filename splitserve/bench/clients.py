"""Several clients in one `bench serve` run, each with its own load, key, class and SLO.

    splitserve bench serve --target http://127.0.0.1:8000 --workload fixed \\
        --client name=flood,rate=10,concurrency=40,api_key=KEY1,priority=5 \\
        --client name=light,rate=1,concurrency=4,api_key=KEY2,ttft_slo_ms=2000 \\
        --duration 60

A client spec is comma-separated key=value pairs:
- name (required, unique): the records' tag, so every summary is also given per client;
- rate (requests/s, default --request-rate), burstiness, concurrency (default
  --concurrency), num_requests (default --num-requests): the client's own arrivals;
- api_key: sent as its bearer token (the server counts and shares fairly by key);
- priority (int, lower first; vLLM's convention), ttft_slo_ms, stream_pace: sent in each
  request (SplitServe's extensions of the OpenAI body and of GenerateRequest);
- weight: its fair-share weight, for the fairness gap below (default 1).
Every client draws its own prompts from the workload (its own seed) and runs concurrently
with the others. Besides the per-client summaries, the report gives each client's service,
VTC's weighted token count (prompt tokens + 2 x output tokens, / weight; router.fairness
charges the same), and the fairness gap: the most-served client's service over the least
served one's (1.0 = equal shares).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from splitserve.bench.metrics import RequestRecord
from splitserve.bench.runner import RunConfig, RunResult, run
from splitserve.bench.targets import TargetConfig, make_target
from splitserve.bench.workloads import WorkloadConfig, make_workload

OUTPUT_TOKEN_COST = 2.0  # VTC's charge per output token, relative to a prompt token
_INT_KEYS = ("concurrency", "num_requests", "priority", "ttft_slo_ms")
_FLOAT_KEYS = ("rate", "burstiness", "weight")
_TEXT_KEYS = ("name", "api_key", "stream_pace")


@dataclass(frozen=True)
class ClientSpec:
    name: str
    rate: float | None = None
    burstiness: float | None = None
    concurrency: int | None = None
    num_requests: int | None = None
    api_key: str | None = None
    priority: int | None = None
    ttft_slo_ms: int | None = None
    stream_pace: str | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"a client needs a name without '/', got {self.name!r}")
        if not self.weight > 0 or math.isinf(self.weight):
            raise ValueError(f"client {self.name}: weight must be a positive number")

    def body(self) -> dict[str, Any]:
        """What the client adds to every request it sends."""
        extra: dict[str, Any] = {}
        if self.priority is not None:
            extra["priority"] = self.priority
        if self.ttft_slo_ms is not None:
            extra["ttft_slo_ms"] = self.ttft_slo_ms
        if self.stream_pace is not None:
            try:
                extra["stream_pace"] = float(self.stream_pace)
            except ValueError:
                extra["stream_pace"] = self.stream_pace  # a named speed
        return extra


def parse_client(text: str) -> ClientSpec:
    """One --client value; ValueError naming what is wrong."""
    fields: dict[str, Any] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--client {text!r}: expected key=value pairs, got {part!r}")
        if key in fields:
            raise ValueError(f"--client {text!r}: {key} given twice")
        try:
            if key in _INT_KEYS:
                fields[key] = int(value)
            elif key in _FLOAT_KEYS:
                fields[key] = float(value)
            elif key in _TEXT_KEYS:
                fields[key] = value.strip()
            else:
                raise ValueError(f"unknown key {key!r} (known: "
                                 f"{', '.join(_TEXT_KEYS + _INT_KEYS + _FLOAT_KEYS)})")
        except ValueError as exc:
            raise ValueError(f"--client {text!r}: {exc}") from None
    if "name" not in fields:
        raise ValueError(f"--client {text!r}: name=... is required")
    return ClientSpec(**fields)


def check_clients(clients: list[ClientSpec]) -> None:
    names = [c.name for c in clients]
    if len(set(names)) != len(names):
        raise ValueError(f"client names must differ, got {names}")


def client_run_config(client: ClientSpec, base: RunConfig) -> RunConfig:
    """The run's limits with the client's own load (ValueError from RunConfig if bad)."""
    changes: dict[str, Any] = {"seed": base.seed + _seed_offset(client.name)}
    if client.rate is not None:
        changes["request_rate"] = client.rate
    if client.burstiness is not None:
        changes["burstiness"] = client.burstiness
    if client.concurrency is not None:
        changes["concurrency"] = client.concurrency
    if client.num_requests is not None:
        changes["num_requests"] = client.num_requests
    return dataclasses.replace(base, **changes)


def _seed_offset(name: str) -> int:
    return sum((i + 1) * ord(ch) for i, ch in enumerate(name)) % 100_003


def _tagged(workload: WorkloadConfig, client: ClientSpec) -> Any:
    """The client's own prompts (its own seed), every request tagged with its name."""
    seeded = dataclasses.replace(workload, seed=workload.seed + _seed_offset(client.name))
    for request in make_workload(seeded):
        tag = f"{client.name}/{request.tag}" if request.tag else client.name
        yield dataclasses.replace(request, tag=tag)


async def run_clients(target_cfg: TargetConfig, workload: WorkloadConfig, base: RunConfig,
                      clients: list[ClientSpec], progress: bool) -> RunResult:
    """Every client's run at once, each on a target of its own (its key, its body fields);
    one RunResult holding all their records (tagged by client)."""
    targets = [make_target(dataclasses.replace(
        target_cfg, api_key=c.api_key or target_cfg.api_key,
        extra={**target_cfg.extra, **c.body()})) for c in clients]
    for target in targets:
        await target.open()
    try:
        results: list[RunResult] = await asyncio.gather(*(
            run(target, _tagged(workload, client), client_run_config(client, base),
                progress and i == 0)
            for i, (target, client) in enumerate(zip(targets, clients, strict=True))))
    finally:
        for target in targets:
            await target.close()
    records: list[RequestRecord] = [r for result in results for r in result.records]
    return RunResult(
        records, max(r.wall_s for r in results), min(r.start_unix_s for r in results),
        ",".join(sorted({r.stopped_by for r in results})),
        sum(r.peak_in_flight for r in results))


def client_of(tag: str) -> str:
    return tag.split("/", 1)[0]


def fairness(records: list[RequestRecord], clients: list[ClientSpec]) -> dict[str, Any]:
    """Per client: requests, prompt and output tokens served, the weighted service; and
    the gap between the most and the least served client."""
    per: dict[str, dict[str, Any]] = {}
    weights = {c.name: c.weight for c in clients}
    for client in clients:
        mine = [r for r in records if client_of(r.tag) == client.name]
        # Tokens the server delivered, finished or not (a cut-off run still served them).
        output = sum(r.output_tokens if r.ok else sum(r.chunk_tokens) for r in mine)
        prompt = sum(r.prompt_tokens for r in mine if r.ok or r.chunk_tokens)
        per[client.name] = {
            "requests": len(mine), "completed": sum(r.ok for r in mine),
            "prompt_tokens": prompt, "output_tokens": output,
            "service": (prompt + OUTPUT_TOKEN_COST * output) / weights[client.name]}
    services = [p["service"] for p in per.values()]
    gap = (max(services) / min(services)) if services and min(services) > 0 else None
    return {"clients": per, "fairness_gap": gap}


def format_fairness(data: dict[str, Any]) -> str:
    lines = ["per client     requests  done  prompt tok  output tok   service"]
    for name, p in data["clients"].items():
        lines.append(f"{name:<14s}{p['requests']:>9d}{p['completed']:>6d}{p['prompt_tokens']:>12d}"
                     f"{p['output_tokens']:>12d}{p['service']:>10.0f}")
    gap = data["fairness_gap"]
    lines.append("fairness gap (most / least served, weighted): "
                 + ("-" if gap is None else f"{gap:.2f}x"))
    return "\n".join(lines)
