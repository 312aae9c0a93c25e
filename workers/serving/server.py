"""`alignd model-server`: the embedded backend. OpenAI's `/v1/chat/completions`, `/v1/completions`
(with `stream`) and `/v1/models`, Hugging Face's `POST /v1/models/{model}/generate`, on transformers.

It serves what vLLM would in production, so the whole path (job -> fine-tuned model -> query) works
on a laptop and in CI. Internal: the alignd API is its client and does tenancy; it listens on
127.0.0.1 by default.

Prompts: chat messages are rendered with the model's chat template, or Mistral's `[INST]` format
when it has none, with exactly one BOS (`workers.pipeline.prompts`, as in training). Text prompts
(completions, generate) are tokenized as given, without adding special tokens, then given exactly
one BOS. `generate` with `parameters.decoder_input_details` reports the prompt token ids the model
was fed (`details.prefill`), as Hugging Face's TGI does.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from app.core.config import Settings, get_settings
from app.core.errors import AlignError, InvalidRequest, NotFound, install_error_handlers
from app.schemas.inference import GenerateRequest
from workers.errors import ModelNotFound, PipelineError
from workers.pipeline.prompts import render_prompt_ids, with_single_bos
from workers.serving import responses
from workers.serving.engine import ContextTooLong, Engine, LoadedModel, ModelCache, SamplingOptions
from workers.serving.protocol import ChatRequest, CompletionRequest, generate_options
from workers.serving.resolver import ModelResolver

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DEFAULT_CHAT_MAX_TOKENS = 512


class ModelUnavailable(AlignError):
    status_code = 503
    type = "service_unavailable_error"
    code = "model_not_loadable"


def text_prompt_ids(loaded: LoadedModel, text: str) -> list[int]:
    """The text tokenized as given (no template, no added special tokens), with exactly one BOS."""
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    return with_single_bos(list(ids), loaded.bos_id)


class CompletionServer:
    """The request pipeline: resolve the name -> load the model -> tokenize -> generate -> format."""

    def __init__(self, settings: Settings) -> None:
        self.resolver = ModelResolver(settings)
        self.engine = Engine(ModelCache(settings.model_server_cache_size))

    async def model(self, name: str) -> LoadedModel:
        source = await run_in_threadpool(self.resolver.source, name)
        try:
            return await self.engine.load(source)
        except ModelNotFound as exc:
            raise NotFound(exc.message, param="model", code="model_not_found") from exc
        except PipelineError as exc:
            raise ModelUnavailable(f"model {name!r} cannot be loaded: {exc.message}", param="model") from exc

    def _budget(self, loaded: LoadedModel, prompt_ids: list[int], requested: int | None) -> int:
        if requested is None:
            room = (loaded.max_length or DEFAULT_CHAT_MAX_TOKENS + len(prompt_ids)) - len(prompt_ids)
            requested = max(1, min(DEFAULT_CHAT_MAX_TOKENS, room))
        try:
            self.engine.check_length(loaded, prompt_ids, requested)
        except ContextTooLong as exc:
            raise InvalidRequest(str(exc), param="max_tokens", code="context_length_exceeded") from exc
        return requested

    async def chat(self, request: ChatRequest) -> dict[str, Any] | AsyncIterator[bytes]:
        loaded = await self.model(request.model)
        try:
            messages = [m.as_message() for m in request.messages]
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="messages") from exc
        prompt_ids = render_prompt_ids(loaded.tokenizer, messages)
        options = request.options(self._budget(loaded, prompt_ids, request.requested_tokens))
        if request.stream:
            return responses.chat_chunks(request.model, self.engine.stream(loaded, prompt_ids, options), options.n,
                                         len(prompt_ids), request.include_usage)
        completions = await self.engine.generate(loaded, prompt_ids, options)
        return responses.chat_completion(request.model, completions, len(prompt_ids))

    async def complete(self, request: CompletionRequest) -> dict[str, Any] | AsyncIterator[bytes]:
        loaded = await self.model(request.model)
        prompts = [text_prompt_ids(loaded, p) if isinstance(p, str) else p for p in request.prompts()]
        options = [request.options(self._budget(loaded, ids, request.max_tokens)) for ids in prompts]
        if request.stream:
            streams = [(len(ids), self.engine.stream(loaded, ids, o)) for ids, o in zip(prompts, options, strict=True)]
            return responses.completion_chunks(request.model, streams, request.n, request.include_usage)
        results = [(ids, await self.engine.generate(loaded, ids, o)) for ids, o in zip(prompts, options, strict=True)]
        return responses.text_completion(request.model, results)

    async def generate(self, name: str, request: GenerateRequest) -> list[dict[str, Any]]:
        parameters = request.parameters
        if parameters.wants_rerank:
            raise InvalidRequest("best_of with rerank is done by the alignd API, not the model server",
                                 param="parameters.best_of")
        loaded = await self.model(name)
        prompt_ids = text_prompt_ids(loaded, request.inputs)
        options: SamplingOptions = generate_options(parameters)
        self._budget(loaded, prompt_ids, options.max_new_tokens)
        completions = await self.engine.generate(loaded, prompt_ids, options)
        return responses.generated_texts(loaded, request.inputs, prompt_ids, completions,
                                         return_full_text=parameters.return_full_text, details=parameters.details,
                                         decoder_input_details=parameters.decoder_input_details,
                                         seed=parameters.seed)


def _answer(result: dict[str, Any] | AsyncIterator[bytes]) -> JSONResponse | StreamingResponse:
    if isinstance(result, dict):
        return JSONResponse(result)
    return StreamingResponse(result, media_type="text/event-stream", headers=SSE_HEADERS)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    server = CompletionServer(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        server.engine.close()

    app = FastAPI(title="alignd model server", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    app.state.server = server

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        now = int(time.time())
        return {"object": "list", "data": [{"id": name, "object": "model", "created": now, "owned_by": "alignd"}
                                           for name in server.engine.cache.loaded_names()]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest):  # noqa: ANN202 — JSON or SSE
        return _answer(await server.chat(request))

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):  # noqa: ANN202 — JSON or SSE
        return _answer(await server.complete(request))

    @app.post("/v1/models/{model}/generate")
    async def generate(model: str, request: GenerateRequest) -> JSONResponse:
        return JSONResponse(await server.generate(model, request))

    return app
