"""workers/distributed.py and deploy/{accelerate,deepspeed}: the launch command, the configs agree
with each other and are accepted by accelerate's own loader, and the DeepSpeed file has what the
HF Trainer integration fills in. CPU only; DeepSpeed itself is not needed (one test uses it when
it is installed)."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from workers import distributed
from workers.distributed import (
    DistributedBackendMissing,
    DistributedTrainingFailed,
    LaunchConfig,
    build_launch_command,
    launch_distributed_training,
    zero3_launch_config,
)

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
ACCELERATE_YAML = DEPLOY / "accelerate" / "zero3.yaml"
DEEPSPEED_JSON = DEPLOY / "deepspeed" / "zero3.json"


def deepspeed_config() -> dict:
    return json.loads(DEEPSPEED_JSON.read_text())


def accelerate_args(argv: list[str]) -> tuple[Any, Any, bool]:
    """What `accelerate launch` makes of our argv, through its own parser and validation."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    launch_at = argv.index("accelerate.commands.launch")
    args = launch_command_parser().parse_args(argv[launch_at + 1:])
    return _validate_launch_command(args)


# ---- the command ---------------------------------------------------------------------------------

def test_launch_command_runs_the_train_entry_on_every_gpu(tmp_path: Path) -> None:
    request = tmp_path / "round-3" / "train_request.json"
    argv = build_launch_command(8, request)
    assert argv[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert argv[argv.index("--config_file") + 1] == str(ACCELERATE_YAML)
    assert argv[argv.index("--deepspeed_config_file") + 1] == str(DEEPSPEED_JSON)
    assert argv[argv.index("--num_processes") + 1] == "8"
    assert argv[-3:] == ["-m", "workers.pipeline.train_entry", str(request.resolve())]
    assert all(Path(argv[argv.index(flag) + 1]).is_absolute() for flag in ("--config_file", "--deepspeed_config_file"))


@pytest.mark.parametrize("num_gpus", [1, 2, 8])
def test_accelerate_reads_the_command_as_deepspeed_on_n_processes(num_gpus: int, tmp_path: Path) -> None:
    args, defaults, _ = accelerate_args(build_launch_command(num_gpus, tmp_path / "request.json"))
    assert args.use_deepspeed
    assert args.num_processes == num_gpus and args.num_machines == 1
    assert args.deepspeed_config_file == str(DEEPSPEED_JSON)
    assert args.zero3_init_flag is True
    assert args.module and args.training_script == "workers.pipeline.train_entry"
    assert args.training_script_args == [str((tmp_path / "request.json").resolve())]
    assert defaults.num_processes == 8, "the YAML's default matches the 8-GPU pool (k8s prod)"


def test_launch_command_rejects_zero_gpus_and_missing_configs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        build_launch_command(0, tmp_path / "request.json")
    with pytest.raises(FileNotFoundError, match="zero3"):
        build_launch_command(2, tmp_path / "request.json", launch=zero3_launch_config(tmp_path))


def test_production_launch_is_zero3_and_needs_deepspeed(tmp_path: Path) -> None:
    """The default is the ZeRO-3 launch; only an explicit LaunchConfig without a DeepSpeed file (the
    tests' CPU ranks) can leave DeepSpeed out."""
    assert zero3_launch_config() == LaunchConfig(ACCELERATE_YAML, DEEPSPEED_JSON)
    assert zero3_launch_config().backends == ("accelerate", "deepspeed")
    assert build_launch_command(2, tmp_path / "r.json") == build_launch_command(
        2, tmp_path / "r.json", launch=zero3_launch_config())
    plain = LaunchConfig(accelerate_config=tmp_path / "cpu.yaml")
    assert plain.backends == ("accelerate",)
    argv = build_launch_command(2, tmp_path / "r.json", launch=plain)
    assert "--deepspeed_config_file" not in argv and argv[argv.index("--config_file") + 1] == str(tmp_path / "cpu.yaml")


def test_the_entry_module_is_the_other_helpers_train_entry() -> None:
    assert distributed.TRAIN_ENTRY_MODULE == "workers.pipeline.train_entry"
    assert distributed.DEFAULT_CONFIG_DIR == DEPLOY


# ---- running it ----------------------------------------------------------------------------------

def test_missing_backend_is_a_clear_pipeline_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "deepspeed" else real_find_spec(name, *a))
    assert distributed.missing_distributed_backends() == ["deepspeed"]
    with pytest.raises(DistributedBackendMissing) as caught:
        launch_distributed_training(2, tmp_path / "request.json")
    assert caught.value.code == "distributed_backend_missing"
    assert "deepspeed" in caught.value.message


