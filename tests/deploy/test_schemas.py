"""Every rendered manifest validates offline against the Kubernetes JSON schemas (kubernetes-validate, strict).

kubernetes-validate ships the schemas of each Kubernetes release inside the package, so nothing is
fetched. Strict mode rejects unknown fields, which catches a misspelled key that the API server would
silently drop (e.g. `readinesProbe`). Checked at the oldest release the manifests rely on and the newest
the validator knows.
"""

from __future__ import annotations

import copy
import json

import kubernetes_validate
import pytest
import yaml

from .k8s import DEPLOY_TARGETS, JOB_TARGETS, K8S, needs_kubectl

pytestmark = needs_kubectl

# 1.27: native gRPC probes GA, topologySpreadConstraints.matchLabelKeys and PDB unhealthyPodEvictionPolicy on
# by default (beta). The newest release the installed validator ships schemas for.
K8S_VERSIONS = ["1.27", kubernetes_validate.latest_version()]
EXAMPLES = [K8S / "monitoring" / "prometheus-adapter.yaml"]  # podmonitor.yaml is a CRD: no schema ships for it
KINDS = {"Deployment", "Service", "PersistentVolumeClaim", "NetworkPolicy", "PodDisruptionBudget",
         "HorizontalPodAutoscaler", "Job", "ConfigMap"}


def validate(doc: dict, version: str) -> None:
    name = f"{doc['kind']}/{doc['metadata']['name']}"
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{name} is invalid at Kubernetes {version}: {e.message} at {'/'.join(map(str, e.path))}")
    except kubernetes_validate.SchemaNotFoundError as e:
        pytest.fail(f"{name}: {e.message}")


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_manifests_validate(renders, version):
    docs = [d for t in [*DEPLOY_TARGETS, *JOB_TARGETS] for d in renders[t]]
    docs += [d for path in EXAMPLES for d in yaml.safe_load_all(path.read_text()) if d]
    unique = {json.dumps(d, sort_keys=True): d for d in docs}  # the overlays share most objects
    for doc in unique.values():
        validate(doc, version)
    assert {d["kind"] for d in docs} == KINDS, "a kind was added or lost: list it here once it validates"


def test_the_validator_rejects_a_misspelled_field(renders):
    (dep, *_) = [d for d in renders["base"] if d["kind"] == "Deployment"]
    bad = copy.deepcopy(dep)
    container = bad["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(bad, K8S_VERSIONS[0], strict=True)
