"""Self-Play Preference Optimization (SPPO, arXiv 2405.00675; seeds/001) as a TRL DPOTrainer subclass.

Per pair, with log-ratio(y) = log pi(y|x) - log pi_ref(y|x) and the soft win probabilities p_win
and p_lose that the pair stage took from the reward model's win-probability matrix:

    loss = ((log-ratio(y_w) - (p_win - 1/2) / beta)^2 + (log-ratio(y_l) - (p_lose - 1/2) / beta)^2) / 2

(beta = 1/eta). TRL's `sppo_hard` is the special case p_win = 1, p_lose = 0 without the halving;
this trainer is the soft version. Everything else (tokenisation, reference model or disabled
adapter, LoRA, optimiser, logging) is DPOTrainer's: only the loss and the two extra columns differ.
With `length_normalize` the log-ratios are averaged over the completion's tokens.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from trl import DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

SPPO_COLUMNS = ("p_win", "p_lose")


def sppo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, p_win: torch.Tensor,
              p_lose: torch.Tensor, beta: float) -> torch.Tensor:
    """The per-pair SPPO loss (see the module docstring)."""
    chosen_error = (chosen_logratios - (p_win - 0.5) / beta) ** 2
    rejected_error = (rejected_logratios - (p_lose - 0.5) / beta) ** 2
    return (chosen_error + rejected_error) / 2


class SPPOCollator(DataCollatorForPreference):
    """DPO's collator plus the p_win and p_lose of each pair."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        output = super().torch_call(examples)
        for column in SPPO_COLUMNS:
            output[column] = torch.tensor([float(e[column]) for e in examples])
        return output


def completion_logps(model: Any, inputs: dict[str, Any], *, average: bool) -> torch.Tensor:
    """Log-probability of each row's completion tokens (summed, or averaged per token)."""
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False).logits
    targets = inputs["input_ids"][:, 1:]
    token_logps = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    mask = inputs["completion_mask"][:, 1:].to(token_logps.dtype)
    total = (token_logps * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1.0) if average else total


class SPPOTrainer(DPOTrainer):
    """DPOTrainer with the SPPO loss; the dataset must carry `p_win` and `p_lose` per pair."""

    def __init__(self, *args: Any, length_normalize: bool = False, **kwargs: Any) -> None:
        training_args = kwargs.get("args")
        if kwargs.get("data_collator") is None and training_args is not None:
            tokenizer = kwargs["processing_class"]
            pad = training_args.pad_token or tokenizer.pad_token or tokenizer.eos_token
            kwargs["data_collator"] = SPPOCollator(
                pad_token_id=tokenizer.convert_tokens_to_ids(pad), max_length=training_args.max_length,
                truncation_mode=training_args.truncation_mode, pad_to_multiple_of=training_args.pad_to_multiple_of)
        super().__init__(*args, **kwargs)
        self.length_normalize = length_normalize

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        for column in SPPO_COLUMNS:
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    def _reference_logps(self, inputs: dict[str, Any]) -> torch.Tensor:
        from accelerate.utils import is_peft_model
        from trl.trainer.utils import use_adapter

        context: Any = contextlib.nullcontext()
        model = self.ref_model
        if model is None:
            model = self.model
            if is_peft_model(self.model):  # a new adapter: the reference is the model without it
                unwrapped = self.accelerator.unwrap_model(self.model)
                context = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with torch.no_grad(), context:
            return completion_logps(model, inputs, average=self.length_normalize)

    def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
        mode = "train" if self.model.training else "eval"
        logps = completion_logps(model, inputs, average=self.length_normalize)
        ref_logps = self._reference_logps(inputs)
        chosen_logratios, rejected_logratios = (logps - ref_logps).chunk(2, dim=0)  # batch is [chosen, rejected]
        p_win = inputs["p_win"].to(logps.device, logps.dtype)
        p_lose = inputs["p_lose"].to(logps.device, logps.dtype)
        loss = sppo_loss(chosen_logratios, rejected_logratios, p_win, p_lose, self.beta).mean()

        metrics = self._metrics[mode]
        chosen, rejected = chosen_logratios.detach(), rejected_logratios.detach()
        metrics["rewards/chosen"].append(self.accelerator.gather(self.beta * chosen).mean().item())
        metrics["rewards/rejected"].append(self.accelerator.gather(self.beta * rejected).mean().item())
        metrics["rewards/accuracies"].append(self.accelerator.gather((chosen > rejected).float()).mean().item())
        metrics["sppo/p_win"].append(self.accelerator.gather(p_win).mean().item())
        metrics["sppo/p_lose"].append(self.accelerator.gather(p_lose).mean().item())
        if return_outputs:
            return loss, {"chosen_logratios": chosen_logratios, "rejected_logratios": rejected_logratios}
        return loss
