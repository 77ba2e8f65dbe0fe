"""Training the image inserter: a supervised warm-up on the plan format, then GRPO (TRL), optionally with LoRA.

Pure of the cluster: `train_inserter(config, train, val, work_dir, hooks)` reads examples and writes model folders;
what it reports (metrics per step, checkpoints, "should I stop?") goes through `TrainingHooks`, which the trainer
worker implements with Postgres and S3 (services/trainer/runs.py) and a benchmark or a notebook may leave out.

Why a warm-up: from a model that does not write the `<think>...</think><answer>[...]</answer>` format, every
sampled completion scores 0 and GRPO's group-relative advantage is 0 everywhere, so nothing is learned. A few
dozen supervised steps on the gold plans fix the format; GRPO then optimises which images and where.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common.llm import DEFAULT_LOCAL_MODEL, ensure_converted, is_bundled
from services.trainer.data import TrainingExample, balanced_by_plan_size
from services.trainer.evaluation import evaluate_model
from services.trainer.rewards import DEFAULT_REWARD_WEIGHTS, REWARD_FUNCTIONS

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything a run needs; stored as the run's `config` (JSON) and enough to repeat it."""

    collection: str
    base_model: str = DEFAULT_LOCAL_MODEL  # a hub id (offline: in the HF cache), a model folder, or the bundled one
    name: str | None = None  # the registered model's name (default: inserter-<collection>-<run id prefix>)
    # supervised warm-up
    sft_steps: int = 20
    sft_batch_size: int = 4
    sft_learning_rate: float = 5e-5
    # Full fine-tuning of the top N transformer layers only (0: every weight). The backward pass stops at the lowest
    # trained layer: 6.5 s instead of 17 s for 1,200 tokens (N = 8, SmolLM2-135M, 2 CPU cores, a plain loop). In
    # TRL's SFT step the forward pass and its LM head over every position (prompt included) then dominate.
    sft_top_layers: int = 0
    # Plans of each size (0, 1, 2, 3+ images) weigh alike in both phases (data.balanced_by_plan_size). Off by
    # default: on qgc_manual it made GRPO learn (+0.11 F1 in 40 steps) but from a lower start (bench/README.md).
    balance_plans: bool = False
    # GRPO
    steps: int = 40
    prompts_per_step: int = 1  # with a group of 4: ~8-15 s a step for the bundled model on 2 CPU cores
    num_generations: int = 4  # completions per prompt: the group GRPO compares
    max_completion_length: int = 48  # a plan of 5 images; raised to fit the longest target (completion_budget)
    learning_rate: float = 5e-5  # for LoRA adapters; full fine-tuning wants ~1e-6
    temperature: float = 1.0
    # KL to the warm-up model. 0 (DAPO and TRL's default) skips the reference model's forward pass, a third of a
    # step's compute on a CPU; the warm-up's format holds without it once the plans are short.
    beta: float = 0.0
    reward_weights: tuple[float, ...] = DEFAULT_REWARD_WEIGHTS  # format, recall, position, precision
    # GRPO trains LoRA adapters instead of every weight (merged into the weights before saving); the warm-up too
    # with `sft_lora` (full fine-tuning learns the plan format in a few steps, LoRA on the top layers in dozens).
    lora: bool = True
    sft_lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    # Adapters on the top N transformer layers only (0: every layer): the backward pass then stops at the lowest
    # adapted layer, which on a CPU is most of what a step costs beyond the forward passes.
    lora_top_layers: int = 8
    # data
    val_fraction: float = 0.2
    max_train_examples: int | None = None
    eval_examples: int = 24  # validation examples scored after each phase (0: none)
    checkpoint_every: int = 10  # GRPO steps between checkpoints
    # Recomputes activations in the backward pass: less memory (3B models on one GPU), ~30% slower. TRL turns it
    # on by default; a 135M model on CPU does not need it.
    gradient_checkpointing: bool = False
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["reward_weights"] = list(self.reward_weights)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown training settings: {', '.join(sorted(unknown))}")
        values = dict(data)
        if "reward_weights" in values:
            values["reward_weights"] = tuple(float(w) for w in values["reward_weights"])
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        if self.sft_steps < 0 or self.steps < 0:
            raise ValueError("sft_steps and steps must be >= 0")
        if self.num_generations < 2:
            raise ValueError("num_generations must be >= 2: GRPO compares completions within a group")
        if len(self.reward_weights) != len(REWARD_FUNCTIONS):
            raise ValueError(
                f"reward_weights needs {len(REWARD_FUNCTIONS)} values (format, recall, position, precision)"
            )
        if self.lora_top_layers < 0 or self.sft_top_layers < 0:
            raise ValueError("lora_top_layers and sft_top_layers must be >= 0 (0: every layer)")
        if not 0 < self.val_fraction < 1:
            raise ValueError("val_fraction must be between 0 and 1")


