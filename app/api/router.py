from fastapi import APIRouter

from app.api.routes import health, inference, jobs, me, prompt_sets

api_router = APIRouter()
api_router.include_router(health.router)
api_router.include_router(me.router)
api_router.include_router(prompt_sets.router)
api_router.include_router(jobs.router)
api_router.include_router(inference.router)
