"""OpenAI and Hugging Face response shapes, whole and as server-sent event chunks."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from workers.serving.engine import Completion, LoadedModel, StreamUpdate


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def chat_completion(model: str, completions: list[Completion], prompt_tokens: int) -> dict[str, Any]:
    return {
        "id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                     "finish_reason": c.finish_reason} for i, c in enumerate(completions)],
        "usage": usage(prompt_tokens, sum(len(c.token_ids) for c in completions)),
    }


def text_completion(model: str, per_prompt: list[tuple[list[int], list[Completion]]]) -> dict[str, Any]:
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for prompt_ids, completions in per_prompt:
        prompt_tokens += len(prompt_ids)
        for c in completions:
            choices.append({"index": len(choices), "text": c.text, "logprobs": None,
                            "finish_reason": c.finish_reason})
            completion_tokens += len(c.token_ids)
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def generated_texts(loaded: LoadedModel, inputs: str, prompt_ids: list[int], completions: list[Completion], *,
                    return_full_text: bool, details: bool, decoder_input_details: bool,
                    seed: int | None) -> list[dict[str, Any]]:
    """`[{"generated_text": ...}]`, with TGI's `details` when asked (`prefill`: the prompt token
    ids exactly as the model received them)."""
    outputs = []
    for c in completions:
        out: dict[str, Any] = {"generated_text": inputs + c.text if return_full_text else c.text}
        if details or decoder_input_details:
            out["details"] = {
                "finish_reason": c.stopped_by, "generated_tokens": len(c.token_ids), "seed": seed,
                "tokens": [{"id": t, "text": loaded.tokenizer.decode([t])} for t in c.token_ids],
            }
            if decoder_input_details:
                out["details"]["prefill"] = [{"id": t, "text": loaded.tokenizer.decode([t])} for t in prompt_ids]
        outputs.append(out)
    return outputs


async def chat_chunks(model: str, steps: AsyncIterator[list[StreamUpdate]], n: int,
                      prompt_tokens: int, include_usage: bool) -> AsyncIterator[bytes]:
    head = {"id": new_id("chatcmpl"), "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model}
    for i in range(n):
        yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]})
    tokens: dict[int, int] = {}
    async for step in steps:
        for u in step:
            tokens[u.row] = u.tokens
            if u.text:
                yield sse({**head, "choices": [{"index": u.row, "delta": {"content": u.text}, "logprobs": None,
                                                "finish_reason": None}]})
            if u.finish_reason:
                yield sse({**head, "choices": [{"index": u.row, "delta": {}, "logprobs": None,
                                                "finish_reason": u.finish_reason}]})
    if include_usage:
        yield sse({**head, "choices": [], "usage": usage(prompt_tokens, sum(tokens.values()))})
    yield sse("[DONE]")


async def completion_chunks(model: str, streams: list[tuple[int, AsyncIterator[list[StreamUpdate]]]],
                            n: int, include_usage: bool) -> AsyncIterator[bytes]:
    """One stream per prompt, one after the other; choice index = prompt index * n + sample."""
    head = {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model}
    prompt_tokens = generated = 0
    for p, (prompt_length, steps) in enumerate(streams):
        prompt_tokens += prompt_length
        tokens: dict[int, int] = {}
        async for step in steps:
            for u in step:
                tokens[u.row] = u.tokens
                yield sse({**head, "choices": [{"index": p * n + u.row, "text": u.text, "logprobs": None,
                                                "finish_reason": u.finish_reason}]})
        generated += sum(tokens.values())
    if include_usage:
        yield sse({**head, "choices": [], "usage": usage(prompt_tokens, generated)})
    yield sse("[DONE]")
