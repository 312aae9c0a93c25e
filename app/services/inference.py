"""Serving a tenant's fine-tuned models: resolve the name, pick the backend, proxy or best-of-N.

Each request reads as stages: `resolve` (tenant-scoped name -> served model, 404/409), `backend_for`
(vLLM or the embedded server), then either a passthrough (JSON or SSE) or, with `best_of` +
`rerank`, sample N -> rerank on a worker -> keep the top n.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi.concurrency import run_in_threadpool

from app.core.config import get_settings
from app.core.errors import UnprocessableRequest
from app.db.models import Job, Tenant
from app.db.session import read_session_factory, session_scope
from app.schemas.inference import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    ModelCard,
    ModelList,
)
from app.services import served_models
from app.services.model_backends import ModelBackend, backend_for
from app.services.rerank import ranked, rerank
from app.services.served_models import ServedModelInfo, route_for


@dataclass
class InferenceResult:
    """A JSON answer, or an SSE byte stream to pass on."""

    body: Any = None
    stream: AsyncIterator[bytes] | None = None


def _register(tenant_id: str, name: str) -> ServedModelInfo:
    with session_scope() as session:
        return served_models.ensure_registered(session, name=name, tenant_id=tenant_id)


async def resolve(*, tenant: Tenant, name: str) -> ServedModelInfo:
    """The tenant's model called `name`; 404 if unknown or another tenant's, 409 while training."""
    model = await served_models.lookup(read_session_factory(), tenant=tenant, name=name)
    if model is None:
        model = await run_in_threadpool(_register, tenant.id, name)
        served_models.remember(model)
    return model


def _check_best_of(best_of: int | None) -> None:
    limit = get_settings().best_of_max
    if best_of is not None and best_of > limit:
        raise UnprocessableRequest(f"best_of: at most {limit}", param="best_of", code="invalid_value")


def _message_text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


def _sse(chunks: list[dict[str, Any]]) -> AsyncIterator[bytes]:
    async def events() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return events()


def _rerank_info(candidates: list[str], scores: list[float], order: list[int]) -> dict[str, Any]:
    return {"best_of": len(candidates), "scores": scores, "chosen": order, "candidates": candidates}


async def _best_of_choices(model: ServedModelInfo, backend: ModelBackend, path: str, body: dict[str, Any],
                           prompt: Any, best_of: int, n: int, text_of: Any) -> dict[str, Any]:
    """Sample `best_of` answers in one backend call, rerank them, keep the top `n` (re-indexed)."""
    body = {**body, "n": best_of, "stream": False}
    body.pop("stream_options", None)
    answer = await backend.post(path, body)
    choices = sorted(answer["choices"], key=lambda c: c["index"])
    candidates = [text_of(c) for c in choices]
    scores = await rerank(tenant_id=model.tenant_id, job_id=model.job_id, prompt=prompt, candidates=candidates)
    order = ranked(scores, n)
    answer["choices"] = [{**choices[i], "index": k} for k, i in enumerate(order)]
    answer["rerank"] = _rerank_info(candidates, scores, order)
    return answer


def _chat_stream_of(answer: dict[str, Any], include_usage: bool) -> AsyncIterator[bytes]:
    """A finished chat answer as the chunks a streaming client expects."""
    head = {"id": answer.get("id"), "object": "chat.completion.chunk", "created": answer.get("created"),
            "model": answer.get("model")}
    chunks = []
    for c in answer["choices"]:
        chunks.append({**head, "choices": [{"index": c["index"], "finish_reason": None, "delta": {
            "role": "assistant", "content": c["message"].get("content") or ""}}]})
        chunks.append({**head, "choices": [{"index": c["index"], "delta": {},
                                            "finish_reason": c.get("finish_reason")}]})
    chunks[-1]["rerank"] = answer["rerank"]
    if include_usage:
        chunks.append({**head, "choices": [], "usage": answer.get("usage")})
    return _sse(chunks)


def _completion_stream_of(answer: dict[str, Any], include_usage: bool) -> AsyncIterator[bytes]:
    head = {"id": answer.get("id"), "object": "text_completion", "created": answer.get("created"),
            "model": answer.get("model")}
    chunks = [{**head, "choices": [{"index": c["index"], "text": c["text"], "logprobs": None,
                                    "finish_reason": c.get("finish_reason")}]} for c in answer["choices"]]
    chunks[-1]["rerank"] = answer["rerank"]
    if include_usage:
        chunks.append({**head, "choices": [], "usage": answer.get("usage")})
    return _sse(chunks)


def _include_usage(request: ChatCompletionRequest | CompletionRequest) -> bool:
    options = getattr(request, "stream_options", None)
    return isinstance(options, dict) and bool(options.get("include_usage"))


async def chat_completions(*, tenant: Tenant, request: ChatCompletionRequest) -> InferenceResult:
    _check_best_of(request.best_of)
    model = await resolve(tenant=tenant, name=request.model)
    backend = backend_for(model)
    body = request.backend_body()
    if not request.wants_rerank:
        if request.stream:
            return InferenceResult(stream=await backend.stream("/v1/chat/completions", body))
        return InferenceResult(body=await backend.post("/v1/chat/completions", body))
    prompt = [{"role": m.role, "content": _message_text(m.content)} for m in request.messages]
    answer = await _best_of_choices(model, backend, "/v1/chat/completions", body, prompt, request.best_of,
                                    request.n, lambda c: c["message"].get("content") or "")
    if request.stream:
        return InferenceResult(stream=_chat_stream_of(answer, _include_usage(request)))
    return InferenceResult(body=answer)


async def completions(*, tenant: Tenant, request: CompletionRequest) -> InferenceResult:
    _check_best_of(request.best_of)
    model = await resolve(tenant=tenant, name=request.model)
    backend = backend_for(model)
    body = request.backend_body()
    if not request.wants_rerank:
        if request.stream:
            return InferenceResult(stream=await backend.stream("/v1/completions", body))
        return InferenceResult(body=await backend.post("/v1/completions", body))
    answer = await _best_of_choices(model, backend, "/v1/completions", body, request.prompt_text,
                                    request.best_of, request.n, lambda c: c["text"])
    if request.stream:
        return InferenceResult(stream=_completion_stream_of(answer, _include_usage(request)))
    return InferenceResult(body=answer)


async def generate(*, tenant: Tenant, name: str, request: GenerateRequest) -> list[dict[str, Any]]:
    """Hugging Face style: the text is the prompt as is (one BOS, no template); a list of outputs."""
    parameters = request.parameters
    _check_best_of(parameters.best_of)
    model = await resolve(tenant=tenant, name=name)
    backend = backend_for(model)
    if not parameters.wants_rerank:
        return await backend.generate(request.inputs, parameters, parameters.num_return_sequences)
    outputs = await backend.generate(request.inputs, parameters, parameters.best_of)
    candidates = [o["generated_text"] for o in outputs]
    if parameters.return_full_text:
        candidates = [c[len(request.inputs):] for c in candidates]
    scores = await rerank(tenant_id=model.tenant_id, job_id=model.job_id, prompt=request.inputs,
                          candidates=candidates)
    order = ranked(scores, parameters.num_return_sequences)
    return [{**outputs[i], "rerank": _rerank_info(candidates, scores, order)} for i in order]


def model_card(job: Job, tenant: Tenant) -> ModelCard:
    method = (job.spec.get("training") or {}).get("method", "lora")
    info = ServedModelInfo(name=job.fine_tuned_model, tenant_id=job.tenant_id, job_id=job.id,
                           base_model=job.base_model, model_path="", is_adapter=method == "lora",
                           created_at=job.finished_at or job.created_at)
    created = job.finished_at or job.created_at
    return ModelCard(id=job.fine_tuned_model, created=int(created.timestamp()), owned_by=tenant.name,
                     parent=job.base_model, root=job.base_model, job=job.id, method=method,
                     backend=route_for(info, get_settings()).kind)


def list_models(*, tenant: Tenant) -> ModelList:
    with session_scope() as session:
        return ModelList(data=[model_card(job, tenant) for job in served_models.list_models(session, tenant=tenant)])


def _card_of_job(job_id: str, tenant: Tenant) -> ModelCard:
    with session_scope() as session:
        return model_card(session.get(Job, job_id), tenant)


async def retrieve_model(*, tenant: Tenant, name: str) -> ModelCard:
    model = await resolve(tenant=tenant, name=name)
    return await run_in_threadpool(_card_of_job, model.job_id, tenant)
