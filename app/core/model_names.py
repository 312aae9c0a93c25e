"""Turn a user's model name into something a loader may open, without importing any ML library.

A name is either a directory under the configured model root (`tiny-mistral`, `acme/rm-v2`) or a
hub id (`org/name`). Users never pass filesystem paths; a name that resolves outside the root (via
`..` or a symlink) is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app.schemas.job_spec import validate_model_name


class ModelNameError(ValueError):
    """The name is malformed or points outside the model root."""


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    location: str  # a local directory or a hub id
    is_local: bool


def resolve_model_name(name: str, model_root: Path) -> ResolvedModel:
    try:
        validate_model_name(name)
    except ValueError as exc:
        raise ModelNameError(str(exc)) from exc
    root = model_root.resolve()
    candidate = (root / name).resolve()
    if candidate != root and root in candidate.parents:
        if candidate.is_dir():
            return ResolvedModel(name=name, location=str(candidate), is_local=True)
    elif (root / name).exists():
        raise ModelNameError(f"model {name!r} resolves outside the model root")
    if "/" in name:
        return ResolvedModel(name=name, location=name, is_local=False)
    raise ModelNameError(f"no model named {name!r} under the model root, and it is not a hub id")
