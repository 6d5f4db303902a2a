"""HorizontalPodAutoscalers (overlays/cluster) and the metrics they read, against the services' own metrics.

The chain is: the services export gauges (sdxl_services.metrics) -> Prometheus scrapes the pods' metrics
port (monitoring/podmonitor.yaml) -> prometheus-adapter serves them per pod (monitoring/
prometheus-adapter.yaml) -> the HPAs read them. Each link is checked against the next.
"""

from __future__ import annotations

import prometheus_client
import pytest
import yaml

from .k8s import K8S, containers, needs_kubectl, of_kind, pod_labels, selects

pytestmark = needs_kubectl

CLUSTER = ["overlays/cluster", "overlays/cluster+tls"]
ADAPTER = K8S / "monitoring" / "prometheus-adapter.yaml"
POD_MONITOR = K8S / "monitoring" / "podmonitor.yaml"


def service_metrics() -> dict[str, str]:
    """{family name: type} of every metric the services register with prometheus_client."""
    import sdxl_services.metrics  # noqa: F401  (registers the services' metrics)

    return {m.name: m.type for m in prometheus_client.REGISTRY.collect()}


def adapter_rules() -> list[dict]:
    (config_map,) = [d for d in yaml.safe_load_all(ADAPTER.read_text()) if d]
    return yaml.safe_load(config_map["data"]["config.yaml"])["rules"]


def hpas_by_target(docs: list[dict]) -> dict[str, dict]:
    found = {}
    for hpa in of_kind(docs, "HorizontalPodAutoscaler").values():
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["apiVersion"], ref["kind"]) == ("apps/v1", "Deployment"), hpa["metadata"]["name"]
        assert ref["name"] not in found, f"two HPAs scale {ref['name']}"
        found[ref["name"]] = hpa
    return found


@pytest.mark.parametrize("target", CLUSTER)
def test_every_deployment_has_one_autoscaler_that_owns_its_replicas(renders, target):
    docs = renders[target]
    hpas = hpas_by_target(docs)
    deployments = of_kind(docs, "Deployment")
    assert set(hpas) == set(deployments), f"HPAs target {sorted(hpas)}, Deployments are {sorted(deployments)}"
    for name, dep in deployments.items():
        # With spec.replicas in the manifest, every `kubectl apply` would reset what the HPA chose.
        assert "replicas" not in dep["spec"], f"{name}: spec.replicas set although an HPA scales it"
        spec = hpas[name]["spec"]
        assert 1 <= spec["minReplicas"] <= spec["maxReplicas"], f"{name}: min/max {spec}"


@pytest.mark.parametrize("target", CLUSTER)
def test_base_scales_within_four_times_the_refiners_bounds(renders, target):
    hpas = hpas_by_target(renders[target])
    base, refiner = hpas["sdxl-base"]["spec"], hpas["sdxl-refiner"]["spec"]
    assert base["minReplicas"] == 4 * refiner["minReplicas"], "the 80/20 ensemble split at equal step cost"
    assert base["maxReplicas"] == 4 * refiner["maxReplicas"]


@pytest.mark.parametrize("target", CLUSTER)
def test_stages_scale_on_the_requests_they_hold_and_the_orchestrator_on_cpu(renders, target):
    docs = renders[target]
    hpas = hpas_by_target(docs)
    for dep, _, c, args in containers(docs):
        metrics = hpas[dep["metadata"]["name"]]["spec"]["metrics"]
        kinds = {m["type"] for m in metrics}
        if args.stage == "orchestrator":
            assert kinds == {"Resource"} and metrics[0]["resource"]["name"] == "cpu"
            assert c["resources"]["requests"].get("cpu"), "CPU utilization is relative to the CPU request"
        else:
            assert kinds == {"Pods"}, f"{args.stage}: scale on the requests each pod's engine holds, got {kinds}"
            names = {m["pods"]["metric"]["name"] for m in metrics}
            assert "sdxl_inflight_requests" in names, f"{args.stage}: {names}"
            assert all(m["pods"]["target"]["type"] == "AverageValue" for m in metrics)


def pod_metric_names(renders) -> set[str]:
    hpas = [h for t in CLUSTER for h in of_kind(renders[t], "HorizontalPodAutoscaler").values()]
    return {m["pods"]["metric"]["name"] for h in hpas for m in h["spec"]["metrics"] if m["type"] == "Pods"}


def test_hpa_metrics_are_gauges_the_services_export(renders):
    defined = service_metrics()
    for name in pod_metric_names(renders):
        assert name in defined, f"HPA metric {name} is not defined in sdxl_services.metrics"
        assert defined[name] == "gauge", f"{name} is a {defined[name]}: an average over pods needs a gauge"


def test_the_adapter_serves_every_hpa_metric_per_pod_from_service_metrics(renders):
    defined = service_metrics()
    served = {}
    for rule in adapter_rules():
        series = rule["seriesQuery"].strip("'\"").split("{")[0]
        assert series in defined, f"prometheus-adapter rule reads {series}, which the services do not export"
        overrides = rule["resources"]["overrides"]
        assert overrides["pod"]["resource"] == "pod" and overrides["namespace"]["resource"] == "namespace"
        assert all(f"<<.{p}>>" in rule["metricsQuery"] for p in ("Series", "LabelMatchers", "GroupBy"))
        served[rule["name"]["as"]] = series
    missing = pod_metric_names(renders) - set(served)
    assert not missing, f"no prometheus-adapter rule serves the HPA metrics {missing}"


def test_the_pod_monitor_scrapes_every_deployments_metrics_port(renders):
    monitor = yaml.safe_load(POD_MONITOR.read_text())
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    for target in CLUSTER:
        for dep, _, c, args in containers(renders[target]):
            assert selects(monitor["spec"]["selector"], pod_labels(dep)), f"PodMonitor misses {dep['metadata']['name']}"
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert ports.get(endpoint["port"]) == args.metrics_port, f"{dep['metadata']['name']}: no {endpoint['port']}"
