"""Rule rewards: declarative constraints scored without a model (seeds/004: "never give personal
financial advice" before there is a classifier for it).

An answer's rules reward is 0 when every rule holds; each broken regex rule (a `must_match` that
does not match, a `must_not_match` that does) costs `violation_penalty`, and each word outside
[`min_words`, `max_words`] costs `length_penalty`. Nothing a user sends is executed: patterns are
compiled by `re`, bounded in length and number by the job schema, and run on at most
`MAX_TEXT_CHARS` characters of an answer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MAX_TEXT_CHARS = 20_000


@dataclass(frozen=True)
class RuleSet:
    must_match: tuple[str, ...] = ()
    must_not_match: tuple[str, ...] = ()
    min_words: int | None = None
    max_words: int | None = None
    violation_penalty: float = 1.0
    length_penalty: float = 0.05

    @classmethod
    def from_config(cls, config: Any) -> RuleSet:
        """From `app.schemas.job_spec.RulesConfig` (or anything with the same attributes)."""
        return cls(must_match=tuple(config.must_match), must_not_match=tuple(config.must_not_match),
                   min_words=config.min_words, max_words=config.max_words,
                   violation_penalty=config.violation_penalty, length_penalty=config.length_penalty)


@dataclass(frozen=True)
class RuleCheck:
    violations: int
    words_outside: int
    reward: float

    @property
    def satisfied(self) -> bool:
        return self.violations == 0 and self.words_outside == 0


class RuleScorer:
    def __init__(self, rules: RuleSet) -> None:
        self.rules = rules
        self._must = [re.compile(p) for p in rules.must_match]
        self._must_not = [re.compile(p) for p in rules.must_not_match]

    def check(self, text: str) -> RuleCheck:
        text = text[:MAX_TEXT_CHARS]
        violations = sum(p.search(text) is None for p in self._must)
        violations += sum(p.search(text) is not None for p in self._must_not)
        words = len(text.split())
        outside = 0
        if self.rules.min_words is not None and words < self.rules.min_words:
            outside = self.rules.min_words - words
        if self.rules.max_words is not None and words > self.rules.max_words:
            outside = words - self.rules.max_words
        reward = -(self.rules.violation_penalty * violations + self.rules.length_penalty * outside)
        return RuleCheck(violations=violations, words_outside=outside, reward=reward)

    def rewards(self, responses: Sequence[str]) -> list[float]:
        return [self.check(r).reward for r in responses]

    def satisfaction_rate(self, responses: Sequence[str]) -> float:
        """Share of answers that keep every rule."""
        if not responses:
            return 0.0
        return sum(self.check(r).satisfied for r in responses) / len(responses)
