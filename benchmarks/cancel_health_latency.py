"""How long a decode worker's gRPC server takes to answer a health check right after a burst
of cancelled streams, while its engine decodes (SmolLM2, one process, real gRPC).

    PYTHONPATH=. .venv/bin/python benchmarks/cancel_health_latency.py [--streams 16]
        [--cancels 8] [--rounds 6] [--dtype bfloat16] [--threads 2]

Each round: `--streams` streams decode (local prefill, long outputs); `--cancels` of them are
cancelled at once by the client, and a health check is sent right after; its latency is
printed, then the cancelled streams are replaced. gRPC runs a cancelled stream's callback on
the one thread that serves every call of the server: a callback that waits for the engine
thread (an abort made between steps) holds every other call up for a step per cancel.
Prints each round's latency and the median.
"""

from __future__ import annotations

import argparse
import statistics
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.cluster.memory import InMemoryClusterStore
from splitserve.common.convert.common import sampling_to_proto
from splitserve.common.sampling_params import SamplingParams
from splitserve.decode_worker.worker import DecodeWorker
from splitserve.engine.config import EngineConfig
from splitserve.v1 import worker_pb2, worker_pb2_grpc
from splitserve.worker.runtime import WorkerOptions


def _admit(stub: worker_pb2_grpc.DecodeWorkerStub, request_id: str) -> grpc.Future:
    stream = stub.Admit(worker_pb2.AdmitRequest(
        request_id=request_id, prompt_token_ids=list(range(300, 316)), prefill_locally=True,
        sampling_params=sampling_to_proto(SamplingParams(temperature=0.0, max_tokens=4000,
                                                         ignore_eos=True))))
    assert next(stream).admission.accepted
    next(stream)  # decoding
    return stream


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--cancels", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    engine = EngineConfig(model="smollm2-135m", dtype=args.dtype, num_threads=args.threads)
    worker = DecodeWorker(WorkerOptions(engine=engine, kv_backend="inproc", worker_id="d0",
                                        output_channels=False), InMemoryClusterStore())
    worker.start()
    latencies = []
    try:
        with grpc.insecure_channel(worker.address) as channel:
            stub = worker_pb2_grpc.DecodeWorkerStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            streams = [_admit(stub, f"s{i}") for i in range(args.streams)]
            n = args.streams
            for round_ in range(args.rounds):
                time.sleep(0.5)  # a few steps of the full batch
                for stream in streams[:args.cancels]:
                    stream.cancel()
                started = time.perf_counter()
                health.Check(health_pb2.HealthCheckRequest(), timeout=60)
                latencies.append((time.perf_counter() - started) * 1e3)
                print(f"round {round_}: health check {latencies[-1]:7.1f} ms after "
                      f"{args.cancels} cancels", flush=True)
                streams = streams[args.cancels:] + [
                    _admit(stub, f"s{n + i}") for i in range(args.cancels)]
                n += args.cancels
            for stream in streams:
                stream.cancel()
    finally:
        worker.stop()
    print(f"median {statistics.median(latencies):.1f} ms over {len(latencies)} rounds")


if __name__ == "__main__":
    main()
