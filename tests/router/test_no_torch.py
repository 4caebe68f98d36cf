"""The router never imports torch (DESIGN.md): checked in a fresh interpreter that starts a
router and serves requests through it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, sys
import grpc
from splitserve.router.config import RouterConfig
from splitserve.router.server import start_router
from splitserve.v1 import router_pb2, router_pb2_grpc

with start_router(RouterConfig()) as r, grpc.insecure_channel(r.address) as channel:
    stub = router_pb2_grpc.SplitServeStub(channel)
    models = stub.ListModels(router_pb2.ListModelsRequest(), timeout=10)
    try:
        list(stub.Generate(router_pb2.GenerateRequest(prompt="Hello"), timeout=10))
        code = "OK"
    except grpc.RpcError as exc:
        code = exc.code().name
heavy = sorted(m for m in ("torch", "transformers", "triton", "ray") if m in sys.modules)
print(json.dumps({"model": models.models[0].id, "code": code, "heavy": heavy}))
"""


def test_router_runs_without_importing_torch() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"model": "smollm2-135m", "code": "UNAVAILABLE", "heavy": []}
