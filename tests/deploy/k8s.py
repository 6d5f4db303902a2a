"""deploy/k8s rendered with `kubectl kustomize` (offline), and small readers of the result for the deploy tests."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from sdxl_services.stage import parse_args

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ["base", "overlays/single-node", "overlays/cluster"]
TLS = "components/tls"
# What the deploy tests render: the overlays as shipped, and each with the TLS component included.
DEPLOY_TARGETS = [*OVERLAYS, "overlays/single-node+tls", "overlays/cluster+tls"]
JOB_TARGETS = ["weights", "weights-from-path"]
STAGE_FLAGS = {"text_encoder": "--text-encoder", "base": "--base", "refiner": "--refiner", "vae": "--vae"}
GPU_STAGES = {"base", "refiner"}

# Skips without kubectl, fails under CI (conftest.py's `kubectl` fixture).
needs_kubectl = pytest.mark.usefixtures("kubectl")


def kustomize(path: Path) -> list[dict]:
    proc = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        pytest.fail(f"kubectl kustomize {path} failed:\n{proc.stderr}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def with_components(workdir: Path, target: str, components: list[str]) -> Path:
    """A kustomization in workdir that includes `target` plus `components`, as a user's overlay would."""
    workdir.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(K8S, workdir)  # kustomize refuses absolute paths
    (workdir / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [f"{rel}/{target}"], "components": [f"{rel}/{c}" for c in components]}))
    return workdir


def render(target: str, workdir: Path) -> list[dict]:
    """`target` is a folder under deploy/k8s, or FOLDER+tls for that folder with the TLS component."""
    folder, _, extra = target.partition("+")
    if not extra:
        return kustomize(K8S / folder)
    return kustomize(with_components(workdir / target.replace("/", "_"), folder, [TLS]))


def of_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def containers(docs: list[dict]):
    """(deployment, pod spec, container, parsed args) for every container of every Deployment."""
    for dep in of_kind(docs, "Deployment").values():
        spec = dep["spec"]["template"]["spec"]
        for c in spec["containers"]:
            assert not c.get("command"), f"{c['name']}: the image's ENTRYPOINT runs python -m sdxl_services"
            try:
                args = parse_args([str(a) for a in c["args"]])
            except SystemExit:
                pytest.fail(f"{dep['metadata']['name']}: args do not parse with sdxl_services.stage: {c['args']}")
            yield dep, spec, c, args


def stage_deployments(docs: list[dict]) -> dict[str, tuple[dict, dict, dict, object]]:
    found = {}
    for dep, spec, c, args in containers(docs):
        assert args.stage not in found, f"two Deployments run {args.stage}"
        found[args.stage] = (dep, spec, c, args)
    return found


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def pod_labels(workload: dict) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"].get("labels", {})


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against a set of labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def mount_of(path: str, container: dict, spec: dict) -> tuple[dict, dict, str]:
    """(volumeMount, volume, path inside the volume) of the mount holding `path`; fails if none does."""
    for m in sorted(container.get("volumeMounts", []), key=lambda m: -len(m["mountPath"])):
        root = m["mountPath"].rstrip("/") + "/"
        if path.startswith(root):
            volume = next(v for v in spec.get("volumes", []) if v["name"] == m["name"])
            return m, volume, path[len(root):]
    pytest.fail(f"{container['name']}: {path} is on no mounted volume")


def image_of(docs: list[dict]) -> set[str]:
    return {c["image"] for d in docs if d["kind"] in ("Deployment", "Job")
            for c in d["spec"]["template"]["spec"]["containers"]}
