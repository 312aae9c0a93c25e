"""Starting vLLM's OpenAI server the way alignd serves with it.

One server per base model, multi-LoRA on (`--enable-lora`, `--max-loras`, `--max-lora-rank` from
settings) and runtime adapter loading allowed (`VLLM_ALLOW_RUNTIME_LORA_UPDATING`): the API loads
each job's adapter under its `fine_tuned_model` name (`app.services.model_backends.load_adapter`).
A full fine-tune is served by a server of its own, named after the model. Weights load from
safetensors only; remote code is never trusted (vLLM's default, and no flag here turns it on).
vLLM pins its own torch and CUDA, so it is a GPU-image dependency: everything here only builds a
command line and never imports vLLM.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from app.core.config import Settings
from workers.pipeline.prompts import MISTRAL_FALLBACK_TEMPLATE


def is_vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None or shutil.which("vllm") is not None


def has_chat_template(model_dir: Path) -> bool:
    if (model_dir / "chat_template.jinja").is_file() or (model_dir / "chat_template.json").is_file():
        return True
    config = model_dir / "tokenizer_config.json"
    try:
        return bool(json.loads(config.read_text()).get("chat_template")) if config.is_file() else False
    except ValueError:
        return False


@dataclass(frozen=True)
class VllmServer:
    model_location: str  # a base model or a full fine-tune: directory (or hub id for a base)
    served_name: str  # the name requests use: the base model's name, or the fine-tuned model's
    lora: bool  # a base model that takes jobs' adapters

    def command(self, settings: Settings, *, host: str, port: int, vllm: str = "vllm",
                chat_template: Path | None = None, extra: list[str] | None = None) -> list[str]:
        argv = [vllm, "serve", self.model_location, "--served-model-name", self.served_name,
                "--host", host, "--port", str(port), "--load-format", "safetensors"]
        if self.lora:
            argv += ["--enable-lora", "--max-loras", str(settings.vllm_max_loras),
                     "--max-lora-rank", str(settings.vllm_max_lora_rank)]
        if chat_template is not None:
            argv += ["--chat-template", str(chat_template)]
        return argv + list(extra or [])

    def fallback_chat_template(self, directory: Path) -> Path | None:
        """Mistral's `[INST]` template, as the pipeline uses, for a local model that has none."""
        location = Path(self.model_location)
        if not location.is_dir() or has_chat_template(location):
            return None
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "mistral-inst.jinja"
        path.write_text(MISTRAL_FALLBACK_TEMPLATE)
        return path


def environment() -> dict[str, str]:
    """Environment vLLM needs beside the caller's: runtime LoRA loading on, no telemetry."""
    return {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
