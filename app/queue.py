"""The Celery application as the API sees it: configuration and sending tasks by name.

The API never imports `workers/`; it enqueues by task name. Workers build their Celery app from
the same `make_celery()` and register the tasks on it, so both ends agree on broker and routes.
"""

from __future__ import annotations

from functools import lru_cache

from celery import Celery
from kombu import Queue

from app.core.config import Settings, get_settings

GPU_QUEUES = ("gpu", "gpu-a100", "gpu-h200")
DEFAULT_QUEUE = "default"
# Best-of-N reranking with reward models: its own queue so a request never waits behind a job round.
RERANK_QUEUE = "rerank"

TASK_VALIDATE_JOB = "alignd.validate_job"
TASK_RUN_ROUND = "alignd.run_round"
TASK_DELIVER_WEBHOOK = "alignd.deliver_webhook"
TASK_REQUEUE_STALE = "alignd.requeue_stale_jobs"
TASK_PURGE_IDEMPOTENCY = "alignd.purge_idempotency_keys"
TASK_RERANK = "alignd.rerank"
TASK_PURGE_RERANK_REQUESTS = "alignd.purge_rerank_requests"


def broker_options(settings: Settings) -> dict[str, object]:
    if settings.resolved_broker_url.startswith("filesystem"):
        folder = settings.broker_folder
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
        }
    # Redis redelivers an unacknowledged task after this long: it must exceed the longest round.
    return {"visibility_timeout": settings.visibility_timeout_s}


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("alignd", broker=settings.resolved_broker_url, set_as_current=False)
    app.conf.update(
        broker_transport_options=broker_options(settings),
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        # A killed worker's task is not requeued by Celery; alignd counts attempts itself and the
        # housekeeping task requeues jobs whose heartbeat went stale.
        task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=1,
        task_default_queue=DEFAULT_QUEUE,
        task_queues=[Queue(DEFAULT_QUEUE)] + [Queue(q) for q in GPU_QUEUES] + [Queue(RERANK_QUEUE)],
        task_routes={
            TASK_VALIDATE_JOB: {"queue": DEFAULT_QUEUE},
            TASK_DELIVER_WEBHOOK: {"queue": DEFAULT_QUEUE},
            TASK_REQUEUE_STALE: {"queue": DEFAULT_QUEUE},
            TASK_PURGE_IDEMPOTENCY: {"queue": DEFAULT_QUEUE},
            TASK_RERANK: {"queue": RERANK_QUEUE},
            TASK_PURGE_RERANK_REQUESTS: {"queue": DEFAULT_QUEUE},
        },
        beat_schedule={
            "requeue-stale-jobs": {"task": TASK_REQUEUE_STALE, "schedule": settings.requeue_interval_s},
            "purge-idempotency-keys": {"task": TASK_PURGE_IDEMPOTENCY, "schedule": 3600.0},
            "purge-rerank-requests": {"task": TASK_PURGE_RERANK_REQUESTS, "schedule": 3600.0},
        },
        worker_hijack_root_logger=False,
        worker_enable_remote_control=not settings.resolved_broker_url.startswith("filesystem"),
    )
    return app


@lru_cache
def celery_client() -> Celery:
    return make_celery()


def send(task_name: str, args: list[object], queue: str | None = None, countdown: float | None = None) -> None:
    celery_client().send_task(task_name, args=args, queue=queue, countdown=countdown)


def broker_reachable(timeout: float = 2.0) -> bool:
    try:
        with celery_client().connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
        return True
    except Exception:  # noqa: BLE001 — readiness only reports, the caller answers 503
        return False
