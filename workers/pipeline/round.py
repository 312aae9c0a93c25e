"""One round of iterative alignment: split (once per job) -> generate -> score -> pair -> train -> evaluate.

The algorithm decides what "pair" and "train" mean: preference pairs and DPO (any TRL loss) or
SPPO, or the best answer per prompt and SFT (rejection sampling).

Each stage's output is written atomically at a path derived from the job id and round
(`workers.pipeline.artifacts`); a stage whose output exists is skipped, so re-running `run_round`
after a crash (even SIGKILL mid-stage) resumes at the first incomplete stage. The caller injects
`RoundHooks` for progress, events and cancellation; no Celery or HTTP here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.schemas.job_spec import JobSpec
from workers.errors import NoPairs, PipelineError
from workers.pipeline import artifacts
from workers.pipeline.artifacts import RoundPaths
from workers.pipeline.generate import GenerationConfig, PolicyModel, generate_completions
from workers.pipeline.hooks import RoundHooks
from workers.pipeline.loading import model_cache, resolve
from workers.pipeline.pair import PairingConfig, build_pairs, load_pairs, save_pairs, select_best
from workers.pipeline.prompts import Messages, validate_prompt
from workers.pipeline.round_eval import evaluate_round
from workers.pipeline.score import RewardModel, load_reward_model, reward_model_spec
from workers.pipeline.split import PromptSplit, SplitConfig, split_prompts
from workers.pipeline.train import LoraSettings, StartingPolicy, TrainConfig, train_for_algorithm

# Share of a round's progress each stage accounts for (start, end).
STAGE_SPAN = {"split": (0.0, 0.02), "generate": (0.02, 0.3), "score": (0.3, 0.45), "pair": (0.45, 0.5),
              "train": (0.5, 0.85), "evaluate": (0.85, 1.0)}


@dataclass
class RoundContext:
    job_id: str
    round_index: int  # 1-based
    spec: JobSpec
    prompts: Sequence[Messages]
    artifact_root: Path
    model_root: Path
    hooks: RoundHooks = field(default_factory=RoundHooks)
    generation_backend: str = "auto"  # "auto" | "transformers" | "vllm"
    judge_endpoint_allowlist: tuple[str, ...] = ()  # the service's setting; empty: judge rewards refused


@dataclass(frozen=True)
class ModelLocation:
    """Where round n's policy lives, for serving: the base model plus the adapter (or a full model)."""

    base_model: str
    base_location: str
    model_dir: Path
    is_adapter: bool

    @property
    def adapter_dir(self) -> Path | None:
        return self.model_dir if self.is_adapter else None


@dataclass
class RoundResult:
    job_id: str
    round_index: int
    metrics: dict[str, Any]
    model_dir: Path
    is_adapter: bool
    skipped_stages: list[str] = field(default_factory=list)


def round_model_location(artifact_root: Path, job_id: str, round_index: int, spec: JobSpec,
                         model_root: Path) -> ModelLocation:
    base = resolve(spec.base_model, model_root)
    model_dir = artifacts.round_paths(artifact_root, job_id, round_index).model
    is_adapter = (model_dir / "adapter_config.json").is_file() or (
        not model_dir.exists() and spec.training.method == "lora")
    return ModelLocation(base_model=spec.base_model, base_location=base.location, model_dir=model_dir,
                         is_adapter=is_adapter)


def _starting_policy(ctx: RoundContext) -> StartingPolicy:
    base = resolve(ctx.spec.base_model, ctx.model_root)
    if ctx.round_index == 1:
        return StartingPolicy(base_location=base.location)
    previous = round_model_location(ctx.artifact_root, ctx.job_id, ctx.round_index - 1, ctx.spec, ctx.model_root)
    if not previous.model_dir.is_dir():
        raise PipelineError(f"round {ctx.round_index - 1} has no trained model; run it first",
                            code="previous_round_missing")
    if previous.is_adapter:
        return StartingPolicy(base_location=base.location, adapter_dir=previous.model_dir)
    return StartingPolicy(base_location=base.location, full_model_dir=previous.model_dir)


def _policy_model(start: StartingPolicy) -> PolicyModel:
    if start.full_model_dir is not None:
        return PolicyModel(base_location=str(start.full_model_dir))
    return PolicyModel(base_location=start.base_location, adapter_dir=start.adapter_dir)


