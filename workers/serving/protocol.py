"""Request bodies of the embedded model server (the OpenAI subset it implements) and how each
turns into sampling options. Pydantic only; the Hugging Face body is the API's own schema."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.schemas.inference import GenerateParameters
from workers.serving.engine import SamplingOptions

# Accepted by OpenAI, not implemented here: refused rather than silently ignored.
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions", "logit_bias",
               "response_format", "best_of")


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=300)
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    n: int = Field(1, ge=1, le=128)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    # vLLM's extensions, used by the benchmark to fix the number of generated tokens.
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    repetition_penalty: float | None = Field(None, gt=0.0)

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> _Request:
        extra = self.model_extra or {}
        used = [k for k in UNSUPPORTED if extra.get(k) not in ((None, False, 1) if k == "best_of" else (None, False))]
        if used:
            raise ValueError(f"not supported by the embedded model server: {', '.join(used)}")
        return self

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def options(self, max_new_tokens: int) -> SamplingOptions:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingOptions(max_new_tokens=max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                               top_k=max(self.top_k, 0), n=self.n, seed=self.seed, min_new_tokens=self.min_tokens,
                               ignore_eos=self.ignore_eos, repetition_penalty=self.repetition_penalty, stop=stop)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def as_message(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if p.get("type", "text") == "text")
        role = "system" if self.role == "developer" else self.role
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"message role {self.role!r} is not supported by the embedded model server")
        return {"role": role, "content": content or ""}


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @property
    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] = Field(min_length=1)
    max_tokens: int = Field(16, ge=1)

    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)


def generate_options(parameters: GenerateParameters) -> SamplingOptions:
    sampling = parameters.sampling
    temperature = (1.0 if parameters.temperature is None else parameters.temperature) if sampling else 0.0
    return SamplingOptions(max_new_tokens=parameters.max_new_tokens, temperature=temperature,
                           top_p=parameters.top_p or 1.0, top_k=parameters.top_k or 0,
                           n=parameters.num_return_sequences, seed=parameters.seed,
                           repetition_penalty=parameters.repetition_penalty, stop=tuple(parameters.stop))
