"""Tiny, deterministic models for tests, benchmarks and the product demo (no network, CPU, seconds).

`build_tiny_models(out_dir)` writes:

- `tiny-mistral/`: a randomly initialised Mistral-architecture causal LM (2 layers, hidden 64) with a
  word-level tokenizer trained by `tokenizers` on a synthetic English corpus. It has BOS/EOS/PAD and
  no chat template, so the pipeline's Mistral `[INST] ... [/INST]` fallback is used.
- `tiny-mistral-chat/`: the same weights with a ChatML-style chat template in the tokenizer.
- `tiny-mistral-liked/`: `tiny-mistral` fine-tuned for a few steps on answers full of liked words:
  with `tiny-mistral` as the reference, the implicit (DPO log-ratio) reward
  log p_liked(y|x) - log p_base(y|x) prefers liked words, as Merlinite's instruct-vs-base pair does.
- `tiny-rm/`: a scalar reward model (`MistralForSequenceClassification`, num_labels=1) with its own
  chat template (`<|user|> ... <|assistant|> ...`), different from the policy's.
- `tiny-pairrm/`: a DeBERTa-v2 PairRM in llm-blender's layout (`ranker_config.json`/`config.json`
  holding the `RankerConfig`, `backbone_config.json`, tokenizer with `<|source|>`, `<|candidate1|>`,
  `<|candidate2|>`, `<|candidate|>`, and `model.safetensors` of `CrossCompareReranker`).

The preference both reward models carry ("liked words"): a response is better the larger the
fraction of its words that belong to `LIKED_WORDS` (cheerful adjectives). The scalar RM regresses
that fraction (times 10); the PairRM is trained to say which of two responses has the larger one.
Both are trained for a few hundred steps on synthetic random-word responses, like those the
untrained tiny policy produces, so a few rounds of DPO on the policy visibly raise their reward.

Run as `python -m workers.tiny_models <out_dir>`.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LIKED_WORDS: tuple[str, ...] = (
    "kind", "bright", "happy", "gentle", "warm", "calm", "brave", "clever",
    "honest", "sunny", "sweet", "lovely", "cheerful", "friendly", "joyful", "wise",
)
_NOUNS = (
    "cat", "dog", "river", "city", "garden", "teacher", "robot", "book", "song", "tree", "house",
    "market", "friend", "ocean", "mountain", "road", "child", "window", "letter", "storm", "bridge",
    "train", "forest", "apple", "lamp", "clock", "story", "ship", "field", "coffee", "idea", "plan",
)
_VERBS = (
    "sees", "finds", "helps", "builds", "reads", "writes", "opens", "likes", "visits", "paints",
    "carries", "follows", "answers", "explains", "moves", "keeps", "shows", "makes", "needs", "wants",
)
_PLAIN_ADJECTIVES = (
    "old", "small", "large", "red", "blue", "quiet", "long", "short", "green", "heavy", "empty",
    "cold", "late", "early", "plain", "round", "wooden", "distant", "busy", "simple",
)
_FUNCTION_WORDS = (
    "the", "a", "an", "and", "but", "or", "of", "in", "on", "with", "to", "from", "is", "was", "it",
    "this", "that", "very", "really", "quite", "because", "then", "so", "we", "you", "they", "i",
    "be", "are", "hello", "hi", "answer", "question", "user", "assistant", "system", "please", "me",
)
_QUESTION_STARTS = ("what", "why", "how", "where", "when", "who", "tell", "describe", "explain", "write")
_PUNCTUATION = (".", ",", "?", "!")

POLICY_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]")
RM_SPECIALS = ("<|user|>", "<|assistant|>", "<|system|>")
PAIRRM_PREFIXES = ("<|source|>", "<|candidate1|>", "<|candidate2|>", "<|candidate|>")
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

CHATML_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)
RM_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}{{ eos_token }}"
)


@dataclass(frozen=True)
class TinyModels:
    """Where the tiny models were written, and the names to give the pipeline (model-root relative)."""

    root: Path
    policy: str = "tiny-mistral"
    policy_chat: str = "tiny-mistral-chat"
    policy_liked: str = "tiny-mistral-liked"
    scalar_rm: str = "tiny-rm"
    pairrm: str = "tiny-pairrm"


def liked_fraction(text: str) -> float:
    """The preference both tiny reward models learn: share of a text's words that are liked."""
    words = [w for w in text.lower().replace(".", " ").replace(",", " ").split() if w.isalpha()]
    if not words:
        return 0.0
    return sum(w in LIKED_WORDS for w in words) / len(words)


