"""docker-compose.yml: one GPU machine. Parsed with PyYAML (no Docker here) and checked for
consistency: services, start order, shared volumes, settings and the servers they name, the vLLM
command `alignd vllm` builds, GPUs, health checks, no secrets."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.deploy.vllm_command import assert_serves_like_alignd_needs, flag, vllm_serve_command

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / "deploy" / "compose.env.example"
ALIGND_SERVICES = {"migrate", "api", "worker-default", "worker-gpu", "worker-rerank", "model-server"}
# Services that run `alignd` for a process of their own but with alignd's settings all the same.
SETTINGS_READERS = ALIGND_SERVICES | {"vllm"}
WORKERS = {"worker-default", "worker-gpu", "worker-rerank"}
LONG_RUNNING = {"postgres", "redis", "api", "worker-default", "worker-gpu", "worker-rerank", "model-server", "vllm"}
DOCKERFILE_TARGETS = {"api", "worker"}
_VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?::?(?P<op>[-?])(?P<arg>[^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's ${VAR:-default} / ${VAR:?error}, with the defaults (or the given values)."""
    env = env or {}

    def replace(match: re.Match[str]) -> str:
        if match["name"] in env:
            return env[match["name"]]
        if match["op"] == "-":
            return match["arg"]
        return f"<{match['name']}>"

    return _VARIABLE.sub(replace, value)


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment as a mapping"
    return {k: interpolate(str(v)) for k, v in env.items()}


def volume_mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """container path -> (source, read-only)"""
    result = {}
    for entry in service.get("volumes", []):
        parts = entry.split(":")
        if parts[0].startswith("${"):  # ${VAR:?message}:/path[:ro] holds a colon of its own
            source_end = entry.index("}") + 1
            parts = [entry[:source_end], *entry[source_end + 1:].split(":")]
        result[parts[1]] = (parts[0], len(parts) > 2 and parts[2] == "ro")
    return result


def alignd_settings(service: dict[str, Any]) -> dict[str, str]:
    return {k: v for k, v in environment(service).items() if k.startswith("ALIGND_")}


def test_the_services_of_one_gpu_box(services: dict[str, Any]) -> None:
    assert set(services) == {"postgres", "redis", "migrate", "api", "worker-default", "worker-gpu", "worker-rerank",
                             "model-server", "vllm"}


def test_alignd_services_build_from_the_dockerfile_targets(services: dict[str, Any]) -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    stages = set(re.findall(r"^FROM \S+ AS (\S+)$", dockerfile, re.M))
    for name in SETTINGS_READERS:
        build = services[name]["build"]
        assert build["target"] in DOCKERFILE_TARGETS & stages
        expected = "alignd-worker" if build["target"] == "worker" else "alignd-api"
        assert interpolate(services[name]["image"]).startswith(f"{expected}:0.1.0")
    assert services["worker-gpu"]["build"]["target"] == services["vllm"]["build"]["target"] == "worker"
    assert services["worker-default"]["build"]["target"] == "api", "the default worker needs no torch"
    for name in ("worker-rerank", "model-server", "vllm"):
        assert services[name]["build"]["target"] == "worker", f"{name} needs torch"
    for name in SETTINGS_READERS:
        assert "entrypoint" not in services[name], f"{name}: the image's `alignd` entrypoint"
    assert "/opt/vllm" not in COMPOSE.read_text(), "one environment in the image: /opt/alignd"


def test_third_party_images_are_pinned_as_in_the_dev_cluster(services: dict[str, Any]) -> None:
    dev_cluster = {}
    for path in (REPO / "k8s" / "overlays" / "dev").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == "StatefulSet":
                dev_cluster[doc["metadata"]["name"]] = doc["spec"]["template"]["spec"]["containers"][0]["image"]
    for name in ("postgres", "redis"):
        image = services[name]["image"]
        tag = image.rpartition(":")[2]
        assert ":" in image and tag != "latest" and re.match(r"\d+\.\d+", tag), image
        assert image == dev_cluster[name], "one version of Postgres and Redis to test against"


def test_alignd_services_share_one_configuration(services: dict[str, Any]) -> None:
    envs = [environment(services[name]) for name in ALIGND_SERVICES]
    assert all(env == envs[0] for env in envs), "one settings object: the same environment everywhere"
    assert alignd_settings(services["vllm"]) == alignd_settings(services["api"]), \
        "`alignd vllm` reads the LoRA limits the API checks jobs against"
    env = envs[0]
    assert env["ALIGND_ENVIRONMENT"] == "production"
    database, broker = urlsplit(env["ALIGND_DATABASE_URL"]), urlsplit(env["ALIGND_BROKER_URL"])
    assert database.scheme == "postgresql+psycopg" and database.hostname == "postgres" and database.port == 5432
    postgres = environment(services["postgres"])
    assert (database.username, database.path.lstrip("/")) == (postgres["POSTGRES_USER"], postgres["POSTGRES_DB"])
    raw_url = services["api"]["environment"]["ALIGND_DATABASE_URL"]
    assert "${POSTGRES_PASSWORD" in raw_url and "${POSTGRES_PASSWORD" in services["postgres"]["environment"][
        "POSTGRES_PASSWORD"], "one password variable for both ends"
    assert broker.scheme == "redis" and broker.hostname == "redis" and broker.port == 6379


