"""Querying a model trained by a real job, through the running API (uvicorn) with the embedded
model server, using the official `openai` client: models, chat, completions, streaming, the
Hugging Face `[INST]` endpoint, best-of-N reranking, and tenancy (404) / readiness (409)."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.serving.conftest import JOB, Served, prompt_lines

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "what the small cat sees ?"}]
INST = "[INST] Recommend me some Hollywood movies [/INST]"


def test_models_are_listed_and_retrieved_with_the_openai_client(served: Served):
    client = served.openai()
    cards = {m.id: m for m in client.models.list().data}
    assert served.model in cards, cards
    card = cards[served.model]
    assert card.owned_by == "serve" and card.object == "model"
    assert card.model_extra["parent"] == "tiny-mistral" and card.model_extra["job"] == served.job["id"]
    assert card.model_extra["backend"] == "embedded" and card.model_extra["method"] == "lora"
    assert client.models.retrieve(served.model).id == served.model
    assert served.openai(served.other.key).models.list().data == []


def test_chat_completion_and_completion_with_the_openai_client(served: Served):
    client = served.openai()
    chat = client.chat.completions.create(model=served.model, messages=QUESTION, max_tokens=12, seed=3)
    assert chat.model == served.model and chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content.strip()
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert 0 < chat.usage.completion_tokens <= 12 and chat.usage.prompt_tokens > 0
    completion = client.completions.create(model=served.model, prompt="[INST] tell the cat [/INST]", max_tokens=8,
                                           n=2, seed=4)
    assert [c.index for c in completion.choices] == [0, 1] and all(c.text.strip() for c in completion.choices)
    assert 0 < completion.usage.completion_tokens <= 16


def _direct_greedy_answer(served: Served, tiny_models, messages: list[dict[str, str]], max_new_tokens: int) -> str:
    """The job's adapter on its base, loaded straight from the artifact store, decoding greedily."""
    from pathlib import Path

    import torch

    from workers.pipeline.loading import load_policy, load_tokenizer
    from workers.pipeline.prompts import render_prompt_ids

    base = str(tiny_models.root / "tiny-mistral")
    adapter = Path(served.stack.env["ALIGND_ARTIFACT_ROOT"]) / served.job["id"] / "round-1" / "model"
    assert (adapter / "adapter_config.json").is_file()
    tokenizer = load_tokenizer(base)
    model = load_policy(base, adapter, device="cpu").eval()
    ids = torch.tensor([render_prompt_ids(tokenizer, messages)])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_answers_come_from_the_jobs_adapter_streamed_or_not(served: Served, tiny_models):
    client = served.openai()
    whole = client.chat.completions.create(model=served.model, messages=QUESTION, max_tokens=10, temperature=0)
    expected = _direct_greedy_answer(served, tiny_models, QUESTION, 10)
    assert whole.choices[0].message.content == expected
    stream = client.chat.completions.create(model=served.model, messages=QUESTION, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_streaming_completion(served: Served):
    client = served.openai()
    whole = client.completions.create(model=served.model, prompt="the cat", max_tokens=6, temperature=0)
    chunks = list(client.completions.create(model=served.model, prompt="the cat", max_tokens=6, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_inst_endpoint_feeds_the_text_with_exactly_one_bos(served: Served, tiny_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models.root / "tiny-mistral")
    bos, inst = tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("[INST]")
    two_turns = "[INST] hi [/INST] hello the cat</s>[INST] and the dog ? [/INST]"
    for inputs in (INST, f"<s>{INST}", f"<s><s>{INST}", two_turns):
        response = served.client.call("POST", f"/v1/models/{served.model}/generate", json={
            "inputs": inputs,
            "parameters": {"max_new_tokens": 8, "temperature": 0.7, "top_p": 0.9, "decoder_input_details": True}})
        assert response.status_code == 200, response.text
        [output] = response.json()
        assert isinstance(output["generated_text"], str) and output["details"]["generated_tokens"] <= 8
        fed = [t["id"] for t in output["details"]["prefill"]]
        text_ids = tokenizer(inputs, add_special_tokens=False)["input_ids"]
        while text_ids and text_ids[0] == bos:
            text_ids = text_ids[1:]
        assert fed == [bos] + text_ids, inputs
        assert fed.count(bos) == 1 and fed.count(inst) == inputs.count("[INST]")  # no second template
    # Without a BOS in the text, that is exactly what the tokenizer itself makes of it.
    response = served.client.call("POST", f"/v1/models/{served.model}/generate",
                                  json={"inputs": INST, "parameters": {"decoder_input_details": True}})
    assert [t["id"] for t in response.json()[0]["details"]["prefill"]] == tokenizer(INST)["input_ids"]
    bad = served.client.call("POST", f"/v1/models/{served.model}/generate",
                             json={"inputs": INST, "parameters": {"max_tokens": 8}})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "parameters.max_tokens"


def _reward_model(tiny_models):  # noqa: ANN202 — workers.pipeline.score.RewardModel
    from workers.pipeline.score import RewardModelSpec, load_reward_model

    rm = JOB["reward_model"]
    return load_reward_model(RewardModelSpec(type=rm["type"], model=rm["model"]), tiny_models.root)


def _top(scores: list[float]) -> int:
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def test_best_of_n_returns_the_candidate_the_reward_model_ranks_highest(served: Served, tiny_models):
    client = served.openai()
    reward_model = _reward_model(tiny_models)

    chat = client.chat.completions.create(model=served.model, messages=QUESTION, max_tokens=12, temperature=1.0,
                                          extra_body={"best_of": 4, "rerank": True})
    rerank = chat.model_extra["rerank"]
    assert rerank["best_of"] == 4 and len(rerank["candidates"]) == 4 and len(chat.choices) == 1
    direct = reward_model.score_candidates([QUESTION], [rerank["candidates"]]).scores[0]
    assert rerank["scores"] == pytest.approx(direct, abs=1e-4)
    assert chat.choices[0].message.content == rerank["candidates"][_top(direct)]
    assert chat.usage.completion_tokens >= len(rerank["candidates"])  # all N were generated

    completion = client.completions.create(model=served.model, prompt="[INST] what the small cat sees ? [/INST]",
                                           max_tokens=10, best_of=3, n=2, extra_body={"rerank": True})
    rerank = completion.model_extra["rerank"]
    direct = reward_model.score_candidates([QUESTION], [rerank["candidates"]]).scores[0]
    order = sorted(range(3), key=lambda i: (-direct[i], i))[:2]
    assert [c.text for c in completion.choices] == [rerank["candidates"][i] for i in order]

    response = served.client.call("POST", f"/v1/models/{served.model}/generate", json={
        "inputs": "[INST] what the small cat sees ? [/INST]",
        "parameters": {"max_new_tokens": 10, "temperature": 1.0, "best_of": 3, "rerank": True}})
    assert response.status_code == 200, response.text
    [output] = response.json()
    direct = reward_model.score_candidates([QUESTION], [output["rerank"]["candidates"]]).scores[0]
    assert output["generated_text"] == output["rerank"]["candidates"][_top(direct)]

    chunks = list(client.chat.completions.create(model=served.model, messages=QUESTION, max_tokens=8, stream=True,
                                                 extra_body={"best_of": 3, "rerank": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    rerank = chunks[-1].model_extra["rerank"]
    direct = reward_model.score_candidates([QUESTION], [rerank["candidates"]]).scores[0]
    assert streamed == rerank["candidates"][_top(direct)]

    with pytest.raises(openai.UnprocessableEntityError, match="rerank"):
        client.completions.create(model=served.model, prompt="hi", best_of=3)


def test_unknown_and_other_tenants_models_answer_404_and_training_ones_409(served: Served):
    with pytest.raises(openai.NotFoundError):
        served.openai().chat.completions.create(model="ft:tiny-mistral:serve::0123456789abcdef01234567",
                                                messages=QUESTION, max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        served.openai(served.other.key).chat.completions.create(model=served.model, messages=QUESTION, max_tokens=4)
    response = served.other.call("POST", f"/v1/models/{served.model}/generate", json={"inputs": INST})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert served.other.call("GET", f"/v1/models/{served.model}").status_code == 404

    prompt_set = served.client.upload(prompt_lines(8, seed=9))
    job = served.client.create_job({**JOB, "prompt_set": prompt_set["id"], "suffix": "pending"})
    name = f"ft:tiny-mistral:serve:pending:{job['id'].removeprefix('job_')}"
    try:
        response = served.client.call("POST", "/v1/chat/completions",
                                      json={"model": name, "messages": QUESTION, "max_tokens": 4})
        assert response.status_code == 409, response.text
        assert response.json()["error"]["code"] == "model_not_ready"
        status = response.headers["alignd-job-status"]
        assert status in ("validating", "queued", "running") and status in response.json()["error"]["message"]
    finally:
        served.client.call("POST", f"/v1/jobs/{job['id']}/cancel")


def test_backend_down_answers_503_in_the_envelope(served: Served):
    served.stack.terminate("model-server", timeout=30)
    try:
        response = served.client.call("POST", "/v1/completions", json={"model": served.model, "prompt": "hi"})
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "backend_unavailable"
    finally:
        served.stack.start_model_server()
    assert httpx.get(f"{served.stack.env['ALIGND_MODEL_SERVER_URL']}/healthz").status_code == 200
