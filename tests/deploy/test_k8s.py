"""k8s/: render both overlays offline, validate every manifest against the Kubernetes schemas, and
check that the pieces fit (selectors, references, probes, resources, GPUs, images, security)."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.deploy.kustomize import Manifest, object_id, pod_specs, render, split_image

REPO = Path(__file__).resolve().parents[2]
OVERLAYS = {"dev": REPO / "k8s" / "overlays" / "dev", "prod": REPO / "k8s" / "overlays" / "prod"}
# Oldest Kubernetes minor still supported by the major clouds, and the newest the validator knows.
SCHEMA_VERSIONS = ("1.30.0", "1.37.0")
# Created out of band in production (docs/deploying.md); the prod overlay must not render it.
EXTERNAL_SECRETS = {"dev": set(), "prod": {"alignd-secrets"}}
HEARTBEAT_PROBE = "/app/deploy/scripts/worker-heartbeat-check.sh"
PRESTOP = "/app/deploy/scripts/worker-prestop.sh"
WAIT_FOR_MIGRATIONS = "/app/deploy/scripts/wait_for_migrations.py"
WORKLOADS = {"Deployment", "StatefulSet", "Job"}


@pytest.fixture(scope="module", params=sorted(OVERLAYS))
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[Manifest]]:
    return request.param, render(OVERLAYS[request.param])


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Manifest]]:
    return {name: render(path) for name, path in OVERLAYS.items()}


# ---- helpers -------------------------------------------------------------------------------------

def of_kind(manifests: list[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def named(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    found = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def containers(manifest: Manifest, *, init: bool = True) -> list[Manifest]:
    result = []
    for spec in pod_specs(manifest):
        result += (spec.get("initContainers", []) if init else []) + spec.get("containers", [])
    return result


def template_labels(manifest: Manifest) -> dict[str, str]:
    return manifest["spec"]["template"]["metadata"].get("labels", {})


def config(manifests: list[Manifest]) -> dict[str, str]:
    return named(manifests, "ConfigMap", "alignd-config")["data"]


def workers(manifests: list[Manifest]) -> list[tuple[Manifest, Manifest]]:
    """(Deployment, container) for every container that runs `alignd worker`."""
    return [(m, c) for m in of_kind(manifests, "Deployment") for c in containers(m, init=False)
            if c.get("args", [None])[0] == "worker"]


def queues(container: Manifest) -> list[str]:
    args = container["args"]
    return args[args.index("--queues") + 1].split(",")


def gpu_workers(manifests: list[Manifest]) -> list[tuple[Manifest, Manifest]]:
    return [(m, c) for m, c in workers(manifests) if any(q.startswith("gpu") for q in queues(c))]


def mounts(manifest: Manifest, container: Manifest) -> dict[str, tuple[str, bool]]:
    """mountPath -> (claim name or volume kind, read-only) for one container."""
    volumes = {v["name"]: v for spec in pod_specs(manifest) for v in spec.get("volumes", [])}
    result = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        claim = volume.get("persistentVolumeClaim", {}).get("claimName")
        result[mount["mountPath"]] = (claim or next(iter(set(volume) - {"name"})), bool(mount.get("readOnly")))
    return result


def vllm_deployments(manifests: list[Manifest]) -> list[Manifest]:
    return [m for m in of_kind(manifests, "Deployment")
            if template_labels(m).get("app.kubernetes.io/component") == "model-server"]


def arg_value(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


# ---- rendering and schemas -----------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("name", sorted(OVERLAYS))
def test_renderer_matches_kubectl_kustomize(name: str) -> None:
    result = subprocess.run(["kubectl", "kustomize", str(OVERLAYS[name])], capture_output=True, text=True,
                            timeout=60, check=True)
    theirs = {object_id(m): m for m in yaml.safe_load_all(result.stdout) if m}
    ours = {object_id(m): m for m in render(OVERLAYS[name])}
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert ours[key] == theirs[key], f"{key} renders differently"


def test_every_manifest_is_schema_valid(overlay: tuple[str, list[Manifest]]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="dev extra: kubernetes-validate")
    _, manifests = overlay
    for manifest in manifests:
        for version in SCHEMA_VERSIONS:
            # strict: unknown fields (a misspelt probe, a field at the wrong level) are errors.
            kubernetes_validate.validate(manifest, version, strict=True)


def test_schema_validation_catches_a_misplaced_field(rendered: dict[str, list[Manifest]]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="dev extra: kubernetes-validate")
    api = copy.deepcopy(named(rendered["prod"], "Deployment", "alignd-api"))
    container = api["spec"]["template"]["spec"]["containers"][0]
    container["livenessProbes"] = container.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(api, SCHEMA_VERSIONS[-1], strict=True)


def test_overlays_share_one_namespace_each(overlay: tuple[str, list[Manifest]]) -> None:
    name, manifests = overlay
    assert {m["metadata"].get("namespace") for m in manifests} == {"alignd" if name == "prod" else "alignd-dev"}


# ---- the pieces fit ------------------------------------------------------------------------------

def test_workload_selectors_match_their_pod_templates(overlay: tuple[str, list[Manifest]]) -> None:
    _, manifests = overlay
    for manifest in of_kind(manifests, "Deployment") + of_kind(manifests, "StatefulSet"):
        selector = manifest["spec"]["selector"]["matchLabels"]
        assert selector, object_id(manifest)
        assert selector.items() <= template_labels(manifest).items(), object_id(manifest)
    for statefulset in of_kind(manifests, "StatefulSet"):
        service = named(manifests, "Service", statefulset["spec"]["serviceName"])
        assert service["spec"].get("clusterIP") == "None", "a StatefulSet's governing Service is headless"


def test_services_select_pods_that_exist_on_named_ports(overlay: tuple[str, list[Manifest]]) -> None:
    _, manifests = overlay
    workloads = of_kind(manifests, "Deployment") + of_kind(manifests, "StatefulSet")
    for service in of_kind(manifests, "Service"):
        selector = service["spec"]["selector"]
        selected = [w for w in workloads if selector.items() <= template_labels(w).items()]
        assert len(selected) == 1, f"Service {service['metadata']['name']} selects {len(selected)} workloads"
        ports = {p.get("name"): p["containerPort"] for c in containers(selected[0], init=False)
                 for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert target in ports or target in ports.values(), f"{service['metadata']['name']}: {target}"


def test_referenced_configmaps_secrets_and_claims_exist(overlay: tuple[str, list[Manifest]]) -> None:
    name, manifests = overlay
    present = {kind: {m["metadata"]["name"] for m in of_kind(manifests, kind)}
               for kind in ("ConfigMap", "Secret", "PersistentVolumeClaim", "ServiceAccount")}
    wanted: dict[str, set[str]] = {kind: set() for kind in present}
    for manifest in manifests:
        for spec in pod_specs(manifest):
            wanted["ServiceAccount"].add(spec.get("serviceAccountName", "default"))
            for volume in spec.get("volumes", []):
                if "persistentVolumeClaim" in volume:
                    wanted["PersistentVolumeClaim"].add(volume["persistentVolumeClaim"]["claimName"])
                if "configMap" in volume:
                    wanted["ConfigMap"].add(volume["configMap"]["name"])
                if "secret" in volume:
                    wanted["Secret"].add(volume["secret"]["secretName"])
        for container in containers(manifest):
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    wanted["ConfigMap"].add(source["configMapRef"]["name"])
                if "secretRef" in source:
                    wanted["Secret"].add(source["secretRef"]["name"])
            for env in container.get("env", []):
                ref = env.get("valueFrom", {})
                if "configMapKeyRef" in ref:
                    wanted["ConfigMap"].add(ref["configMapKeyRef"]["name"])
                if "secretKeyRef" in ref:
                    wanted["Secret"].add(ref["secretKeyRef"]["name"])
    wanted["ServiceAccount"].discard("default")  # the Postgres and Redis pods use the namespace's
    assert wanted["Secret"] - present["Secret"] == EXTERNAL_SECRETS[name]
    assert not present["Secret"] & EXTERNAL_SECRETS[name], "the out-of-band Secret must not be rendered"
    for kind in ("ConfigMap", "PersistentVolumeClaim", "ServiceAccount"):
        assert wanted[kind] <= present[kind], f"{kind}: missing {wanted[kind] - present[kind]}"


def test_only_development_renders_secrets(rendered: dict[str, list[Manifest]]) -> None:
    assert of_kind(rendered["prod"], "Secret") == []
    for secret in of_kind(rendered["dev"], "Secret"):
        for value in secret["stringData"].values():
            if "password" in value or "secret" in value:
                assert "dev-only" in value, f"{secret['metadata']['name']} holds a non-placeholder secret"


def test_dev_secrets_point_at_the_dev_database_and_broker(rendered: dict[str, list[Manifest]]) -> None:
    manifests = rendered["dev"]
    secrets = named(manifests, "Secret", "alignd-secrets")["stringData"]
    credentials = named(manifests, "Secret", "postgres-credentials")["stringData"]
    database = urlsplit(secrets["ALIGND_DATABASE_URL"])
    assert database.scheme == "postgresql+psycopg"
    assert (database.username, database.password, database.path.lstrip("/")) == (
        credentials["POSTGRES_USER"], credentials["POSTGRES_PASSWORD"], credentials["POSTGRES_DB"])
    broker = urlsplit(secrets["ALIGND_BROKER_URL"])
    assert broker.scheme == "redis"
    for url, service_name in ((database, "postgres"), (broker, "redis")):
        service = named(manifests, "Service", service_name)
        assert url.hostname == service_name
        assert url.port in {p["port"] for p in service["spec"]["ports"]}


def test_settings_environment_per_overlay(rendered: dict[str, list[Manifest]]) -> None:
    assert config(rendered["prod"])["ALIGND_ENVIRONMENT"] == "production"
    assert config(rendered["dev"])["ALIGND_ENVIRONMENT"] == "development"
    for manifests in rendered.values():
        # Production refuses to start without these; the rest come from the Secret.
        settings = config(manifests)
        assert {"ALIGND_MODEL_ROOT", "ALIGND_ARTIFACT_ROOT", "ALIGND_VLLM_BASE_URLS"} <= settings.keys()
        assert not any(word in key for key in settings for word in ("PASSWORD", "SECRET", "DATABASE_URL"))


# ---- containers: resources, probes, security, images ---------------------------------------------

def test_every_container_has_requests_and_limits(overlay: tuple[str, list[Manifest]]) -> None:
    _, manifests = overlay
    for manifest in manifests:
        for container in containers(manifest):
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= resources.get(bound, {}).keys(), \
                    f"{object_id(manifest)} {container['name']}: {bound}"


def test_long_running_containers_have_liveness_and_readiness_probes(overlay: tuple[str, list[Manifest]]) -> None:
    # Job containers are exempt: they run to completion and a probe could only kill a migration.
    _, manifests = overlay
    for manifest in of_kind(manifests, "Deployment") + of_kind(manifests, "StatefulSet"):
        for container in containers(manifest, init=False):
            for probe in ("livenessProbe", "readinessProbe"):
                assert probe in container, f"{object_id(manifest)} {container['name']}: {probe}"


def test_api_probes_health_and_readiness_endpoints(overlay: tuple[str, list[Manifest]]) -> None:
    _, manifests = overlay
    api = named(manifests, "Deployment", "alignd-api")
    container = containers(api, init=False)[0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_workers_probe_their_heartbeat_file(overlay: tuple[str, list[Manifest]]) -> None:
    _, manifests = overlay
    assert workers(manifests)
    for manifest, container in workers(manifests):
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            command = container[probe]["exec"]["command"]
            assert command[0] == HEARTBEAT_PROBE, f"{object_id(manifest)} {probe}"
            assert int(command[1]) >= 30, "older than a few Celery heartbeats (2 s) plus a job heartbeat"
        live, ready = (int(container[p]["exec"]["command"][1]) for p in ("livenessProbe", "readinessProbe"))
        assert live > ready, "a worker leaves the ready set before it is restarted"
        assert mounts(manifest, container)["/var/lib/alignd"][0] == "emptyDir", "heartbeat file in ALIGND_HOME"


def test_containers_run_unprivileged(overlay: tuple[str, list[Manifest]]) -> None:
    _, manifests = overlay
    for manifest in manifests:
        for spec in pod_specs(manifest):
            pod_security = spec.get("securityContext", {})
            assert pod_security.get("runAsNonRoot") is True, object_id(manifest)
            assert pod_security.get("runAsUser", 0) != 0, object_id(manifest)
            assert pod_security.get("seccompProfile", {}).get("type") == "RuntimeDefault", object_id(manifest)
            assert spec.get("automountServiceAccountToken") is False, object_id(manifest)
        for container in containers(manifest):
            security = container.get("securityContext", {})
            where = f"{object_id(manifest)} {container['name']}"
            assert security.get("allowPrivilegeEscalation") is False, where
            assert security.get("readOnlyRootFilesystem") is True, where
            assert security.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not security.get("privileged"), where


def test_images_are_pinned(overlay: tuple[str, list[Manifest]]) -> None:
    name, manifests = overlay
    for manifest in manifests:
        for container in containers(manifest):
            _, tag, digest = split_image(container["image"])
            assert digest or (tag and tag != "latest" and re.search(r"\d", tag)), container["image"]
            assert container.get("imagePullPolicy") != "Always", container["image"]
    if name == "prod":
        alignd_images = {split_image(c["image"])[0] for m in manifests for c in containers(m)}
        assert alignd_images == {"registry.example.com/alignd/api", "registry.example.com/alignd/worker"}


# ---- API, migrations -----------------------------------------------------------------------------

def test_api_autoscaler_owns_the_replica_count(overlay: tuple[str, list[Manifest]]) -> None:
    _, manifests = overlay
    for hpa in of_kind(manifests, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        deployment = named(manifests, target["kind"], target["name"])
        assert "replicas" not in deployment["spec"], "an apply would reset the autoscaler's count"
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        for container in containers(deployment, init=False):
            assert "cpu" in container["resources"]["requests"], "CPU utilisation needs a CPU request"
    assert named(manifests, "HorizontalPodAutoscaler", "alignd-api")


def test_migrations_run_once_and_everything_waits_for_them(overlay: tuple[str, list[Manifest]]) -> None:
    _, manifests = overlay
    jobs = of_kind(manifests, "Job")
    assert [j["metadata"]["name"] for j in jobs] == ["alignd-migrate"]
    assert containers(jobs[0])[0]["args"] == ["db", "upgrade"]
    assert jobs[0]["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    for deployment in of_kind(manifests, "Deployment"):
        if deployment in vllm_deployments(manifests):
            continue  # vLLM does not touch the database
        init = deployment["spec"]["template"]["spec"].get("initContainers", [])
        assert any(WAIT_FOR_MIGRATIONS in c.get("command", []) for c in init), object_id(deployment)


# ---- workers -------------------------------------------------------------------------------------

def test_worker_queues_are_queues_the_application_declares(overlay: tuple[str, list[Manifest]]) -> None:
    from app.queue import DEFAULT_QUEUE, GPU_QUEUES

    _, manifests = overlay
    consumed = set()
    for _, container in workers(manifests):
        assert set(queues(container)) <= {DEFAULT_QUEUE, *GPU_QUEUES}, container["args"]
        consumed |= set(queues(container))
    assert {DEFAULT_QUEUE, "gpu"} <= consumed
    routes = json.loads(config(manifests).get("ALIGND_GPU_QUEUE_ROUTES", "[]"))
    for _, queue_name in routes:
        assert queue_name in consumed, f"jobs routed to {queue_name} but no worker consumes it"


def test_exactly_one_scheduler(overlay: tuple[str, list[Manifest]]) -> None:
    _, manifests = overlay
    beats = [(m, c) for m, c in workers(manifests) if "--beat" in c["args"]]
    assert len(beats) == 1
    deployment, container = beats[0]
    assert queues(container) == ["default"]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate", "a rollout must not run two schedulers"


def test_gpu_workers_hold_gpus_and_drain_within_the_grace_period(overlay: tuple[str, list[Manifest]]) -> None:
    _, manifests = overlay
    assert gpu_workers(manifests)
    for deployment, container in gpu_workers(manifests):
        where = object_id(deployment)
        resources = container["resources"]
        assert int(resources["limits"]["nvidia.com/gpu"]) >= 1, where
        assert resources["requests"].get("nvidia.com/gpu") == resources["limits"]["nvidia.com/gpu"], where
        spec = deployment["spec"]["template"]["spec"]
        assert spec["nodeSelector"].get("nvidia.com/gpu.present") == "true", where
        assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in spec["tolerations"])
        annotations = deployment["metadata"]["annotations"]
        step = int(annotations["alignd.io/max-step-seconds"])
        save = int(annotations["alignd.io/checkpoint-save-seconds"])
        assert spec["terminationGracePeriodSeconds"] > step + save, where
        assert container["lifecycle"]["preStop"]["exec"]["command"] == [PRESTOP], where
        assert mounts(deployment, container)["/dev/shm"][0] == "emptyDir", "NCCL needs more than 64 MiB"
        # No surge: there is no spare GPU to start the new pod on before the old one stops.
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0, where


def test_multi_gpu_pool_matches_the_accelerate_config(rendered: dict[str, list[Manifest]]) -> None:
    accelerate = yaml.safe_load((REPO / "deploy" / "accelerate" / "zero3.yaml").read_text())
    gpus = [int(c["resources"]["limits"]["nvidia.com/gpu"]) for _, c in gpu_workers(rendered["prod"])]
    assert accelerate["num_processes"] == max(gpus) > 1


# ---- shared volumes and vLLM ---------------------------------------------------------------------

def test_artifact_and_model_volumes_are_shared_at_the_configured_paths(overlay: tuple[str, list[Manifest]]) -> None:
    _, manifests = overlay
    settings = config(manifests)
    artifacts, models = settings["ALIGND_ARTIFACT_ROOT"], settings["ALIGND_MODEL_ROOT"]
    claims = {c["metadata"]["name"]: c for c in of_kind(manifests, "PersistentVolumeClaim")}
    assert "ReadWriteMany" in claims["alignd-artifacts"]["spec"]["accessModes"]
    users = [(m, c) for m, c in workers(manifests)] + [
        (m, c) for m in [named(manifests, "Deployment", "alignd-api"), *vllm_deployments(manifests)]
        for c in containers(m, init=False)]
    for manifest, container in users:
        mounted = mounts(manifest, container)
        where = f"{object_id(manifest)} {container['name']}"
        assert mounted.get(artifacts, ("", False))[0] == "alignd-artifacts", where
        assert mounted.get(models) == ("alignd-models", True), where
        is_vllm = manifest in vllm_deployments(manifests)
        assert mounted[artifacts][1] is is_vllm, f"{where}: vLLM reads artifacts, alignd writes them"


def test_vllm_serves_each_configured_base_model_with_runtime_lora(overlay: tuple[str, list[Manifest]]) -> None:
    _, manifests = overlay
    base_urls: dict[str, Any] = json.loads(config(manifests)["ALIGND_VLLM_BASE_URLS"])
    assert base_urls
    models = config(manifests)["ALIGND_MODEL_ROOT"]
    for model_name, url in base_urls.items():
        parts = urlsplit(url)
        service = named(manifests, "Service", parts.hostname)
        assert parts.port in {p["port"] for p in service["spec"]["ports"]}
        [deployment] = [d for d in vllm_deployments(manifests)
                        if service["spec"]["selector"].items() <= template_labels(d).items()]
        [container] = containers(deployment, init=False)
        args = container["args"]
        assert container["command"] == ["/opt/vllm/bin/vllm"] and args[0] == "serve"
        assert arg_value(args, "--served-model-name") == model_name
        assert args[1] == f"{models}/{model_name}", "weights from the model volume, not the hub"
        assert "--enable-lora" in args and "--trust-remote-code" not in args
        assert arg_value(args, "--load-format") == "safetensors"
        assert int(arg_value(args, "--max-loras")) >= 1
        assert int(arg_value(args, "--max-lora-rank")) in {8, 16, 32, 64, 128, 256, 320, 512}
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
        assert int(arg_value(args, "--port")) == container["ports"][0]["containerPort"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/health"
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", "runtime LoRA loading stays internal"


def test_only_the_api_and_gpu_workers_reach_vllm(overlay: tuple[str, list[Manifest]]) -> None:
    _, manifests = overlay
    [policy] = of_kind(manifests, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/component": "model-server"}
    [rule] = policy["spec"]["ingress"]
    [peer] = rule["from"]
    [expression] = peer["podSelector"]["matchExpressions"]
    allowed = set(expression["values"])
    clients = {template_labels(m)["app.kubernetes.io/component"] for m in of_kind(manifests, "Deployment")}
    assert allowed == {"api", "worker-gpu"} and allowed <= clients
    for deployment in vllm_deployments(manifests):
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= template_labels(deployment).items()
