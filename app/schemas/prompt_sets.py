from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel


class PromptSetRead(BaseModel):
    id: str
    object: Literal["prompt_set"] = "prompt_set"
    name: str
    format: str
    num_prompts: int
    sha256: str
    created_at: datetime


class PromptSetDeleted(BaseModel):
    id: str
    object: Literal["prompt_set"] = "prompt_set"
    deleted: bool = True
