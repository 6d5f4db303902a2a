import os
import shutil

import pytest

from .k8s import DEPLOY_TARGETS, JOB_TARGETS, render

KUBECTL_INSTALL = "install kubectl (https://kubernetes.io/docs/tasks/tools/; it includes kustomize)"


def require_tool(name: str, why: str, install: str) -> str:
    """The tool's path. Without it: skip, or fail under CI (the CI variable set), where a skip would hide a gap."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not on PATH; {why}: {install}"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (CI is set, so this fails rather than skips)", pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def kubectl() -> str:
    """kubectl, which renders deploy/k8s (`kubectl kustomize`, offline)."""
    return require_tool("kubectl", "the deploy tests render deploy/k8s with `kubectl kustomize`", KUBECTL_INSTALL)


@pytest.fixture(scope="session")
def renders(kubectl, tmp_path_factory) -> dict[str, list[dict]]:
    """Every target rendered once: the overlays, each with the TLS component, and the weights Jobs."""
    workdir = tmp_path_factory.mktemp("kustomize")
    return {t: render(t, workdir) for t in [*DEPLOY_TARGETS, *JOB_TARGETS]}


@pytest.fixture(params=DEPLOY_TARGETS)
def rendered(request, renders) -> tuple[str, list[dict]]:
    return request.param, renders[request.param]
