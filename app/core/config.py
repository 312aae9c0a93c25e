"""One settings object for the API, the workers and the CLI.

Every value comes from an `ALIGND_*` environment variable (or a `.env` file); nothing else in the
code base reads `os.environ`. With no settings at all alignd runs embedded: SQLite, a filesystem
Celery broker and the transformers model server, all under `ALIGND_HOME` (default `./var`).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# vLLM accepts only these as --max-lora-rank (LoRAConfig.max_lora_rank, vLLM 0.32).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ALIGND_", env_file=".env", extra="ignore")

    environment: str = Field("development", description="development | production")
    home: Path = Field(Path("var"), description="Root of embedded state (db, broker, artifacts)")

    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite under home")
    broker_url: str | None = Field(None, description="Celery broker; default filesystem under home")
    model_root: Path | None = Field(None, description="Directory of local models users may name")
    artifact_root: Path | None = Field(None, description="Where job artifacts are written")

    api_url: str = Field("http://127.0.0.1:8000", description="Where the CLI client finds the API")
    api_key: str | None = Field(None, description="The CLI client's bearer key")
    model_server_url: str = Field("http://127.0.0.1:8100", description="Embedded model server")

    # Serving fine-tuned models (GET /v1/models, /v1/chat/completions, /v1/completions, generate).
    # Base model name -> URL of the vLLM OpenAI server for it (`alignd vllm --base-model NAME`);
    # adapters of jobs on that base are loaded into it at run time. A full fine-tune's own name may
    # also be a key (its own `vllm serve`). Models without an entry go to the embedded server.
    vllm_base_urls: dict[str, str] = Field(default_factory=dict,
                                           description='JSON, e.g. {"org/base": "http://vllm:8000"}')
    vllm_max_loras: int = Field(8, ge=1, description="vLLM --max-loras: adapters in one batch")
    vllm_max_lora_rank: int = Field(64, ge=1, description="vLLM --max-lora-rank: largest servable rank")
    model_request_timeout_s: float = Field(600.0, gt=0, description="Read timeout of a proxied request")
    best_of_max: int = Field(16, ge=2, description="Largest best_of a request may ask for")
    rerank_timeout_s: float = Field(120.0, gt=0, description="How long the API waits for a rerank")
    model_server_cache_size: int = Field(4, ge=1, description="Models the embedded server keeps loaded")

    max_upload_bytes: int = 50 * 1024 * 1024
    max_json_body_bytes: int = 1024 * 1024
    max_prompts: int = 1_000_000
    idempotency_ttl_hours: int = 24

    # A round must finish well inside the broker's visibility timeout or Redis redelivers it.
    visibility_timeout_s: int = 6 * 3600
    heartbeat_interval_s: float = 10.0
    stale_after_s: float = 120.0
    requeue_interval_s: float = 30.0
    max_attempts: int = 3

    # [[min_billion_params, queue], ...]: e.g. [[30, "gpu-h200"], [0, "gpu-a100"]]. Full
    # fine-tuning counts three times the parameters (weights, gradients, optimizer state).
    gpu_queue_routes: list[tuple[float, str]] = Field(default_factory=list)

    # Base URLs of OpenAI-compatible endpoints a job's `judge` reward may call (e.g.
    # ["http://judge.internal:8000/v1"]); a job's endpoint must be one of them or below one. Empty:
    # judge rewards are off.
    judge_endpoint_allowlist: list[str] = Field(default_factory=list)

    webhook_max_retries: int = 8
    webhook_timeout_s: float = 10.0

    @field_validator("vllm_max_lora_rank")
    @classmethod
    def _a_rank_vllm_accepts(cls, rank: int) -> int:
        if rank not in VLLM_LORA_RANKS:
            raise ValueError(f"vLLM's --max-lora-rank must be one of {list(VLLM_LORA_RANKS)}, got {rank}")
        return rank

    @model_validator(mode="after")
    def _refuse_dev_defaults_in_production(self) -> Settings:
        if self.environment == "production":
            missing = [n for n in ("database_url", "broker_url", "model_root", "artifact_root")
                       if getattr(self, n) is None]
            if missing:
                raise ValueError(f"production needs explicit settings: {', '.join(missing)}")
        return self

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.home / 'alignd.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_folder(self) -> Path:
        return (self.home / "broker").resolve()

    @property
    def resolved_model_root(self) -> Path:
        return (self.model_root or self.home / "models").resolve()

    @property
    def resolved_artifact_root(self) -> Path:
        return (self.artifact_root or self.home / "artifacts").resolve()

    @property
    def is_sqlite(self) -> bool:
        return self.resolved_database_url.startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    return Settings()


def reset_settings_cache() -> None:
    """Tests change the environment and call this so every module sees the new settings."""
    get_settings.cache_clear()
