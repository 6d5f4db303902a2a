"""The weights Job (deploy/k8s/weights, weights-from-path) against the stages that read what it writes.

Each container must run `python -m sdxl_core.loading.fetch SOURCE DEST`, write DEST on the claim the
stages mount, and between them write exactly the model folders the stages' --model / --refiner-model
name. The rendered commands are then run here, with the mounts mapped to temporary folders, and the
stages' model paths must come out complete.
"""

from __future__ import annotations

import re
import runpy
import shutil
import sys
from pathlib import Path

import pytest

from sdxl_core.loading.hub import HUB_ID

from .k8s import DEPLOY_TARGETS, JOB_TARGETS, ROOT, containers, image_of, mount_of, needs_kubectl, of_kind

pytestmark = needs_kubectl

FETCH = ["python", "-m", "sdxl_core.loading.fetch"]


def job_containers(docs: list[dict]):
    (job,) = of_kind(docs, "Job").values()
    spec = job["spec"]["template"]["spec"]
    for c in spec["containers"]:
        yield spec, c


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def stage_models(docs: list[dict]) -> set[tuple[str, str]]:
    """(claim, path inside it) of every model folder a stage loads."""
    found = set()
    for _, spec, c, args in containers(docs):
        for path in filter(None, (args.model, args.refiner_model)):
            _, volume, inside = mount_of(path, c, spec)
            found.add((volume["persistentVolumeClaim"]["claimName"], inside))
    return found


def image_offline_default() -> str | None:
    m = re.search(r"HF_HUB_OFFLINE=(\S+)", (ROOT / "deploy" / "docker" / "Dockerfile").read_text())
    return m and m.group(1)


@pytest.mark.parametrize("target", JOB_TARGETS)
def test_the_job_runs_fetch_with_source_and_dest(renders, target):
    (job,) = of_kind(renders[target], "Job").values()
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] in ("OnFailure", "Never")
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"].get("fsGroup"), "DEST must be writable"
    for spec, c in job_containers(renders[target]):
        assert c["command"] == FETCH, f"{c['name']}: the image's ENTRYPOINT runs the services; override command"
        source, dest = c["args"]
        mount, volume, _ = mount_of(dest, c, spec)
        assert not mount.get("readOnly") and not volume["persistentVolumeClaim"].get("readOnly"), (
            f"{c['name']}: DEST {dest} is on a read-only mount")
        env = env_of(c)
        if source.startswith("/"):
            source_mount, _, _ = mount_of(source, c, spec)
            assert source_mount.get("readOnly"), f"{c['name']}: the source volume should be read-only"
        else:
            assert HUB_ID.match(source), f"{c['name']}: SOURCE {source} is neither an absolute path nor a hub id"
            if image_offline_default() not in (None, "0"):
                assert env.get("HF_HUB_OFFLINE", {}).get("value") == "0", "the image sets HF_HUB_OFFLINE: unset it"
            cache = env.get("HF_HUB_CACHE", {}).get("value")
            if cache:  # hard links from the cache into DEST need one filesystem
                assert mount_of(cache + "/x", c, spec)[0] is mount, f"{c['name']}: HF_HUB_CACHE not on DEST's volume"
            token = env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert token == {"name": "sdxl-hf-token", "key": "token", "optional": True}, token


@pytest.mark.parametrize("overlay", DEPLOY_TARGETS)
@pytest.mark.parametrize("target", JOB_TARGETS)
def test_the_job_writes_exactly_the_models_the_stages_load(renders, target, overlay):
    written = set()
    for spec, c in job_containers(renders[target]):
        _, volume, inside = mount_of(c["args"][1], c, spec)
        written.add((volume["persistentVolumeClaim"]["claimName"], inside))
    assert written == stage_models(renders[overlay]), f"{target} writes {written}, {overlay} loads another set"
    assert image_of(renders[target]) == image_of(renders[overlay]), "the Job and the services use one image"


def test_the_rendered_commands_fill_the_stages_model_paths(renders, tiny_model_dir, tmp_path, monkeypatch):
    """weights-from-path's containers, run as rendered (in this interpreter) with each mount mapped to a folder here.

    tests/core/test_fetch.py runs the same `python -m` command in a process of its own.
    """
    source = tmp_path / "source"
    source.mkdir()
    shutil.copytree(tiny_model_dir / "base", source / "sdxl-base-1.0")
    shutil.copytree(tiny_model_dir / "refiner", source / "sdxl-refiner-1.0")
    claims = {"sdxl-weights-source": source, "sdxl-models": tmp_path / "models"}
    for spec, c in job_containers(renders["weights-from-path"]):
        local = []
        for arg in c["args"]:
            _, volume, inside = mount_of(arg, c, spec)
            local.append(str(claims[volume["persistentVolumeClaim"]["claimName"]] / inside))
        python, flag, module = c["command"]
        assert (python, flag) == ("python", "-m")
        monkeypatch.setattr(sys, "argv", [module, *local])
        monkeypatch.delitem(sys.modules, module, raising=False)  # as in a fresh `python -m`
        with pytest.raises(SystemExit) as exit_:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        assert exit_.value.code == 0, f"{c['name']}: exit {exit_.value.code}"
    for claim, inside in stage_models(renders["overlays/cluster"]):
        assert (claims[claim] / inside / "model_index.json").is_file(), f"the stages' {inside} was not written"
    assert sorted(p.name for p in Path(claims["sdxl-models"]).iterdir()) == ["sdxl-base-1.0", "sdxl-refiner-1.0"]