def fake_launcher(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, script: str) -> None:
    """Replace the accelerate argv by a tiny Python program; everything else runs for real."""
    program = tmp_path / "fake_launch.py"
    program.write_text(script)
    monkeypatch.setattr(distributed, "missing_distributed_backends", lambda *backends: [])
    monkeypatch.setattr(distributed, "build_launch_command",
                        lambda n, request, launch: [sys.executable, str(program), str(n), str(request)])


def test_a_failing_launch_raises_with_the_end_of_its_log(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_launcher(monkeypatch, tmp_path, (
        "import sys\n"
        "for step in range(100):\n"
        "    print(f'rank0 step {step}')\n"
        "print('torch.OutOfMemoryError: CUDA out of memory', file=sys.stderr)\n"
        "sys.exit(3)\n"))
    log = tmp_path / "logs" / "train.log"
    with pytest.raises(DistributedTrainingFailed) as caught:
        launch_distributed_training(4, tmp_path / "request.json", log_path=log)
    error = caught.value
    assert error.code == "distributed_training_failed"
    assert error.data["returncode"] == 3 and error.data["num_gpus"] == 4
    assert "CUDA out of memory" in error.message and "rank0 step 99" in error.message
    assert "rank0 step 0\n" not in error.message, "only the tail of a long log"
    assert "rank0 step 0" in log.read_text()


def test_a_successful_launch_returns_and_passes_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    marker = tmp_path / "ran.json"
    fake_launcher(monkeypatch, tmp_path, (
        "import json, os, sys\n"
        f"open({str(marker)!r}, 'w').write(json.dumps({{'argv': sys.argv[1:], "
        "'home': os.environ.get('ALIGND_HOME'), 'cwd': os.getcwd()}))\n"))
    env = {**os.environ, "ALIGND_HOME": str(tmp_path / "home")}
    launch_distributed_training(2, tmp_path / "request.json", env=env, cwd=tmp_path)
    ran = json.loads(marker.read_text())
    assert ran["argv"] == ["2", str(tmp_path / "request.json")]
    assert ran["home"] == str(tmp_path / "home") and ran["cwd"] == str(tmp_path)


def test_the_worker_polls_while_the_ranks_run_and_never_leaves_them_behind(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path) -> None:
    pid_file = tmp_path / "launcher.pid"
    fake_launcher(monkeypatch, tmp_path, (
        "import os, sys, time\n"
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "time.sleep(120)\n"))
    polls: list[float] = []

    def worker_goes_away() -> None:
        polls.append(time.monotonic())
        if len(polls) == 3:
            raise KeyboardInterrupt  # e.g. the worker process itself is being torn down

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        launch_distributed_training(2, tmp_path / "request.json", while_running=worker_goes_away,
                                    poll_interval_s=0.05)
    assert len(polls) == 3 and time.monotonic() - started < 60
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # terminated and reaped, not orphaned


def test_ranks_that_stop_without_being_asked_fail_the_stage(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Outcome `drained` while neither the worker nor its drain file asked for it: not a silent success."""
    from workers.pipeline.hooks import RoundHooks
    from workers.pipeline.train import StartingPolicy, TrainConfig
    from workers.pipeline.train_request import TrainRequest

    fake_launcher(monkeypatch, tmp_path, (
        "import json, sys\n"
        "request = json.load(open(sys.argv[2]))\n"
        "open(request['control_dir'] + '/outcome.json', 'w').write(json.dumps({'status': 'drained', "
        "'result': None}))\n"))
    request = TrainRequest(config=TrainConfig(), start=StartingPolicy("base"), pairs_dir=tmp_path / "pairs",
                           out_dir=tmp_path / "out", scratch_dir=tmp_path / "scratch",
                           control_dir=tmp_path / "control")
    with pytest.raises(DistributedTrainingFailed, match="drained"):
        distributed.train_with_ranks(request, num_gpus=2, request_path=tmp_path / "train_request.json",
                                     log_path=tmp_path / "train.log", hooks=RoundHooks(),
                                     progress=lambda fraction: None, poll_interval_s=0.05)


# ---- the config files ----------------------------------------------------------------------------

def test_accelerate_loader_accepts_the_yaml() -> None:
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    loaded = load_config_from_file(str(ACCELERATE_YAML))
    assert isinstance(loaded, ClusterConfig)
    assert loaded.distributed_type == DistributedType.DEEPSPEED
    assert loaded.num_machines == 1
    # Relative to the repository root (and /app in the images): the JSON we ship.
    assert (REPO / loaded.deepspeed_config["deepspeed_config_file"]).resolve() == DEEPSPEED_JSON


def test_accelerate_deepspeed_plugin_accepts_the_json_as_launched(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """accelerate refuses a config file combined with precision/ZeRO settings in the YAML; this is
    the check each rank runs, with the fields the launcher reports."""
    from accelerate.utils import DeepSpeedPlugin

    args, defaults, mixed_precision_from_yaml = accelerate_args(build_launch_command(8, tmp_path / "r.json"))
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_yaml else [])
    monkeypatch.setenv("ACCELERATE_CONFIG_DS_FIELDS", ",".join(fields).lower())
    plugin = DeepSpeedPlugin(hf_ds_config=args.deepspeed_config_file)
    assert plugin.zero_stage == 3
    assert plugin.offload_optimizer_device == "none" and plugin.offload_param_device == "none"
    assert plugin.zero3_save_16bit_model is True
    plugin.set_mixed_precision("bf16")  # what TrainingArguments(bf16=True) asks for
    assert plugin.deepspeed_config["bf16"]["enabled"] is True
    assert plugin.deepspeed_config["fp16"]["enabled"] is False


def test_accelerate_refuses_precision_in_the_yaml_next_to_the_json(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Why the YAML has no `mixed_precision`: proves the check above is the real one."""
    from accelerate.utils import DeepSpeedPlugin

    bad = yaml.safe_load(ACCELERATE_YAML.read_text()) | {"mixed_precision": "bf16"}
    (tmp_path / "accelerate").mkdir()
    (tmp_path / "deepspeed").mkdir()
    (tmp_path / "accelerate" / "zero3.yaml").write_text(yaml.safe_dump(bad))
    (tmp_path / "deepspeed" / "zero3.json").write_text(DEEPSPEED_JSON.read_text())
    argv = build_launch_command(8, tmp_path / "r.json", launch=zero3_launch_config(tmp_path))
    args, defaults, mixed_precision_from_yaml = accelerate_args(argv)
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_yaml else [])
    monkeypatch.setenv("ACCELERATE_CONFIG_DS_FIELDS", ",".join(fields).lower())
    with pytest.raises(ValueError, match="deepspeed_config_file"):
        DeepSpeedPlugin(hf_ds_config=args.deepspeed_config_file)


def test_deepspeed_json_is_bf16_zero3_without_offload() -> None:
    config = deepspeed_config()
    assert config["bf16"] == {"enabled": True}
    assert config["fp16"]["enabled"] is False
    zero = config["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "none"
    # Trainer.save_model gathers the shards into 16-bit weights the next round and vLLM can load.
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    # The HF Trainer's own torch AdamW: DeepSpeed's FusedAdam would need CUDA ops compiled into
    # the image (it is a runtime image; DS_BUILD_OPS=0).
    assert "optimizer" not in config and "scheduler" not in config


def hf_filled_keys() -> set[str]:
    """The DeepSpeed keys transformers' HfTrainerDeepSpeedConfig fills from TrainingArguments or the
    model, read from its source so the test follows transformers upgrades."""
    from transformers.integrations import deepspeed as hf_deepspeed

    tree = ast.parse(inspect.getsource(hf_deepspeed.HfTrainerDeepSpeedConfig))
    return {node.args[0].value for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in {"fill_match", "fill_only"} and node.args
            and isinstance(node.args[0], ast.Constant)}


def auto_keys(node: object, prefix: str = "") -> set[str]:
    if isinstance(node, dict):
        return set().union(*(auto_keys(v, f"{prefix}{k}.") for k, v in node.items())) if node else set()
    return {prefix.rstrip(".")} if node == "auto" else set()


def test_every_auto_value_is_one_the_hf_integration_fills() -> None:
    filled = hf_filled_keys()
    assert {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "bf16.enabled"} <= filled
    autos = auto_keys(deepspeed_config())
    # A literal "auto" the integration does not replace reaches DeepSpeed and fails there.
    assert autos and autos <= filled, autos - filled
    # Batch geometry must follow the job's TrainingArguments: a literal here would have to match
    # every job's per-device batch size and accumulation, or the Trainer refuses to start.
    assert {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
            "gradient_clipping"} <= autos


def test_hf_trainer_fills_the_json_completely() -> None:
    """With DeepSpeed installed (the GPU image), run transformers' own processing of the file."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is a GPU-image dependency")
    from types import SimpleNamespace

    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    args = TrainingArguments(output_dir="unused", per_device_train_batch_size=2, gradient_accumulation_steps=4,
                             bf16=True, report_to=[])
    hf_config = HfTrainerDeepSpeedConfig(deepspeed_config())
    hf_config.trainer_config_process(args)
    hf_config.trainer_config_finalize(args, SimpleNamespace(config=SimpleNamespace(hidden_size=4096)), 100)
    assert auto_keys(hf_config.config) == set()
    assert hf_config.config["train_micro_batch_size_per_gpu"] == 2
