"""GPU round benchmark on a randomly initialised 7B Mistral-shaped model (no download needed).

    python bench/gpu_round.py [--method lora|full|both] [--batch 8] [--seq 1024] [--steps 10]

Measures, on one GPU:
- decode tokens/s of batched sampling vs the memory-bandwidth bound (weights bytes / bandwidth
  per decode step; the bandwidth is measured with a large device-to-device copy);
- DPO training tokens/s (policy forward+backward on chosen+rejected, reference forward) and
  MFU = 6 * N * tokens/s / peak, with the peak from a measured bf16 matmul;
- peak GPU memory, for LoRA and for full fine-tuning.

It uses transformers + peft directly with the DPO loss written out (TRL's trainer adds dataset
plumbing that is irrelevant to throughput). Exits with a clear message when no GPU is present.
"""

from __future__ import annotations

import argparse
import sys
import time


def _require_gpu() -> None:
    try:
        import torch
    except ImportError:
        sys.exit("gpu_round: torch is not installed; this benchmark needs a CUDA GPU")
    if not torch.cuda.is_available():
        sys.exit("gpu_round: no CUDA GPU available; run this benchmark on a GPU machine")


def _mistral_7b(torch_dtype):
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                           sliding_window=None, tie_word_embeddings=False)
    with torch.device("cuda"):
        model = MistralForCausalLM(config).to(torch_dtype)
    return model


def measured_bf16_peak_flops(n: int = 8192, iters: int = 20) -> float:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * iters / (time.perf_counter() - t)


def measured_bandwidth(gib: int = 4, iters: int = 10) -> float:
    import torch

    src = torch.empty(gib * 2 ** 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * src.numel() * iters / (time.perf_counter() - t)  # read + write


def bench_decode(model, batch: int, prompt_len: int, new_tokens: int, bandwidth: float) -> dict[str, float]:
    import torch

    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device="cuda")
    model.generate(ids, max_new_tokens=4, do_sample=True, min_new_tokens=4)
    torch.cuda.synchronize()
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, top_p=0.9)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t
    steps_per_s = new_tokens / wall
    bound = bandwidth / weight_bytes
    return {"decode_tokens_per_s": batch * new_tokens / wall, "decode_steps_per_s": steps_per_s,
            "bandwidth_bound_steps_per_s": bound, "fraction_of_bound": steps_per_s / bound}


def bench_dpo(method: str, batch: int, seq: int, steps: int, peak: float) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    torch.cuda.reset_peak_memory_stats()
    policy = _mistral_7b(torch.bfloat16)
    policy.gradient_checkpointing_enable()
    policy.config.use_cache = False
    n_params = sum(p.numel() for p in policy.parameters())
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(policy, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear",
                                                   task_type="CAUSAL_LM"))
        policy.enable_input_require_grads()
        reference = None  # adapter disabled = base
    else:
        reference = _mistral_7b(torch.bfloat16).eval().requires_grad_(False)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6, fused=True)
    ids = torch.randint(0, 32000, (2 * batch, seq), device="cuda")  # chosen then rejected
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, seq // 2:] = True  # completion half

    def seq_logps(model):
        logits = model(input_ids=ids).logits[:, :-1].float()
        lp = torch.gather(logits.log_softmax(-1), 2, ids[:, 1:, None]).squeeze(-1)
        return (lp * mask[:, 1:]).sum(-1)

    def step():
        with torch.no_grad():
            if reference is None:
                with policy.disable_adapter():
                    ref = seq_logps(policy)
            else:
                ref = seq_logps(reference)
        logps = seq_logps(policy)
        ratio = (logps - ref).view(2, batch)
        loss = -F.logsigmoid(0.1 * (ratio[0] - ratio[1])).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t
    tokens_per_s = 2 * batch * seq * steps / wall
    # 6N per trained token (fwd+bwd; checkpointing recompute not counted, as MFU conventionally is)
    return {f"{method}_train_tokens_per_s": tokens_per_s,
            f"{method}_train_pairs_per_s": batch * steps / wall,
            f"{method}_mfu": 6 * n_params * tokens_per_s / peak,
            f"{method}_mfu_with_reference_forward": 8 * n_params * tokens_per_s / peak,
            f"{method}_peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=["lora", "full", "both"], default="both")
    parser.add_argument("--batch", type=int, default=4, help="preference pairs per step")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--decode-batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=256)
    args = parser.parse_args()
    _require_gpu()
    import gc

    import torch

    print(f"device: {torch.cuda.get_device_name()}")
    peak = measured_bf16_peak_flops()
    bandwidth = measured_bandwidth()
    print(f"measured bf16 matmul peak: {peak / 1e12:.0f} TFLOP/s, copy bandwidth: {bandwidth / 1e12:.2f} TB/s")
    results: dict[str, float] = {}
    model = _mistral_7b(torch.bfloat16).eval()
    results.update(bench_decode(model, args.decode_batch, 128, args.new_tokens, bandwidth))
    del model
    gc.collect()
    torch.cuda.empty_cache()
    for method in (["lora", "full"] if args.method == "both" else [args.method]):
        try:
            results.update(bench_dpo(method, args.batch, args.seq, args.steps, peak))
        except torch.cuda.OutOfMemoryError:
            print(f"{method}: out of memory at batch={args.batch} seq={args.seq}")
        gc.collect()
        torch.cuda.empty_cache()
    for key, value in results.items():
        print(f"{key:40s} {value:12.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
