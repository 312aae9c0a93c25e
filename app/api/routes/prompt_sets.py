from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import JSONResponse

from app.api.deps import IdempotencyKeyDep, SessionDep, TenantDep
from app.schemas.common import ERROR_RESPONSES, ListResponse
from app.schemas.prompt_sets import PromptSetDeleted, PromptSetRead
from app.services import prompt_sets as service
from app.services.idempotency import request_hash
from app.services.idempotent import create_once

router = APIRouter(prefix="/v1/prompt-sets", tags=["prompt sets"], responses=ERROR_RESPONSES)


@router.post("", status_code=201, response_model=PromptSetRead)
async def upload_prompt_set(session: SessionDep, tenant: TenantDep, idempotency_key: IdempotencyKeyDep,
                            file: Annotated[UploadFile, File(description="JSONL, CSV or Parquet")],
                            name: Annotated[str | None, Form(max_length=200)] = None) -> JSONResponse:
    data = await file.read()
    body_hash = request_hash(data, (name or "").encode("utf-8", "surrogatepass"),
                             (file.filename or "").encode("utf-8", "surrogatepass"))

    def create() -> dict:
        prompt_set = service.create_prompt_set(session, tenant=tenant, data=data, filename=file.filename,
                                               content_type=file.content_type, name=name)
        return service.to_read(prompt_set).model_dump(mode="json")

    outcome = create_once(session, tenant=tenant, endpoint="POST /v1/prompt-sets", key=idempotency_key,
                          body_hash=body_hash, create=create)
    return JSONResponse(outcome.body, status_code=outcome.status_code)


@router.get("", response_model=ListResponse[PromptSetRead])
def list_prompt_sets(session: SessionDep, tenant: TenantDep) -> ListResponse[PromptSetRead]:
    return ListResponse(data=[service.to_read(p) for p in service.list_prompt_sets(session, tenant=tenant)])


@router.get("/{prompt_set_id}", response_model=PromptSetRead)
def get_prompt_set(prompt_set_id: str, session: SessionDep, tenant: TenantDep) -> PromptSetRead:
    return service.to_read(service.get_prompt_set(session, tenant=tenant, prompt_set_id=prompt_set_id))


@router.delete("/{prompt_set_id}", response_model=PromptSetDeleted)
def delete_prompt_set(prompt_set_id: str, session: SessionDep, tenant: TenantDep) -> PromptSetDeleted:
    service.delete_prompt_set(session, tenant=tenant, prompt_set_id=prompt_set_id)
    session.commit()
    return PromptSetDeleted(id=prompt_set_id)
