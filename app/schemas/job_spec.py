"""The job body a user sends: every field typed, bounded and defaulted from the recipes.

Unknown fields answer 422 (`extra="forbid"` everywhere). The worker reads the same classes back
from the job row, so API and pipeline agree on one definition.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Hub ids (`org/name`) or a name under ALIGND_MODEL_ROOT; never a path that could leave it.
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-.]*(/[A-Za-z0-9_][A-Za-z0-9_\-.]*)?$")
MODEL_NAME_MAX = 200


def validate_model_name(value: str) -> str:
    if value.startswith("/") or value.startswith("~") or "\\" in value:
        raise ValueError("model names are hub ids or names under the model root, not paths")
    if ".." in value or "--" in value:
        raise ValueError("model names may not contain '..' or '--'")
    if len(value) > MODEL_NAME_MAX or not _MODEL_NAME.match(value):
        raise ValueError("model name must look like 'name' or 'org/name' (letters, digits, _ - .)")
    return value


ModelName = Annotated[str, Field(min_length=1, max_length=MODEL_NAME_MAX,
                                 examples=["mistralai/Mistral-7B-Instruct-v0.2"])]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerationConfig(StrictModel):
    max_new_tokens: int = Field(512, ge=1, le=8192)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    batch_size: int = Field(16, ge=1, le=1024, description="Prompts per generate call (transformers)")


class RewardModelConfig(StrictModel):
    type: Literal["pairrm", "scalar"] = "pairrm"
    model: ModelName = "llm-blender/PairRM"
    batch_size: int = Field(8, ge=1, le=512)
    max_length: int = Field(1024, ge=16, le=32768, description="Token limit of one scored input")

    @field_validator("model")
    @classmethod
    def _model_name(cls, v: str) -> str:
        return validate_model_name(v)


class PairingConfig(StrictModel):
    strategy: Literal["best_vs_worst", "best_vs_random"] = "best_vs_worst"
    min_margin: float = Field(0.0, ge=0.0, description="Drop prompts whose best-worst gap is below")


class AlgorithmConfig(StrictModel):
    type: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, gt=0.0, le=100.0)
    loss_type: str = Field("sigmoid", min_length=1, max_length=40,
                           description="Any TRL DPO loss type: sigmoid, ipo, hinge, robust, ...")
    reference: Literal["round_start", "base"] = "round_start"
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)

    @field_validator("loss_type")
    @classmethod
    def _loss_type(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z0-9_]+", v):
            raise ValueError("loss_type must be a TRL loss type name")
        return v


class LoraConfig(StrictModel):
    r: int = Field(16, ge=1, le=512)
    alpha: int = Field(16, ge=1, le=4096)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"


class TrainingConfig(StrictModel):
    method: Literal["lora", "full"] = "lora"
    learning_rate: float = Field(5e-7, gt=0.0, le=1.0)
    epochs: float = Field(1, gt=0, le=100)
    batch_size: int = Field(8, ge=1, le=4096)
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    max_length: int = Field(1024, ge=16, le=131072)
    max_prompt_length: int = Field(512, ge=8, le=131072)
    lr_scheduler_type: str = Field("cosine", pattern=r"^[a-z_]+$", max_length=40)
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    gradient_checkpointing: bool = True
    lora: LoraConfig = Field(default_factory=LoraConfig)
    num_gpus: int = Field(1, ge=1, le=64, description="GPUs one worker trains on (>1: accelerate "
                          "with DeepSpeed ZeRO-3)")
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @model_validator(mode="after")
    def _lengths(self) -> TrainingConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError("training.max_prompt_length must be below training.max_length")
        return self


class JobSpec(StrictModel):
    """Everything that decides what a job computes (stored on the job, read by the worker)."""

    base_model: ModelName
    prompt_set: str = Field(min_length=1, max_length=64, description="Id of an uploaded prompt set")
    reward_model: RewardModelConfig = Field(default_factory=RewardModelConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    pairing: PairingConfig = Field(default_factory=PairingConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    rounds: int = Field(3, ge=1, le=20)
    samples_per_prompt: int = Field(5, ge=2, le=64)
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    reuse_prompts: bool = Field(False, description="Train every round on all training prompts "
                                "instead of one disjoint shard per round")
    split_seed: int = Field(0, ge=0, le=2**31 - 1)

    @field_validator("base_model")
    @classmethod
    def _base_model(cls, v: str) -> str:
        return validate_model_name(v)


def find_nul(value: Any, path: str = "") -> str | None:
    """Path of the first string (or key) holding a NUL character: Postgres cannot store one."""
    if isinstance(value, str):
        return path or "body" if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            sub = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and "\x00" in key:
                return sub
            found = find_nul(item, sub)
            if found:
                return found
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = find_nul(item, f"{path}[{i}]")
            if found:
                return found
    return None


class JobCreate(JobSpec):
    """The POST /v1/jobs body: the spec plus what concerns the job's owner, not its result."""

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        where = find_nul(data)
        if where:
            raise ValueError(f"NUL characters are not allowed (at {where})")
        return data

    suffix: str | None = Field(None, max_length=40, pattern=r"^[A-Za-z0-9_\-]+$")
    webhook_url: str | None = Field(None, max_length=2000, pattern=r"^https?://[^\s]+$")
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, Any]) -> dict[str, Any]:
        if len(v) > 16:
            raise ValueError("metadata holds at most 16 keys")
        return v

    def spec(self) -> JobSpec:
        return JobSpec.model_validate(self.model_dump(include=set(JobSpec.model_fields)))
