"""Querying fine-tuned models: OpenAI's `/v1/models`, `/v1/chat/completions`, `/v1/completions`
(SSE streaming included) and Hugging Face's `POST /v1/models/{model}/generate`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from app.api.deps import TenantDep
from app.schemas.common import ErrorResponse
from app.schemas.inference import (
    ChatCompletionRequest,
    CompletionRequest,
    GeneratedText,
    GenerateRequest,
    ModelCard,
    ModelList,
)
from app.services import inference as service
from app.services.inference import InferenceResult

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 422, 502, 503, 504)
}
OPENAI_ANSWER: dict[int | str, dict[str, Any]] = {
    200: {"description": "The backend's OpenAI answer, or server-sent events with `stream: true`",
          "content": {"application/json": {}, "text/event-stream": {}}},
}

router = APIRouter(prefix="/v1", tags=["inference"], responses=ERRORS)


def _answer(result: InferenceResult) -> JSONResponse | StreamingResponse:
    if result.stream is not None:
        return StreamingResponse(result.stream, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return JSONResponse(result.body)


@router.get("/models", response_model=ModelList)
def list_models(tenant: TenantDep) -> ModelList:
    return service.list_models(tenant=tenant)


@router.get("/models/{model}", response_model=ModelCard)
async def retrieve_model(model: str, tenant: TenantDep) -> ModelCard:
    return await service.retrieve_model(tenant=tenant, name=model)


@router.post("/chat/completions", responses=OPENAI_ANSWER, response_class=JSONResponse)
async def chat_completions(body: ChatCompletionRequest, tenant: TenantDep):  # noqa: ANN201 — JSON or SSE
    return _answer(await service.chat_completions(tenant=tenant, request=body))


@router.post("/completions", responses=OPENAI_ANSWER, response_class=JSONResponse)
async def completions(body: CompletionRequest, tenant: TenantDep):  # noqa: ANN201 — JSON or SSE
    return _answer(await service.completions(tenant=tenant, request=body))


@router.post("/models/{model}/generate", response_model=list[GeneratedText])
async def generate(model: str, body: GenerateRequest, tenant: TenantDep) -> JSONResponse:
    return JSONResponse(await service.generate(tenant=tenant, name=model, request=body))
