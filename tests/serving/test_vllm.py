"""vLLM's OpenAI server as alignd starts it (`alignd vllm`'s command: multi-LoRA, safetensors, runtime
adapter loading), with the tiny Mistral and a LoRA adapter loaded at run time, queried with the
`openai` client and through the API's vLLM backend (the `[INST]` path with one BOS).

Needs vLLM (importable, on PATH, or at $ALIGND_TEST_VLLM) and a CUDA GPU; skipped otherwise.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from app.core.config import Settings
from app.schemas.inference import GenerateParameters
from app.services.model_backends import VllmBackend, load_adapter
from app.services.served_models import ServedModelInfo, route_for
from tests.e2e.stack import free_port
from workers.serving.vllm import VllmServer, environment, is_vllm_available

pytestmark = pytest.mark.vllm

ADAPTER_NAME = "ft:tiny-mistral:acme:vllm:0123456789abcdef01234567"


def _vllm_executable() -> str:
    configured = os.environ.get("ALIGND_TEST_VLLM")
    if configured:
        return configured
    if not is_vllm_available():
        pytest.skip("vLLM is not installed (GPU image only)")
    return shutil.which("vllm") or "vllm"


def _require_gpu() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a CUDA GPU")


def _make_adapter(base: Path, out: Path) -> Path:
    """A rank-8 LoRA adapter with non-zero weights (so it changes the answers), as safetensors."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True, trust_remote_code=False)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def vllm_server(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[tuple[str, Path, Path]]:
    executable = _vllm_executable()
    _require_gpu()
    tiny_models = request.getfixturevalue("tiny_models")  # only once vLLM can run: building takes a while
    home = tmp_path_factory.mktemp("vllm")
    adapter = _make_adapter(tiny_models.root / "tiny-mistral", home / "adapter")
    port = free_port()
    server = VllmServer(model_location=str(tiny_models.root / "tiny-mistral"), served_name="tiny-mistral", lora=True)
    argv = server.command(Settings(vllm_max_loras=2, vllm_max_lora_rank=8), host="127.0.0.1", port=port,
                          vllm=executable, chat_template=server.fallback_chat_template(home),
                          extra=["--max-model-len", "512", "--gpu-memory-utilization", "0.2", "--enforce-eager"])
    assert "--enable-lora" in argv and argv[argv.index("--load-format") + 1] == "safetensors"
    assert "--trust-remote-code" not in argv
    log = (home / "vllm.log").open("wb")
    proc = subprocess.Popen(argv, env={**os.environ, **environment()}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited:\n{(home / 'vllm.log').read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("vLLM did not start within 10 minutes")
            time.sleep(2)
        yield url, adapter, tiny_models.root
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_vllm_serves_an_adapter_loaded_at_run_time(vllm_server):
    import openai
    from transformers import AutoTokenizer

    url, adapter, model_root = vllm_server

    async def load_twice() -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            await load_adapter(client, url, ADAPTER_NAME, str(adapter))
            await load_adapter(client, url, ADAPTER_NAME, str(adapter))  # idempotent

    asyncio.run(load_twice())
    listed = {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
    assert {"tiny-mistral", ADAPTER_NAME} <= listed

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "what the small cat sees ?"}]
    chat = client.chat.completions.create(model=ADAPTER_NAME, messages=messages, max_tokens=8)
    assert chat.choices[0].message.content is not None and chat.usage.completion_tokens > 0
    adapted = client.completions.create(model=ADAPTER_NAME, prompt="the cat sees", max_tokens=8, temperature=0)
    base = client.completions.create(model="tiny-mistral", prompt="the cat sees", max_tokens=8, temperature=0)
    assert adapted.choices[0].text != base.choices[0].text  # the adapter is applied

    model = ServedModelInfo(name=ADAPTER_NAME, tenant_id="ten", job_id="job_0123456789abcdef01234567",
                            base_model="tiny-mistral", model_path=str(adapter), is_adapter=True,
                            created_at=datetime.now(UTC))
    route = route_for(model, Settings(vllm_base_urls={"tiny-mistral": url}))
    inputs = "<s>[INST] Recommend me some Hollywood movies [/INST]"

    async def generate() -> list[dict]:
        async with httpx.AsyncClient(timeout=120) as http:
            backend = VllmBackend(http, route, model)
            return await backend.generate(inputs, GenerateParameters(max_new_tokens=8, decoder_input_details=True), 1)

    [output] = asyncio.run(generate())
    tokenizer = AutoTokenizer.from_pretrained(model_root / "tiny-mistral")
    fed = [t["id"] for t in output["details"]["prefill"]]
    assert fed == tokenizer(inputs, add_special_tokens=False)["input_ids"] and fed.count(tokenizer.bos_token_id) == 1
    assert isinstance(output["generated_text"], str)
