"""The alignd API: a FastAPI app that stores jobs and hands work to Celery by task name."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.api.limits import BodySizeLimit, RejectNulInUrl
from app.api.metrics import MetricsMiddleware
from app.api.router import api_router
from app.core.config import get_settings
from app.core.errors import install_error_handlers
from app.db.fast_reads import close_readers
from app.db.session import dispose_async_engines
from app.services.model_backends import close_http_clients


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    yield
    await close_http_clients()
    await close_readers()
    await dispose_async_engines()


def create_app() -> FastAPI:
    settings = get_settings()
    app = FastAPI(title="alignd", version="0.1.0", lifespan=lifespan,
                  description="Alignment as a service: iterative preference optimisation jobs.")
    install_error_handlers(app)
    app.include_router(api_router)
    app.add_middleware(BodySizeLimit, json_limit=settings.max_json_body_bytes,
                       upload_limit=settings.max_upload_bytes)
    app.add_middleware(RejectNulInUrl)
    app.add_middleware(MetricsMiddleware)
    return app
