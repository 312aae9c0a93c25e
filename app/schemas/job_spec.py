"""The job body a user sends: every field typed, bounded and defaulted from the recipes.

Unknown fields answer 422 (`extra="forbid"` everywhere). The worker reads the same classes back
from the job row, so API and pipeline agree on one definition.
"""

from __future__ import annotations

import math
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


# Rules are declarative: regexes compiled by Python's `re`, never code. Patterns and their number are
# bounded, and the worker truncates the text they run on (`workers.pipeline.rules`).
REGEX_MAX_LENGTH = 200
REGEXES_MAX = 16


def _compile_patterns(patterns: list[str]) -> list[str]:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"invalid regex {pattern!r}: {exc}") from exc
    return patterns


Regex = Annotated[str, Field(min_length=1, max_length=REGEX_MAX_LENGTH)]


class RulesConfig(StrictModel):
    """Constraints a team states without training a model. The rules reward of an answer is 0 when
    every rule holds and goes down by `violation_penalty` per broken regex rule and by
    `length_penalty` per word outside [`min_words`, `max_words`]."""

    must_match: list[Regex] = Field(default_factory=list, max_length=REGEXES_MAX,
                                    description="Regexes a good answer matches (re.search), e.g. '(?i)consult'")
    must_not_match: list[Regex] = Field(default_factory=list, max_length=REGEXES_MAX,
                                        description="Regexes a good answer never matches")
    min_words: int | None = Field(None, ge=0, le=100_000)
    max_words: int | None = Field(None, ge=1, le=100_000)
    violation_penalty: float = Field(1.0, ge=0.0, le=1000.0, description="Reward lost per broken regex rule")
    length_penalty: float = Field(0.05, ge=0.0, le=1000.0,
                                  description="Reward lost per word below min_words or above max_words")

    @field_validator("must_match", "must_not_match")
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        return _compile_patterns(v)

    @model_validator(mode="after")
    def _some_rule(self) -> RulesConfig:
        if not (self.must_match or self.must_not_match or self.min_words is not None
                or self.max_words is not None):
            raise ValueError("rules need at least one of must_match, must_not_match, min_words, max_words")
        if self.min_words is not None and self.max_words is not None and self.min_words > self.max_words:
            raise ValueError("rules.min_words must not exceed rules.max_words")
        return self


class RewardWeights(StrictModel):
    """How a rules reward is added to the reward model's: score = model * s_model + rules * s_rules."""

    model: float = Field(1.0, ge=0.0, le=1000.0)
    rules: float = Field(1.0, ge=0.0, le=1000.0)


JUDGE_PLACEHOLDERS = ("{prompt}", "{answer_a}", "{answer_b}")
DEFAULT_JUDGE_TEMPLATE = (
    "Which answer to the user's request is better: more helpful, correct and harmless? "
    "Reply with exactly one letter, A or B.\n\n"
    "[Request]\n{prompt}\n\n[Answer A]\n{answer_a}\n\n[Answer B]\n{answer_b}"
)


class JudgeConfig(StrictModel):
    """An OpenAI-compatible chat endpoint asked which of two answers is better (self-rewarding
    style), in both orders to cancel position bias. The address must be in the service's
    `ALIGND_JUDGE_ENDPOINT_ALLOWLIST`; the judge's model name is `reward_model.model`."""

    endpoint: str = Field(max_length=500, pattern=r"^https?://[^\s]+$",
                          description="Base URL of the API, e.g. http://judge:8000/v1; alignd POSTs to "
                                      "<endpoint>/chat/completions")
    prompt_template: str = Field(DEFAULT_JUDGE_TEMPLATE, min_length=1, max_length=8000,
                                 description="Must contain {prompt}, {answer_a} and {answer_b}; the reply's "
                                             "first standalone A or B is the verdict")
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    max_tokens: int = Field(8, ge=1, le=1024)
    timeout_s: float = Field(60.0, gt=0.0, le=600.0)
    max_concurrency: int = Field(8, ge=1, le=64, description="Requests in flight at once")

    @field_validator("prompt_template")
    @classmethod
    def _placeholders(cls, v: str) -> str:
        missing = [p for p in JUDGE_PLACEHOLDERS if p not in v]
        if missing:
            raise ValueError(f"judge.prompt_template must contain {', '.join(missing)}")
        return v


