"""NetworkPolicies and PodDisruptionBudgets of the rendered manifests, evaluated against the pods they govern.

The NetworkPolicies are evaluated as Kubernetes does (a pod selected by an Ingress policy admits only
what some rule of those policies allows) for a set of sources, and the result is compared port by port
with who should get in: the orchestrator to the stages' gRPC port, anyone to the orchestrator's gRPC
port, Prometheus to the metrics ports, nobody to anything else (kubelet probes come from the node, which
NetworkPolicy always admits).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from .k8s import containers, needs_kubectl, of_kind, pod_labels, selects

pytestmark = needs_kubectl

HERE = {"kubernetes.io/metadata.name": "sdxl"}
ELSEWHERE = {"kubernetes.io/metadata.name": "clients"}
PROMETHEUS = {"app.kubernetes.io/name": "prometheus"}  # kube-prometheus-stack's pods, the base's default peer
MONITORING = {"kubernetes.io/metadata.name": "monitoring"}


@dataclass(frozen=True)
class Source:
    name: str
    labels: dict = field(hash=False)
    namespace: dict = field(hash=False)


def sources(docs: list[dict]) -> list[Source]:
    """Every sdxl pod, the orchestrator's labels in another namespace, clients, Prometheus."""
    found = [Source(args.stage, pod_labels(dep), HERE) for dep, _, _, args in containers(docs)]
    orchestrator = next(s for s in found if s.name == "orchestrator")
    return [*found, Source("orchestrator-lookalike", orchestrator.labels, ELSEWHERE),
            Source("client", {"app": "client"}, ELSEWHERE), Source("client-here", {"app": "client"}, HERE),
            Source("prometheus", PROMETHEUS, MONITORING)]


def isolating(policies: list[dict], labels: dict) -> list[dict]:
    return [p for p in policies
            if selects(p["spec"]["podSelector"], labels) and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]


def port_matches(rule: dict, port: int, named: dict[str, int]) -> bool:
    if not rule.get("ports"):
        return True  # no ports: every port
    for entry in rule["ports"]:
        p = entry.get("port")
        number = named.get(p) if isinstance(p, str) else p
        if entry.get("protocol", "TCP") == "TCP" and (p is None or (
                number is not None and number <= port <= entry.get("endPort", number))):
            return True
    return False


def peer_matches(rule: dict, source: Source) -> bool:
    if not rule.get("from"):
        return True  # no peers: from anywhere
    for peer in rule["from"]:
        if "ipBlock" in peer:
            return True  # an address range may hold any source: count it as admitting
        ns_selector = peer.get("namespaceSelector")
        in_namespace = source.namespace == HERE if ns_selector is None else selects(ns_selector, source.namespace)
        if in_namespace and selects(peer.get("podSelector", {}), source.labels):
            return True
    return False


def admitted(policies: list[dict], labels: dict, named: dict[str, int], port: int, docs: list[dict]) -> set[str]:
    """Names of the sources that may open a TCP connection to `port` of a pod with `labels`."""
    selecting = isolating(policies, labels)
    return {s.name for s in sources(docs) if not selecting or any(
        port_matches(rule, port, named) and peer_matches(rule, s)
        for p in selecting for rule in p["spec"].get("ingress", []))}


def expected(stage: str, port_name: str, everyone: set[str]) -> set[str]:
    if port_name == "grpc":
        return everyone if stage == "orchestrator" else {"orchestrator"}
    if port_name == "metrics":
        return {"prometheus"}
    return set()  # health (plaintext, for kubelet probes) and anything else


def test_each_port_admits_exactly_its_clients(rendered):
    _, docs = rendered
    policies = list(of_kind(docs, "NetworkPolicy").values())
    everyone = {s.name for s in sources(docs)}
    for dep, _, c, args in containers(docs):
        named = {p["name"]: p["containerPort"] for p in c["ports"]}
        for port_name, port in named.items():
            got = admitted(policies, pod_labels(dep), named, port, docs)
            want = expected(args.stage, port_name, everyone)
            assert got == want, f"{dep['metadata']['name']} port {port_name} ({port}): admits {got}, want {want}"


def test_an_sdxl_pod_without_its_own_policy_admits_nothing(rendered):
    _, docs = rendered
    policies = list(of_kind(docs, "NetworkPolicy").values())
    for labels in ({"app.kubernetes.io/name": "sdxl", "app.kubernetes.io/component": "new-stage"},
                   pod_labels(of_kind(docs, "Deployment")["sdxl-base"])):
        assert admitted(policies, labels, {}, 8080, docs) == set(), f"{labels}: not default-deny"


def test_policy_ports_exist_on_the_pods_they_select(rendered):
    _, docs = rendered
    for policy in of_kind(docs, "NetworkPolicy").values():
        for dep, _, c, _ in containers(docs):
            if not selects(policy["spec"]["podSelector"], pod_labels(dep)):
                continue
            declared = {p["name"] for p in c["ports"]} | {p["containerPort"] for p in c["ports"]}
            for rule in policy["spec"].get("ingress", []):
                for entry in rule.get("ports", []):
                    assert entry["port"] in declared, (
                        f"NetworkPolicy {policy['metadata']['name']}: port {entry['port']} is not a port of "
                        f"{dep['metadata']['name']} ({sorted(map(str, declared))})")


def effective_min_replicas(docs: list[dict], dep: dict) -> int:
    hpa = [h for h in of_kind(docs, "HorizontalPodAutoscaler").values()
           if h["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]]
    return hpa[0]["spec"].get("minReplicas", 1) if hpa else dep["spec"].get("replicas", 1)


def test_one_disruption_budget_per_deployment_that_lets_a_drain_proceed(rendered):
    _, docs = rendered
    budgets = of_kind(docs, "PodDisruptionBudget")
    deployments = of_kind(docs, "Deployment")
    for name, dep in deployments.items():
        mine = [b for b in budgets.values() if selects(b["spec"]["selector"], pod_labels(dep))]
        assert len(mine) == 1, f"{name}: {len(mine)} PodDisruptionBudgets select it"
        (budget,) = mine
        others = [n for n, d in deployments.items() if n != name and selects(budget["spec"]["selector"], pod_labels(d))]
        assert not others, f"PodDisruptionBudget {budget['metadata']['name']} also selects {others}"
        replicas = effective_min_replicas(docs, dep)
        spec = budget["spec"]
        if "maxUnavailable" in spec:
            assert spec["maxUnavailable"] == 1, f"{name}: take one pod of a stage at a time"
        else:
            assert spec["minAvailable"] < replicas, f"{name}: minAvailable {spec['minAvailable']} blocks every drain"


@pytest.mark.parametrize("source", ["base", "client-here"])
def test_stages_do_not_reach_each_other(renders, source):
    docs = renders["overlays/cluster"]
    policies = list(of_kind(docs, "NetworkPolicy").values())
    vae = of_kind(docs, "Deployment")["sdxl-vae"]
    named = {p["name"]: p["containerPort"] for p in vae["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert source not in admitted(policies, pod_labels(vae), named, named["grpc"], docs)