@dataclass
class Checkpoint:
    phase: str  # sft | grpo | final
    step: int
    folder: Path


class TrainingHooks:
    """What a run reports as it goes. The default does nothing (a bench or notebook run)."""

    def on_metrics(self, phase: str, step: int, metrics: dict[str, float]) -> None:
        return None

    def on_checkpoint(self, checkpoint: Checkpoint) -> None:
        return None

    def stop_reason(self) -> str | None:
        """A reason to stop now (the run was cancelled), or None to go on."""
        return None


class Stopped(Exception):
    """Training stopped early on request; the last checkpoint stands."""


@dataclass
class TrainResult:
    model_dir: Path
    base_source: str
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)  # seconds, steps, eval metrics per phase


def resolve_base(name: str) -> str:
    """A local folder for the bundled model (converted once), else the name as transformers takes it."""
    return str(ensure_converted(name)) if is_bundled(name) else name


def device_flags() -> dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        return {"use_cpu": False, "bf16": torch.cuda.is_bf16_supported(), "fp16": False}
    return {"use_cpu": True, "bf16": False, "fp16": False}


def load_model(source: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    return model, tokenizer


def save_plain(model, tokenizer, folder: Path) -> Path:
    """A plain transformers checkpoint (LoRA adapters merged into a copy), loadable by LocalChatModel."""
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def train_top_layers(model, count: int) -> int:
    """Freeze every weight but those of the top `count` transformer layers and the final norm; returns how many
    weights stay trainable. The embeddings (tied to the output head in SmolLM2) stay frozen: the backward pass then
    stops at the lowest trained layer. A model without a decoder stack at `model.model.layers` and a final norm at
    `model.model.norm` (Llama, Qwen2, Mistral and SmolLM2 have both) is refused with a ValueError."""
    decoder = getattr(model, "model", None)
    layers, norm = getattr(decoder, "layers", None), getattr(decoder, "norm", None)
    if layers is None or norm is None:
        raise ValueError(
            f"sft_top_layers needs a Llama-style model (model.model.layers and model.model.norm); "
            f"{type(model).__name__} has not: train all layers (sft_top_layers=0) or use LoRA"
        )
    first = max(0, len(layers) - count)
    trained = {id(p) for layer in layers[first:] for p in layer.parameters()}
    trained |= {id(p) for p in norm.parameters()}
    for parameter in model.parameters():
        parameter.requires_grad = id(parameter) in trained
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_config(config: TrainConfig, model=None):
    if not config.lora:
        return None
    from peft import LoraConfig

    layers = None
    if config.lora_top_layers and model is not None:
        count = model.config.num_hidden_layers
        layers = list(range(max(0, count - config.lora_top_layers), count))
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        if layers
        else "all-linear",
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
    )


# TRL's log keys -> ours (the dashboard plots columns starting with `reward` and containing `loss`).
METRIC_NAMES = {
    "loss": "loss",
    "kl": "kl",
    "reward": "reward",
    "reward_std": "reward_std",
    "completions/mean_length": "completion_length",
    "completions/clipped_ratio": "completion_clipped",
    "grad_norm": "grad_norm",
    "learning_rate": "learning_rate",
    "entropy": "entropy",
    "mean_token_accuracy": "token_accuracy",
    "step_time": "step_time",  # seconds of the step (TRL's GRPO), the cost the bench reports
}