def generation_config(spec: JobSpec, *, samples: int, seed: int) -> GenerationConfig:
    g = spec.generation
    return GenerationConfig(samples_per_prompt=samples, max_new_tokens=g.max_new_tokens,
                            temperature=g.temperature, top_p=g.top_p, batch_size=g.batch_size, seed=seed,
                            tensor_parallel_size=spec.training.num_gpus)


# Job algorithm -> trainer: ipo and sppo_hard are TRL DPO losses (the spec sets `loss_type`).
TRAINING_ALGORITHM = {"dpo": "dpo", "ipo": "dpo", "sppo_hard": "dpo", "sppo": "sppo",
                      "rejection_sampling": "rejection_sampling"}


def train_config(spec: JobSpec) -> TrainConfig:
    t, a = spec.training, spec.algorithm
    targets = t.lora.target_modules if isinstance(t.lora.target_modules, str) else list(t.lora.target_modules)
    return TrainConfig(
        method=t.method, learning_rate=t.learning_rate, epochs=t.epochs, batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, max_length=t.max_length,
        max_prompt_length=t.max_prompt_length, lr_scheduler_type=t.lr_scheduler_type,
        warmup_ratio=t.warmup_ratio, gradient_checkpointing=t.gradient_checkpointing, seed=t.seed,
        beta=a.beta, loss_type=a.loss_type, label_smoothing=a.label_smoothing, reference=a.reference,
        lora=LoraSettings(r=t.lora.r, alpha=t.lora.alpha, dropout=t.lora.dropout, target_modules=targets),
        algorithm=TRAINING_ALGORITHM[a.type], length_normalize=a.length_normalize)


