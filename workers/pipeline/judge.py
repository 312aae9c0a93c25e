"""A judge reward: an OpenAI-compatible chat model asked which of two answers is better.

Every ordered pair (i first, j second) of a prompt's candidates is asked, so each pair is seen in
both orders; a verdict is +1 when the first answer wins and -1 when the second does (0 when the
reply names neither). The pairwise logit is

    D[i][j] = JUDGE_LOGIT * (v(i, j) - v(j, i)) / 2

so a verdict that follows the answer in both orders gives P = sigmoid(2) ~ 0.88 and one that
follows the position cancels to 0.5, as PairRM's both-orders averaging does. The score of a
candidate is the mean of its row of D.

The endpoint must be in the service's allowlist (`endpoint_allowed`), checked when the job is
validated and again here before any request. The prompt template is filled by plain replacement
of `{prompt}`, `{answer_a}` and `{answer_b}` (never `str.format`, which could reach attributes).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from app.core.endpoints import endpoint_allowed
from workers.errors import JudgeEndpointNotAllowed, JudgeUnavailable
from workers.pipeline.prompts import Messages

JUDGE_LOGIT = 2.0
_VERDICT = re.compile(r"\b([AB])\b")


@dataclass(frozen=True)
class JudgeSettings:
    endpoint: str
    model: str
    prompt_template: str
    temperature: float = 0.0
    max_tokens: int = 8
    timeout_s: float = 60.0
    max_concurrency: int = 8

    @classmethod
    def from_config(cls, config: Any, model: str) -> JudgeSettings:
        """From `app.schemas.job_spec.JudgeConfig` plus the judge model's name."""
        return cls(endpoint=config.endpoint, model=model, prompt_template=config.prompt_template,
                   temperature=config.temperature, max_tokens=config.max_tokens, timeout_s=config.timeout_s,
                   max_concurrency=config.max_concurrency)


def render_judge_prompt(template: str, prompt: Messages, answer_a: str, answer_b: str) -> str:
    request = prompt[-1]["content"] if len(prompt) == 1 else "\n".join(
        f"{m['role'].upper()}: {m['content']}" for m in prompt)
    # One pass, so an answer that contains "{answer_b}" is not substituted again.
    values = {"{prompt}": request, "{answer_a}": answer_a, "{answer_b}": answer_b}
    return re.sub(r"\{prompt\}|\{answer_a\}|\{answer_b\}", lambda m: values[m.group(0)], template)


def parse_verdict(reply: str) -> int:
    """+1 when the reply names A first, -1 for B, 0 when it names neither."""
    match = _VERDICT.search(reply.strip().upper()) if reply else None
    if match is None:
        return 0
    return 1 if match.group(1) == "A" else -1


class ChatJudge:
    """Asks the endpoint; one `httpx.Client` per judge, a small thread pool for concurrency."""

    def __init__(self, settings: JudgeSettings, allowlist: Sequence[str]) -> None:
        if not endpoint_allowed(settings.endpoint, allowlist):
            raise JudgeEndpointNotAllowed(f"judge endpoint {settings.endpoint!r} is not in this service's "
                                  "ALIGND_JUDGE_ENDPOINT_ALLOWLIST")
        import httpx

        self.settings = settings
        self.http = httpx.Client(timeout=settings.timeout_s, follow_redirects=False)
        self.unparsed = 0

    def ask(self, text: str) -> str:
        import httpx

        body = {"model": self.settings.model, "messages": [{"role": "user", "content": text}],
                "temperature": self.settings.temperature, "max_tokens": self.settings.max_tokens}
        url = self.settings.endpoint.strip().rstrip("/") + "/chat/completions"
        try:
            response = self.http.post(url, json=body)
            response.raise_for_status()
            return str(response.json()["choices"][0]["message"]["content"] or "")
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
            raise JudgeUnavailable(f"judge endpoint {self.settings.endpoint!r} failed: {exc}") from exc

    def verdicts(self, texts: Sequence[str]) -> list[int]:
        with ThreadPoolExecutor(max_workers=self.settings.max_concurrency) as pool:
            replies = list(pool.map(self.ask, texts))
        verdicts = [parse_verdict(r) for r in replies]
        self.unparsed += sum(v == 0 for v in verdicts)
        return verdicts

    def pairwise_logits(self, prompts: Sequence[Messages], candidates: Sequence[Sequence[str]],
                        on_batch: Callable[[], None] = lambda: None) -> list[list[list[float]]]:
        """D[b][i][j] for every prompt b (see the module docstring); one batch of requests per prompt."""
        matrices = []
        for prompt, cands in zip(prompts, candidates, strict=True):
            on_batch()
            k = len(cands)
            pairs = [(i, j) for i in range(k) for j in range(k) if i != j]
            texts = [render_judge_prompt(self.settings.prompt_template, prompt, cands[i], cands[j]) for i, j in pairs]
            vote = dict(zip(pairs, self.verdicts(texts), strict=True))
            matrices.append([[0.0 if i == j else JUDGE_LOGIT * (vote[i, j] - vote[j, i]) / 2 for j in range(k)]
                             for i in range(k)])
        return matrices