def rename_metrics(logs: dict[str, Any]) -> dict[str, float]:
    """TRL's logged values under stable names: rewards per component as `reward_<name>`.

    >>> rename_metrics({"loss": 0.5, "rewards/format_reward/mean": 1.0, "rewards/format_reward/std": 0.0, "epoch": 1})
    {'loss': 0.5, 'reward_format': 1.0}
    """
    metrics: dict[str, float] = {}
    for key, value in logs.items():
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            continue
        if key.startswith("rewards/") and key.endswith("/mean"):
            metrics["reward_" + key.split("/")[1].removesuffix("_reward")] = float(value)
        elif key in METRIC_NAMES:
            metrics[METRIC_NAMES[key]] = float(value)
    return metrics


def recorder(hooks: TrainingHooks, phase: str, step_offset: int, checkpoint_every: int, work_dir: Path):
    """A transformers callback: metrics to the hooks at every log, a stop check at every step, and (GRPO)
    a checkpoint every `checkpoint_every` steps."""
    from transformers import TrainerCallback

    class RunRecorder(TrainerCallback):
        stopped_for: str | None = None
        saved_step: int | None = None  # the step of the last checkpoint it reported

        def on_log(self, args, state, control, logs=None, **kwargs):
            metrics = rename_metrics(logs or {})
            if metrics and "train_runtime" not in (logs or {}):
                hooks.on_metrics(phase, state.global_step + step_offset, metrics)

        def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
            reason = hooks.stop_reason()
            step = state.global_step + step_offset
            due = checkpoint_every and phase == "grpo" and state.global_step % checkpoint_every == 0
            if (due or reason) and model is not None and processing_class is not None:
                folder = save_plain(model, processing_class, work_dir / f"{phase}-step-{step:05d}")
                hooks.on_checkpoint(Checkpoint(phase, step, folder))
                self.saved_step = step
            if reason:
                self.stopped_for = reason
                control.should_training_stop = True

    return RunRecorder()


def shared_trainer_args(config: TrainConfig, work_dir: Path, phase: str) -> dict[str, Any]:
    """What the SFT and the GRPO trainer are given alike: log every step, save nothing themselves (the recorder
    uploads checkpoints), report nowhere, the device's flags."""
    return {
        "output_dir": str(work_dir / f"{phase}-trainer"),
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "gradient_checkpointing": config.gradient_checkpointing,
        **device_flags(),
    }


def supervised_warm_up(config: TrainConfig, source: str, train: Sequence[TrainingExample], work_dir: Path, hooks):
    """`config.sft_steps` steps of SFT on the gold plans (loss on the completion only); returns the folder."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = load_model(source)
    if config.sft_top_layers and not config.sft_lora:
        log.info(
            "warm-up trains the top %d layers: %d weights",
            config.sft_top_layers,
            train_top_layers(model, config.sft_top_layers),
        )
    train = balanced_by_plan_size(list(train), config.seed) if config.balance_plans else train
    dataset = Dataset.from_list([{"prompt": e.prompt, "completion": e.completion} for e in train])
    args = SFTConfig(
        max_steps=config.sft_steps,
        per_device_train_batch_size=config.sft_batch_size,
        learning_rate=config.sft_learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(5, config.sft_steps // 4),
        seed=config.seed,
        max_length=2048,
        **shared_trainer_args(config, work_dir, "sft"),
    )
    callback = recorder(hooks, "sft", 0, 0, work_dir)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(config, model) if config.sft_lora else None,
        callbacks=[callback],
    )
    trainer.train()
    if callback.stopped_for:
        raise Stopped(callback.stopped_for)
    return save_plain(trainer.model, tokenizer, work_dir / "sft")


def completion_budget(config: TrainConfig, train: Sequence[TrainingExample], tokenizer) -> int:
    """GRPO's `max_completion_length`: the configured one, raised to fit the longest target plan in `train` plus
    the end of turn. A sampled plan cut short does not parse and earns no reward, so a cap under some targets
    would teach the policy to drop images from exactly the passages that hold many."""
    longest = max((len(tokenizer(e.completion[-1]["content"]).input_ids) for e in train), default=0)
    if longest + 2 > config.max_completion_length:
        log.info("max_completion_length %d raised to %d (longest target)", config.max_completion_length, longest + 2)
    return max(config.max_completion_length, longest + 2)


def grpo(config: TrainConfig, source: str, train: Sequence[TrainingExample], work_dir: Path, hooks, done: int = 0):
    """GRPO from `source` for the steps not yet `done`; returns the folder of the final weights."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    model, tokenizer = load_model(source)
    train = balanced_by_plan_size(list(train), config.seed + 1) if config.balance_plans else train
    dataset = Dataset.from_list(
        [
            {"prompt": e.prompt, "unit_count": e.unit_count, "candidate_names": e.candidate_names, "gold": e.gold}
            for e in train
        ]
    )
    args = GRPOConfig(
        max_steps=config.steps - done,
        per_device_train_batch_size=config.prompts_per_step * config.num_generations,
        num_generations=config.num_generations,
        max_completion_length=completion_budget(config, train, tokenizer),
        temperature=config.temperature,
        beta=config.beta,
        learning_rate=config.learning_rate,
        reward_weights=list(config.reward_weights),
        seed=config.seed + done,
        **shared_trainer_args(config, work_dir, "grpo"),
    )
    callback = recorder(hooks, "grpo", done, config.checkpoint_every, work_dir)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=list(REWARD_FUNCTIONS),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(config, model),
        callbacks=[callback],
    )
    trainer.train()
    if callback.stopped_for:
        raise Stopped(callback.stopped_for)
    folder = save_plain(trainer.model, tokenizer, work_dir / "grpo")
    final_step = trainer.state.global_step + done
    if callback.saved_step != final_step:  # the final weights are the run's last checkpoint too
        hooks.on_checkpoint(Checkpoint("grpo", final_step, folder))
    return folder


