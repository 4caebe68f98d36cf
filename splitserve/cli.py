"""The `splitserve` command line.

    splitserve serve    --model M --prefill-workers N --decode-workers K --port 50051
    splitserve router   --port 50051 [--redis-url URL]
    splitserve prefill  --cluster grpc://127.0.0.1:50051 [--kv-store HOST:PORT]
    splitserve decode   --cluster grpc://127.0.0.1:50051 [--kv-store HOST:PORT [--serve-kv-store]]
    splitserve kv-store --port 29500   (a shared rendezvous store; by default each worker hosts its own)
    splitserve generate "prompt" [--address] [--chat] [--max-tokens] [--temperature]
    splitserve certs    --out DIR  (a local CA and mutual-TLS certificates: --tls-dir DIR/<name>)
    splitserve bench offline | kv | serve | compare | chaos | fuzz | fairness | slo | disagg | kv-tier
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from splitserve.common import envs
from splitserve.engine.config import KV_CACHE_DTYPES  # standard library only

DEMO_PROMPT = "Explain in three sentences why the sky is blue."


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default="smollm2-135m", help="alias, HF model dir or .gguf file")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", default="auto")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--num-kv-blocks", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--no-fair-share", action="store_true",
                   help="admit to the running batch first come, first served within a "
                        "priority class, not by fair share across clients")
    g.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
                   help="KV cache storage: the model's dtype; bfloat16 / float16 (an fp32 "
                        "model's K/V in half the bytes, like llama.cpp's default f16 cache); "
                        "or int8 / fp8 (e4m3; CUDA 8.9+ or CPU) with a scale per token and "
                        "head (about half of bf16's bytes); P and D must agree")
    g.add_argument("--host-kv-cache-bytes", type=_byte_size, default=0,
                   help="host-memory tier for KV blocks the prefix cache evicts (e.g. 4GiB; "
                        "0: none)")
    g.add_argument("--disk-kv-cache-dir", default=None,
                   help="disk tier below the host tier: one checksummed file per block")
    g.add_argument("--disk-kv-cache-bytes", type=_byte_size, default=8 << 30,
                   help="most bytes of files in --disk-kv-cache-dir (default 8GiB)")
    g.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton", "cpu"])
    g.add_argument("--threads", type=int, default=None, help="CPU threads per engine")
    g.add_argument("--no-cpu-weight-prepack", action="store_true",
                   help="CPU: skip the packed weight copies for small batches (halves weight "
                        "memory, slower decode)")
    g.add_argument("--enforce-eager", action="store_true",
                   help="CUDA: run decode steps eagerly instead of replaying CUDA graphs "
                        "captured per batch size")


_BYTE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 1 << 10, "m": 10**6,
               "mb": 10**6, "mib": 1 << 20, "g": 10**9, "gb": 10**9, "gib": 1 << 30,
               "t": 10**12, "tb": 10**12, "tib": 1 << 40}


def _byte_size(text: str) -> int:
    """'4GiB', '512MB', '1000000' -> bytes."""
    number = text.strip().rstrip("bBiIkKmMgGtT")
    unit = text.strip()[len(number):].lower()
    try:
        value = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r}") from None
    if unit not in _BYTE_UNITS or value < 0:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r}")
    return int(value * _BYTE_UNITS[unit])


def _add_tls_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-dir", default=None,
                   help="folder with ca.crt, tls.crt, tls.key: mutual TLS on every gRPC "
                        "connection (default: SPLITSERVE_TLS_DIR; see `splitserve certs`)")


def _apply_tls_dir(args: argparse.Namespace) -> None:
    """Check --tls-dir's files now and hand the folder to every part of this process (and
    to the processes it starts) through SPLITSERVE_TLS_DIR."""
    from splitserve.common import tls

    folder = envs.tls_dir(getattr(args, "tls_dir", None))
    if folder:
        folder = os.path.abspath(folder)
        tls.load(folder)
        os.environ["SPLITSERVE_TLS_DIR"] = folder


def cmd_certs(args: argparse.Namespace) -> int:
    from splitserve.common import certs

    return certs.run(args)


def _engine_config(args: argparse.Namespace) -> Any:
    from splitserve.engine.config import EngineConfig

    return EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device, block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching, fair_share=not args.no_fair_share,
        priority_aging_s=args.priority_aging,
        client_weights=tuple(sorted(args.client_weights.items())),
        kv_cache_dtype=args.kv_cache_dtype,
        host_kv_cache_bytes=args.host_kv_cache_bytes,
        disk_kv_cache_dir=args.disk_kv_cache_dir,
        disk_kv_cache_bytes=args.disk_kv_cache_bytes,
        attention_backend=args.attention_backend, num_threads=args.threads,
        cpu_weight_prepack=not args.no_cpu_weight_prepack, enforce_eager=args.enforce_eager,
    )


def _wait_for_signal(failed: threading.Event | None = None) -> bool:
    """Block until SIGINT or SIGTERM, or until `failed` is set; whether it was `failed`."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        if failed is not None and failed.is_set():
            return True
    return False