RewardType = Literal["pairrm", "scalar", "implicit", "rules", "judge"]


class RewardModelConfig(StrictModel):
    """What scores the candidates.

    - pairrm: llm-blender's pairwise ranker (`model`, default llm-blender/PairRM).
    - scalar: a sequence-classification reward model (`model`), with its own chat template.
    - implicit: the DPO log-ratio of two causal LMs (Merlinite):
      r(x, y) = log pi_model(y|x) - log pi_reference_model(y|x), per token when `length_normalize`.
    - rules: `rules` alone.
    - judge: an OpenAI-compatible chat model (`model` on `judge.endpoint`) comparing two answers.

    `rules` may also be added to any other type, weighted by `weights`.
    """

    type: RewardType = "pairrm"
    model: ModelName | None = Field(None, description="pairrm (default llm-blender/PairRM), scalar, "
                                    "implicit (the tuned model), judge (the judge's model name)")
    reference_model: ModelName | None = Field(None, description="implicit: the reference (e.g. base) model")
    length_normalize: bool = Field(False, description="implicit: average the log-ratio over response tokens")
    rules: RulesConfig | None = None
    weights: RewardWeights | None = Field(None, description="With rules on another type; default 1 and 1")
    judge: JudgeConfig | None = None
    batch_size: int = Field(8, ge=1, le=512)
    max_length: int = Field(1024, ge=16, le=32768, description="Token limit of one scored input")

    @field_validator("model", "reference_model")
    @classmethod
    def _model_name(cls, v: str | None) -> str | None:
        return None if v is None else validate_model_name(v)

    @model_validator(mode="after")
    def _fields_of_type(self) -> RewardModelConfig:
        if self.type == "pairrm" and self.model is None:
            self.model = "llm-blender/PairRM"
        if self.type in ("scalar", "implicit", "judge") and self.model is None:
            raise ValueError(f"reward_model.type {self.type!r} needs reward_model.model")
        if self.type == "rules" and self.model is not None:
            raise ValueError("reward_model.type 'rules' uses no model; add rules to another type instead")
        if (self.type == "implicit") != (self.reference_model is not None):
            raise ValueError("reward_model.reference_model is required by, and only used by, type 'implicit'")
        if self.length_normalize and self.type != "implicit":
            raise ValueError("reward_model.length_normalize applies to type 'implicit'")
        if (self.type == "judge") != (self.judge is not None):
            raise ValueError("reward_model.judge is required by, and only used by, type 'judge'")
        if self.type == "rules" and self.rules is None:
            raise ValueError("reward_model.type 'rules' needs reward_model.rules")
        if self.weights is not None and (self.rules is None or self.type == "rules"):
            raise ValueError("reward_model.weights combine rules with another reward type")
        return self


class PairingConfig(StrictModel):
    strategy: Literal["best_vs_worst", "best_vs_random"] = "best_vs_worst"
    min_margin: float = Field(0.0, ge=0.0, description="Drop prompts whose best-worst gap is below")
    length_penalty: float = Field(0.0, ge=0.0, le=100.0, description="Rank candidates by score minus this "
                                  "times their length in tokens (RLHFlow's max_min_p)")


AlgorithmType = Literal["dpo", "ipo", "sppo", "sppo_hard", "rejection_sampling"]
# Algorithms that are one TRL DPO loss: the type fixes `loss_type`.
TRL_LOSS_OF_TYPE = {"ipo": "ipo", "sppo_hard": "sppo_hard"}
# Losses whose log-ratios `length_normalize` can average per token (sigmoid: TRL's sigmoid_norm;
# ipo: TRL already does; sppo: ours).
LENGTH_NORMALIZABLE = {"sigmoid", "ipo"}