def test_start_order_waits_for_migrations(services: dict[str, Any]) -> None:
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["migrate"]["restart"] == "no"
    for name in ALIGND_SERVICES - {"migrate"}:  # all of them use the database
        depends = services[name]["depends_on"]
        assert depends["migrate"] == {"condition": "service_completed_successfully"}, name
        assert depends["postgres"]["condition"] == depends["redis"]["condition"] == "service_healthy", name
    assert services["worker-gpu"]["depends_on"]["vllm"] == {"condition": "service_healthy"}


def test_artifacts_are_shared_by_workers_api_and_model_servers(services: dict[str, Any],
                                                              compose: dict[str, Any]) -> None:
    env = environment(services["api"])
    artifacts, models = env["ALIGND_ARTIFACT_ROOT"], env["ALIGND_MODEL_ROOT"]
    readers = {"vllm", "model-server"}  # load adapters and full fine-tunes the workers wrote
    for name in ("api", "worker-default", "worker-gpu", *readers):
        mounted = volume_mounts(services[name])
        assert mounted[artifacts] == ("artifacts", name in readers), f"{name}: model servers read, alignd writes"
    # Reward models resolve under the model root or as hub ids, never in the artifacts.
    assert artifacts not in volume_mounts(services["worker-rerank"])
    for name in SETTINGS_READERS - {"migrate"}:
        mounted = volume_mounts(services[name])
        assert mounted[models][1] is True, f"{name}: models read-only"
        assert mounted[models][0] == volume_mounts(services["api"])[models][0]
    assert set(compose["volumes"]) >= {"artifacts", "pgdata", "redisdata"}
    for service in services.values():
        for source, _ in volume_mounts(service).values():
            assert source.startswith(("${", "/", ".")) or source in compose["volumes"], source


