"""The TLS component (deploy/k8s/components/tls): stage servers and the orchestrator's stage channels agree.

With the component, every stage server must serve TLS from the `sdxl-tls` Secret and require client
certificates, and the orchestrator must trust that CA and present a client certificate; without it,
neither side may be half-configured. Probes and ports are checked with the rest in test_manifests.
"""

from __future__ import annotations

import pytest

from .k8s import DEPLOY_TARGETS, containers, mount_of, needs_kubectl, stage_deployments

pytestmark = needs_kubectl

SECRET = "sdxl-tls"
WITH_TLS = [t for t in DEPLOY_TARGETS if t.endswith("+tls")]
# flag -> the Secret key its file must be
SERVER_FILES = {"tls_cert": "tls.crt", "tls_key": "tls.key", "tls_client_ca": "ca.crt"}
CLIENT_FILES = {"stage_tls_ca": "ca.crt", "stage_tls_cert": "tls.crt", "stage_tls_key": "tls.key"}


def secret_file(path: str, container: dict, spec: dict) -> tuple[str, str]:
    """(Secret name, key) that `path` reads, via a read-only secret volume mount."""
    mount, volume, key = mount_of(path, container, spec)
    assert "secret" in volume, f"{container['name']}: {path} is not on a Secret volume"
    assert mount.get("readOnly"), f"{container['name']}: the TLS Secret is mounted read-write"
    return volume["secret"]["secretName"], key


@pytest.mark.parametrize("target", WITH_TLS)
def test_stage_servers_serve_mtls_from_the_secret(renders, target):
    for stage, (_, spec, c, args) in stage_deployments(renders[target]).items():
        if stage == "orchestrator":
            continue
        for flag, key in SERVER_FILES.items():
            path = getattr(args, flag)
            assert path, f"{stage}: no --{flag.replace('_', '-')}"
            assert secret_file(path, c, spec) == (SECRET, key), f"{stage}: --{flag.replace('_', '-')} {path}"


@pytest.mark.parametrize("target", WITH_TLS)
def test_the_orchestrator_trusts_the_ca_and_presents_a_client_certificate(renders, target):
    _, spec, c, args = stage_deployments(renders[target])["orchestrator"]
    for flag, key in CLIENT_FILES.items():
        path = getattr(args, flag)
        assert path, f"orchestrator: no --{flag.replace('_', '-')}"
        assert secret_file(path, c, spec) == (SECRET, key), f"orchestrator: --{flag.replace('_', '-')} {path}"


def test_both_ends_of_the_stage_channels_agree(rendered):
    """Stage servers on TLS <=> the orchestrator dials TLS; client certs required => the orchestrator has one."""
    target, docs = rendered
    deployments = stage_deployments(docs)
    *_, orch = deployments["orchestrator"]
    for stage, (*_, args) in deployments.items():
        if stage == "orchestrator":
            continue
        tls = bool(args.tls_cert)
        assert tls == bool(orch.stage_tls_ca), f"{target}: {stage} TLS {tls}, orchestrator not"
        if args.tls_client_ca:
            assert orch.stage_tls_cert and orch.stage_tls_key, f"{target}: {stage} requires a client certificate"


@pytest.mark.parametrize("target", WITH_TLS)
def test_the_component_changes_only_the_deployments_tls_settings(renders, target):
    plain, with_tls = renders[target.removesuffix("+tls")], renders[target]
    assert [d for d in plain if d["kind"] != "Deployment"] == [d for d in with_tls if d["kind"] != "Deployment"]
    before = {dep["metadata"]["name"]: c["args"] for dep, _, c, _ in containers(plain)}
    for dep, _, c, _ in containers(with_tls):
        old = before[dep["metadata"]["name"]]
        assert c["args"][:len(old)] == old, f"{dep['metadata']['name']}: the component changed existing args"
        added = c["args"][len(old):]
        assert added and all(a.startswith(("--tls-", "--stage-tls-", "--health-port=")) for a in added), added
