import pytest

from .k8s import DEPLOY_TARGETS, JOB_TARGETS, render


@pytest.fixture(scope="session")
def renders(tmp_path_factory) -> dict[str, list[dict]]:
    """Every target rendered once: the overlays, each with the TLS component, and the weights Jobs."""
    workdir = tmp_path_factory.mktemp("kustomize")
    return {t: render(t, workdir) for t in [*DEPLOY_TARGETS, *JOB_TARGETS]}


@pytest.fixture(params=DEPLOY_TARGETS)
def rendered(request, renders) -> tuple[str, list[dict]]:
    return request.param, renders[request.param]
