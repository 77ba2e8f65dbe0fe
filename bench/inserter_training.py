"""Issue 6's honest evaluation: the inserter trained on a collection (warm-up, then GRPO) against the untrained base
model and the `rule` inserter, on the held-out documents of the same collection.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python -m bench.inserter_training --collection recipes \
        --sft-steps 40 --steps 16 --out bench/results/inserter_training.json

Needs a cluster with the collection ingested (`m2io up`, `m2io ingest infra/demo/recipes --collection recipes`).
Every plan is scored as the model wrote it (an unparseable plan places no image: no rule fallback), with the
MRAMG metrics of services/common/metrics.py; `parse_rate` is the share of plans that parsed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

from services.trainer.core import TrainConfig, TrainingHooks, train_inserter
from services.trainer.data import build_examples
from services.trainer.evaluation import evaluate_model, evaluate_rule


class Log(TrainingHooks):
    def __init__(self):
        self.steps: list[dict] = []

    def on_metrics(self, phase, step, metrics):
        self.steps.append({"phase": phase, "step": step, **metrics})
        shown = {k: round(v, 3) for k, v in metrics.items() if k.startswith(("reward", "loss", "kl", "val_image_f1"))}
        print(f"{phase} {step}: {shown}", flush=True)


def hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    threads = torch.get_num_threads()
    return f"CPU, {os.cpu_count()} cores ({platform.machine()}), torch {torch.__version__}, {threads} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--collection", default="recipes")
    parser.add_argument("--sft-steps", type=int, default=40)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=None, help="GRPO learning rate (default: config's)")
    parser.add_argument(
        "--split-train",
        action="store_true",
        help="warm up on half of the training documents and run GRPO on the other half (prompts it has not memorised)",
    )
    parser.add_argument("--skip-base", action="store_true", help="do not score the untrained base model")
    parser.add_argument("--val", type=int, default=0, help="validation examples scored (0: all)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/m2io-bench-training"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/inserter_training.json"))
    args = parser.parse_args()

    report = build_examples(args.collection)
    train, val = report.split("train"), report.split("val")
    val = val[: args.val] if args.val else val
    print(f"{args.collection}: {report.summary()}", flush=True)
    config = TrainConfig(collection=args.collection, sft_steps=args.sft_steps, steps=args.steps, eval_examples=0)
    if args.learning_rate:
        config.learning_rate = args.learning_rate
    sft_train, grpo_train = train, train
    if args.split_train:
        documents = sorted({e.doc_key for e in train})
        first = set(documents[::2])
        sft_train = [e for e in train if e.doc_key in first]
        grpo_train = [e for e in train if e.doc_key not in first]
    results: dict = {
        "collection": args.collection,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "hardware": hardware(),
        "data": report.summary(),
        "val_examples": len(val),
        "config": config.to_dict(),
        "split_train": args.split_train,
        "sft_examples": len(sft_train),
        "grpo_examples": len(grpo_train),
        "variants": {},
    }

    def evaluate(name: str, source: str | None) -> None:
        started = time.monotonic()
        metrics = evaluate_rule(val) if source is None else evaluate_model(source, val)
        metrics["eval_seconds"] = round(time.monotonic() - started, 1)
        results["variants"][name] = metrics
        print(f"{name}: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in metrics.items()})}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")

    evaluate("rule", None)
    from services.trainer.core import resolve_base

    if not args.skip_base:
        evaluate("base (SmolLM2-135M-Instruct, prompted)", resolve_base(config.base_model))
    log = Log()
    warm_only = TrainConfig(**{**config.to_dict(), "steps": 0, "reward_weights": config.reward_weights})
    started = time.monotonic()
    warm = train_inserter(warm_only, sft_train, [], args.work_dir / "sft", log)
    results["sft_seconds"] = round(time.monotonic() - started, 1)
    evaluate(f"warm-up (SFT, {config.sft_steps} steps)", str(warm.model_dir))
    grpo_config = TrainConfig(**{**config.to_dict(), "sft_steps": 0, "base_model": str(warm.model_dir),
                                 "reward_weights": config.reward_weights})  # fmt: skip
    started = time.monotonic()
    final = train_inserter(grpo_config, grpo_train, [], args.work_dir / "grpo", log)
    results["grpo_seconds"] = round(time.monotonic() - started, 1)
    results["steps"] = log.steps
    evaluate(f"GRPO ({config.steps} steps after the warm-up)", str(final.model_dir))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
