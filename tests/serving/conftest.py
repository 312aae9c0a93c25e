"""One running alignd for the serving tests: API (uvicorn), GPU, default and rerank workers and the
embedded model server, each its own process, on a Postgres database and Redis index of its own; and
one model trained by a real one-round job through it. Module-scoped: the stack tests are one module."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.e2e.stack import Client, Stack, free_port, isolated_stack
from workers.tiny_models import synthetic_prompts

# One short round on the tiny policy with the scalar reward model (tests/e2e's FAST, fewer prompts).
JOB = {
    "base_model": "tiny-mistral",
    "reward_model": {"type": "scalar", "model": "tiny-rm", "batch_size": 16},
    "rounds": 1,
    "samples_per_prompt": 4,
    "eval_fraction": 0.25,
    "reuse_prompts": True,
    "generation": {"max_new_tokens": 12, "temperature": 1.0, "top_p": 1.0, "batch_size": 32},
    "training": {"learning_rate": 1e-2, "epochs": 2, "batch_size": 8, "max_length": 96, "max_prompt_length": 48,
                 "warmup_ratio": 0.0, "lr_scheduler_type": "constant", "lora": {"r": 8, "alpha": 16}},
    "algorithm": {"type": "dpo", "beta": 0.1},
    "suffix": "serve",
}


@dataclass
class Served:
    stack: Stack
    client: Client
    other: Client  # another tenant
    job: dict[str, Any]

    @property
    def model(self) -> str:
        return self.job["fine_tuned_model"]

    @property
    def api_base(self) -> str:
        return f"{self.stack.url}/v1"

    def openai(self, key: str | None = None):  # noqa: ANN201 — openai.OpenAI
        import openai

        return openai.OpenAI(base_url=self.api_base, api_key=key or self.client.key, max_retries=0, timeout=120)


def prompt_lines(n: int, seed: int) -> list[str]:
    return [p[-1]["content"] for p in synthetic_prompts(n, seed=seed)]


@pytest.fixture(scope="module")
def served(tiny_models, tmp_path_factory) -> Iterator[Served]:
    with isolated_stack(tiny_models.root, tmp_path_factory.mktemp("serving-stack"), redis_offset=11,
                        ALIGND_MODEL_SERVER_URL=f"http://127.0.0.1:{free_port()}",
                        ALIGND_RERANK_TIMEOUT_S="90") as stack:
        stack.start_api()
        stack.start_gpu_worker()
        stack.start_default_worker()
        stack.start_rerank_worker()
        stack.start_model_server()
        client = Client(stack, stack.key("serve"))
        other = Client(stack, stack.key("other"))
        prompt_set = client.upload(prompt_lines(32, seed=5))
        job = client.create_job({**JOB, "prompt_set": prompt_set["id"]})
        job = client.wait(job["id"], timeout=600)
        assert job["status"] == "succeeded", (job, stack.log("gpu-worker"))
        yield Served(stack=stack, client=client, other=other, job=job)
