"""The API's model backends against a stand-in for vLLM's OpenAI server (the routes and answers
alignd relies on: `/v1/models`, `/tokenize`, `/v1/completions`, `/v1/chat/completions` with SSE,
runtime `/v1/load_lora_adapter`), so the vLLM code path runs in CI; plus routing and errors."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from app.core.config import Settings
from app.schemas.inference import GenerateParameters
from app.services.model_backends import EmbeddedBackend, UpstreamError, VllmBackend, backend_for, load_adapter
from app.services.served_models import ServedModelInfo, job_id_of, route_for

BOS = 1
ADAPTER = "ft:base:acme::0123456789abcdef01234567"


def fake_vllm() -> tuple[FastAPI, dict]:
    """Serves the base model `base`; adapters exist only once loaded (as with runtime loading)."""
    state: dict = {"adapters": {}, "loads": 0, "completions": []}
    app = FastAPI()

    def known(name: str) -> bool:
        return name == "base" or name in state["adapters"]

    def missing(name: str) -> JSONResponse:
        return JSONResponse({"error": {"message": f"The model `{name}` does not exist.", "type": "NotFoundError",
                                       "code": 404}}, status_code=404)

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": n} for n in ["base", *state["adapters"]]]}

    @app.post("/v1/load_lora_adapter")
    async def load(request: Request):  # noqa: ANN202
        body = await request.json()
        await asyncio.sleep(0.05)  # loading takes a while: concurrent first requests overlap
        if body["lora_name"] in state["adapters"]:
            return JSONResponse({"error": {"message": f"The lora adapter '{body['lora_name']}' has already been "
                                                      "loaded.", "type": "InvalidUserInput", "code": 400}},
                                status_code=400)
        state["loads"] += 1
        state["adapters"][body["lora_name"]] = body["lora_path"]
        return JSONResponse(f"Success: LoRA adapter '{body['lora_name']}' added successfully.")

    @app.post("/tokenize")
    async def tokenize(request: Request):  # noqa: ANN202
        body = await request.json()
        if not known(body["model"]):
            return missing(body["model"])
        words = body["prompt"].replace("<s>", " <s> ").split()
        tokens = [BOS if w == "<s>" else 10 + len(w) for w in words]
        if body.get("add_special_tokens", True):
            tokens = [BOS, *tokens]
        return {"count": len(tokens), "tokens": tokens, "max_model_len": 512}

    @app.post("/v1/completions")
    async def completions(request: Request):  # noqa: ANN202
        body = await request.json()
        if not known(body["model"]):
            return missing(body["model"])
        state["completions"].append(body)
        return {"object": "text_completion", "model": body["model"], "choices": [
            {"index": i, "text": f" answer {i}", "finish_reason": "length"} for i in range(body.get("n", 1))]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):  # noqa: ANN202
        body = await request.json()
        if not known(body["model"]):
            return missing(body["model"])
        if body.get("stream"):
            async def events():  # noqa: ANN202
                for word in ("hello", " there"):
                    yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': word}}]})}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        return {"object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello there"}}]}

    return app, state


def served_model(is_adapter: bool = True, name: str = ADAPTER) -> ServedModelInfo:
    return ServedModelInfo(name=name, tenant_id="ten_1", job_id="job_0123456789abcdef01234567", base_model="base",
                           model_path="/artifacts/job_x/round-3/model", is_adapter=is_adapter,
                           created_at=datetime.now(UTC))


def vllm_backend(app: FastAPI, model: ServedModelInfo | None = None) -> VllmBackend:
    model = model or served_model()
    settings = Settings(vllm_base_urls={"base": "http://vllm"})
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
    return VllmBackend(client, route_for(model, settings), model)


def test_routing_by_settings():
    settings = Settings(vllm_base_urls={"base": "http://vllm-base:8000/", ADAPTER: "http://full:8000"},
                        model_server_url="http://embedded:8100")
    adapter = route_for(served_model(), settings)
    assert (adapter.kind, adapter.url, adapter.adapter_path) == ("vllm", "http://vllm-base:8000",
                                                                 "/artifacts/job_x/round-3/model")
    full = route_for(served_model(is_adapter=False), settings)
    assert (full.kind, full.url, full.adapter_path) == ("vllm", "http://full:8000", None)
    other_full = route_for(served_model(is_adapter=False, name="ft:base:acme::ffffffffffffffffffffffff"), settings)
    assert other_full.kind == "embedded" and other_full.url == "http://embedded:8100"
    assert route_for(served_model(), Settings(model_server_url="http://embedded:8100")).kind == "embedded"


def test_model_names_name_their_job():
    assert job_id_of("ft:tiny-mistral:acme:bot:0123456789abcdef01234567") == "job_0123456789abcdef01234567"
    assert job_id_of("ft:tiny-mistral:acme::abc") == "job_abc"
    assert job_id_of("tiny-mistral") is None and job_id_of("ft:x") is None and job_id_of("ft:a:b:c:../x") is None


def test_adapter_is_loaded_on_first_use_once_even_when_requests_race():
    app, state = fake_vllm()

    async def scenario() -> list:
        backend = vllm_backend(app)
        body = {"model": ADAPTER, "messages": [{"role": "user", "content": "hi"}]}
        answers = await asyncio.gather(*[backend.post("/v1/chat/completions", body) for _ in range(4)])
        answers.append(await backend.post("/v1/chat/completions", body))
        return answers

    answers = asyncio.run(scenario())
    assert all(a["choices"][0]["message"]["content"] == "hello there" for a in answers)
    assert state["loads"] == 1 and state["adapters"] == {ADAPTER: "/artifacts/job_x/round-3/model"}


def test_a_restarted_vllm_gets_the_adapter_again_and_streams_pass_through():
    app, state = fake_vllm()

    async def scenario() -> bytes:
        backend = vllm_backend(app)
        await load_adapter(backend.client, "http://vllm", ADAPTER, "/artifacts/job_x/round-3/model")
        await load_adapter(backend.client, "http://vllm", ADAPTER, "/artifacts/job_x/round-3/model")  # idempotent
        state["adapters"].clear()  # vLLM restarted: runtime adapters are gone
        stream = await backend.stream("/v1/chat/completions", {"model": ADAPTER, "stream": True, "messages": []})
        return b"".join([chunk async for chunk in stream])

    raw = asyncio.run(scenario())
    assert raw.count(b"data: ") == 3 and raw.endswith(b"data: [DONE]\n\n") and b"there" in raw
    assert state["loads"] == 2


def test_hf_generate_on_vllm_sends_token_ids_with_exactly_one_bos():
    app, state = fake_vllm()

    async def scenario(inputs: str, parameters: GenerateParameters) -> list:
        return await vllm_backend(app).generate(inputs, parameters, 2)

    params = GenerateParameters(max_new_tokens=7, temperature=0.5, top_k=5, seed=3, decoder_input_details=True)
    outputs = asyncio.run(scenario("<s><s>[INST] Recommend me movies [/INST]", params))
    sent = state["completions"][-1]
    assert sent["prompt"] == [BOS, 10 + 6, 10 + 9, 10 + 2, 10 + 6, 10 + 7] and sent["prompt"].count(BOS) == 1
    assert (sent["max_tokens"], sent["n"], sent["temperature"], sent["top_k"], sent["seed"]) == (7, 2, 0.5, 5, 3)
    assert [o["generated_text"] for o in outputs] == [" answer 0", " answer 1"]
    assert [t["id"] for t in outputs[0]["details"]["prefill"]] == sent["prompt"]
    asyncio.run(scenario("[INST] hi [/INST]", GenerateParameters()))
    assert state["completions"][-1]["prompt"] == [BOS, 16, 12, 17] and state["completions"][-1]["temperature"] == 0


def test_backend_errors_keep_the_envelope():
    app, _ = fake_vllm()

    async def unknown_full_model() -> None:
        model = served_model(is_adapter=False, name="ft:base:acme::ffffffffffffffffffffffff")
        settings = Settings(vllm_base_urls={model.name: "http://vllm"})
        backend = VllmBackend(httpx.AsyncClient(transport=httpx.ASGITransport(app=app)),
                              route_for(model, settings), model)
        await backend.post("/v1/completions", {"model": model.name, "prompt": "hi"})

    with pytest.raises(UpstreamError) as raised:
        asyncio.run(unknown_full_model())
    assert raised.value.status_code == 404 and "does not exist" in raised.value.message

    async def unreachable() -> None:
        model = served_model()
        settings = Settings(model_server_url="http://127.0.0.1:9")
        backend = backend_for(model, settings)
        assert isinstance(backend, EmbeddedBackend)
        await backend.post("/v1/completions", {"model": model.name, "prompt": "hi"})

    with pytest.raises(UpstreamError) as raised:
        asyncio.run(unreachable())
    assert raised.value.status_code == 503 and raised.value.code == "backend_unavailable"