def cmd_serve(args: argparse.Namespace) -> int:
    from splitserve.launcher import ServeOptions, serve

    options = ServeOptions(
        engine=_engine_config(args), prefill_workers=args.prefill_workers,
        decode_workers=args.decode_workers, port=args.port, http_port=args.http_port,
        redis_url=args.redis_url,
        ray_address=args.ray_address, prefill_resource=args.prefill_resource,
        decode_resource=args.decode_resource,
        router_options={"local_prefill_threshold": args.local_prefill_threshold,
                        **_router_security(args), **_pd_control(args)},
        flippable=args.pd_control, stream_interval=args.stream_interval,
    )
    if args.ray_address is None:
        # The local actors log nowhere visible: prepare the model here, where a one-time
        # GGUF conversion can say what it is doing (the actors then find it in the cache).
        from splitserve.engine.model_files import resolve_model

        print(f"preparing model {args.model} ...", flush=True)
        resolve_model(args.model)
    print(f"starting SplitServe: {options.prefill_workers} prefill + {options.decode_workers} "
          f"decode worker(s), model {args.model} ...", flush=True)
    policy = _scale_policy(args)  # (a bad flag fails before anything starts)
    deployment = serve(options)
    print(f"SplitServe ready at {deployment.address} (cluster state {deployment.cluster_url}, "
          f"OpenAI API http://{deployment.http_address}/v1)", flush=True)
    autoscaler = None
    if policy is not None and deployment.http_address:
        from splitserve.scaling import Autoscaler, metrics_reader

        reader = metrics_reader(deployment.http_address,
                                envs.get("SPLITSERVE_API_KEY") or None)
        autoscaler = Autoscaler(deployment, reader, policy).start()
        print(f"autoscaling up to {dict(policy.max_workers)} workers", flush=True)
    try:
        if args.demo:
            _demo(deployment.address, args.demo_prompt)
        if not args.exit_after_demo:
            print("serving; Ctrl-C to stop", flush=True)
            _wait_for_signal()
    finally:
        if autoscaler is not None:
            autoscaler.stop()
        print("draining and stopping ...", flush=True)
        deployment.shutdown()
    return 0


def _scale_policy(args: argparse.Namespace) -> Any:
    """The ScalePolicy of --max-*-workers (None: no autoscaling); SystemExit on bad flags."""
    maxima = {"prefill": args.max_prefill_workers, "decode": args.max_decode_workers}
    if all(m is None for m in maxima.values()):
        return None
    if not args.pd_control:
        raise SystemExit("splitserve serve: --max-prefill-workers/--max-decode-workers need "
                         "--pd-control (its scale hints say when to add a worker)")
    if args.http_port is None:
        raise SystemExit("splitserve serve: autoscaling reads the router's /metrics: it needs "
                         "--http-port")
    start = {"prefill": args.prefill_workers, "decode": args.decode_workers}
    for role, most in maxima.items():
        if most is not None and most < start[role]:
            raise SystemExit(f"splitserve serve: --max-{role}-workers {most} is below "
                             f"--{role}-workers {start[role]}")
    from splitserve.scaling import ScalePolicy

    try:
        return ScalePolicy({r: m if m is not None else start[r] for r, m in maxima.items()},
                           hold_s=args.scale_hold, cooldown_s=args.scale_cooldown)
    except ValueError as exc:
        raise SystemExit(f"splitserve serve: {exc}") from None


