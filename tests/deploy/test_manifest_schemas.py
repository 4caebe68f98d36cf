"""The deployment manifests against Kubernetes' own API schemas, offline (kubernetes-validate
bundles the JSON schemas of every Kubernetes release; strict: unknown fields are errors).

- The Helm chart rendered for real (helm-python-sdk, Helm's engine) in every values case
  of test_helm_chart.RENDER_CASES: every resource validates.
- deploy/kuberay/raycluster.yaml: its core resources (the submission Job, the Service)
  validate as they are; the RayCluster custom resource has no schema in any package a
  registry serves (KubeRay's CRD is not bundled anywhere we can install), so its pod
  templates, where nearly everything of ours is, are validated as core PodTemplates, and
  the whole resource against KubeRay's CRD when SPLITSERVE_KUBERAY_CRD names its file
  (ray.io_rayclusters.yaml from KubeRay's repository or `kubectl get crd
  rayclusters.ray.io -o yaml`).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy._crd import crd_errors
from tests.deploy.test_helm_chart import CHART, RENDER_CASES, helm_python

kubernetes_validate = pytest.importorskip("kubernetes_validate")

# A current Kubernetes release (the chart's kubeVersion allows >= 1.27).
KUBE_VERSION = "1.33.0"
RAYCLUSTER = Path(__file__).resolve().parents[2] / "deploy" / "kuberay" / "raycluster.yaml"


def _validate(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def _rendered(case: str) -> list[dict[str, Any]]:
    with helm_python.Chart.load(str(CHART)) as chart:
        out = chart.render(RENDER_CASES[case], name="t", namespace="ns")
    return [doc for path, text in out.items() if Path(path).suffix == ".yaml"
            for doc in yaml.safe_load_all(text) if doc]


@pytest.mark.skipif(helm_python is None, reason="helm_python (helm-python-sdk) not installed")
@pytest.mark.parametrize("case", sorted(RENDER_CASES))
def test_every_rendered_resource_validates(case: str) -> None:
    docs = _rendered(case)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("Deployment") >= 3, kinds  # router, prefill, decode
    for doc in docs:
        _validate(doc)


@pytest.mark.skipif(helm_python is None, reason="helm_python (helm-python-sdk) not installed")
def test_the_validator_catches_what_kubectl_would_refuse() -> None:
    """The check can fail: a misspelt field and a wrong type are both errors."""
    deployment = next(d for d in _rendered("default") if d["kind"] == "Deployment")
    misspelt = copy.deepcopy(deployment)
    misspelt["spec"]["template"]["spec"]["containerz"] = []
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    for bad in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            _validate(bad)


def _pod_templates(raycluster: dict[str, Any]) -> list[dict[str, Any]]:
    spec = raycluster["spec"]
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [group["template"] for group in groups]


def test_kuberay_manifest_validates() -> None:
    docs = [d for d in yaml.safe_load_all(RAYCLUSTER.read_text()) if d]
    clusters = [d for d in docs if d["kind"] == "RayCluster"]
    assert len(clusters) == 1 and clusters[0]["apiVersion"] == "ray.io/v1"
    for doc in docs:
        if doc["kind"] != "RayCluster":
            _validate(doc)
    templates = _pod_templates(clusters[0])
    assert len(templates) == 3  # head, prefill workers, decode workers
    for i, template in enumerate(templates):
        _validate({"apiVersion": "v1", "kind": "PodTemplate",
                   "metadata": {"name": f"group-{i}"}, "template": template})


def _raycluster() -> dict[str, Any]:
    [cluster] = [d for d in yaml.safe_load_all(RAYCLUSTER.read_text())
                 if d and d["kind"] == "RayCluster"]
    return cluster


@pytest.mark.skipif(not os.environ.get("SPLITSERVE_KUBERAY_CRD"),
                    reason="SPLITSERVE_KUBERAY_CRD (KubeRay's RayCluster CRD file) not set")
def test_the_raycluster_validates_against_kuberays_crd() -> None:
    crd = yaml.safe_load(Path(os.environ["SPLITSERVE_KUBERAY_CRD"]).read_text())
    assert crd["spec"]["names"]["kind"] == "RayCluster"
    cluster = _raycluster()
    assert crd_errors(cluster, crd) == []
    misspelt = copy.deepcopy(cluster)
    misspelt["spec"]["headGroupSpec"]["rayStartParamz"] = {}
    wrong_type = copy.deepcopy(cluster)
    wrong_type["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    assert crd_errors(misspelt, crd) == ["unknown field .spec.headGroupSpec.rayStartParamz"]
    assert len(crd_errors(wrong_type, crd)) == 1


def test_the_crd_check_refuses_unknown_fields_and_wrong_types() -> None:
    """The check itself, on a small structural schema of the CRD's shape."""
    crd = {"spec": {"names": {"kind": "Thing"}, "versions": [{"name": "v1", "schema": {
        "openAPIV3Schema": {"type": "object", "properties": {"spec": {
            "type": "object", "required": ["replicas"], "properties": {
                "replicas": {"type": "integer"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "groups": {"type": "array", "items": {
                    "type": "object", "properties": {"name": {"type": "string"}}}},
                "template": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            }}}}}}]}}
    good = {"apiVersion": "example.io/v1", "kind": "Thing", "metadata": {"name": "a"},
            "spec": {"replicas": 2, "labels": {"a": "b"}, "groups": [{"name": "g"}],
                     "template": {"anything": {"goes": 1}}}}
    assert crd_errors(good, crd) == []
    bad = copy.deepcopy(good)
    bad["spec"]["groups"][0]["nmae"] = "typo"
    bad["spec"]["replicas"] = "two"
    bad["spec"]["labels"]["n"] = 3
    errors = crd_errors(bad, crd)
    assert "unknown field .spec.groups[0].nmae" in errors
    assert any("'two' is not of type 'integer'" in e for e in errors)
    assert any("3 is not of type 'string'" in e for e in errors)
    del bad["spec"]["replicas"]
    assert any("'replicas' is a required property" in e for e in crd_errors(bad, crd))
