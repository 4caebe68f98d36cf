"""deploy/helm/splitserve without helm: Chart.yaml, values the templates reference, the
`splitserve` command lines of every container (parsed by the real CLI parser), probes,
drain settings, and the dedicated KV store's script (run for real on loopback).

When the optional `helm_python` package (Helm's engine, pip install helm-python-sdk) is
importable, the chart is also rendered for real and every rendered command parsed."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy._commands import (
    CHART,
    PLACEHOLDER,
    REPO,
    container_invocations,
    helm_defines,
    lookup,
    parse,
    template_args,
)

TEMPLATES = CHART / "templates"
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
DEFINES = helm_defines((TEMPLATES / "_helpers.tpl").read_text())


def template(name: str) -> str:
    return (TEMPLATES / name).read_text()


def all_template_text() -> str:
    return "\n".join(p.read_text() for p in sorted(TEMPLATES.iterdir()) if p.is_file())


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["type"] == "application"
    assert chart["name"] == CHART.name
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"])
    version = re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert version and chart["appVersion"] == version.group(1)  # the image tag default
    assert "1.27" in chart["kubeVersion"]  # native gRPC probes


def test_every_values_path_the_templates_use_exists() -> None:
    text = all_template_text()
    paths = set(re.findall(r"\.Values((?:\.[A-Za-z_]\w*)+)", text))
    assert len(paths) > 40
    missing = []
    for path in sorted(paths):
        try:
            lookup(VALUES, path[1:])
        except KeyError:
            missing.append(path)
    assert not missing, f"referenced by templates, absent from values.yaml: {missing}"
    # Keys of the per-role dict the worker pod spec reads ($cfg = .Values.prefill|decode).
    for path in sorted(set(re.findall(r"\$cfg((?:\.\w+)+)", text))):
        for role in ("prefill", "decode"):
            lookup(VALUES[role], path[1:])


def test_template_actions_are_balanced() -> None:
    for path in sorted(TEMPLATES.iterdir()):
        text = path.read_text()
        assert text.count("{{") == text.count("}}"), path.name
        actions = re.findall(r"{{-?\s*(\w+)", text)
        opened = sum(a in ("if", "with", "range", "define") for a in actions)
        assert opened == actions.count("end"), path.name


def rendered_args(name: str) -> list[list[str]]:
    return template_args(template(name), DEFINES, VALUES)


def test_router_command_parses() -> None:
    [argv] = rendered_args("router.yaml")
    args = parse(argv)
    assert args.command == "router"
    assert args.host == "0.0.0.0" and args.port == VALUES["router"]["port"]
    assert args.model == VALUES["model"] and args.block_size == VALUES["engine"]["blockSize"]
    assert args.redis_url == PLACEHOLDER  # the chart's Redis (or externalUrl) when present


@pytest.mark.parametrize("name, role", [("prefill.yaml", "prefill"), ("decode.yaml", "decode")])
def test_worker_commands_parse_with_values(name: str, role: str) -> None:
    [argv] = rendered_args(name)
    args = parse(argv)
    cfg, engine = VALUES[role], VALUES["engine"]
    assert args.command == role
    assert args.host == "$(POD_IP)"  # bind and register the pod IP (downward API)
    assert args.port == cfg["port"] and args.drain_timeout == cfg["drainTimeoutSeconds"]
    assert args.kv_timeout == cfg["kvTimeoutSeconds"]
    assert args.heartbeat_ttl == cfg["heartbeatTtlSeconds"]
    assert args.cluster == PLACEHOLDER and args.kv_store == PLACEHOLDER
    assert not args.serve_kv_store
    assert (args.model, args.block_size, args.dtype, args.attention_backend) == (
        VALUES["model"], engine["blockSize"], engine["dtype"], engine["attentionBackend"])
    assert args.max_num_batched_tokens == engine["maxNumBatchedTokens"]
    assert "fieldPath: status.podIP" in template("_helpers.tpl")


def test_kv_store_in_decode_mode_is_a_decode_worker_hosting_the_store() -> None:
    [argv] = rendered_args("kvstore.yaml")
    args = parse(argv)
    assert args.command == "decode" and args.serve_kv_store
    assert '"kvStore" (printf "$(POD_IP):%d" $port)' in template("kvstore.yaml")


def test_probes_are_grpc_and_drain_fits_in_the_grace_period() -> None:
    # Every probe is "splitserve.probeAction": native gRPC, or the health check script over
    # mutual TLS when auth.tlsSecret is set (rendered in test_tls_secret_reaches_every_pod).
    action = "\n".join(DEFINES["splitserve.probeAction"])
    assert "grpc:" in action and "/opt/splitserve/healthcheck.py" in action
    for text in (template("router.yaml"), "\n".join(DEFINES["splitserve.workerPodSpec"])):
        probes = re.findall(r"(startupProbe|readinessProbe|livenessProbe):\s*\n\s*"
                            r'\{\{- include "splitserve.probeAction"', text)
        assert sorted(probes) == ["livenessProbe", "readinessProbe", "startupProbe"]
    for role in ("prefill", "decode"):
        cfg = VALUES[role]
        assert cfg["terminationGracePeriodSeconds"] > cfg["drainTimeoutSeconds"] + 5
        assert cfg["resources"]["limits"]["nvidia.com/gpu"] >= 1
        assert cfg["nodeSelector"] and cfg["tolerations"]
    assert VALUES["prefill"]["nodeSelector"] != VALUES["decode"]["nodeSelector"]
    assert "kind: PodDisruptionBudget" in template("decode.yaml") and VALUES["decode"]["pdb"]["enabled"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kv_store_script() -> str:
    text = template("kvstore.yaml")
    block = re.search(r'command: \["python", "-c"\]\n\s*args:\n\s*- \|\n((?:\s{14}.*\n)+)', text)
    assert block, "the dedicated KV store's inline script"
    return textwrap.dedent(block.group(1))


def test_dedicated_kv_store_serves_on_pod_ip_only_and_stops_on_sigterm() -> None:
    import torch.distributed as dist

    port = free_port()
    env = {**os.environ, "POD_IP": "127.0.0.1", "KV_STORE_PORT": str(port),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", kv_store_script()], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "the KV store printed nothing within 60 s"
        assert proc.stdout.readline().strip() == f"READY kv-store 127.0.0.1:{port}"
        client = dist.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False,
                               timeout=timedelta(seconds=10))
        client.set("pair/epoch/send", "1")
        assert client.get("pair/epoch/send") == b"1"
        with pytest.raises(ConnectionRefusedError):  # bound to POD_IP, not every interface
            socket.create_connection(("127.0.0.2", port), timeout=2).close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


helm_python: Any = None
try:  # optional: Helm's own engine, for a real render
    import helm_python  # type: ignore[no-redef]
except ImportError:
    pass

RENDER_CASES: dict[str, dict[str, Any]] = {
    "default": {},
    "kv-store-dedicated": {"kvStore": {"mode": "dedicated"}},
    "kv-store-in-decode": {"kvStore": {"mode": "decode"}},
    "no-redis": {"redis": {"enabled": False}},
    "external-redis": {"redis": {"enabled": False, "externalUrl": "redis://r:6379/0"},
                       "router": {"replicas": 2}},
    "engine-knobs": {"engine": {"numKvBlocks": 4096, "maxModelLen": 8192, "threads": 4,
                                "prefixCaching": False, "maxNumBatchedTokens": 1000000}},
    "auth": {"auth": {"apiKeysSecret": "keys", "clusterTokenSecret": "token"},
             "router": {"env": [{"name": "X", "value": "1"}]}},
    "tls": {"auth": {"tlsSecret": "certs"}, "extraVolumes": [{"name": "m", "emptyDir": {}}],
            "extraVolumeMounts": [{"name": "m", "mountPath": "/models"}]},
    "autoscaling": {"router": {"pdControl": {"enabled": True}, "publicMetrics": True},
                    "decode": {"autoscaling": {"enabled": True, "maxReplicas": 6}},
                    "prefill": {"autoscaling": {"enabled": True, "stabilizationSeconds": 45}}},
}


def rendered_docs(case: str | dict[str, Any]) -> list[dict[str, Any]]:
    """Every object the chart renders for `case` (a RENDER_CASES name, or values)."""
    values = RENDER_CASES[case] if isinstance(case, str) else case
    with helm_python.Chart.load(str(CHART)) as chart:
        out = chart.render(values, name="t", namespace="ns")
    return [doc for path, text in out.items() if Path(path).suffix == ".yaml"
            for doc in yaml.safe_load_all(text) if doc]


def rendered_pods(case: str) -> dict[str, dict[str, Any]]:
    """The pod spec of each role (router, prefill, decode) in the chart rendered for `case`."""
    with helm_python.Chart.load(str(CHART)) as chart:
        out = chart.render(RENDER_CASES[case], name="t", namespace="ns")
    pods: dict[str, dict[str, Any]] = {}
    for path, text in out.items():
        if Path(path).suffix != ".yaml":
            continue
        for doc in yaml.safe_load_all(text):
            pod = (doc or {}).get("spec", {}).get("template", {}).get("spec", {})
            for container in pod.get("containers", []):
                argv = [*container.get("command", []), *container.get("args", [])]
                role = next((a for a in argv if a in ("router", "prefill", "decode")), None)
                if role:
                    pods[role] = pod
    return pods


@pytest.mark.skipif(helm_python is None, reason="helm_python (helm-python-sdk) not installed")
@pytest.mark.parametrize("case", sorted(RENDER_CASES))
def test_rendered_chart_commands_parse(case: str) -> None:
    with helm_python.Chart.load(str(CHART)) as chart:
        out = chart.render(RENDER_CASES[case], name="t", namespace="ns")
    commands: dict[str, Any] = {}
    for path, text in out.items():
        if Path(path).suffix != ".yaml":
            continue
        for doc in yaml.safe_load_all(text):
            for name, argv in container_invocations(doc or {}):
                commands[f"{doc['metadata']['name']}/{name}"] = parse(argv)
    roles = sorted(a.command for a in commands.values())
    assert roles.count("router") == 1 and "prefill" in roles and "decode" in roles
    clusters = {a.cluster for a in commands.values() if a.command in ("prefill", "decode")}
    assert len(clusters) == 1
    if case == "engine-knobs":
        assert all(a.max_num_batched_tokens == 1000000 and a.no_prefix_caching
                   for a in commands.values() if a.command != "router")


@pytest.mark.skipif(helm_python is None, reason="helm_python (helm-python-sdk) not installed")
def test_secrets_reach_the_router_and_every_worker() -> None:
    env_by_role = {role: {e["name"]: e for e in pod["containers"][0].get("env", [])}
                   for role, pod in rendered_pods("auth").items()}
    assert set(env_by_role) == {"router", "prefill", "decode"}
    for env in env_by_role.values():
        ref = env["SPLITSERVE_CLUSTER_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "token", "key": "cluster-token"}
    router = env_by_role["router"]
    assert router["SPLITSERVE_API_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": "keys",
                                                                          "key": "api-keys"}
    assert router["X"]["value"] == "1"
    assert "SPLITSERVE_API_KEYS" not in env_by_role["decode"]


@pytest.mark.skipif(helm_python is None, reason="helm_python (helm-python-sdk) not installed")
def test_tls_secret_reaches_every_pod_and_probes_speak_tls() -> None:
    pods = rendered_pods("tls")
    assert set(pods) == {"router", "prefill", "decode"}
    for role, pod in pods.items():
        container = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env["SPLITSERVE_TLS_DIR"] == "/etc/splitserve/tls"
        port = container["ports"][0]["containerPort"]
        host = "127.0.0.1" if role == "router" else "$(POD_IP)"
        assert env["HEALTHCHECK_ADDR"] == f"{host}:{port}"
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["tls"] == {"name": "tls", "mountPath": "/etc/splitserve/tls",
                                 "readOnly": True}
        assert "m" in mounts  # extra mounts are kept beside it
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["tls"]["secret"]["secretName"] == "certs"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["exec"]["command"] == [
                "python", "/opt/splitserve/healthcheck.py"], (role, probe)
            assert "grpc" not in container[probe]
    for role, pod in rendered_pods("default").items():
        container = pod["containers"][0]
        assert container["livenessProbe"]["grpc"]["port"] == container["ports"][0][
            "containerPort"], role
        assert "SPLITSERVE_TLS_DIR" not in {e["name"] for e in container.get("env", [])}


@pytest.mark.skipif(helm_python is None, reason="helm_python (helm-python-sdk) not installed")
def test_autoscaling_adds_workers_on_the_routers_scale_hint() -> None:
    docs = rendered_docs("autoscaling")
    hpas = {d["spec"]["scaleTargetRef"]["name"]: d["spec"] for d in docs
            if d["kind"] == "HorizontalPodAutoscaler"}
    assert set(hpas) == {"t-splitserve-prefill", "t-splitserve-decode"}
    for role, spec in (("prefill", hpas["t-splitserve-prefill"]),
                       ("decode", hpas["t-splitserve-decode"])):
        (metric,) = spec["metrics"]
        assert metric["object"]["describedObject"] == {"apiVersion": "v1", "kind": "Service",
                                                       "name": "t-splitserve-router"}
        # The name and label the router's P:D control exports (router/pd_control.py).
        assert metric["object"]["metric"] == {"name": "splitserve_pd_scale_hint",
                                              "selector": {"matchLabels": {"role": role}}}
        assert metric["object"]["target"] == {"type": "Value", "value": "500m"}
        assert spec["behavior"]["scaleDown"] == {"selectPolicy": "Disabled"}
        assert spec["behavior"]["scaleUp"]["policies"] == [
            {"type": "Pods", "value": 1, "periodSeconds": 120}]
    assert (hpas["t-splitserve-decode"]["minReplicas"], hpas["t-splitserve-decode"]["maxReplicas"]) == (2, 6)
    assert hpas["t-splitserve-prefill"]["behavior"]["scaleUp"]["stabilizationWindowSeconds"] == 45
    deployments = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Deployment"}
    # The HPA owns the replica count: a helm upgrade must not reset it.
    assert "replicas" not in deployments["t-splitserve-decode"]
    assert "replicas" not in deployments["t-splitserve-prefill"]
    router = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "t-splitserve-router")
    assert {p["name"]: p["port"] for p in router["spec"]["ports"]} == {"grpc": 50051, "http": 8000}
    (args,) = [parse(c["args"])
               for c in deployments["t-splitserve-router"]["template"]["spec"]["containers"]]
    assert args.pd_control and args.public_metrics and args.http_port == 8000
    assert "replicas" in deployments["t-splitserve-router"]


@pytest.mark.skipif(helm_python is None, reason="helm_python (helm-python-sdk) not installed")
@pytest.mark.parametrize("values, message", [
    ({"decode": {"autoscaling": {"enabled": True}}}, "needs router.pdControl.enabled"),
    ({"router": {"pdControl": {"enabled": True}, "httpPort": None},
      "prefill": {"autoscaling": {"enabled": True}}}, "needs router.pdControl.enabled"),
    ({"router": {"pdControl": {"enabled": True}},
      "decode": {"autoscaling": {"enabled": True, "maxReplicas": 1}}}, "maxReplicas must be"),
])
def test_autoscaling_without_what_it_needs_is_refused(values: dict[str, Any], message: str) -> None:
    with pytest.raises(Exception, match=message):
        rendered_docs(values)


@pytest.mark.skipif(helm_python is None, reason="helm_python (helm-python-sdk) not installed")
def test_default_chart_has_no_autoscaler_and_serves_http() -> None:
    docs = rendered_docs("default")
    assert not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    deployments = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Deployment"}
    assert deployments["t-splitserve-decode"]["replicas"] == 2
    (container,) = deployments["t-splitserve-router"]["template"]["spec"]["containers"]
    args = parse(container["args"])
    assert args.http_port == 8000 and not args.pd_control and not args.public_metrics