def _demo(address: str, prompt: str) -> None:
    from splitserve.client import Client, stream_to_terminal

    print(f"\n>>> {prompt}\n", flush=True)
    with Client(address, timeout=300, token=envs.get("SPLITSERVE_API_KEY") or None) as client:
        stream_to_terminal(client, [{"role": "user", "content": prompt}], chat=True,
                           max_tokens=128, temperature=0.0)


def _add_router_security_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-keys-file", default=None,
                   help="client API keys, one name:key per line (also SPLITSERVE_API_KEYS); "
                        "with keys, every API but /health needs 'Authorization: Bearer <key>'")
    p.add_argument("--public-metrics", action="store_true",
                   help="serve /metrics without an API key")
    p.add_argument("--max-request-bytes", type=int, default=4 * 1024 * 1024,
                   help="largest HTTP body / gRPC message accepted (413 / RESOURCE_EXHAUSTED)")
    p.add_argument("--client-write-timeout", type=float, default=10.0,
                   help="seconds a streamed chunk may wait for a client that stopped reading "
                        "before the stream is cut off (0: wait forever)")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template that replaces the model's own (e.g. one that "
                        "renders tools)")
    p.add_argument("--no-output-channels", action="store_true",
                   help="stream every decode worker's outputs over its Admit streams, not "
                        "over one TCP output channel per worker (written by its engine "
                        "thread; see README)")


def _router_security(args: argparse.Namespace) -> dict[str, Any]:
    """The RouterConfig fields of _add_router_security_args (the chat template included)
    and _add_fair_share_args."""
    from splitserve.router.fairness import FairShareConfig

    fair = FairShareConfig(policy=args.admission_policy, client_weights=args.client_weights,
                           aging_s=args.priority_aging)
    return {"api_keys_file": args.api_keys_file, "public_metrics": args.public_metrics,
            "max_request_bytes": args.max_request_bytes, "fair_share": fair,
            "ttft_slo_ms": args.ttft_slo_ms, "chat_template": args.chat_template,
            "client_write_timeout_s": args.client_write_timeout or None,
            "route_policy": args.route_policy, "output_channels": not args.no_output_channels}


def _client_weights(text: str) -> dict[str, float]:
    from splitserve.router.fairness import parse_client_weights

    try:
        return parse_client_weights(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_fair_share_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--admission-policy", default="vtc", choices=["vtc", "fcfs"],
                   help="who gets a freed slot among queued requests of one priority class: "
                        "the client with the least weighted-token service (vtc), or the "
                        "oldest request (fcfs)")
    _add_client_weights_arg(p)
    p.add_argument("--ttft-slo-ms", type=int, default=0,
                   help="default TTFT SLO of requests that name none: a request predicted to "
                        "miss it is refused at once (429 / RESOURCE_EXHAUSTED); 0: none")
    p.add_argument("--route-policy", default="load", choices=["load", "latency"],
                   help="load: decode worker by load, prefill by --prefill-policy and the "
                        "local-prefill rules; latency: the P/D pair with the best TTFT "
                        "predicted from the workers' measured step times (a TTFT SLO the "
                        "best pair would miss is refused at once)")
    _add_priority_aging_arg(p)


def _add_client_weights_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--client-weights", default={}, type=_client_weights,
                   help="fair-share weights by API key name, e.g. alice=2,bob=1 (default 1), "
                        "in the router's queue and in the workers' batches")


def _add_priority_aging_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--priority-aging", type=float, default=10.0,
                   help="seconds of waiting that improve a queued request's priority class "
                        "by one, in the router's queue and in the workers' (0: never)")