class _RoundRunner:
    def __init__(self, ctx: RoundContext):
        self.ctx = ctx
        self.paths: RoundPaths = artifacts.round_paths(ctx.artifact_root, ctx.job_id, ctx.round_index)
        self.metrics: dict[str, Any] = {"job_id": ctx.job_id, "round": ctx.round_index}
        self.skipped: list[str] = []
        self._reward_model: RewardModel | None = None

    # -- plumbing ---------------------------------------------------------------------------------
    def progress(self, stage: str, within: float) -> None:
        lo, hi = STAGE_SPAN[stage]
        self.ctx.hooks.report_progress(stage, lo + (hi - lo) * min(1.0, max(0.0, within)))

    def event(self, level: str, type_: str, message: str, **data: Any) -> None:
        self.ctx.hooks.emit_event(level, type_, message, {"round": self.ctx.round_index, **data})

    def reward_model(self) -> RewardModel:
        if self._reward_model is None:
            self._reward_model = load_reward_model(reward_model_spec(self.ctx.spec.reward_model),
                                                   self.ctx.model_root,
                                                   judge_allowlist=self.ctx.judge_endpoint_allowlist)
        return self._reward_model

    def stage(self, name: str, output: Path, run: Callable[[], dict[str, Any]],
              commit: Callable[[], None]) -> None:
        """Skip when `output` exists; else run, write the stats, then commit the output (atomically)."""
        self.ctx.hooks.check_cancelled()
        stats_path = self.paths.stage_stats(name)
        if output.exists():
            self.skipped.append(name)
            if stats_path.is_file():
                self.metrics.update(artifacts.read_json(stats_path))
            self.event("info", "stage_skipped", f"{name}: output already complete", stage=name)
            self.progress(name, 1.0)
            return
        self.event("info", "stage_started", f"{name} started", stage=name)
        self.progress(name, 0.0)
        started = time.perf_counter()
        stats = run()
        stats[f"{name}_wall_s"] = time.perf_counter() - started
        artifacts.atomic_write_json(stats_path, stats)
        commit()
        self.metrics.update(stats)
        self.event("info", "stage_completed", f"{name} completed", stage=name, **stats)
        self.progress(name, 1.0)

    # -- stages -----------------------------------------------------------------------------------
    def split(self) -> PromptSplit:
        path = artifacts.split_path(self.ctx.artifact_root, self.ctx.job_id)
        if path.is_file():
            return PromptSplit.from_json(artifacts.read_json(path))
        spec = self.ctx.spec
        split = split_prompts(len(self.ctx.prompts), SplitConfig(
            rounds=spec.rounds, eval_fraction=spec.eval_fraction, reuse_prompts=spec.reuse_prompts,
            seed=spec.split_seed))
        artifacts.atomic_write_json(path, split.to_json())
        self.event("info", "split_created", "prompt split created", eval_prompts=len(split.eval_indices),
                   shard_sizes=[len(s) for s in split.round_shards])
        return split

    def generate(self, indices: list[int], policy: PolicyModel) -> None:
        result_box: dict[str, Any] = {}

        def run() -> dict[str, Any]:
            prompts = [self.ctx.prompts[i] for i in indices]
            config = generation_config(self.ctx.spec, samples=self.ctx.spec.samples_per_prompt,
                                       seed=self.ctx.spec.split_seed * 1000 + self.ctx.round_index)
            result = generate_completions(policy, prompts, config, self.ctx.hooks,
                                          backend=self.ctx.generation_backend)
            result_box["rows"] = [
                {"prompt_index": i, "prompt": self.ctx.prompts[i], "completions": c, "completion_tokens": t,
                 "prompt_tokens": p}
                for i, c, t, p in zip(indices, result.completions, result.completion_tokens,
                                      result.prompt_tokens, strict=True)]
            return {"generation_backend": result.backend, "generated_tokens": result.total_completion_tokens,
                    "generate_tokens_per_s": result.tokens_per_s, "prompts": len(indices)}

        self.stage("generate", self.paths.generations, run,
                   lambda: artifacts.atomic_write_jsonl(self.paths.generations, result_box["rows"]))

    def score(self) -> None:
        rows_box: dict[str, Any] = {}

        def run() -> dict[str, Any]:
            gens = artifacts.read_jsonl(self.paths.generations)
            result = self.reward_model().score_candidates(
                [g["prompt"] for g in gens], [g["completions"] for g in gens], self.ctx.hooks)
            rows_box["rows"] = [{"prompt_index": g["prompt_index"], "scores": s, "win_prob": p}
                                for g, s, p in zip(gens, result.scores, result.win_prob, strict=True)]
            return {"score_candidates_per_s": result.candidates_per_s,
                    "scored_candidates": sum(len(s) for s in result.scores)}

        self.stage("score", self.paths.scores, run,
                   lambda: artifacts.atomic_write_jsonl(self.paths.scores, rows_box["rows"]))

    def pair(self) -> None:
        box: dict[str, Any] = {}

        def run() -> dict[str, Any]:
            gens = artifacts.read_jsonl(self.paths.generations)
            scores = artifacts.read_jsonl(self.paths.scores)
            p, algorithm = self.ctx.spec.pairing, self.ctx.spec.algorithm.type
            config = PairingConfig(strategy=p.strategy, min_margin=p.min_margin, length_penalty=p.length_penalty,
                                   seed=self.ctx.spec.split_seed + self.ctx.round_index)
            common = dict(prompt_indices=[g["prompt_index"] for g in gens],
                          lengths=[g["completion_tokens"] for g in gens])
            prompts, candidates = [g["prompt"] for g in gens], [g["completions"] for g in gens]
            if algorithm == "rejection_sampling":
                result = select_best(prompts, candidates, [s["scores"] for s in scores], config, **common)
            else:
                result = build_pairs(prompts, candidates, [s["scores"] for s in scores], config, **common,
                                     win_prob=[s["win_prob"] for s in scores] if algorithm == "sppo" else None)
            if result.dropped:
                self.event("warning" if not result.kept else "info", "pairs_dropped",
                           f"{result.dropped} of {len(gens)} prompts gave no usable pair", **result.stats())
            if not result.kept:
                raise NoPairs(f"all {len(gens)} prompts were dropped (ties or margin < {p.min_margin})",
                              data=result.stats())
            box["result"] = result
            return result.stats()

        def commit() -> None:
            with artifacts.atomic_directory(self.paths.pairs) as tmp:
                save_pairs(box["result"], tmp)

        self.stage("pair", self.paths.pairs, run, commit)

    def train(self, start: StartingPolicy) -> None:
        """In process, or with `training.num_gpus` > 1 as that many ranks (`workers.distributed`).
        A drain checkpoints in `trainer_scratch`, which the next run resumes from; it goes once the
        model is committed."""
        def progress(fraction: float) -> None:
            self.progress("train", fraction)

        def train_on_gpus(config: TrainConfig, out_dir: Path) -> Any:
            from workers.distributed import train_with_ranks
            from workers.pipeline.train_request import TrainRequest

            request = TrainRequest(config=config, start=start, pairs_dir=self.paths.pairs, out_dir=out_dir,
                                   scratch_dir=self.paths.trainer_scratch,
                                   control_dir=self.paths.round_dir / "train-control")
            return train_with_ranks(request, num_gpus=self.ctx.spec.training.num_gpus,
                                    request_path=self.paths.round_dir / "train_request.json",
                                    log_path=self.paths.round_dir / "train.log", hooks=self.ctx.hooks,
                                    progress=progress)

        def run() -> dict[str, Any]:
            import shutil

            config = train_config(self.ctx.spec)
            with artifacts.atomic_directory(self.paths.model) as tmp:
                if self.ctx.spec.training.num_gpus > 1:
                    result = train_on_gpus(config, tmp)
                else:
                    result = train_for_algorithm(config, start, load_pairs(self.paths.pairs), tmp,
                                                 self.paths.trainer_scratch, self.ctx.hooks, progress=progress)
                # the stats must exist before the model dir appears: write them from inside the block
                stats = {"train_loss": result.train_loss, "train_steps": result.steps,
                         "train_samples_per_s": result.samples_per_s,
                         "train_skipped_long_prompts": result.skipped_long_prompts,
                         "model_is_adapter": result.is_adapter, "train_loop_s": result.wall_s,
                         "train_resumed_from_step": result.resumed_from_step}
                artifacts.atomic_write_json(self.paths.stage_stats("train"), stats)
            shutil.rmtree(self.paths.trainer_scratch, ignore_errors=True)  # drain checkpoints, now unneeded
            return stats

        self.stage("train", self.paths.model, run, lambda: None)

    def evaluate(self, split: PromptSplit) -> None:
        box: dict[str, Any] = {}

        def run() -> dict[str, Any]:
            location = round_model_location(self.ctx.artifact_root, self.ctx.job_id, self.ctx.round_index,
                                            self.ctx.spec, self.ctx.model_root)
            base = resolve(self.ctx.spec.base_model, self.ctx.model_root)
            new_policy = (PolicyModel(base.location, location.model_dir) if location.is_adapter
                          else PolicyModel(str(location.model_dir)))
            result, rows = evaluate_round(
                self.ctx, split.eval_indices, new_policy, PolicyModel(base.location), self.reward_model(),
                progress=lambda f: self.progress("evaluate", f))
            box["rows"] = rows
            return result.as_metrics()

        self.stage("evaluate", self.paths.eval_samples, run,
                   lambda: artifacts.atomic_write_jsonl(self.paths.eval_samples, box["rows"]))


