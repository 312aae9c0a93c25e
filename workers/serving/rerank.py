"""Best-of-N reranking: score a prompt's N candidate answers with a job's reward model.

Reward models are loaded with the pipeline's loader (`workers.pipeline.score`) and kept: a rerank
worker answers many requests for the same few jobs. Scores are the pipeline's own for the job's
reward kind: an absolute reward (scalar, implicit, rules), or the mean bias-cancelled pairwise
logit over the other candidates (PairRM, judge).
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from app.core.config import Settings
from app.schemas.job_spec import RewardModelConfig
from workers.pipeline.prompts import Messages
from workers.pipeline.score import RewardModel, load_reward_model, reward_model_spec

_INST = re.compile(r"\[INST\](.*?)\[/INST\]", re.DOTALL)
_SPECIALS = re.compile(r"</?s>")


def prompt_messages(prompt: Any) -> Messages:
    """The conversation a reward model scores against: chat messages as sent (up to the last user
    turn), or raw text in Mistral's `[INST] ... [/INST]` format split back into turns (the reward
    model renders them with its own template), or other text as one user turn."""
    if isinstance(prompt, list):
        messages = [{"role": m["role"], "content": m["content"]} for m in prompt
                    if m.get("role") in ("system", "user", "assistant")]
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
        if last_user >= 0:
            return messages[:last_user + 1]
        return [{"role": "user", "content": "\n\n".join(m["content"] for m in messages)}]
    text = str(prompt)
    turns = list(_INST.finditer(text))
    if not turns:
        return [{"role": "user", "content": _SPECIALS.sub("", text).strip()}]
    messages: Messages = []
    for i, turn in enumerate(turns):
        messages.append({"role": "user", "content": turn.group(1).strip()})
        following = text[turn.end():turns[i + 1].start()] if i + 1 < len(turns) else ""
        answer = _SPECIALS.sub("", following).strip()
        if answer:
            messages.append({"role": "assistant", "content": answer})
    while messages and messages[-1]["role"] != "user":
        messages.pop()
    return messages


class RewardModelCache:
    """Loaded reward models by the job's reward-model config (its JSON), least recently used evicted."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._models: OrderedDict[str, RewardModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, load: Callable[[], RewardModel]) -> RewardModel:
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            model = load()
            self._models[key] = model
            while len(self._models) > self.size:
                self._models.popitem(last=False)
            return model


REWARD_MODELS = RewardModelCache()
# One scoring at a time per process: a fast tokenizer shared across threads can fail ("Already
# borrowed") and two forwards would only compete for the same cores.
_SCORING = threading.Lock()


def _load(config: RewardModelConfig, settings: Settings) -> RewardModel:
    """Every reward kind the pipeline knows (PairRM, scalar, implicit, judge, rules), as a round loads it."""
    return load_reward_model(reward_model_spec(config), settings.resolved_model_root,
                             judge_allowlist=tuple(settings.judge_endpoint_allowlist))


def score_candidates(config: RewardModelConfig, settings: Settings, prompt: Any, candidates: list[str]) -> list[float]:
    """The job's reward model's score of each candidate answer to `prompt`."""
    reward_model = REWARD_MODELS.get(config.model_dump_json(), lambda: _load(config, settings))
    with _SCORING:
        return list(reward_model.score_candidates([prompt_messages(prompt)], [candidates]).scores[0])
