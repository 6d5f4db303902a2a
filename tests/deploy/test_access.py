"""Access in the manifests: every server listens on every interface (the code's default is loopback) and requires
the bearer token from the `sdxl-auth-token` Secret, and the orchestrator sends the stages the token they require."""

from __future__ import annotations

from .k8s import containers, mount_of, needs_kubectl, stage_deployments

pytestmark = needs_kubectl

SECRET = ("sdxl-auth-token", "token")


def token_secret(path: str, container: dict, spec: dict) -> tuple[str, str]:
    """(Secret name, key) of the token file `path`, via a read-only secret volume mount."""
    mount, volume, inside = mount_of(path, container, spec)
    assert "secret" in volume, f"{container['name']}: {path} is not on a Secret volume"
    assert mount.get("readOnly"), f"{container['name']}: the token Secret is mounted read-write"
    keys = {item["path"]: item["key"] for item in volume["secret"].get("items", [])}
    return volume["secret"]["secretName"], keys.get(inside, inside)


def test_every_server_listens_on_every_interface(rendered):
    _, docs = rendered
    for dep, _, _, args in containers(docs):
        host = args.address.rsplit(":", 1)[0]
        assert host in ("[::]", "0.0.0.0"), f"{dep['metadata']['name']}: --address {args.address} (loopback default?)"


def test_every_server_requires_the_token_from_the_secret(rendered):
    _, docs = rendered
    for dep, spec, c, args in containers(docs):
        name = dep["metadata"]["name"]
        assert args.auth_token_file, f"{name}: no --auth-token-file: anyone reaching the port may call it"
        assert token_secret(args.auth_token_file, c, spec) == SECRET, f"{name}: --auth-token-file"


def test_the_orchestrator_sends_the_stages_their_token(rendered):
    _, docs = rendered
    _, spec, c, orch = stage_deployments(docs)["orchestrator"]
    sent = orch.stage_auth_token_file or orch.auth_token_file  # stage.py stage_token()
    assert sent and token_secret(sent, c, spec) == SECRET
