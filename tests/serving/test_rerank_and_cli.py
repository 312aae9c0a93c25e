"""Pieces of serving that need no running stack: what a reward model scores against, the rank
order of candidates, the protocol checks, and the vLLM command `alignd vllm` runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from app.schemas.inference import ChatCompletionRequest, CompletionRequest, GenerateParameters
from app.services.rerank import ranked
from workers.serving.rerank import prompt_messages


def test_inst_text_is_split_back_into_turns_for_the_reward_model():
    assert prompt_messages("[INST] Recommend me some Hollywood movies [/INST]") == [
        {"role": "user", "content": "Recommend me some Hollywood movies"}]
    assert prompt_messages("<s>[INST] hi [/INST] hello there</s>[INST] and movies? [/INST]") == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "and movies?"}]
    assert prompt_messages("plain text") == [{"role": "user", "content": "plain text"}]
    chat = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "partial"}]
    assert prompt_messages(chat) == chat[:2]


def test_candidates_rank_best_first_and_ties_keep_sampling_order():
    assert ranked([0.1, 0.9, 0.5, 0.9], 3) == [1, 3, 2]
    assert ranked([1.0], 1) == [0]


@pytest.mark.parametrize(("body", "message"), [
    ({"best_of": 4}, "best_of needs rerank"),
    ({"rerank": True}, "rerank needs best_of"),
    ({"best_of": 2, "rerank": True, "n": 3}, "n must not exceed best_of"),
])
def test_best_of_needs_rerank_and_room_for_n(body, message):
    with pytest.raises(ValidationError, match=message):
        ChatCompletionRequest.model_validate({"model": "ft:x", "messages": [{"role": "user", "content": "hi"}],
                                              **body})
    with pytest.raises(ValidationError, match="one text prompt"):
        CompletionRequest.model_validate({"model": "ft:x", "prompt": ["a", "b"], "best_of": 2, "rerank": True})


def test_openai_bodies_pass_through_without_alignds_fields():
    request = ChatCompletionRequest.model_validate({
        "model": "ft:x", "messages": [{"role": "user", "content": "hi"}], "best_of": 3, "rerank": True,
        "temperature": 0.3, "logit_bias": {"5": 1}})
    assert request.backend_body() == {"model": "ft:x", "messages": [{"role": "user", "content": "hi"}],
                                      "temperature": 0.3, "logit_bias": {"5": 1}}
    assert GenerateParameters(temperature=0.7).sampling and not GenerateParameters().sampling
    assert not GenerateParameters(temperature=0.0, top_p=0.5, do_sample=True).sampling


def test_alignd_vllm_command_for_a_base_model(tmp_path):
    model = tmp_path / "models" / "org" / "base-7b"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))  # no chat template
    env = {"ALIGND_HOME": str(tmp_path / "home"), "ALIGND_MODEL_ROOT": str(tmp_path / "models"),
           "ALIGND_VLLM_MAX_LORAS": "6", "ALIGND_VLLM_MAX_LORA_RANK": "32", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "alignd.cli", "vllm", "--base-model", "org/base-7b", "--port",
                             "8011", "--dry-run", "--", "--max-model-len", "4096"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    argv = result.stdout.split()
    assert argv[:3] == ["vllm", "serve", str(model)]

    def flag(name: str) -> str:
        return argv[argv.index(name) + 1]

    assert flag("--served-model-name") == "org/base-7b" and flag("--port") == "8011"
    assert flag("--load-format") == "safetensors" and flag("--max-model-len") == "4096"
    assert "--enable-lora" in argv and flag("--max-loras") == "6" and flag("--max-lora-rank") == "32"
    assert "--trust-remote-code" not in argv
    template = flag("--chat-template")
    assert "[INST]" in open(template).read()
    refused = subprocess.run([sys.executable, "-m", "alignd.cli", "vllm", "--base-model", "../etc", "--dry-run"],
                             env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "error" in refused.stderr


def test_alignd_vllm_sets_tensor_parallelism_and_refuses_to_override_its_own_flags(tmp_path):
    model = tmp_path / "models" / "org" / "base-70b"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    env = {"ALIGND_HOME": str(tmp_path / "home"), "ALIGND_MODEL_ROOT": str(tmp_path / "models"),
           "ALIGND_VLLM_MAX_LORA_RANK": "16", "PATH": "/usr/bin:/bin"}

    def alignd_vllm(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "alignd.cli", "vllm", "--base-model", "org/base-70b", *args],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)

    result = alignd_vllm("--tensor-parallel-size", "4", "--dry-run")
    assert result.returncode == 0, result.stderr
    argv = result.stdout.split()
    assert argv[argv.index("--tensor-parallel-size") + 1] == "4"
    assert alignd_vllm("--dry-run").stdout.split().count("--tensor-parallel-size") == 1  # 1 by default

    # The LoRA limits are the settings the API checks jobs against; no remote code, ever.
    for flags, named in ((["--max-lora-rank", "64"], "ALIGND_VLLM_MAX_LORA_RANK"),
                         (["--max-loras=2"], "ALIGND_VLLM_MAX_LORAS"), (["--trust-remote-code"], "never on"),
                         (["-tp", "2"], "--tensor-parallel-size"), (["--load-format", "pt"], "safetensors")):
        refused = alignd_vllm("--dry-run", "--", *flags)
        assert refused.returncode == 2 and named in refused.stderr, (flags, refused.stderr)
        assert refused.stdout == ""

    # Not a dry run, and no vllm on PATH: a clear error instead of a traceback from exec.
    missing = alignd_vllm()
    assert missing.returncode == 2 and "vllm not found" in missing.stderr


@pytest.mark.parametrize("kind", ["pairrm", "scalar"])
def test_rerank_scores_are_the_pipelines_own(kind, tiny_models):
    from app.core.config import Settings
    from app.schemas.job_spec import RewardModelConfig
    from workers.pipeline.score import load_reward_model, reward_model_spec
    from workers.serving.rerank import score_candidates

    config = RewardModelConfig(type=kind, model=tiny_models.pairrm if kind == "pairrm" else tiny_models.scalar_rm)
    candidates = ["the kind happy cat", "a cold empty road", "bright sunny lovely day"]
    scores = score_candidates(config, Settings(model_root=tiny_models.root), "[INST] what the cat sees ? [/INST]",
                              candidates)
    direct = load_reward_model(reward_model_spec(config), tiny_models.root).score_candidates(
        [[{"role": "user", "content": "what the cat sees ?"}]], [candidates]).scores[0]
    assert scores == pytest.approx(direct, abs=1e-4)
    assert max(range(3), key=lambda i: scores[i]) != 1  # the liked words win
