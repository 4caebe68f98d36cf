"""Container health check: ask a SplitServe process's standard gRPC health service.

    python healthcheck.py [ADDRESS] [--service NAME] [--timeout SECONDS]

ADDRESS defaults to $HEALTHCHECK_ADDR, else 127.0.0.1:50051 (the router). Exit status 0
when the service reports SERVING, 1 otherwise (NOT_SERVING, unreachable, timeout): the
contract of Docker's HEALTHCHECK. The router and both workers register the empty service
name "" as SERVING once they accept work; the router turns it NOT_SERVING while draining.

With SPLITSERVE_TLS_DIR set (mutual TLS, see splitserve.common.tls) it connects with the
process's certificate. Kubernetes needs this file only then: its native `grpc:` probes ask
the same service but cannot present a certificate. Imports grpc and splitserve's torch-free
TLS module only, so a probe costs ~0.1 s of CPU.
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_ADDR = "127.0.0.1:50051"


def check(address: str, service: str = "", timeout_s: float = 3.0) -> tuple[bool, str]:
    """(healthy, what was seen) for `service` at `address` (host:port)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from splitserve.common import tls

    files = tls.current()
    channel = (grpc.secure_channel(address, files.channel_credentials(),
                                   options=files.channel_options())
               if files is not None else grpc.insecure_channel(address))
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", nargs="?",
                        default=os.environ.get("HEALTHCHECK_ADDR") or DEFAULT_ADDR)
    parser.add_argument("--service", default="", help='gRPC service name ("" = the whole server)')
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds")
    args = parser.parse_args(argv)
    healthy, seen = check(args.address, args.service, args.timeout)
    print(f"{args.address} {args.service or '(server)'}: {seen}")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
