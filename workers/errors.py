"""Domain errors of the alignment pipeline, each with a stable `code` the API shows to users.

The Celery task turns a `PipelineError` into the job's failure (code + message); anything else is a
bug and surfaces as `internal_error`. `JobCancelled` is not a failure: the task marks the job
cancelled. Stages raise these; none of them is ever caught and dropped.
"""

from __future__ import annotations

from typing import Any


class PipelineError(Exception):
    """Base of every expected pipeline failure: a stable machine code plus a human message."""

    code: str = "pipeline_error"
    retryable: bool = False

    def __init__(self, message: str, *, code: str | None = None, data: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.data = dict(data or {})

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class ModelNotFound(PipelineError):
    """The name does not resolve to a model under the model root (or is not a valid hub id)."""

    code = "model_not_found"


class ModelNotLoadable(PipelineError):
    """The model exists but its config or weights cannot be loaded (corrupt, pickle-only, wrong files)."""

    code = "model_not_loadable"


class TokenizerMissing(PipelineError):
    """The model directory has no usable tokenizer."""

    code = "tokenizer_missing"


class RewardModelWrongKind(PipelineError):
    """The reward model is not of the kind the job asked for (e.g. a causal LM given as a scalar RM)."""

    code = "reward_model_wrong_kind"


class GpuOutOfMemory(PipelineError):
    """CUDA ran out of memory; smaller batches or a LoRA job may fit."""

    code = "gpu_out_of_memory"


class NoPairs(PipelineError):
    """Every preference pair of the round was dropped (ties or margins below `min_margin`)."""

    code = "no_pairs"


class InvalidPrompts(PipelineError):
    """The prompt set is unusable (empty, too small to split, or not chat message lists)."""

    code = "invalid_prompts"


class InvalidTrainingConfig(PipelineError):
    """The training settings are rejected by the trainer (e.g. an unknown TRL loss type)."""

    code = "invalid_training_config"


class ArtifactCorrupt(PipelineError):
    """A stage's recorded output exists but cannot be read back."""

    code = "artifact_corrupt"


class JudgeEndpointNotAllowed(PipelineError):
    """The job's judge endpoint is not in the service's `judge_endpoint_allowlist`."""

    code = "judge_endpoint_not_allowed"


class JudgeUnavailable(PipelineError):
    """The judge endpoint failed or did not answer with a chat completion."""

    code = "judge_unavailable"


class JobCancelled(Exception):
    """Raised by the `check_cancelled` hook; stops the round at the next stage or batch boundary.

    Deliberately not a `PipelineError`: a cancelled job did not fail.
    """

    code = "cancelled"

    def __init__(self, message: str = "job cancelled"):
        super().__init__(message)
        self.message = message
