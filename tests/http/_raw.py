"""A raw HTTP call to a deployment's router, for the tests that need what the openai client
hides: exact statuses, headers, malformed bodies, timings."""

from __future__ import annotations

import http.client
import json
import time
from typing import Any

from tests.service.deployment import Deployment


def call(d: Deployment, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str], float]:
    """(status, body as JSON when it parses else bytes/text, response headers, seconds)."""
    host, port = d.router.http_address.split(":")  # type: ignore[union-attr]
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    started = time.monotonic()
    try:
        conn.request(method, path, body=body,
                     headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    elapsed = time.monotonic() - started
    try:
        parsed: Any = json.loads(data)
    except ValueError:
        parsed = data.decode(errors="replace")
    return response.status, parsed, dict(response.getheaders()), elapsed
