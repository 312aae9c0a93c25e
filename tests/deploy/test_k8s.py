"""k8s/: render both overlays offline, validate every manifest against the Kubernetes schemas, and
check that the pieces fit (selectors, references, the servers the settings name, the vLLM command
`alignd vllm` builds, queues and their workers, probes, resources, GPUs, images, security)."""

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
from tests.deploy.vllm_command import assert_serves_like_alignd_needs, vllm_serve_command

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
DOCKERFILE = REPO / "Dockerfile"
# Stand-ins for the out-of-band production Secret: `alignd vllm` only needs them to be set.
PLACEHOLDER_SECRETS = {"ALIGND_DATABASE_URL": "postgresql+psycopg://alignd@db:5432/alignd",
                       "ALIGND_BROKER_URL": "redis://redis:6379/0"}


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


def running(manifests: list[Manifest], command: str) -> list[tuple[Manifest, Manifest]]:
    """(Deployment, container) for every container that runs `alignd <command>`."""
    return [(m, c) for m in of_kind(manifests, "Deployment") for c in containers(m, init=False)
            if c.get("args", [None])[0] == command]


def vllm_deployments(manifests: list[Manifest]) -> list[Manifest]:
    return [m for m, _ in running(manifests, "vllm")]


def arg_value(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


def alignd_image(container: Manifest) -> str | None:
    """"api" or "worker" for alignd's two images (any registry), None for others."""
    name = split_image(container["image"])[0]
    return next((target for target in ("api", "worker") if name.endswith(f"alignd/{target}")), None)


def gpu_count(container: Manifest) -> int:
    return int(container["resources"].get("limits", {}).get("nvidia.com/gpu", 0))


def server_behind(manifests: list[Manifest], url: str) -> tuple[Manifest, Manifest, int]:
    """The Deployment, container and container port that a URL in the settings reaches: a Service
    of that name with that port, the one Deployment it selects, the container port it targets."""
    parts = urlsplit(url)
    assert parts.scheme == "http" and parts.path in ("", "/"), url
    [service] = [s for s in of_kind(manifests, "Service") if s["metadata"]["name"] == parts.hostname] or [None]
    assert service is not None, f"{url}: no Service {parts.hostname!r}"
    [port] = [p for p in service["spec"]["ports"] if p["port"] == parts.port] or [None]
    assert port is not None, f"{url}: Service {parts.hostname} has no port {parts.port}"
    selector = service["spec"]["selector"]
    selected = [d for d in of_kind(manifests, "Deployment") if selector.items() <= template_labels(d).items()]
    assert len(selected) == 1, f"{url}: Service {parts.hostname} selects {len(selected)} Deployments"
    target = port.get("targetPort", port["port"])
    reached = [(c, p["containerPort"]) for c in containers(selected[0], init=False) for p in c.get("ports", [])
               if target in (p.get("name"), p["containerPort"])]
    assert len(reached) == 1, f"{url}: target port {target!r} is not one container port"
    return selected[0], reached[0][0], reached[0][1]


def admitted_clients(manifests: list[Manifest], deployment: Manifest, port: int) -> set[str] | None:
    """Components whose pods the NetworkPolicies let reach `port` of the deployment's pods (None:
    no policy selects them, so everything may)."""
    labels = template_labels(deployment)
    clients: set[str] | None = None
    for policy in of_kind(manifests, "NetworkPolicy"):
        selector = policy["spec"]["podSelector"]
        assert set(selector) == {"matchLabels"}, "only matchLabels pod selectors are read here"
        if not selector["matchLabels"].items() <= labels.items() or "Ingress" not in policy["spec"]["policyTypes"]:
            continue
        if clients is None:
            clients = set()
        for rule in policy["spec"].get("ingress", []):
            if "ports" in rule and port not in {p["port"] for p in rule["ports"]}:
                continue
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, "only pods of the namespace, by component"
                pods = peer["podSelector"]
                clients |= {v for k, v in pods.get("matchLabels", {}).items() if k == "app.kubernetes.io/component"}
                for expression in pods.get("matchExpressions", []):
                    assert expression["key"] == "app.kubernetes.io/component" and expression["operator"] == "In"
                    clients |= set(expression["values"])
    return clients


def container_env(manifests: list[Manifest], container: Manifest, secrets: dict[str, str]) -> dict[str, str]:
    """The environment the container starts with: envFrom in order, then env (which wins)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(named(manifests, "ConfigMap", source["configMapRef"]["name"])["data"])
        if "secretRef" in source:
            env.update(secrets)
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def alignd_secrets(name: str, manifests: list[Manifest]) -> dict[str, str]:
    if name == "prod":
        return PLACEHOLDER_SECRETS
    return named(manifests, "Secret", "alignd-secrets")["stringData"]


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
        # Production refuses to start without the roots; the rest come from the Secret. The
        # serving URLs and LoRA limits are read by the API and the servers alike.
        settings = config(manifests)
        assert {"ALIGND_MODEL_ROOT", "ALIGND_ARTIFACT_ROOT", "ALIGND_VLLM_BASE_URLS", "ALIGND_MODEL_SERVER_URL",
                "ALIGND_VLLM_MAX_LORAS", "ALIGND_VLLM_MAX_LORA_RANK"} <= settings.keys()
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

def test_every_queue_the_application_routes_to_has_a_worker(overlay: tuple[str, list[Manifest]]) -> None:
    from app.core.config import Settings
    from app.queue import DEFAULT_QUEUE, GPU_QUEUES, RERANK_QUEUE, make_celery

    _, manifests = overlay
    consumed = set()
    for _, container in workers(manifests):
        assert set(queues(container)) <= {DEFAULT_QUEUE, *GPU_QUEUES, RERANK_QUEUE}, container["args"]
        consumed |= set(queues(container))
    # A Redis URL: the filesystem broker would make folders; nothing connects here.
    app = make_celery(Settings(_env_file=None, environment="development", broker_url="redis://redis:6379/0"))
    routed = {route["queue"] for route in app.conf.task_routes.values()}
    assert RERANK_QUEUE in routed, "the API sends best-of-N reranking there"
    # gpu: where validation sends a job no ALIGND_GPU_QUEUE_ROUTES entry takes (workers/routing.py).
    routed |= {"gpu"} | {q for _, q in json.loads(config(manifests).get("ALIGND_GPU_QUEUE_ROUTES", "[]"))}
    assert routed <= consumed, f"tasks sent to {routed - consumed} would wait forever"


def test_rerank_workers_consume_only_the_rerank_queue(overlay: tuple[str, list[Manifest]]) -> None:
    from app.queue import RERANK_QUEUE

    name, manifests = overlay
    settings = config(manifests)
    [(deployment, container)] = [(m, c) for m, c in workers(manifests) if RERANK_QUEUE in queues(c)]
    where = object_id(deployment)
    # Not beside a GPU queue: a round holds its worker for hours, and the API waits 120 s.
    assert queues(container) == [RERANK_QUEUE] and "--beat" not in container["args"], where
    assert alignd_image(container) == "worker", "reward models need torch"
    mounted = mounts(deployment, container)
    assert mounted[settings["ALIGND_MODEL_ROOT"]] == ("alignd-models", True), where
    # Reward models resolve under the model root or as hub ids (workers/pipeline/score.py).
    assert settings["ALIGND_ARTIFACT_ROOT"] not in mounted, f"{where}: reads no artifacts"
    if name == "prod":
        # PairRM compares N x (N - 1) pairs; 7B reward models: on CPU, large best_of times out.
        assert gpu_count(container) == 1, where
        assert deployment["spec"]["replicas"] >= 2, "a restarting worker must not time every best_of out"
    else:
        assert gpu_count(container) == 0, "CPU outside production: PairRM is small"


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


def test_processes_run_on_the_image_that_has_their_dependencies(overlay: tuple[str, list[Manifest]]) -> None:
    _, manifests = overlay
    # The api image has no torch: the API, migrations and the default queue only.
    for manifest in manifests:
        for container in containers(manifest, init=False):
            image, args = alignd_image(container), container.get("args", [])
            if image is None:
                continue  # Postgres, Redis
            light = args[0] in ("api", "db") or (args[0] == "worker" and set(queues(container)) == {"default"})
            assert image == ("api" if light else "worker"), f"{object_id(manifest)}: {args[:3]} on {image}"


def test_args_only_containers_start_alignd(overlay: tuple[str, list[Manifest]]) -> None:
    _, manifests = overlay
    entrypoints = re.findall(r"^ENTRYPOINT (.+)$", DOCKERFILE.read_text(), re.M)
    assert entrypoints and all(json.loads(e) == ["alignd"] for e in entrypoints), entrypoints
    for manifest in manifests:
        for container in containers(manifest, init=False):
            if alignd_image(container):
                assert "command" not in container, f"{object_id(manifest)}: the image runs `alignd <args>`"
    for path in (REPO / "k8s").rglob("*.yaml"):
        assert "/opt/vllm" not in path.read_text(), f"{path}: one environment in the image, /opt/alignd"


def test_worker_image_containers_can_write_their_caches(overlay: tuple[str, list[Manifest]]) -> None:
    # Read-only root filesystem: Hugging Face, Triton and torch.compile caches need a volume.
    [cache] = re.findall(r"XDG_CACHE_HOME=(\S+)", DOCKERFILE.read_text())
    _, manifests = overlay
    for manifest in of_kind(manifests, "Deployment"):
        for container in containers(manifest, init=False):
            if alignd_image(container) == "worker":
                kind, read_only = mounts(manifest, container).get(cache, ("", True))
                assert kind == "emptyDir" and not read_only, f"{object_id(manifest)}: {cache}"


def test_gpu_pods_land_on_gpu_nodes(overlay: tuple[str, list[Manifest]]) -> None:
    _, manifests = overlay
    for manifest in of_kind(manifests, "Deployment"):
        for container in containers(manifest, init=False):
            resources = container["resources"]
            if "nvidia.com/gpu" not in resources["limits"] and "nvidia.com/gpu" not in resources["requests"]:
                continue
            where = object_id(manifest)
            assert resources["requests"].get("nvidia.com/gpu") == resources["limits"].get("nvidia.com/gpu"), where
            spec = manifest["spec"]["template"]["spec"]
            assert spec["nodeSelector"].get("nvidia.com/gpu.present") == "true", where
            assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in spec["tolerations"])
            # No surge: there is no spare GPU to start the new pod on before the old one stops.
            assert manifest["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0, where


# ---- shared volumes and serving ------------------------------------------------------------------

def test_artifact_and_model_volumes_are_shared_at_the_configured_paths(overlay: tuple[str, list[Manifest]]) -> None:
    _, manifests = overlay
    settings = config(manifests)
    artifacts, models = settings["ALIGND_ARTIFACT_ROOT"], settings["ALIGND_MODEL_ROOT"]
    claims = {c["metadata"]["name"]: c for c in of_kind(manifests, "PersistentVolumeClaim")}
    assert "ReadWriteMany" in claims["alignd-artifacts"]["spec"]["accessModes"]
    # vLLM and the embedded model server load the adapters and full models the workers wrote.
    readers = [*vllm_deployments(manifests), *(m for m, _ in running(manifests, "model-server"))]
    assert readers
    # The rerank worker reads no artifacts (test_rerank_workers_consume_only_the_rerank_queue).
    writers = [(m, c) for m, c in workers(manifests) if queues(c) != ["rerank"]]
    users = writers + [(m, c) for m in [named(manifests, "Deployment", "alignd-api"), *readers]
                       for c in containers(m, init=False)]
    for manifest, container in users:
        mounted = mounts(manifest, container)
        where = f"{object_id(manifest)} {container['name']}"
        assert mounted.get(models) == ("alignd-models", True), where
        assert mounted.get(artifacts, ("", False))[0] == "alignd-artifacts", where
        assert mounted[artifacts][1] is (manifest in readers), f"{where}: model servers read, alignd writes"


def test_model_server_url_reaches_the_embedded_model_server(overlay: tuple[str, list[Manifest]]) -> None:
    """Every model no vLLM serves (full fine-tunes, LoRA models of other bases) goes there
    (app/services/served_models.py), or answers 503."""
    _, manifests = overlay
    deployment, container, port = server_behind(manifests, config(manifests)["ALIGND_MODEL_SERVER_URL"])
    args = container["args"]
    assert args[0] == "model-server", args
    assert arg_value(args, "--host") == "0.0.0.0" and int(arg_value(args, "--port")) == port
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] == "/healthz", probe
    sources = {next(iter(s.values()))["name"] for s in container["envFrom"]}
    assert sources == {"alignd-config", "alignd-secrets"}, "settings, and the database for served models"
    assert gpu_count(container) == 1, "it serves 7B-class models on every request"


def test_each_vllm_url_reaches_a_vllm_serving_that_model(overlay: tuple[str, list[Manifest]]) -> None:
    _, manifests = overlay
    base_urls: dict[str, Any] = json.loads(config(manifests)["ALIGND_VLLM_BASE_URLS"])
    assert base_urls
    reached = []
    for model_name, url in base_urls.items():
        deployment, container, port = server_behind(manifests, url)
        reached.append(deployment)
        args = container["args"]
        assert args[0] == "vllm", f"{url} reaches {args[:1]}, not `alignd vllm`"
        # A full fine-tune's own server is keyed by its ft: name (README, Backends).
        assert arg_value(args, "--model" if model_name.startswith("ft:") else "--base-model") == model_name
        assert arg_value(args, "--host") == "0.0.0.0" and int(arg_value(args, "--port")) == port
        assert int(arg_value(args, "--tensor-parallel-size")) == gpu_count(container) >= 1
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe]["httpGet"]["path"] == "/health", probe
        service = named(manifests, "Service", urlsplit(url).hostname)
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", "runtime LoRA loading stays internal"
    assert sorted(map(object_id, vllm_deployments(manifests))) == sorted(map(object_id, reached)), \
        "a vLLM no URL names holds GPUs for nothing"


def test_vllm_runs_the_serve_command_alignd_builds(overlay: tuple[str, list[Manifest]], tmp_path: Path) -> None:
    """`alignd vllm --dry-run` on the container's own arguments and settings."""
    name, manifests = overlay
    assert vllm_deployments(manifests)
    for deployment, container in running(manifests, "vllm"):
        args = container["args"]
        env = container_env(manifests, container, alignd_secrets(name, manifests))
        settings_env = {k: v for k, v in env.items() if k.startswith("ALIGND_")}
        serve, model_dir = vllm_serve_command(args, settings_env, tmp_path / deployment["metadata"]["name"])
        assert_serves_like_alignd_needs(serve, model_dir=model_dir, name=arg_value(args, "--base-model"),
                                        settings_env=settings_env, port=container["ports"][0]["containerPort"],
                                        gpus=gpu_count(container))
        assert serve[-len(args[args.index("--") + 1:]):] == args[args.index("--") + 1:], "flags after -- pass on"
        assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


def test_server_behind_refuses_urls_that_reach_nothing(rendered: dict[str, list[Manifest]]) -> None:
    manifests = rendered["prod"]
    server_behind(manifests, "http://alignd-model-server:8100")
    for wrong in ("http://alignd-model-server:8000", "http://model-server:8100", "http://alignd-api:8000/v1"):
        with pytest.raises(AssertionError):
            server_behind(manifests, wrong)


def test_only_alignd_clients_reach_the_model_servers(overlay: tuple[str, list[Manifest]]) -> None:
    """Neither server authenticates: vLLM's runtime LoRA endpoints load any path they are given, and
    the embedded model server answers for any tenant's model (the API does tenancy)."""
    _, manifests = overlay
    components = {template_labels(m)["app.kubernetes.io/component"] for m in of_kind(manifests, "Deployment")}
    settings = config(manifests)
    for url in json.loads(settings["ALIGND_VLLM_BASE_URLS"]).values():
        deployment, _, port = server_behind(manifests, url)
        assert admitted_clients(manifests, deployment, port) == {"api", "worker-gpu"}, url
    deployment, _, port = server_behind(manifests, settings["ALIGND_MODEL_SERVER_URL"])
    assert admitted_clients(manifests, deployment, port) == {"api"}, "only the API queries the model server"
    for policy in of_kind(manifests, "NetworkPolicy"):
        selected = [d for d in of_kind(manifests, "Deployment")
                    if policy["spec"]["podSelector"]["matchLabels"].items() <= template_labels(d).items()]
        assert selected, f"NetworkPolicy {policy['metadata']['name']} protects nothing"
    assert {"api", "worker-gpu"} <= components