def _add_pd_control_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pd-control", action="store_true",
                   help="closed-loop P:D control: move workers started --flippable between "
                        "the prefill and decode roles to meet --pd-slo (router.pd_control)")
    p.add_argument("--pd-slo", default="ttft_ms=2000,tpot_ms=100",
                   help="the controller's objectives, met by the --pd-percentile of the "
                        "last --pd-window seconds' requests")
    p.add_argument("--pd-percentile", type=float, default=90.0)
    p.add_argument("--pd-period", type=float, default=2.0, help="seconds between decisions")
    p.add_argument("--pd-window", type=float, default=10.0)
    p.add_argument("--pd-consecutive", type=int, default=3,
                   help="periods in a row a role must be short before a switch")
    p.add_argument("--pd-cooldown", type=float, default=20.0,
                   help="seconds after a switch before the next")
    p.add_argument("--pd-headroom", type=float, default=0.8,
                   help="a role gives a worker only while its own latency is under this "
                        "fraction of its objective")
    p.add_argument("--pd-tpot-signal", default="finished", choices=["live", "finished"],
                   help="the TPOT the controller reads: finished (finished requests' whole "
                        "TPOTs) or live (decoding requests' token gaps of the last second)")
    p.add_argument("--pd-prefill-queue-tokens", type=int, default=0,
                   help="queued prompt tokens per prefill worker that make prefill short "
                        "by themselves (0: latency only)")


def _pd_control(args: argparse.Namespace) -> dict[str, Any]:
    """{"pd_control": PDControlConfig} with --pd-control, else {}."""
    if not args.pd_control:
        return {}
    from splitserve.bench.metrics import parse_slo
    from splitserve.router.pd_decide import PDControlConfig

    slo = parse_slo(args.pd_slo)
    return {"pd_control": PDControlConfig(
        ttft_slo_ms=slo.get("ttft_ms", 2000.0), tpot_slo_ms=slo.get("tpot_ms", 100.0),
        percentile=args.pd_percentile, tpot_signal=args.pd_tpot_signal,
        period_s=args.pd_period, window_s=args.pd_window, consecutive=args.pd_consecutive,
        cooldown_s=args.pd_cooldown, headroom=args.pd_headroom,
        prefill_queue_tokens=args.pd_prefill_queue_tokens)}


def cmd_router(args: argparse.Namespace) -> int:
    from splitserve.router.config import RouterConfig
    from splitserve.router.server import start_router

    router = start_router(RouterConfig(
        model=args.model, host=args.host, port=args.port, http_port=args.http_port,
        cluster_url=args.redis_url,
        block_size=args.block_size, local_prefill_threshold=args.local_prefill_threshold,
        prefill_timeout_ms=args.prefill_timeout_ms, prefill_policy=args.prefill_policy,
        max_inflight=args.max_inflight, max_queued=args.max_queued,
        max_resumes=args.max_resumes, **_router_security(args), **_pd_control(args),
    ))
    print(f"READY router {router.address} cluster {router.cluster_url} http "
          f"{router.http_address}", flush=True)
    _wait_for_signal()
    router.drain(args.drain_timeout)  # SIGTERM: refuse new requests, let running ones finish
    router.stop(5.0)
    return 0


def _add_stream_interval_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stream-interval", type=int, default=1,
                   help="decode workers send a request's tokens this many at a time (the "
                        "first and last at once, a partial group after 0.1 s; paced streams "
                        "never grouped): fewer messages for the router and client, burstier "
                        "arrival")


