"""The rendered Kubernetes manifests (deploy/k8s, kustomize) against the code: no drift.

Renders the base and each overlay, as shipped and with the TLS component, with `kubectl kustomize`
(offline) and checks that every container's args parse with the stage's own argument parser, that
ports, probes, grace periods, Services and the orchestrator's dns:/// targets agree with each other
and with the services' defaults.
"""

from __future__ import annotations

from urllib.parse import urlparse

from sdxl_services.stage import STAGES, server_options

from .k8s import GPU_STAGES, STAGE_FLAGS, containers, mount_of, needs_kubectl, of_kind, port_of, stage_deployments

PRESTOP_MARGIN_S = 5  # the last responses' flush and process exit, beyond preStop + drain

pytestmark = needs_kubectl


def test_every_stage_deployed_once(rendered):
    _, docs = rendered
    assert set(stage_deployments(docs)) == set(STAGES)


def test_ports_and_probes_match_address(rendered):
    _, docs = rendered
    for dep, _, c, args in containers(docs):
        name = dep["metadata"]["name"]
        port = port_of(args.address)
        assert port != 0, f"{name}: --address needs a fixed port"
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports.get("grpc") == port, f"{name}: containerPort 'grpc' {ports.get('grpc')} != --address {port}"
        if args.metrics_port is not None:
            assert ports.get("metrics") == args.metrics_port, f"{name}: metrics containerPort != --metrics-port"
        # With TLS on, kubelet's gRPC probes (plaintext) need the plaintext health-only port.
        health = args.health_port
        if args.tls_cert:
            assert health and health != port, f"{name}: TLS on {port} needs --health-port for the probes"
        if health:
            assert ports.get("health") == health, f"{name}: containerPort 'health' != --health-port {health}"
        probe_port = health or port
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert probe in c, f"{name}: no {probe}"
            assert c[probe].get("grpc", {}).get("port") == probe_port, (
                f"{name}: {probe} is not grpc on port {probe_port}")


def test_startup_probe_allows_weight_loading(rendered):
    _, docs = rendered
    for dep, _, c, args in containers(docs):
        if args.stage == "orchestrator":
            continue
        p = c["startupProbe"]
        budget = p.get("failureThreshold", 3) * p.get("periodSeconds", 10) + p.get("initialDelaySeconds", 0)
        assert budget >= 600, f"{dep['metadata']['name']}: startupProbe allows {budget} s, weights need up to 10 min"


def test_grace_period_covers_prestop_and_drain(rendered):
    _, docs = rendered
    for dep, spec, c, args in containers(docs):
        drain = server_options(args).grace_s
        pre = c.get("lifecycle", {}).get("preStop")
        assert pre, f"{dep['metadata']['name']}: no preStop to let endpoints update before draining"
        command = pre["exec"]["command"]
        assert command[0] == "sleep", f"{dep['metadata']['name']}: preStop {command}"
        sleep_s = float(command[1])
        period = spec.get("terminationGracePeriodSeconds", 30)
        assert period >= sleep_s + drain + PRESTOP_MARGIN_S, (
            f"{dep['metadata']['name']}: terminationGracePeriodSeconds {period} < preStop {sleep_s} + drain {drain}"
            f" + {PRESTOP_MARGIN_S}")


def test_services_select_their_stage_and_port(rendered):
    _, docs = rendered
    services = of_kind(docs, "Service")
    deployments = stage_deployments(docs)
    for stage, (dep, _, c, args) in deployments.items():
        labels = dep["spec"]["template"]["metadata"]["labels"]
        matching = [s for s in services.values() if s["spec"]["selector"].items() <= labels.items()]
        assert len(matching) == 1, f"{stage}: {len(matching)} Services select it"
        svc = matching[0]
        (port,) = svc["spec"]["ports"]
        target = port["targetPort"]
        assert target == "grpc" or target == port_of(args.address), f"{stage}: Service targetPort {target}"
        if stage == "orchestrator":
            assert svc["spec"].get("clusterIP") != "None", "the orchestrator's Service is for clients: ClusterIP"
        else:
            assert svc["spec"].get("clusterIP") == "None", f"{stage}: stage Services must be headless for dns:///"


