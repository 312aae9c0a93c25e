"""Model names the embedded server answers to, and what to load for each.

- A fine-tuned model (`ft:...`): its `served_models` row (registered on first use from the job,
  as the API does), i.e. the base model plus the job's adapter, or the job's full model.
- A base model: a directory under the model root (or a hub id), as a job names it.

Names are the only input; paths come from the database and the configured roots. Served-model
rows never change once written, so answers are cached.
"""

from __future__ import annotations

import threading
from pathlib import Path

from app.core.config import Settings
from app.core.errors import NotFound
from app.core.model_names import ModelNameError, resolve_model_name
from app.db.session import session_scope
from app.services.served_models import FINE_TUNED_PREFIX, ensure_registered
from workers.serving.engine import ModelSource


class ModelResolver:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._sources: dict[str, ModelSource] = {}
        self._lock = threading.Lock()

    def _base_location(self, name: str) -> str:
        try:
            return resolve_model_name(name, self.settings.resolved_model_root).location
        except ModelNameError as exc:
            raise NotFound(f"The model {name!r} does not exist: {exc}", param="model",
                           code="model_not_found") from exc

    def _resolve(self, name: str) -> ModelSource:
        if not name.startswith(FINE_TUNED_PREFIX):
            return ModelSource(name=name, base_location=self._base_location(name))
        with session_scope() as session:
            served = ensure_registered(session, name=name, tenant_id=None)
        if not served.is_adapter:
            return ModelSource(name=name, base_location=served.model_path)
        return ModelSource(name=name, base_location=self._base_location(served.base_model),
                           adapter_dir=Path(served.model_path))

    def source(self, name: str) -> ModelSource:
        with self._lock:
            cached = self._sources.get(name)
        if cached is not None:
            return cached
        source = self._resolve(name)
        with self._lock:
            self._sources[name] = source
        return source
