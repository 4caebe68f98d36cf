"""What `splitserve bench fuzz` sends, standard library and grpc only: one fuzz case over
HTTP (a fresh connection each) or as a raw gRPC Generate call, a normal completion timed,
and an oversized body pushed the way a naive client pushes it."""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
import time
from dataclasses import dataclass

import grpc

from splitserve.bench.fuzz_cases import GrpcCase, HttpCase
from splitserve.v1 import common_pb2, router_pb2

GENERATE = "/splitserve.v1.SplitServe/Generate"
NORMAL_PROMPT, NORMAL_MAX_TOKENS = "Hello there", 4
# What a gRPC caller may get for bad input, or for a request the service cannot take now.
# UNKNOWN, INTERNAL, UNAVAILABLE (the router gone) and the rest count as failures.
GOOD_CODES = frozenset({"OK", "INVALID_ARGUMENT", "NOT_FOUND", "OUT_OF_RANGE",
                        "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED",
                        "PERMISSION_DENIED", "DEADLINE_EXCEEDED"})


def send_http(address: str, case: HttpCase, timeout_s: float = 30.0) -> str:
    """The response's status code as text, or "no response: <error>" (the connection
    failed, was dropped or timed out). The body is read to its end."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
    headers = {"Content-Type": case.content_type} if case.content_type else {}
    try:
        conn.request(case.method, case.path, body=case.body, headers=headers)
        response = conn.getresponse()
        response.read()
        return str(response.status)
    except (OSError, http.client.HTTPException) as exc:
        return f"no response: {type(exc).__name__}"
    finally:
        conn.close()


def raw_generate(channel: grpc.Channel) -> grpc.UnaryStreamMultiCallable:
    """Generate with the request passed as already serialized bytes."""
    return channel.unary_stream(GENERATE, request_serializer=lambda b: b,
                                response_deserializer=router_pb2.GenerateResponse.FromString)


def send_grpc(generate: grpc.UnaryStreamMultiCallable, case: GrpcCase,
              timeout_s: float = 30.0) -> str:
    """The status code's name; an OK stream that ends without a finish reason, or with
    FINISH_REASON_ERROR, is "OK, no finish" / "OK, finish error"."""
    try:
        chunks = list(generate(case.data, timeout=timeout_s))
    except grpc.RpcError as err:
        return str(err.code().name)
    if not chunks or chunks[-1].finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED:
        return "OK, no finish"
    if chunks[-1].finish_reason == common_pb2.FINISH_REASON_ERROR:
        return "OK, finish error"
    return "OK"


def normal_http(address: str) -> tuple[str, float]:
    """A small valid completion over HTTP: (status, seconds)."""
    body = {"prompt": NORMAL_PROMPT, "max_tokens": NORMAL_MAX_TOKENS}
    case = HttpCase("normal", "POST", "/v1/completions", json.dumps(body).encode(),
                    "application/json")
    started = time.monotonic()
    status = send_http(address, case)
    return status, time.monotonic() - started


def normal_grpc(generate: grpc.UnaryStreamMultiCallable) -> tuple[str, float]:
    """The same completion over gRPC: (status, seconds)."""
    request = router_pb2.GenerateRequest(
        prompt=NORMAL_PROMPT,
        sampling_params=common_pb2.SamplingParams(max_tokens=NORMAL_MAX_TOKENS))
    started = time.monotonic()
    status = send_grpc(generate, GrpcCase("normal", request.SerializeToString()))
    return status, time.monotonic() - started


@dataclass
class BigPost:
    """One oversized POST: the status it got (0: none), seconds from its first byte sent to
    its status line read, body bytes written, and the error that ended it early, if any."""

    status: int = 0
    seconds: float | None = None
    sent_bytes: int = 0
    error: str = ""


def big_body(size: int) -> bytes:
    """A completion request of exactly `size` bytes of JSON."""
    head, tail = b'{"max_tokens": 4, "prompt": "', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def post_big(address: str, body: bytes, start: threading.Barrier,
             timeout_s: float = 60.0) -> BigPost:
    """POST `body` to /v1/completions with its Content-Length, as a client that writes the
    whole body before it looks for a reply would, but noting when the reply came. Ends
    when the body is out and the reply read, or the router closed the connection."""
    host, port = address.rsplit(":", 1)
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {address}\r\nContent-Type: "
            f"application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    out = BigPost()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        start.wait()
        started = time.monotonic()
        sock.sendall(head)
        sock.setblocking(False)
        try:
            _push(sock, memoryview(body), out, started, started + timeout_s)
        except OSError as exc:  # a reset once the reply is out is the router's right
            out.error = type(exc).__name__
    return out


def _push(sock: socket.socket, body: memoryview, out: BigPost, started: float,
          deadline: float) -> None:
    received = b""
    while time.monotonic() < deadline:
        if out.seconds is not None and out.sent_bytes >= len(body):
            return
        writing = [sock] if out.sent_bytes < len(body) else []
        readable, writable, _ = select.select([sock], writing, [], 1.0)
        if writable:
            try:
                out.sent_bytes += sock.send(body[out.sent_bytes:out.sent_bytes + 65536])
            except BlockingIOError:
                pass
        if readable:
            chunk = sock.recv(65536)
            if not chunk:
                return  # closed by the router
            received += chunk
            if out.seconds is None and b"\r\n" in received:
                out.seconds = time.monotonic() - started
                out.status = int(received.split(b" ", 2)[1])
    out.error = "timeout"
