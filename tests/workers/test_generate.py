from workers.pipeline.generate import GenerationConfig, PolicyModel, generate_completions, is_vllm_available
from workers.pipeline.loading import load_tokenizer
from workers.pipeline.prompts import MISTRAL_FALLBACK_TEMPLATE, render_prompt_ids
from workers.tiny_models import synthetic_prompts

PROMPT = [{"role": "user", "content": "tell the cat a story ?"}]


def test_tokenizer_without_template_gets_inst_format_and_one_bos(tiny_models):
    tokenizer = load_tokenizer(str(tiny_models.root / tiny_models.policy))
    assert not tokenizer.chat_template
    ids = render_prompt_ids(tokenizer, PROMPT)
    assert tokenizer.chat_template == MISTRAL_FALLBACK_TEMPLATE
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    text = tokenizer.decode(ids)
    assert text.startswith("<s> [INST] tell the cat a story ? [/INST]")


def test_system_message_and_earlier_turns_render_in_the_fallback(tiny_models):
    tokenizer = load_tokenizer(str(tiny_models.root / tiny_models.policy))
    messages = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hi"}, {"role": "user", "content": "tell a story"}]
    text = tokenizer.decode(render_prompt_ids(tokenizer, messages))
    assert text.count("[INST]") == 2 and "be kind hello" in text and text.count("<s>") == 1


def test_chat_template_path_keeps_a_single_bos(tiny_models):
    tokenizer = load_tokenizer(str(tiny_models.root / tiny_models.policy_chat))
    assert "im_start" in tokenizer.chat_template
    ids = render_prompt_ids(tokenizer, PROMPT)
    # the template writes BOS itself; tokenizing with special tokens would have added a second
    assert ids.count(tokenizer.bos_token_id) == 1
    assert "<|im_start|> user tell the cat a story ?" in tokenizer.decode(ids)
    assert "[INST]" not in tokenizer.decode(ids)


def test_transformers_backend_gives_k_samples_without_prompt_and_counts_tokens(tiny_models):
    prompts = synthetic_prompts(5, seed=3)
    config = GenerationConfig(samples_per_prompt=3, max_new_tokens=6, temperature=1.0, top_p=1.0,
                              batch_size=2, seed=1)
    policy = PolicyModel(str(tiny_models.root / tiny_models.policy))
    result = generate_completions(policy, prompts, config)
    assert result.backend == "transformers" and not is_vllm_available()
    assert len(result.completions) == 5 and all(len(c) == 3 for c in result.completions)
    assert all(1 <= n <= 6 for row in result.completion_tokens for n in row)
    assert all("[INST]" not in c and "[/INST]" not in c for row in result.completions for c in row)
    assert result.tokens_per_s > 0 and result.total_completion_tokens == sum(map(sum, result.completion_tokens))
    assert len({c for row in result.completions for c in row}) > 5  # sampled, not one answer repeated
    assert generate_completions(policy, prompts, config).completions == result.completions  # seeded


def test_greedy_generation_repeats_the_single_answer(tiny_models):
    config = GenerationConfig(samples_per_prompt=2, max_new_tokens=4, temperature=0.0)
    result = generate_completions(PolicyModel(str(tiny_models.root / tiny_models.policy)), [PROMPT], config)
    assert result.completions[0][0] == result.completions[0][1]


def test_batch_rendering_gives_the_ids_of_one_prompt_at_a_time(tiny_models):
    from workers.pipeline.prompts import render_prompts_ids

    prompts = synthetic_prompts(6, seed=4) + [[{"role": "system", "content": "be kind"}, PROMPT[0]]]
    for name in (tiny_models.policy, tiny_models.policy_chat):
        tokenizer = load_tokenizer(str(tiny_models.root / name))
        assert render_prompts_ids(tokenizer, prompts) == [render_prompt_ids(tokenizer, p) for p in prompts]
    assert render_prompts_ids(tokenizer, []) == []
