"""Prompt rendering for the policy: its own chat template, else Mistral's `[INST]` format.

Token ids always start with exactly one BOS: the template may already write it, and tokenizing the
rendered text must then not add another (`add_special_tokens=False`); when the template has no BOS
and the tokenizer defines one, it is prepended once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from workers.errors import InvalidPrompts

Messages = list[dict[str, str]]

# Mistral-Instruct's format (Snorkel recipe): `<s>[INST] {prompt} [/INST] {answer}</s>`. A system
# message is folded into the next user turn, as Mistral's own template does.
MISTRAL_FALLBACK_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = m['content'] + '\n\n' %}"
    "{% elif m['role'] == 'user' %}[INST] {{ ns.system }}{{ m['content'] }} [/INST]{% set ns.system = '' %}"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
_ROLES = {"system", "user", "assistant"}


def validate_prompt(messages: Any) -> Messages:
    """A prompt is a non-empty list of {role, content} messages whose last one is the user's."""
    if not isinstance(messages, list) or not messages:
        raise InvalidPrompts("each prompt must be a non-empty list of chat messages")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise InvalidPrompts("each message needs a role (system|user|assistant) and a string content")
    if messages[-1]["role"] != "user":
        raise InvalidPrompts("the last message of a prompt must be the user's")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def ensure_chat_template(tokenizer: Any) -> bool:
    """Give a template-less tokenizer the Mistral fallback (in memory); True when it was needed."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = MISTRAL_FALLBACK_TEMPLATE
    return True


def with_single_bos(ids: list[int], bos_id: int | None) -> list[int]:
    if bos_id is None:
        return ids
    start = 0
    while start < len(ids) and ids[start] == bos_id:
        start += 1
    return [bos_id] + ids[start:]


def render_prompt_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of the prompt with the generation prompt appended, exactly one leading BOS."""
    return render_prompts_ids(tokenizer, [messages])[0]


def render_prompts_ids(tokenizer: Any, prompts: Sequence[Sequence[dict[str, str]]]) -> list[list[int]]:
    """`render_prompt_ids` of every prompt, tokenized in one batch call (the same ids, faster)."""
    if not prompts:
        return []
    ensure_chat_template(tokenizer)
    texts = [tokenizer.apply_chat_template(list(m), tokenize=False, add_generation_prompt=True) for m in prompts]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [with_single_bos(list(ids), tokenizer.bos_token_id) for ids in encoded]