def all_words() -> list[str]:
    return sorted(set(LIKED_WORDS + _NOUNS + _VERBS + _PLAIN_ADJECTIVES + _FUNCTION_WORDS
                      + _QUESTION_STARTS))


def synthetic_sentence(rng: random.Random) -> str:
    adjective = rng.choice(LIKED_WORDS + _PLAIN_ADJECTIVES)
    return (f"{rng.choice(('the', 'a', 'this'))} {adjective} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} "
            f"{rng.choice(('the', 'a', 'that'))} {rng.choice(_PLAIN_ADJECTIVES)} {rng.choice(_NOUNS)} .")


def synthetic_prompts(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """Chat prompts in the same synthetic English, for tests and the demo."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        question = (f"{rng.choice(_QUESTION_STARTS)} {rng.choice(('the', 'a'))} "
                    f"{rng.choice(_PLAIN_ADJECTIVES)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} "
                    f"{rng.choice(('the', 'a'))} {rng.choice(_NOUNS)} ?")
        prompts.append([{"role": "user", "content": question}])
    return prompts


def _random_response(rng: random.Random, words: list[str], liked_share: float) -> str:
    length = rng.randint(2, 20)
    out = [rng.choice(LIKED_WORDS) if rng.random() < liked_share else rng.choice(words)
           for _ in range(length)]
    return " ".join(out)


def _train_word_tokenizer(specials: tuple[str, ...], corpus: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token=specials[0] if "<unk>" in specials else "[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    trainer = trainers.WordLevelTrainer(special_tokens=list(specials), min_frequency=1)
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer


def _corpus() -> list[str]:
    rng = random.Random(1234)
    lines = [synthetic_sentence(rng) for _ in range(400)]
    lines.append(" ".join(all_words()) + " " + " ".join(_PUNCTUATION))  # every word, whatever sampling did
    return lines


def _policy_tokenizer(corpus: list[str]) -> Any:
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    raw = _train_word_tokenizer(POLICY_SPECIALS + ("<|im_start|>", "<|im_end|>"), corpus)
    raw.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                            special_tokens=[("<s>", raw.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", model_max_length=512,
                                   additional_special_tokens=["[INST]", "[/INST]", "<|im_start|>",
                                                              "<|im_end|>"])


def build_policy(out_dir: Path, corpus: list[str]) -> None:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    tokenizer = _policy_tokenizer(corpus)
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, sliding_window=None,
        initializer_range=0.1,  # larger than usual so LoRA can move the output distribution far
    )
    model = MistralForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir / "tiny-mistral", safe_serialization=True)
    tokenizer.save_pretrained(out_dir / "tiny-mistral")
    model.save_pretrained(out_dir / "tiny-mistral-chat", safe_serialization=True)
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(out_dir / "tiny-mistral-chat")
    tokenizer.chat_template = None
    build_liked_policy(out_dir / "tiny-mistral-liked", model, tokenizer)


def build_liked_policy(out_dir: Path, model: Any, tokenizer: Any, steps: int = 40) -> None:
    """A copy of the policy nudged towards answers made of liked words (`[INST] q [/INST] answer`)."""
    import copy

    from workers.pipeline.prompts import ensure_chat_template

    liked = copy.deepcopy(model)
    ensure_chat_template(tokenizer)
    rng = random.Random(5)
    prompts = synthetic_prompts(32, seed=17)

    def batch(size: int) -> tuple[dict[str, Any], Any]:
        texts = []
        for _ in range(size):
            answer = " ".join(rng.choice(LIKED_WORDS) for _ in range(rng.randint(4, 12)))
            texts.append(tokenizer.apply_chat_template(
                rng.choice(prompts) + [{"role": "assistant", "content": answer}], tokenize=False))
        enc = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        return dict(enc), labels

    _fit(liked, steps, lambda: batch(16), lambda out, labels: out.loss, lr=3e-3,
         with_labels=True)
    liked.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(out_dir)


def build_scalar_rm(out_dir: Path, corpus: list[str], steps: int = 200) -> None:
    import torch
    from transformers import MistralConfig, MistralForSequenceClassification, PreTrainedTokenizerFast

    raw = _train_word_tokenizer(("<unk>", "<s>", "</s>", "<pad>") + RM_SPECIALS, corpus)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>", model_max_length=512)
    tokenizer.chat_template = RM_TEMPLATE
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=16, max_position_embeddings=512,
        num_labels=1, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, sliding_window=None,
    )
    model = MistralForSequenceClassification(config)
    rng = random.Random(7)
    words = all_words()
    prompts = synthetic_prompts(64, seed=11)

    def batch(size: int) -> tuple[dict[str, Any], Any]:
        texts, targets = [], []
        for _ in range(size):
            response = _random_response(rng, words, rng.choice((0.0, 0.05, 0.15, 0.3, 0.6)))
            conversation = rng.choice(prompts) + [{"role": "assistant", "content": response}]
            texts.append(tokenizer.apply_chat_template(conversation, tokenize=False))
            targets.append(10.0 * liked_fraction(response))
        enc = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
        return dict(enc), torch.tensor(targets)

    _fit(model, steps, lambda: batch(32), lambda out, y: torch.nn.functional.mse_loss(
        out.logits.squeeze(-1), y))
    model.save_pretrained(out_dir / "tiny-rm", safe_serialization=True)
    tokenizer.save_pretrained(out_dir / "tiny-rm")


def _fit(model: Any, steps: int, make_batch: Any, loss_fn: Any, lr: float = 3e-3,
         with_labels: bool = False) -> None:
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        inputs, target = make_batch()
        outputs = model(**inputs, labels=target) if with_labels else model(**inputs)
        loss = loss_fn(outputs, target)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    model.eval()


PAIRRM_LR = 2e-3  # 6e-3 trained on one CPU and stalled at chance on another: fragile
PAIRRM_RANKER_CONFIG: dict[str, Any] = {
    "ranker_type": "pairranker", "model_type": "deberta", "model_name": "tiny-deberta-v2",
    "cache_dir": None, "load_checkpoint": None, "source_maxlength": 48, "candidate_maxlength": 48,
    "n_tasks": 1, "num_pos": 1, "num_neg": 1, "sub_sampling_mode": "all_pair", "sub_sampling_ratio": 0.5,
    "loss_type": "instructgpt", "reduce_type": "linear", "inference_mode": "bubble", "drop_out": 0.05,
    "fp16": False, "device": None,
}


def build_pairrm(out_dir: Path, corpus: list[str], steps: int = 400) -> None:
    """Train a tiny PairRM with llm-blender's own ranker and collator classes, save it safely."""
    import torch
    from safetensors.torch import save_file
    from tokenizers.processors import TemplateProcessing
    from transformers import DebertaV2Config, PreTrainedTokenizerFast

    from workers.pipeline.pairrm import build_pairrm_ranker

    raw = _train_word_tokenizer(BERT_SPECIALS + PAIRRM_PREFIXES, corpus)
    raw.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", raw.token_to_id("[CLS]")), ("[SEP]", raw.token_to_id("[SEP]"))])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]",
        mask_token="[MASK]", model_max_length=512, additional_special_tokens=list(PAIRRM_PREFIXES))
    backbone = DebertaV2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=512, relative_attention=True,
        pos_att_type=["p2c", "c2p"], position_buckets=16, max_relative_positions=32,
        position_biased_input=False, pad_token_id=tokenizer.pad_token_id, type_vocab_size=0,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pooler_dropout=0.0,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    ranker, collator = build_pairrm_ranker({**PAIRRM_RANKER_CONFIG, "drop_out": 0.0}, backbone, tokenizer)
    rng = random.Random(3)
    words = all_words()
    sources = [p[0]["content"] for p in synthetic_prompts(64, seed=13)]

    def batch(size: int) -> tuple[dict[str, Any], Any]:
        rows, labels = [], []
        while len(rows) < size:
            a = _random_response(rng, words, rng.choice((0.0, 0.1, 0.3, 0.6)))
            b = _random_response(rng, words, rng.choice((0.0, 0.1, 0.3, 0.6)))
            if liked_fraction(a) == liked_fraction(b):
                continue
            rows.append({"source": rng.choice(sources), "candidates": [a, b]})
            labels.append(float(liked_fraction(a) > liked_fraction(b)))
        enc = collator(rows)
        inputs = {
            "source_ids": enc["source_ids"], "source_attention_mask": enc["source_attention_mask"],
            "cand1_ids": enc["candidate_ids"][:, 0], "cand1_attention_mask": enc["candidate_attention_mask"][:, 0],
            "cand2_ids": enc["candidate_ids"][:, 1], "cand2_attention_mask": enc["candidate_attention_mask"][:, 1],
        }
        return inputs, torch.tensor(labels)

    class _Forward(torch.nn.Module):  # `_fit` calls model(**inputs); the ranker's pair forward is `_forward`
        def __init__(self) -> None:
            super().__init__()
            self.ranker = ranker

        def forward(self, **inputs: Any) -> Any:
            return self.ranker._forward(**inputs)["logits"]

    _fit(_Forward(), steps, lambda: batch(32),
         lambda logits, y: torch.nn.functional.binary_cross_entropy_with_logits(logits, y), lr=PAIRRM_LR)
    save_file({k: v.contiguous() for k, v in ranker.state_dict().items()}, str(out_dir / "model.safetensors"))
    for name in ("ranker_config.json", "config.json"):
        (out_dir / name).write_text(json.dumps(PAIRRM_RANKER_CONFIG, indent=1))
    (out_dir / "backbone_config.json").write_text(backbone.to_json_string())
    tokenizer.save_pretrained(out_dir)