def test_orchestrator_targets_name_stage_services(rendered):
    _, docs = rendered
    services = of_kind(docs, "Service")
    deployments = stage_deployments(docs)
    *_, orch = deployments["orchestrator"]
    for stage, flag in STAGE_FLAGS.items():
        target = getattr(orch, stage)
        assert target, f"orchestrator: no {flag}"
        url = urlparse(target)
        assert url.scheme == "dns" and url.netloc == "", f"orchestrator {flag}={target}: want dns:///NAME:PORT"
        host, port = url.path.lstrip("/").rsplit(":", 1)
        name = host.split(".")[0]
        assert name in services, f"orchestrator {flag}: no Service {name}"
        svc = services[name]
        (svc_port,) = svc["spec"]["ports"]
        assert svc_port["port"] == int(port), f"orchestrator {flag}: port {port} != Service {name}'s {svc_port}"
        dep, _, _, args = deployments[stage]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= labels.items(), f"orchestrator {flag}: {name} selects no {stage}"
        assert svc_port["targetPort"] in ("grpc", port_of(args.address))


def test_devices_match_gpu_requests(rendered):
    _, docs = rendered
    for dep, spec, c, args in containers(docs):
        name = dep["metadata"]["name"]
        limits = c.get("resources", {}).get("limits", {})
        gpus = int(limits.get("nvidia.com/gpu", 0))
        if args.stage in GPU_STAGES:
            assert gpus == 1, f"{name}: a GPU stage requests nvidia.com/gpu: 1, got {gpus}"
            assert args.device == "cuda:0", f"{name}: one visible GPU is cuda:0, got --device {args.device}"
            assert any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", [])), f"{name}: toleration"
        if args.device.startswith("cuda"):
            assert gpus >= int(args.device.partition(":")[2] or 0) + 1, f"{name}: --device {args.device} without GPU"
        elif args.stage != "orchestrator":
            assert args.dtype != "float16", f"{name}: float16 on CPU"


def test_models_come_from_the_readonly_volume(rendered):
    _, docs = rendered
    claims = of_kind(docs, "PersistentVolumeClaim")
    for dep, spec, c, args in containers(docs):
        if args.stage == "orchestrator":
            continue
        name = dep["metadata"]["name"]
        assert args.model, f"{name}: no --model would load the tiny test model"
        for path in filter(None, (args.model, args.refiner_model)):
            mount, volume, _ = mount_of(path, c, spec)
            assert mount.get("readOnly"), f"{name}: the models volume is mounted read-write"
            claim = volume["persistentVolumeClaim"]["claimName"]
            assert "ReadOnlyMany" in claims[claim]["spec"]["accessModes"]


def test_container_security(rendered):
    _, docs = rendered
    for dep, spec, c, _ in containers(docs):
        assert spec.get("securityContext", {}).get("runAsNonRoot"), dep["metadata"]["name"]
        assert c.get("securityContext", {}).get("allowPrivilegeEscalation") is False, dep["metadata"]["name"]


def test_single_node_overlay(renders):
    docs = renders["overlays/single-node"]
    assert {dep["spec"].get("replicas", 1) for dep, *_ in containers(docs)} == {1}
    assert not of_kind(docs, "HorizontalPodAutoscaler"), "one node's GPUs are fixed: nothing to autoscale"
    hosts = set()
    for dep, spec, _, args in containers(docs):
        hosts.add(spec.get("nodeSelector", {}).get("kubernetes.io/hostname"))
        if args.stage in GPU_STAGES:  # no spare GPU for a surge pod during a rollout
            assert dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    assert len(hosts) == 1 and None not in hosts, f"single-node pins every stage to one node, got {hosts}"
