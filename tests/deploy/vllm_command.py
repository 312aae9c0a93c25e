"""`alignd vllm --dry-run` on the arguments a deployment (compose or Kubernetes) gives its vLLM
container: the `vllm serve` command that container would exec, built from the settings the API
reads too. Shared by test_compose.py and test_k8s.py."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from workers.serving.vllm import environment


def flag(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def vllm_serve_command(args: list[str], settings_env: dict[str, str], tmp_path: Path) -> tuple[list[str], Path]:
    """Run `alignd <args> --dry-run` as the container would, with the container's ALIGND_* settings
    (and nothing else of this process's environment), except that the model root and ALIGND_HOME
    are under tmp_path and the base model has a directory there, as on the model volume. Returns
    the printed `vllm serve` argv and that model directory."""
    assert args[0] == "vllm", args
    name = flag(args, "--base-model")
    models = tmp_path / "models"
    model_dir = models / name
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")
    # --dry-run goes before `--`: what follows is handed to vllm serve as it is.
    cut = args.index("--") if "--" in args else len(args)
    argv = [*args[:cut], "--dry-run", *args[cut:]]
    env = {**settings_env, "PATH": os.environ["PATH"], "ALIGND_MODEL_ROOT": str(models),
           "ALIGND_HOME": str(tmp_path / "home")}
    # cwd: no .env file of this checkout is read.
    result = subprocess.run([sys.executable, "-m", "alignd.cli", *argv], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout.strip().splitlines()[-1]), model_dir


def assert_serves_like_alignd_needs(serve: list[str], *, model_dir: Path, name: str, settings_env: dict[str, str],
                                    port: int, gpus: int) -> None:
    """The command serves the base from the model volume under the name jobs use, reachable on the
    container's port, with multi-LoRA limited by the same settings the API checks jobs against."""
    assert Path(serve[0]).name == "vllm" and serve[1] == "serve", serve
    assert serve[2] == str(model_dir), "weights from the model volume, not the hub"
    assert flag(serve, "--served-model-name") == name
    assert flag(serve, "--host") == "0.0.0.0", "reachable from other containers"
    assert int(flag(serve, "--port")) == port
    assert "--enable-lora" in serve
    assert flag(serve, "--max-loras") == settings_env["ALIGND_VLLM_MAX_LORAS"]
    assert flag(serve, "--max-lora-rank") == settings_env["ALIGND_VLLM_MAX_LORA_RANK"]
    assert int(settings_env["ALIGND_VLLM_MAX_LORA_RANK"]) in {8, 16, 32, 64, 128, 256, 320, 512}, "vLLM's ranks"
    assert flag(serve, "--load-format") == "safetensors"
    assert not any(a.startswith("--trust-remote-code") for a in serve)
    assert int(flag(serve, "--tensor-parallel-size")) == gpus, "one GPU per tensor-parallel rank"
    for managed in ("--max-loras", "--max-lora-rank", "--port", "--tensor-parallel-size"):
        assert serve.count(managed) == 1, f"{managed} given twice"
    # What `alignd vllm` adds to the environment when it execs vllm.
    assert environment()["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