class AlgorithmConfig(StrictModel):
    """- dpo: TRL's DPOTrainer with any `loss_type`; ipo and sppo_hard are those TRL losses.
    - sppo: Self-Play Preference Optimization with soft win probabilities from the reward model:
      per pair ((log-ratio(y_w) - (p_win - 1/2)/beta)^2 + (log-ratio(y_l) - (p_lose - 1/2)/beta)^2) / 2,
      beta = 1/eta.
    - rejection_sampling: best-of-N, then SFT on the best answers (TRL's SFTTrainer)."""

    type: AlgorithmType = "dpo"
    beta: float = Field(0.1, gt=0.0, le=100.0)
    eta: float | None = Field(None, ge=0.01, le=1e6, description="sppo, sppo_hard: SPPO's eta = 1/beta "
                              "(the SPPO card's eta 1000 is beta 0.001)")
    loss_type: str = Field("sigmoid", min_length=1, max_length=40,
                           description="dpo: any TRL DPO loss type: sigmoid, ipo, hinge, robust, ...")
    reference: Literal["round_start", "base"] = "round_start"
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    length_normalize: bool = Field(False, description="Average the log-ratios per completion token "
                                   "(dpo with sigmoid, ipo, sppo)")

    @field_validator("loss_type")
    @classmethod
    def _loss_type(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z0-9_]+", v):
            raise ValueError("loss_type must be a TRL loss type name")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> AlgorithmConfig:
        if self.type in TRL_LOSS_OF_TYPE:
            wanted = TRL_LOSS_OF_TYPE[self.type]
            if self.loss_type not in ("sigmoid", wanted):
                raise ValueError(f"algorithm.type {self.type!r} is the TRL loss {wanted!r}; "
                                 f"loss_type {self.loss_type!r} contradicts it")
            self.loss_type = wanted
        elif self.type != "dpo" and self.loss_type != "sigmoid":
            raise ValueError(f"algorithm.loss_type applies to DPO losses, not {self.type!r}")
        if self.eta is not None:
            if self.type not in ("sppo", "sppo_hard"):
                raise ValueError("algorithm.eta applies to sppo and sppo_hard")
            if "beta" in self.model_fields_set and not math.isclose(self.beta, 1.0 / self.eta, rel_tol=1e-6):
                raise ValueError("algorithm.eta is 1/beta: give one of them, or both consistently")
            self.beta = 1.0 / self.eta
        if self.length_normalize and self.type != "sppo" and self.loss_type not in LENGTH_NORMALIZABLE:
            raise ValueError("algorithm.length_normalize works with sppo and the sigmoid and ipo losses")
        if self.type in ("sppo", "rejection_sampling") and self.label_smoothing:
            raise ValueError(f"algorithm.label_smoothing applies to DPO losses, not {self.type!r}")
        if self.type == "rejection_sampling" and self.reference != "round_start":
            raise ValueError("rejection_sampling has no reference model")
        return self


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


class EarlyStoppingConfig(StrictModel):
    """Stop after `patience` rounds in a row whose held-out mean reward does not beat the best
    earlier round by more than `min_delta`."""

    patience: int = Field(1, ge=1, le=20)
    min_delta: float = Field(0.0, ge=0.0)


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
    selection: Literal["best", "last"] = Field("best", description="The served model: the round with the "
                                               "highest held-out win rate, or the last round")
    early_stopping: EarlyStoppingConfig | None = Field(None, description="Stop when the held-out reward stops "
                                                       "improving; the job still succeeds")
    length_growth_warning: float | None = Field(0.2, gt=0.0, le=100.0, description="Warn (event "
                                                "round.length_growth) when the held-out mean length grows by "
                                                "more than this fraction in one round; null: never")

    @field_validator("base_model")
    @classmethod
    def _base_model(cls, v: str) -> str:
        return validate_model_name(v)

    @model_validator(mode="after")
    def _algorithm_fits(self) -> JobSpec:
        if self.algorithm.type == "rejection_sampling" and self.pairing.strategy != "best_vs_worst":
            raise ValueError("rejection_sampling trains on the best answer only; pairing.strategy does not apply")
        return self


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
