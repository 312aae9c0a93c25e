"""Opening user-named models safely: names via `resolve_model_name`, safetensors only, no remote code.

Every loader maps library failures to the pipeline's domain errors so a user sees `model_not_found`,
`model_not_loadable` or `tokenizer_missing` instead of a stack trace.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from app.core.model_names import ModelNameError, ResolvedModel, resolve_model_name
from workers.errors import GpuOutOfMemory, ModelNotFound, ModelNotLoadable, TokenizerMissing

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spm.model")


def resolve(name: str, model_root: Path) -> ResolvedModel:
    try:
        return resolve_model_name(name, model_root)
    except ModelNameError as exc:
        raise ModelNotFound(str(exc), data={"model": name}) from exc


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def compute_device() -> str:
    return "cuda" if has_gpu() else "cpu"


def training_dtype() -> Any:
    """bf16 on a GPU that supports it, fp32 on CPU (CPU bf16 matmuls are slow and lossy here)."""
    import torch

    if has_gpu() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


@contextmanager
def oom_as_domain_error() -> Iterator[None]:
    """Turn CUDA OOM into `gpu_out_of_memory` (other exceptions pass through untouched)."""
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        raise GpuOutOfMemory(f"GPU out of memory: {exc}".splitlines()[0]) from exc


def load_tokenizer(location: str) -> Any:
    from transformers import AutoTokenizer

    path = Path(location)
    if path.is_dir() and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise TokenizerMissing(f"model directory {path.name!r} has no tokenizer files")
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise TokenizerMissing(f"cannot load the tokenizer of {path.name!r}: {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _check_weights(location: str) -> None:
    path = Path(location)
    if not path.is_dir():
        return
    if not (path / "config.json").is_file():
        raise ModelNotLoadable(f"model directory {path.name!r} has no config.json")
    if not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise ModelNotLoadable(f"model {path.name!r} only has pickle weights; safetensors are required")
        raise ModelNotLoadable(f"model directory {path.name!r} has no weights")


def load_causal_lm(location: str, *, dtype: Any = None, device: str | None = None) -> Any:
    from transformers import AutoModelForCausalLM

    _check_weights(location)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            location, trust_remote_code=False, use_safetensors=True, dtype=dtype or training_dtype())
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise ModelNotLoadable(f"cannot load causal LM {Path(location).name!r}: {exc}") from exc
    return model.to(device or compute_device())


def load_policy(base_location: str, adapter_dir: Path | None, *, dtype: Any = None,
                device: str | None = None, merge: bool = True, trainable: bool = False) -> Any:
    """Base model, plus the cumulative LoRA adapter when given (merged for inference by default)."""
    model = load_causal_lm(base_location, dtype=dtype, device=device)
    if adapter_dir is None:
        return model
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelNotLoadable(f"cannot load the LoRA adapter at {adapter_dir}: {exc}") from exc
    return model.merge_and_unload() if merge else model