def _cmd_worker(role: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from splitserve.worker.runtime import WorkerOptions

        options = WorkerOptions(
            engine=_engine_config(args), worker_id=args.worker_id, host=args.host,
            port=args.port, cluster_url=args.cluster, kv_backend="torch_dist",
            kv_store=args.kv_store, serve_kv_store=args.serve_kv_store,
            kv_timeout_s=args.kv_timeout, heartbeat_ttl_s=args.heartbeat_ttl,
            lease_s=args.lease_timeout, kv_migration=not args.no_kv_migration,
            metrics_port=args.metrics_port, max_output_backlog=args.max_output_backlog,
            stream_interval=args.stream_interval, kv_send=args.kv_send,
            output_channels=not args.no_output_channels,
        )
        from splitserve.launcher import build_worker

        worker = build_worker(role, options, flippable=args.flippable).start()
        print(f"READY {role} {worker.worker_id} {worker.address} metrics "
              f"{worker.metrics_port}", flush=True)
        if _wait_for_signal(worker.failed):
            # The engine failed: its requests went back to the router and it left the
            # cluster. Exit non-zero, so that whatever supervises it starts a fresh one.
            print(f"FAILED {role} {worker.worker_id}: its engine failed (see the log)",
                  file=sys.stderr, flush=True)
            worker.stop(1.0)
            return 1
        # SIGTERM: stop taking work; a decode worker hands its requests to the others (a
        # pod replaced, a process restarted), or finishes them when it is the last one.
        worker.drain(args.drain_timeout, migrate=True)
        worker.stop(1.0)
        return 0

    return run


def cmd_kv_store(args: argparse.Namespace) -> int:
    """The KV rendezvous store as its own process: no worker's death takes it along."""
    from splitserve.kvtransfer.torch_dist import create_rendezvous_store

    store = create_rendezvous_store(args.host, args.port)
    print(f"READY kv-store {args.host}:{store.port}", flush=True)
    _wait_for_signal()
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from splitserve.client import Client, stream_to_terminal

    prompt: Any = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    with Client(args.address, timeout=args.timeout, token=args.api_key) as client:
        completion = stream_to_terminal(client, prompt, chat=args.chat,
                                        max_tokens=args.max_tokens, temperature=args.temperature,
                                        seed=args.seed)
    return 0 if completion.finish_reason in ("stop", "length") else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from splitserve import bench

    return bench.main(args.bench_args)


def cmd_profile(args: argparse.Namespace) -> int:
    from splitserve.sim import profiler

    return profiler.run(args)


def cmd_plan(args: argparse.Namespace) -> int:
    from splitserve.sim import planner

    return planner.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitserve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="router + workers as Ray actors (local or on a cluster)")
    _add_engine_args(p)
    p.add_argument("--prefill-workers", type=int, default=1)
    p.add_argument("--decode-workers", type=int, default=1)
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--http-port", type=int, default=8000,
                   help="OpenAI-compatible API and /metrics (0: ephemeral)")
    p.add_argument("--redis-url", default=None)
    p.add_argument("--ray-address", default=None)
    p.add_argument("--prefill-resource", default=None, help="custom Ray resource for prefill")
    p.add_argument("--decode-resource", default=None, help="custom Ray resource for decode")
    p.add_argument("--local-prefill-threshold", type=int, default=32)
    _add_stream_interval_arg(p)
    p.add_argument("--demo", action="store_true", help="stream one chat answer once ready")
    p.add_argument("--demo-prompt", default=DEMO_PROMPT)
    p.add_argument("--exit-after-demo", action="store_true")
    _add_router_security_args(p)
    _add_fair_share_args(p)
    _add_pd_control_args(p)
    p.add_argument("--max-prefill-workers", type=int, default=None, metavar="N",
                   help="with --pd-control: add prefill workers up to N while the router "
                        "finds prefill short and no worker can move to it (splitserve.scaling)")
    p.add_argument("--max-decode-workers", type=int, default=None, metavar="N",
                   help="the same for decode workers")
    p.add_argument("--scale-hold", type=float, default=30.0,
                   help="seconds a role must stay short before a worker is added")
    p.add_argument("--scale-cooldown", type=float, default=120.0,
                   help="seconds after an addition before the next decision")
    _add_tls_arg(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("router", help="the router as a plain process")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--http-port", type=int, default=8000,
                   help="OpenAI-compatible API and /metrics (0: ephemeral)")
    p.add_argument("--redis-url", default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--local-prefill-threshold", type=int, default=32)
    p.add_argument("--prefill-timeout-ms", type=int, default=0,
                   help="deadline for a prompt's KV and first token to reach the decode worker")
    p.add_argument("--prefill-policy", default="kv_aware",
                   choices=["kv_aware", "round_robin", "least_loaded"])
    p.add_argument("--max-inflight", type=int, default=256)
    p.add_argument("--max-queued", type=int, default=256)
    p.add_argument("--max-resumes", type=int, default=2,
                   help="times a request moves on after losing a worker (0: fail it)")
    p.add_argument("--drain-timeout", type=float, default=10.0)
    _add_router_security_args(p)
    _add_fair_share_args(p)
    _add_pd_control_args(p)
    _add_tls_arg(p)
    p.set_defaults(func=cmd_router)

    for role in ("prefill", "decode"):
        p = sub.add_parser(role, help=f"a {role} worker as a plain process")
        _add_engine_args(p)
        _add_priority_aging_arg(p)
        _add_client_weights_arg(p)
        p.add_argument("--worker-id", default=None)
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=0)
        p.add_argument("--cluster", required=True, help="grpc://router:port or redis://...")
        p.add_argument("--kv-store", default=None,
                       help="host:port of a KV rendezvous store the deployment shares "
                            "(default: this worker hosts its own on --host)")
        p.add_argument("--serve-kv-store", action="store_true",
                       help="host the shared --kv-store in this process")
        p.add_argument("--kv-timeout", type=float, default=30.0)
        p.add_argument("--heartbeat-ttl", type=float, default=3.0)
        p.add_argument("--no-kv-migration", action="store_true",
                       help="decode: a drain hands requests on for recompute instead of "
                            "shipping their KV")
        p.add_argument("--lease-timeout", type=float, default=20.0,
                       help="seconds a silent router's calls (and the KV blocks they "
                            "reserved) are kept before they are cancelled")
        p.add_argument("--drain-timeout", type=float, default=10.0)
        p.add_argument("--max-output-backlog", type=int, default=4096,
                       help="decode: step outputs a stream may leave unread before it is "
                            "cut off and its request aborted")
        _add_stream_interval_arg(p)
        p.add_argument("--no-output-channels", action="store_true",
                       help="decode: accept no router output channels (every request's "
                            "outputs over its Admit stream)")
        p.add_argument("--kv-send", default="auto", choices=["auto", "layer", "whole"],
                       help="prefill: send a prompt's KV a layer at a time as it is computed "
                            "(layer), or all layers in one message at the end (whole); auto: "
                            "per layer on a GPU, and on CPU only for prompts whose per-layer "
                            "messages reach 512 KiB (whole below)")
        p.add_argument("--metrics-port", type=int, default=None,
                       help="serve Prometheus metrics on --host at this port (0: ephemeral)")
        p.add_argument("--flippable", action="store_true",
                       help="start in this role but accept WorkerControl.SwitchRole: switch "
                            "to the other role at runtime, same process and weights (the "
                            "router's --pd-control asks for it)")
        _add_tls_arg(p)
        p.set_defaults(func=_cmd_worker(role))

    p = sub.add_parser("kv-store", help="the KV rendezvous store (a TCPStore) as a process")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=29500, help="0: an ephemeral port")
    p.set_defaults(func=cmd_kv_store)

    p = sub.add_parser("generate", help="stream an answer from a running service")
    p.add_argument("prompt")
    p.add_argument("--address", default="127.0.0.1:50051")
    p.add_argument("--chat", action="store_true")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--api-key", default=envs.get("SPLITSERVE_API_KEY") or None,
                   help="sent as 'authorization: Bearer <key>' (default: SPLITSERVE_API_KEY)")
    _add_tls_arg(p)
    p.set_defaults(func=cmd_generate)

    from splitserve.common import certs

    p = sub.add_parser("certs", help="a local CA and mutual-TLS certificates for --tls-dir")
    certs.add_arguments(p)
    p.set_defaults(func=cmd_certs)

    from splitserve.sim import planner, profiler

    p = sub.add_parser("profile", help="measure step times and KV bandwidth for the simulator")
    profiler.add_arguments(p)
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("plan", help="the P:D split with the most goodput per device under an "
                       "SLO, from a profile")
    planner.add_arguments(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("bench", help="benchmarks (splitserve bench --help)", add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        _apply_tls_dir(args)
    except ValueError as exc:
        print(f"splitserve: {exc}", file=sys.stderr)
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