def train_inserter(
    config: TrainConfig,
    train: Sequence[TrainingExample],
    val: Sequence[TrainingExample],
    work_dir: Path,
    hooks: TrainingHooks | None = None,
    resume: Checkpoint | None = None,
) -> TrainResult:
    """Warm-up then GRPO; returns the final model folder and per-phase timings and validation metrics.

    `resume` (a checkpoint of an interrupted run) skips what it covers: the warm-up once its weights exist, and
    the GRPO steps already taken (the weights resume; the optimiser state starts afresh)."""
    import torch

    hooks = hooks or TrainingHooks()
    config.validate()
    if not train:
        raise ValueError("no training examples: the collection has no passages with locatable images")
    torch.manual_seed(config.seed)
    work_dir.mkdir(parents=True, exist_ok=True)
    train = list(train)[: config.max_train_examples] if config.max_train_examples else list(train)
    base_source = resolve_base(config.base_model)
    result = TrainResult(model_dir=Path(base_source), base_source=base_source)
    source = base_source
    grpo_done = 0
    if resume is not None:
        source = str(resume.folder)
        grpo_done = resume.step if resume.phase == "grpo" else 0
    if config.sft_steps and resume is None:
        started = time.monotonic()
        folder = supervised_warm_up(config, source, train, work_dir, hooks)
        result.phases["sft"] = {"seconds": round(time.monotonic() - started, 1), "steps": config.sft_steps}
        hooks.on_checkpoint(Checkpoint("sft", config.sft_steps, folder))
        source = str(folder)
        if val and config.eval_examples:
            result.phases["sft"]["val"] = evaluate_model(source, val[: config.eval_examples])
            hooks.on_metrics("eval", 1, {f"val_{k}": v for k, v in result.phases["sft"]["val"].items() if v})
    if config.steps > grpo_done:
        started = time.monotonic()
        folder = grpo(config, source, train, work_dir, hooks, done=grpo_done)
        result.phases["grpo"] = {"seconds": round(time.monotonic() - started, 1), "steps": config.steps - grpo_done}
        source = str(folder)
        if val and config.eval_examples:
            result.phases["grpo"]["val"] = evaluate_model(source, val[: config.eval_examples])
            hooks.on_metrics("eval", 2, {f"val_{k}": v for k, v in result.phases["grpo"]["val"].items() if v})
    result.model_dir = Path(source)
    return result
