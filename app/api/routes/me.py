from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel

from app.api.deps import TenantDep
from app.schemas.common import ERROR_RESPONSES

router = APIRouter(prefix="/v1", tags=["tenant"], responses=ERROR_RESPONSES)


class TenantRead(BaseModel):
    id: str
    object: Literal["tenant"] = "tenant"
    name: str
    webhook_secret: str


@router.get("/me", response_model=TenantRead)
def me(tenant: TenantDep) -> TenantRead:
    """The caller's tenant, with the secret its webhooks are signed with."""
    return TenantRead(id=tenant.id, name=tenant.name, webhook_secret=tenant.webhook_secret)
