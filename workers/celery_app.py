"""The workers' Celery app: the API's configuration plus the task modules."""

from __future__ import annotations

from app.queue import make_celery

celery_app = make_celery()
celery_app.conf.include = [
    "workers.liveness",
    "workers.tasks.validate",
    "workers.tasks.rounds",
    "workers.tasks.webhooks",
    "workers.tasks.housekeeping",
    "workers.tasks.rerank",
]
