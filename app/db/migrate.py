"""`alignd db upgrade`: Alembic is the only way the schema is made."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from app.core.config import get_settings

ALEMBIC_INI = Path(__file__).resolve().parents[2] / "alembic.ini"


def alembic_config(url: str | None = None) -> Config:
    config = Config(str(ALEMBIC_INI))
    config.attributes["url"] = url or get_settings().resolved_database_url
    return config


def upgrade(url: str | None = None, revision: str = "head") -> None:
    settings = get_settings()
    if (url or settings.resolved_database_url).startswith("sqlite"):
        settings.home.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), revision)