def test_gpus_are_reserved_for_the_worker_and_vllm_only(services: dict[str, Any]) -> None:
    # The rerank worker and the model server run on CPU here: both GPUs are taken (docker-compose.yml).
    for name, service in services.items():
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
        if name not in {"worker-gpu", "vllm"}:
            assert devices is None, name
            continue
        [device] = devices
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert len(device["device_ids"]) == 1
    [vllm_devices] = services["vllm"]["deploy"]["resources"]["reservations"]["devices"]
    tensor_parallel = interpolate(flag(services["vllm"]["command"], "--tensor-parallel-size"))
    assert int(tensor_parallel) == len(vllm_devices["device_ids"]), "one GPU per tensor-parallel rank"
    worker_gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"][0]
    vllm_gpu = services["vllm"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"][0]
    assert interpolate(worker_gpu) != interpolate(vllm_gpu), "by default each gets its own GPU"


def test_gpu_worker_stops_after_a_step_and_a_checkpoint(services: dict[str, Any]) -> None:
    worker = services["worker-gpu"]
    assert worker["command"] == ["worker", "--queues", "gpu"]
    grace = re.fullmatch(r"(\d+)([smh])", worker["stop_grace_period"])
    assert grace
    seconds = int(grace[1]) * {"s": 1, "m": 60, "h": 3600}[grace[2]]
    labels = worker["labels"]
    assert seconds > int(labels["alignd.io/max-step-seconds"]) + int(labels["alignd.io/checkpoint-save-seconds"])
    assert worker["init"] is True, "tini forwards SIGTERM to the worker alone"
    assert worker.get("stop_signal", "SIGTERM") == "SIGTERM", "SIGTERM is Celery's warm shutdown"


def test_one_scheduler(services: dict[str, Any]) -> None:
    beats = [name for name, s in services.items() if "--beat" in s.get("command", [])]
    assert beats == ["worker-default"]
    assert "deploy" not in services["worker-default"] or "replicas" not in services["worker-default"]["deploy"]


def test_every_long_running_service_has_a_healthcheck(services: dict[str, Any]) -> None:
    for name in LONG_RUNNING:
        check = services[name]["healthcheck"]
        assert check["test"][0] in {"CMD", "CMD-SHELL"}, name
        assert services[name]["restart"] == "unless-stopped", name
    for name in WORKERS:
        assert services[name]["healthcheck"]["test"][1] == "/app/deploy/scripts/worker-heartbeat-check.sh"
    assert "/readyz" in services["api"]["healthcheck"]["test"][-1]
    assert "/health'" in services["vllm"]["healthcheck"]["test"][-1]
    assert "/healthz'" in services["model-server"]["healthcheck"]["test"][-1]
    for name in ("api", "vllm", "model-server"):  # in the container's PATH: /opt/alignd/bin
        assert services[name]["healthcheck"]["test"][1] == "python", name


def test_every_queue_the_application_routes_to_has_a_worker(services: dict[str, Any]) -> None:
    from app.core.config import Settings
    from app.queue import RERANK_QUEUE, make_celery

    consumed: dict[str, str] = {}
    for name in WORKERS:
        command = services[name]["command"]
        assert command[:2] == ["worker", "--queues"], name
        for queue_name in command[2].split(","):
            consumed[queue_name] = name
    # A Redis URL: the filesystem broker would make folders; nothing connects here.
    app = make_celery(Settings(_env_file=None, environment="development", broker_url="redis://redis:6379/0"))
    # gpu: where validation sends a job no ALIGND_GPU_QUEUE_ROUTES entry takes (workers/routing.py).
    routed = {route["queue"] for route in app.conf.task_routes.values()} | {"gpu"}
    assert routed <= set(consumed), f"tasks sent to {routed - set(consumed)} would wait forever"
    # Reranking has its own worker: a GPU worker is busy with a round for hours.
    assert services["worker-rerank"]["command"] == ["worker", "--queues", RERANK_QUEUE]
    assert consumed[RERANK_QUEUE] == "worker-rerank"


def test_the_api_settings_name_the_servers_that_serve_models(services: dict[str, Any]) -> None:
    """The API proxies a query to the vLLM of the model's base, else to the embedded model server
    (app/services/served_models.py): both URLs must name a service listening on that port."""
    env = environment(services["api"])
    base_urls = json.loads(env["ALIGND_VLLM_BASE_URLS"])
    vllm_args = [interpolate(str(a)) for a in services["vllm"]["command"]]
    assert base_urls == {flag(vllm_args, "--base-model"): "http://vllm:8000"}
    url = urlsplit(base_urls[flag(vllm_args, "--base-model")])
    assert url.hostname in services and services[url.hostname]["command"][0] == "vllm"
    assert int(flag(vllm_args, "--port")) == url.port
    assert f"127.0.0.1:{url.port}/health'" in services["vllm"]["healthcheck"]["test"][-1]

    url = urlsplit(env["ALIGND_MODEL_SERVER_URL"])
    server = services[url.hostname]
    assert server["command"][0] == "model-server"
    assert flag(server["command"], "--host") == "0.0.0.0" and int(flag(server["command"], "--port")) == url.port
    assert f"127.0.0.1:{url.port}/healthz'" in server["healthcheck"]["test"][-1]


def test_vllm_runs_the_serve_command_alignd_builds(services: dict[str, Any], tmp_path: Path) -> None:
    vllm = services["vllm"]
    args = [interpolate(str(a)) for a in vllm["command"]]
    settings_env = alignd_settings(vllm)
    serve, model_dir = vllm_serve_command(args, settings_env, tmp_path)
    [devices] = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert_serves_like_alignd_needs(serve, model_dir=model_dir, name=flag(args, "--base-model"),
                                    settings_env=settings_env, port=8000, gpus=len(devices["device_ids"]))
    assert flag(serve, "--max-model-len") == "8192", "flags after -- reach vllm serve"
    assert flag(serve, "--gpu-memory-utilization") == "0.90"
    assert environment(vllm)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert "ports" not in vllm, "the runtime LoRA endpoints are unauthenticated: never published"


def test_model_servers_are_not_published(services: dict[str, Any]) -> None:
    # Neither has authentication: vLLM loads any adapter path, the model server any tenant's model.
    for name in ("vllm", "model-server"):
        assert "ports" not in services[name], name


def test_containers_are_hardened(services: dict[str, Any]) -> None:
    for name in SETTINGS_READERS:
        service = services[name]
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        assert any(t.startswith("/var/lib/alignd:") for t in service["tmpfs"]), f"{name}: ALIGND_HOME"
        assert "user" not in service, f"{name}: the image's uid 10001"
    for name in ("postgres", "redis"):
        assert services[name]["user"] == "999:999"
    published = {name: s["ports"] for name, s in services.items() if "ports" in s}
    assert list(published) == ["api"]
    assert all(interpolate(p).startswith("127.0.0.1:") for p in published["api"])


def test_no_secret_is_written_in_the_file(services: dict[str, Any]) -> None:
    for service in services.values():
        for key, value in service.get("environment", {}).items():
            if any(word in key for word in ("PASSWORD", "SECRET")):
                assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", str(value)), f"{key} must come from the env file"


def test_env_example_lists_every_variable_and_no_secret() -> None:
    used = {m["name"] for m in _VARIABLE.finditer(COMPOSE.read_text())}
    example = dict(line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
                   if line and not line.startswith("#"))
    assert used == set(example), f"undocumented: {used - set(example)}, unused: {set(example) - used}"
    assert example["POSTGRES_PASSWORD"] == ""
