from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from app.api.deps import IdempotencyKeyDep, SessionDep, TenantDep
from app.api.event_stream import stream_events
from app.schemas.common import ERROR_RESPONSES, ListResponse
from app.schemas.job_spec import JobCreate
from app.schemas.jobs import JobEventRead, JobRead, JobRoundRead, JobStatus
from app.services import jobs as service
from app.services.events import list_events
from app.services.idempotency import request_hash
from app.services.idempotent import create_once

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=ERROR_RESPONSES)


@router.post("", status_code=201, response_model=JobRead)
async def create_job(body: JobCreate, request: Request, session: SessionDep, tenant: TenantDep,
                     idempotency_key: IdempotencyKeyDep) -> JSONResponse:
    created_job = None

    def create() -> dict:
        nonlocal created_job
        created_job = service.create_job(session, tenant=tenant, body=body)
        return service.summary(created_job)

    outcome = create_once(session, tenant=tenant, endpoint="POST /v1/jobs", key=idempotency_key,
                          body_hash=request_hash(await request.body()), create=create)
    if outcome.created and created_job is not None:
        service.enqueue_validation(created_job)
    return JSONResponse(outcome.body, status_code=outcome.status_code)


@router.get("", response_model=ListResponse[JobRead])
def list_jobs(session: SessionDep, tenant: TenantDep,
              limit: Annotated[int, Query(ge=1, le=100)] = 20,
              after: Annotated[str | None, Query(max_length=64)] = None,
              status: JobStatus | None = None) -> ListResponse[JobRead]:
    jobs, has_more = service.list_jobs(session, tenant=tenant, limit=limit, after=after, status=status)
    return ListResponse(data=[service.to_read(j) for j in jobs], has_more=has_more)


@router.get("/{job_id}", response_model=JobRead)
async def get_job(job_id: str, tenant: TenantDep) -> JSONResponse:
    # The polling hot path: async, one prepared query, no second validation pass.
    return JSONResponse(await service.get_job_document(tenant=tenant, job_id=job_id))


@router.post("/{job_id}/cancel", response_model=JobRead)
def cancel_job(job_id: str, session: SessionDep, tenant: TenantDep) -> JobRead:
    job = service.cancel_job(session, tenant=tenant, job_id=job_id)
    session.commit()
    service.notify(job)
    return service.to_read(job)


@router.get("/{job_id}/events", response_model=ListResponse[JobEventRead],
            responses={200: {"content": {"text/event-stream": {}}}})
def job_events(job_id: str, session: SessionDep, tenant: TenantDep,
               after: Annotated[int | None, Query(ge=0, le=2**62)] = None,
               limit: Annotated[int, Query(ge=1, le=1000)] = 100,
               stream: bool = False,
               last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=20)] = None):
    job = service.get_job(session, tenant=tenant, job_id=job_id)
    if stream:
        # A reconnecting EventSource sends the id of the last event it saw: resume after it.
        if after is None and last_event_id and last_event_id.isdigit():
            after = int(last_event_id)
        return StreamingResponse(stream_events(job.id, after=after), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    events, has_more = list_events(session, job_id=job.id, after=after, limit=limit)
    return ListResponse(data=[JobEventRead.model_validate(e, from_attributes=True) for e in events],
                        has_more=has_more)


@router.get("/{job_id}/rounds", response_model=ListResponse[JobRoundRead])
def job_rounds(job_id: str, session: SessionDep, tenant: TenantDep) -> ListResponse[JobRoundRead]:
    job = service.get_job(session, tenant=tenant, job_id=job_id)
    return ListResponse(data=service.list_rounds(session, job=job))
