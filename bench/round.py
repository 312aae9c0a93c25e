"""One iterative-DPO round on the tiny models: alignd's pipeline vs a plain transformers + TRL script.

    .venv/bin/python bench/round.py [--prompts 48] [--repeat 5]

Prints per-stage wall times, generation tokens/s, scoring candidates/s and training samples/s for
alignd, the same round written directly against transformers + TRL (no alignd code), and as the last
line `ratio: X.XX` = alignd total / plain total. Both do generate -> score (scalar RM) -> pair
(best vs worst) -> DPO (LoRA) -> evaluate (1 sample per held-out prompt, new vs base).

Both sides run once untimed first (imports, first-call costs), then `--repeat` times each, in
alternating order; the table shows each metric's median and the ratio is of the median totals (a
round lasts about a second, so one run on a shared machine is mostly noise). alignd's in-process
model and tokenizer caches are emptied before every alignd run, so it reads every model from disk
as the plain script does; only reuse within the round counts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETTINGS = {"k": 4, "max_new_tokens": 16, "temperature": 1.0, "top_p": 1.0, "gen_batch": 16, "rm_batch": 32,
            "lr": 3e-2, "epochs": 2, "train_batch": 4, "beta": 0.1, "lora_r": 8, "lora_alpha": 16}


def run_alignd(model_root: Path, prompts: list, artifact_root: Path, eval_fraction: float) -> dict[str, float]:
    from app.schemas.job_spec import JobSpec
    from workers.pipeline.round import RoundContext, run_round

    s = SETTINGS
    spec = JobSpec.model_validate(dict(
        base_model="tiny-mistral", prompt_set="bench", rounds=1, samples_per_prompt=s["k"],
        eval_fraction=eval_fraction, reward_model={"type": "scalar", "model": "tiny-rm", "batch_size": s["rm_batch"]},
        generation={"max_new_tokens": s["max_new_tokens"], "temperature": s["temperature"], "top_p": s["top_p"],
                    "batch_size": s["gen_batch"]},
        algorithm={"beta": s["beta"]},
        training={"learning_rate": s["lr"], "epochs": s["epochs"], "batch_size": s["train_batch"],
                  "max_length": 128, "max_prompt_length": 64, "warmup_ratio": 0.0, "lr_scheduler_type": "constant",
                  "lora": {"r": s["lora_r"], "alpha": s["lora_alpha"]}}))
    from workers.pipeline.loading import model_cache, tokenizer_cache

    model_cache.clear()  # a cold start: nothing loaded by an earlier run is reused
    tokenizer_cache.clear()
    started = time.perf_counter()
    result = run_round(RoundContext(job_id="bench", round_index=1, spec=spec, prompts=prompts,
                                    artifact_root=artifact_root, model_root=model_root,
                                    generation_backend="transformers"))
    m = dict(result.metrics)
    m["total_s"] = time.perf_counter() - started
    return m


def run_plain(model_root: Path, prompts: list, eval_fraction: float, out: Path) -> dict[str, float]:
    """The same round with transformers + TRL directly (what a user would write by hand)."""
    import random

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    s = SETTINGS
    m: dict[str, float] = {}
    total = time.perf_counter()
    order = list(range(len(prompts)))
    random.Random(0).shuffle(order)
    n_eval = max(1, round(len(prompts) * eval_fraction))
    eval_prompts, train_prompts = [prompts[i] for i in order[:n_eval]], [prompts[i] for i in order[n_eval:]]
    policy_dir, rm_dir = model_root / "tiny-mistral", model_root / "tiny-rm"
    tok = AutoTokenizer.from_pretrained(policy_dir)
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }}"
                         " [/INST]{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% endif %}"
                         "{% endfor %}")
    rm_tok = AutoTokenizer.from_pretrained(rm_dir)
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()

    def generate(model, batch_prompts, k):
        texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in batch_prompts]
        tok.padding_side = "left"
        outs, n_tokens = [], 0
        for i in range(0, len(texts), s["gen_batch"]):
            enc = tok(texts[i:i + s["gen_batch"]], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                gen = model.generate(**enc, do_sample=True, temperature=s["temperature"], top_p=s["top_p"], top_k=0,
                                     max_new_tokens=s["max_new_tokens"], num_return_sequences=k,
                                     pad_token_id=tok.pad_token_id)
            new = gen[:, enc["input_ids"].shape[1]:]
            n_tokens += int((new != tok.pad_token_id).sum())
            dec = tok.batch_decode(new, skip_special_tokens=True)
            outs.extend(dec[j:j + k] for j in range(0, len(dec), k))
        return outs, n_tokens

    def rewards(batch_prompts, responses):
        texts = [rm_tok.apply_chat_template(p + [{"role": "assistant", "content": r}], tokenize=False)
                 for p, r in zip(batch_prompts, responses, strict=True)]
        vals = []
        for i in range(0, len(texts), s["rm_batch"]):
            enc = rm_tok(texts[i:i + s["rm_batch"]], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                vals.extend(rm(**enc).logits[:, 0].tolist())
        return vals

    t = time.perf_counter()
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    cands, n_tokens = generate(policy, train_prompts, s["k"])
    m["generate_wall_s"] = time.perf_counter() - t
    m["generate_tokens_per_s"] = n_tokens / m["generate_wall_s"]
    t = time.perf_counter()
    flat = rewards([p for p in train_prompts for _ in range(s["k"])], [c for row in cands for c in row])
    scores = [flat[i:i + s["k"]] for i in range(0, len(flat), s["k"])]
    m["score_wall_s"] = time.perf_counter() - t
    m["score_candidates_per_s"] = len(flat) / m["score_wall_s"]
    t = time.perf_counter()
    rows = []
    for p, c, sc in zip(train_prompts, cands, scores, strict=True):
        best, worst = max(range(len(sc)), key=sc.__getitem__), min(range(len(sc)), key=sc.__getitem__)
        if sc[best] > sc[worst]:
            rows.append({"prompt": p, "chosen": [{"role": "assistant", "content": c[best]}],
                         "rejected": [{"role": "assistant", "content": c[worst]}]})
    Dataset.from_list(rows).save_to_disk(str(out / "pairs"))
    m["pair_wall_s"] = time.perf_counter() - t
    t = time.perf_counter()
    args = DPOConfig(output_dir=str(out / "scratch"), report_to="none", save_strategy="no", logging_steps=1,
                     per_device_train_batch_size=s["train_batch"], num_train_epochs=s["epochs"],
                     learning_rate=s["lr"], lr_scheduler_type="constant", beta=s["beta"], max_length=128,
                     bf16=False, gradient_checkpointing=False, use_cpu=True, disable_tqdm=True)
    trainer = DPOTrainer(model=policy, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"],
                                                target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer.train()
    trainer.model.save_pretrained(str(out / "model"))
    m["train_wall_s"] = time.perf_counter() - t
    m["train_samples_per_s"] = len(rows) * s["epochs"] / m["train_wall_s"]
    t = time.perf_counter()
    merged = trainer.model.merge_and_unload().eval()
    base = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    new_answers, _ = generate(merged, eval_prompts, 1)
    base_answers, _ = generate(base, eval_prompts, 1)
    r_new = rewards(eval_prompts, [a[0] for a in new_answers])
    r_base = rewards(eval_prompts, [a[0] for a in base_answers])
    m["eval_win_rate"] = sum((a > b) + 0.5 * (a == b) for a, b in zip(r_new, r_base, strict=True)) / len(r_new)
    m["evaluate_wall_s"] = time.perf_counter() - t
    m["total_s"] = time.perf_counter() - total
    return m


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--eval-fraction", type=float, default=0.25)
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per side (medians are reported)")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()
    from workers.tiny_models import build_tiny_models, synthetic_prompts

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        build_tiny_models(root / "models")
        print(f"tiny models built in {time.perf_counter() - t:.1f}s (not timed below)")
        prompts = synthetic_prompts(args.prompts, seed=1)
        # warm both sides once (imports, first calls) so neither pays first-use costs in a timed run
        run_plain(root / "models", prompts[:8], 0.25, root / "warm-plain")
        run_alignd(root / "models", prompts[:8], root / "warm-alignd", 0.25)
        runs: dict[str, list[dict[str, float]]] = {"alignd": [], "plain": []}
        for i in range(args.repeat):
            order = ["alignd", "plain"] if i % 2 == 0 else ["plain", "alignd"]
            for side in order:
                if side == "alignd":
                    runs[side].append(run_alignd(root / "models", prompts, root / f"artifacts-{i}", args.eval_fraction))
                else:
                    runs[side].append(run_plain(root / "models", prompts, args.eval_fraction, root / f"plain-{i}"))
            print(f"run {i + 1}: alignd {runs['alignd'][-1]['total_s']:.2f}s plain {runs['plain'][-1]['total_s']:.2f}s")
    keys = ["generate_wall_s", "score_wall_s", "pair_wall_s", "train_wall_s", "evaluate_wall_s",
            "generate_tokens_per_s", "score_candidates_per_s", "train_samples_per_s", "eval_win_rate", "total_s"]
    alignd = {key: statistics.median(r.get(key, float("nan")) for r in runs["alignd"]) for key in keys}
    plain = {key: statistics.median(r.get(key, float("nan")) for r in runs["plain"]) for key in keys}
    print(f"{'metric (median of ' + str(args.repeat) + ')':28s} {'alignd':>10s} {'plain':>10s}")
    for key in keys:
        digits = 3 if key.endswith("_s") else 2  # a stage lasts tens of milliseconds
        print(f"{key:28s} {alignd[key]:10.{digits}f} {plain[key]:10.{digits}f}")
    print(f"ratio: {alignd['total_s'] / plain['total_s']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
