"""Which GPU queue a job goes to: by model size, as configured (`ALIGND_GPU_QUEUE_ROUTES`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from app.core.config import Settings
from app.core.model_names import ModelNameError, resolve_model_name
from app.schemas.job_spec import JobSpec

_SIZE_IN_NAME = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)[bB](?![a-zA-Z])")


def estimate_billions_of_parameters(model_name: str, model_root: Path) -> float | None:
    """From a local config.json (decoder-only estimate) or, for hub ids, a size in the name."""
    try:
        resolved = resolve_model_name(model_name, model_root)
    except ModelNameError:
        return None
    config_path = Path(resolved.location) / "config.json"
    if resolved.is_local and config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
            hidden, layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
            vocab = int(config.get("vocab_size", 32000))
            inter = int(config.get("intermediate_size", 4 * hidden))
            heads = int(config.get("num_attention_heads", 1))
            kv_width = int(config.get("num_key_value_heads", heads)) * (hidden // max(heads, 1))
        except (KeyError, TypeError, ValueError):
            return None
        # q and o projections, grouped k and v projections, gated MLP; embeddings in and out.
        per_layer = 2 * hidden * hidden + 2 * hidden * kv_width + 3 * hidden * inter
        return (layers * per_layer + 2 * vocab * hidden) / 1e9
    match = _SIZE_IN_NAME.search(model_name)
    return float(match.group(1)) if match else None


def choose_gpu_queue(spec: JobSpec, settings: Settings) -> str:
    """The first route whose minimum size the model reaches, else the plain `gpu` queue."""
    if not settings.gpu_queue_routes:
        return "gpu"
    size = estimate_billions_of_parameters(spec.base_model, settings.resolved_model_root)
    effective = (size or 0.0) * (1 if spec.training.method == "lora" else 3)
    for min_billions, queue_name in sorted(settings.gpu_queue_routes, reverse=True):
        if effective >= min_billions:
            return queue_name
    return "gpu"
