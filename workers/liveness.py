"""Worker liveness for probes, and draining on shutdown.

- `$ALIGND_HOME/worker-heartbeat` is touched on every Celery heartbeat and by the job heartbeat
  thread while a round runs (a solo-pool GPU worker's consumer loop is blocked for the whole
  round), so a file-age probe (deploy/scripts/worker-heartbeat-check.sh) tells a live worker from
  a hung one without a broker round trip.
- A worker is draining once Celery starts its warm shutdown (SIGTERM) or once
  `$ALIGND_HOME/drain` exists (the Kubernetes preStop hook writes it). A draining worker stops the
  running round at the next batch boundary and hands the job back to the queue, so another worker
  resumes it at the interrupted stage instead of the grace period killing it mid-stage. Training
  first saves a checkpoint at its current optimizer step, which the next worker resumes from
  (`workers.pipeline.train_checkpoint`). Multi-GPU training ranks, separate processes, cannot see
  `_draining`: they read the drain file themselves, and the worker passes a SIGTERM-only drain on
  as a marker file (`workers.distributed`).
"""

from __future__ import annotations

import threading
from pathlib import Path

from celery import signals

from app.core.config import get_settings

_draining = threading.Event()


def heartbeat_file() -> Path:
    return get_settings().home / "worker-heartbeat"


def drain_file() -> Path:
    return get_settings().home / "drain"


def touch_heartbeat() -> None:
    path = heartbeat_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def draining() -> bool:
    return _draining.is_set() or drain_file().exists()


@signals.worker_ready.connect
def _on_worker_ready(**_: object) -> None:
    _draining.clear()
    drain_file().unlink(missing_ok=True)  # left by a previous pod's preStop on a reused volume
    touch_heartbeat()


@signals.heartbeat_sent.connect
def _on_heartbeat(**_: object) -> None:
    touch_heartbeat()


@signals.worker_shutting_down.connect
def _on_shutting_down(**_: object) -> None:
    _draining.set()