def run_round(ctx: RoundContext) -> RoundResult:
    """Run (or resume) round `ctx.round_index` of job `ctx.job_id`; returns its metrics and model."""
    if not 1 <= ctx.round_index <= ctx.spec.rounds:
        raise ValueError(f"round {ctx.round_index} is outside 1..{ctx.spec.rounds}")
    runner = _RoundRunner(ctx)
    paths = runner.paths
    paths.round_dir.mkdir(parents=True, exist_ok=True)
    for directory in (paths.round_dir.parent, paths.round_dir, paths.round_dir / "stats"):
        for stale in artifacts.remove_stale_temporaries(directory):
            runner.event("warning", "partial_output_removed", f"removed {stale.name} left by an interrupted run")
    if paths.metrics.is_file():
        runner.event("info", "round_skipped", "round already complete")
        return RoundResult(ctx.job_id, ctx.round_index, artifacts.read_json(paths.metrics), paths.model,
                           (paths.model / "adapter_config.json").is_file(),
                           ["split", "generate", "score", "pair", "train", "evaluate"])
    prompts = [validate_prompt(p) for p in ctx.prompts]
    ctx = RoundContext(**{**ctx.__dict__, "prompts": prompts})
    runner.ctx = ctx

    ctx.hooks.check_cancelled()
    runner.progress("split", 0.0)
    split = runner.split()
    runner.progress("split", 1.0)
    start = _starting_policy(ctx)
    runner.generate(split.shard(ctx.round_index), _policy_model(start))
    runner.score()
    runner.pair()
    model_cache.evict_accelerator_models()  # cached inference models give their GPU memory to training
    runner.train(start)
    runner.evaluate(split)
    ctx.hooks.check_cancelled()

    runner.metrics["round_wall_s"] = sum(runner.metrics.get(f"{s}_wall_s", 0.0) for s in STAGE_SPAN)
    artifacts.atomic_write_json(paths.metrics, runner.metrics)
    location = round_model_location(ctx.artifact_root, ctx.job_id, ctx.round_index, ctx.spec, ctx.model_root)
    runner.event("info", "round_completed", f"round {ctx.round_index} completed",
                 **{k: v for k, v in runner.metrics.items() if k.startswith("eval_")})
    return RoundResult(ctx.job_id, ctx.round_index, runner.metrics, location.model_dir, location.is_adapter,
                       runner.skipped)
