from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel

from app.schemas.job_spec import (
    AlgorithmConfig,
    EarlyStoppingConfig,
    GenerationConfig,
    PairingConfig,
    RewardModelConfig,
    TrainingConfig,
)

JobStatus = Literal["validating", "queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


class JobProgress(BaseModel):
    phase: str | None
    fraction: float


class JobError(BaseModel):
    code: str
    message: str


class JobRead(BaseModel):
    id: str
    object: Literal["alignment.job"] = "alignment.job"
    status: JobStatus
    base_model: str
    prompt_set: str
    reward_model: RewardModelConfig
    algorithm: AlgorithmConfig
    pairing: PairingConfig
    generation: GenerationConfig
    training: TrainingConfig
    rounds: int
    samples_per_prompt: int
    eval_fraction: float
    reuse_prompts: bool
    split_seed: int
    selection: Literal["best", "last"]
    early_stopping: EarlyStoppingConfig | None
    length_growth_warning: float | None
    current_round: int
    progress: JobProgress
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: JobError | None
    fine_tuned_model: str | None
    suffix: str | None
    webhook_url: str | None
    metadata: dict[str, Any]


class JobEventRead(BaseModel):
    id: int
    object: Literal["alignment.job.event"] = "alignment.job.event"
    created_at: datetime
    level: Literal["debug", "info", "warning", "error"]
    type: str
    message: str
    data: dict[str, Any]


class JobRoundRead(BaseModel):
    round: int
    status: Literal["running", "succeeded", "failed", "cancelled"]
    metrics: dict[str, Any]
    started_at: datetime
    finished_at: datetime | None


class WebhookPayload(BaseModel):
    type: Literal["alignment.job.succeeded", "alignment.job.failed", "alignment.job.cancelled"]
    data: JobRead
