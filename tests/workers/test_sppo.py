"""The loss SPPO trains on is the formula of REFERENCES.md / the SPPO paper:

    ((log-ratio(y_w) - (p_win - 1/2)/beta)^2 + (log-ratio(y_l) - (p_lose - 1/2)/beta)^2) / 2

checked on hand-computed numbers, through the trainer's own `compute_loss` at the reference (where
the log-ratios are zero), and against TRL's `sppo_hard` (p_win = 1, p_lose = 0) on a perturbed
model, whose log-ratios TRL computes with its own code."""

from __future__ import annotations

import pytest
import torch

from workers.pipeline.loading import load_causal_lm, load_tokenizer
from workers.pipeline.pair import PairingConfig, build_pairs
from workers.pipeline.prompts import ensure_chat_template
from workers.pipeline.sppo import SPPOTrainer, sppo_loss
from workers.tiny_models import synthetic_prompts


def test_sppo_loss_on_a_hand_computed_example():
    # pair 1: log-ratios 0.2 / -0.1, p_win 0.8, p_lose 0.3, beta 0.5: targets 0.6 / -0.4
    #   ((0.2 - 0.6)^2 + (-0.1 + 0.4)^2) / 2 = (0.16 + 0.09) / 2 = 0.125
    # pair 2: log-ratios 1.0 / 0.0, p_win 0.5, p_lose 0.5: targets 0 / 0  ->  (1 + 0) / 2 = 0.5
    loss = sppo_loss(torch.tensor([0.2, 1.0]), torch.tensor([-0.1, 0.0]), torch.tensor([0.8, 0.5]),
                     torch.tensor([0.3, 0.5]), beta=0.5)
    assert loss.tolist() == pytest.approx([0.125, 0.5])


def test_p_win_and_p_lose_are_the_row_means_of_the_win_matrix():
    prompt = [[{"role": "user", "content": "q"}]]
    scores = [[0.0, 2.0, -1.0]]
    sig = lambda x: 1 / (1 + 2.718281828459045 ** -x)  # noqa: E731
    matrix = [[sig(a - b) for b in scores[0]] for a in scores[0]]
    result = build_pairs(prompt, [["a", "b", "c"]], scores, PairingConfig(), win_prob=[matrix])
    row = result.rows[0]
    assert row["chosen"][0]["content"] == "b" and row["rejected"][0]["content"] == "c"
    assert row["p_win"] == pytest.approx((sig(2.0) + 0.5 + sig(3.0)) / 3)
    assert row["p_lose"] == pytest.approx((sig(-1.0) + sig(-3.0) + 0.5) / 3)


def _dataset(p_win: float, p_lose: float):
    from datasets import Dataset

    prompts = synthetic_prompts(4, seed=3)
    rows = build_pairs(prompts, [["kind warm calm gentle", "the old red clock"] for _ in prompts],
                       [[1.0, 0.0]] * len(prompts), PairingConfig()).rows
    return Dataset.from_list([{**r, "p_win": p_win, "p_lose": p_lose} for r in rows])


def _trainer(cls, tiny_models, tmp_path, dataset, beta: float, **kwargs):
    from trl import DPOConfig

    location = str(tiny_models.root / tiny_models.policy)
    tokenizer = load_tokenizer(location)
    ensure_chat_template(tokenizer)
    policy = load_causal_lm(location, dtype=torch.float32, device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():  # move the policy away from the reference so the log-ratios are not zero
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    reference = load_causal_lm(location, dtype=torch.float32, device="cpu").eval()
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, beta=beta, max_length=64,
                     per_device_train_batch_size=4, remove_unused_columns=True, disable_tqdm=True,
                     **kwargs)
    return cls(model=policy, ref_model=reference, args=args, train_dataset=dataset, processing_class=tokenizer)


def _batch(trainer):
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    return trainer.data_collator(rows)


def test_the_training_loss_is_the_formula_at_the_reference(tiny_models, tmp_path):
    beta = 0.5
    trainer = _trainer(SPPOTrainer, tiny_models, tmp_path, _dataset(0.8, 0.3), beta)
    trainer.model.load_state_dict(trainer.ref_model.state_dict())  # policy == reference: log-ratios 0
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, _batch(trainer))
    # ((0 - (0.8 - 0.5)/0.5)^2 + (0 - (0.3 - 0.5)/0.5)^2) / 2 = (0.36 + 0.16) / 2
    assert loss.item() == pytest.approx(0.26, abs=1e-5)


def test_hard_labels_give_half_of_trls_sppo_hard_on_the_same_batch(tiny_models, tmp_path):
    from trl import DPOTrainer

    beta = 2.0
    ours = _trainer(SPPOTrainer, tiny_models, tmp_path / "a", _dataset(1.0, 0.0), beta)
    trl = _trainer(DPOTrainer, tiny_models, tmp_path / "b", _dataset(1.0, 0.0), beta, loss_type=["sppo_hard"])
    ours.model.eval()
    trl.model.eval()
    with torch.no_grad():
        ours_loss = ours.compute_loss(ours.model, _batch(ours)).item()
        trl_loss = trl.compute_loss(trl.model, _batch(trl)).item()
    # TRL's sppo_hard: (lr_w - 1/(2 beta))^2 + (lr_l + 1/(2 beta))^2, without the 1/2 of the soft loss
    assert ours_loss == pytest.approx(trl_loss / 2, rel=1e-4)
    assert ours_loss != pytest.approx(((0.5 / beta) ** 2 * 2) / 2, rel=1e-3)  # the log-ratios were not zero