def tiny_job_settings() -> dict[str, Any]:
    """Job fields sized for the tiny models on a 2-core CPU: seconds per round, yet strong enough to
    move the policy towards the liked words within three rounds (the demo and the tests use them)."""
    return {
        "samples_per_prompt": 4,
        "eval_fraction": 0.2,
        "reuse_prompts": True,
        "generation": {"max_new_tokens": 16, "temperature": 1.0, "top_p": 1.0, "batch_size": 32},
        "training": {"learning_rate": 1e-2, "epochs": 3, "batch_size": 8, "max_length": 96,
                     "max_prompt_length": 48, "warmup_ratio": 0.0, "lr_scheduler_type": "constant",
                     "lora": {"r": 8, "alpha": 16}},
        "algorithm": {"type": "dpo", "beta": 0.1},
    }


def build_tiny_models(out_dir: Path) -> TinyModels:
    """Build all tiny models into `out_dir` (deterministic) and return their names."""
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = _corpus()
    threads = torch.get_num_threads()
    # One thread: the tensors are tiny, and spinning OpenMP workers collapse when the CPU is shared.
    torch.set_num_threads(1)
    try:
        build_policy(out_dir, corpus)
        build_scalar_rm(out_dir, corpus)
        build_pairrm(out_dir / "tiny-pairrm", corpus)
    finally:
        torch.set_num_threads(threads)
    (out_dir / "TINY_MODELS.json").write_text(json.dumps({"liked_words": list(LIKED_WORDS)}, indent=1))
    return TinyModels(root=out_dir)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m workers.tiny_models <out_dir>", file=sys.stderr)
        return 2
    models = build_tiny_models(Path(args[0]))
    print(json.dumps({"root": str(models.root), "policy": models.policy, "scalar_rm": models.scalar_rm,
                      "pairrm": models.pairrm, "policy_chat": models.policy_chat,
                      "policy_liked": models.policy_liked}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
