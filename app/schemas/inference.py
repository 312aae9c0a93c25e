"""Protocol of the model-serving endpoints: OpenAI's models, chat completions and completions, and
Hugging Face's `generate` ({"inputs", "parameters"} -> [{"generated_text"}]).

The OpenAI bodies are validated only where alignd acts on them (model, n, stream, best-of) and
otherwise passed through to the backend as sent (`extra="allow"`), as a gateway should: sampling
parameters are the backend's business. `best_of` + `rerank` is alignd's: N samples reranked by the
job's reward model (vLLM's V1 engine dropped `best_of`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MODEL_NAME = Field(min_length=1, max_length=300, description="A fine-tuned model name (`ft:...`)")


class BestOf(BaseModel):
    """`best_of` samples, reranked by the job's reward model; the top `n` are returned."""

    best_of: int | None = Field(None, ge=1, description="Candidates to sample (needs rerank: true)")
    rerank: bool = Field(False, description="Rank the best_of candidates with the job's reward model")

    @property
    def wants_rerank(self) -> bool:
        return (self.best_of or 1) > 1

    def check_best_of(self, n: int) -> None:
        if self.best_of is not None and self.best_of > 1 and not self.rerank:
            raise ValueError("best_of needs rerank: true (candidates are ranked by the job's reward model)")
        if self.rerank and (self.best_of or 1) < 2:
            raise ValueError("rerank needs best_of >= 2")
        if self.wants_rerank and n > (self.best_of or 1):
            raise ValueError("n must not exceed best_of")


class _OpenAIRequest(BestOf):
    model_config = ConfigDict(extra="allow")

    model: str = MODEL_NAME
    n: int = Field(1, ge=1, le=128)
    stream: bool = False

    @model_validator(mode="after")
    def _best_of(self) -> _OpenAIRequest:
        self.check_best_of(self.n)
        return self

    def backend_body(self) -> dict[str, Any]:
        """What the backend gets: the request as sent, minus alignd's own fields."""
        return self.model_dump(exclude_unset=True, exclude={"best_of", "rerank"})


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str = Field(min_length=1, max_length=32)
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str] | list[int] = Field(description="Text, texts, or token ids")

    @model_validator(mode="after")
    def _one_prompt_for_rerank(self) -> CompletionRequest:
        if self.wants_rerank and not (isinstance(self.prompt, str) or (
                len(self.prompt) == 1 and isinstance(self.prompt[0], str))):
            raise ValueError("best_of with rerank takes one text prompt")
        return self

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else str(self.prompt[0])


class GenerateParameters(BestOf):
    """Hugging Face text-generation parameters (the Inference API / TGI names)."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(20, ge=1, le=8192)
    temperature: float | None = Field(None, ge=0.0, le=100.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    do_sample: bool | None = Field(None, description="Default: sample when temperature/top_p/top_k is set")
    repetition_penalty: float | None = Field(None, gt=0.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: list[str] = Field(default_factory=list, max_length=8)
    return_full_text: bool = False
    num_return_sequences: int = Field(1, ge=1, le=64)
    details: bool = Field(False, description="Add finish reason, token counts and seed")
    decoder_input_details: bool = Field(False, description="Add the prompt token ids the model was fed")

    @model_validator(mode="after")
    def _best_of(self) -> GenerateParameters:
        self.check_best_of(self.num_return_sequences)
        return self

    @property
    def sampling(self) -> bool:
        if self.do_sample is not None:
            return self.do_sample and self.temperature != 0
        return any(v is not None for v in (self.top_p, self.top_k)) or bool(self.temperature)


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: str = Field(min_length=1, max_length=200_000,
                        examples=["[INST] Recommend me some Hollywood movies [/INST]"])
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    options: dict[str, Any] | None = Field(None, description="Accepted for Inference API compatibility")


class GeneratedText(BaseModel):
    model_config = ConfigDict(extra="allow")

    generated_text: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    parent: str = Field(description="The base model")
    root: str = Field(description="The base model")
    job: str
    method: Literal["lora", "full"]
    backend: Literal["vllm", "embedded"]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
