"""Unusable models fail with the right stable error codes."""

import shutil

import pytest

from workers.errors import PipelineError
from workers.pipeline.generate import GenerationConfig, PolicyModel, generate_completions
from workers.pipeline.loading import load_causal_lm, load_tokenizer, resolve
from workers.pipeline.score import RewardModelSpec, load_reward_model


@pytest.fixture()
def model_root(tiny_models, tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    policy = tiny_models.root / tiny_models.policy
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text("{not json")
    (root / "broken" / "model.safetensors").write_bytes(b"garbage")
    shutil.copytree(policy, root / "no-tokenizer", ignore=shutil.ignore_patterns("tokenizer*", "special*"))
    shutil.copytree(policy, root / "policy")
    shutil.copytree(tiny_models.root / tiny_models.scalar_rm, root / "rm")
    shutil.copytree(tiny_models.root / tiny_models.pairrm, root / "pairrm")
    (root / "pickled").mkdir()
    shutil.copy(policy / "config.json", root / "pickled" / "config.json")
    (root / "pickled" / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    return root


def _code(fn):
    with pytest.raises(PipelineError) as info:
        fn()
    return info.value.code


def test_unloadable_and_pickle_only_models(model_root):
    assert _code(lambda: load_causal_lm(str(model_root / "broken"))) == "model_not_loadable"
    assert _code(lambda: load_causal_lm(str(model_root / "pickled"))) == "model_not_loadable"


def test_model_without_tokenizer(model_root):
    assert _code(lambda: load_tokenizer(str(model_root / "no-tokenizer"))) == "tokenizer_missing"
    config = GenerationConfig(samples_per_prompt=2, max_new_tokens=2)
    prompt = [[{"role": "user", "content": "hi"}]]
    assert _code(lambda: generate_completions(PolicyModel(str(model_root / "no-tokenizer")), prompt,
                                              config)) == "tokenizer_missing"


@pytest.mark.parametrize(("kind", "name"), [("scalar", "policy"), ("pairrm", "rm"), ("pairrm", "policy"),
                                            ("scalar", "pairrm")])
def test_wrong_kind_of_reward_model(model_root, kind, name):
    spec = RewardModelSpec(type=kind, model=name)
    assert _code(lambda: load_reward_model(spec, model_root)) == "reward_model_wrong_kind"


@pytest.mark.parametrize("name", ["../models/policy", "/etc/passwd", "nothing-here", "a/../../b"])
def test_names_outside_the_model_root_or_unknown(model_root, name):
    assert _code(lambda: resolve(name, model_root)) == "model_not_found"
