"""Issue 15: does the learned inserter (SFT warm-up, then GRPO) beat the training-free `rule` on held-out documents?

For each development corpus (a collection of the same name in the local cluster; ingested if missing):
  1. training data from the serving distribution (services/trainer/data.py): `gold_text` examples (a passage's own
     text as plain sentences, serving's 12 candidates for a question synthesised from its heading) and `serving`
     examples (the extractive answer to that question with provenance), split by document;
  2. an SFT warm-up, then GRPO from it (alpha 0.8, `grpo`), then short GRPO runs from the same warm-up with other
     alphas (`grpo-alpha-<a>`: reward weights format 1, recall a, position 1 - a, precision 1), each recorded as a
     training run (its curves on the dashboard's Training page) and registered as a model;
  3. `gold_text`: every inserter's plans on the held-out documents' `gold_text` examples (a model's own plans:
     an unparseable plan places nothing; no rule fallback);
  4. `end_to_end`: the held-out documents' questions of the corpus through the cluster (extractive generator)
     with `--inserter rule` and `--inserter checkpoint:<name>` (served: a plan that does not parse falls back to
     `rule`, and parse_rate says how often that happened).

    PYTHONPATH=. HF_HUB_OFFLINE=1 python -m bench.inserter_learning [--corpora recipes qgc_manual] \
        [--sft-steps 30] [--steps 40] [--alpha-steps 12] [--val 30]

Results: bench/results/inserter_learning.json (rows, curves, settings) and bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.inserter_training import hardware
from bench.job_load import ensure_corpus, git_commit
from services.client import Client
from services.common.embedding import DEFAULT_EMBEDDING_MODEL
from services.common.queues import Stage
from services.common.stage_runs import outputs_of_job
from services.jobs.evaluate import score_job
from services.trainer.core import TrainConfig, TrainingHooks, resolve_base, train_inserter
from services.trainer.data import build_examples
from services.trainer.evaluation import evaluate_model, evaluate_rule
from services.trainer.runs import create_run, finish, record_step, register_model

CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"
ALPHAS = (0.0, 0.5, 0.8, 1.0)
COLUMNS = ("f1", "ordering", "position", "parse_rate", "s_per_plan")


class RunLog(TrainingHooks):
    """A bench training run as a recorded run: every metric to `training_steps` (the dashboard's curves) and here."""

    def __init__(self, run_id: uuid.UUID, label: str):
        self.run_id, self.label = run_id, label
        self.steps: list[dict[str, Any]] = []

    def on_metrics(self, phase: str, step: int, metrics: dict[str, float]) -> None:
        record_step(self.run_id, phase, step, metrics)
        self.steps.append({"phase": phase, "step": step, **metrics})
        shown = {k: round(v, 3) for k, v in metrics.items() if k in ("loss", "reward", "reward_std", "val_image_f1")}
        print(f"  {self.label} {phase} {step}: {shown}", flush=True)


def row(corpus: str, setting: str, inserter: str, metrics: dict[str, Any], **extra: Any) -> dict[str, Any]:
    def value(key: str) -> float | None:
        found = metrics.get(key)
        return None if found is None else round(float(found), 4)

    return {
        "corpus": corpus,
        "setting": setting,
        "inserter": inserter,
        "f1": value("image_f1"),
        "ordering": value("ordering"),
        "position": value("position_accuracy"),
        "parse_rate": value("parse_rate"),
        "s_per_plan": value("seconds_per_plan"),
        "examples": metrics.get("count"),
        **extra,
    }


def train_recorded(config: TrainConfig, train, work_dir: Path, label: str) -> tuple[Path, RunLog, float, uuid.UUID]:
    run_id = create_run(config)
    log = RunLog(run_id, label)
    started = time.monotonic()
    try:
        result = train_inserter(config, train, [], work_dir, log)
    except BaseException as error:
        finish(run_id, "failed", f"{type(error).__name__}: {error}")
        raise
    seconds = time.monotonic() - started
    finish(run_id, "succeeded")
    return result.model_dir, log, seconds, run_id


def served(client: Client, corpus: str, questions: Path, inserter: str) -> dict[str, Any]:
    """One job through the cluster; its scores, parse rate (plans without a fallback) and inserter seconds."""
    job_id = client.submit(questions, corpus, generator="extractive", inserter=inserter, name=f"learning {inserter}")
    status = client.wait(job_id, stall_timeout=600)
    report = score_job(job_id, record=False)
    plans = [o.plan for o in outputs_of_job(job_id, [Stage.INSERTER]).values() if o.plan is not None]
    metrics = dict(report["aggregate"])
    metrics["parse_rate"] = sum(p.fallback_reason is None for p in plans) / len(plans) if plans else None
    metrics["seconds_per_plan"] = statistics.median(p.seconds for p in plans) if plans else None
    print(f"  end_to_end {inserter}: state {status.state}, {report['aggregate']}", flush=True)
    return metrics


def val_questions(corpus: str, val_documents: set[str], folder: Path) -> tuple[Path, int]:
    lines = [
        line
        for line in (CORPORA / corpus / "questions.jsonl").read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line).get("doc_id") in val_documents
    ]
    path = folder / f"{corpus}-val-questions.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, len(lines)


class Results:
    """The results file, written again after every row: a run stopped part-way keeps what it measured."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path, self.data = path, data

    def add(self, found: dict[str, Any]) -> None:
        self.data["rows"].append(found)
        print(f"  {found['inserter']} ({found['setting']}): {found}", flush=True)
        self.write()

    def write(self) -> None:
        self.data["verdicts"] = verdicts(self.data["rows"])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2, default=str) + "\n", encoding="utf-8")


def kept_from(earlier: dict[str, Any], data: dict[str, Any], corpora: list[str]) -> dict[str, Any]:
    """`data` (a new run's results) with the rows and corpus entries of an earlier results file for the corpora this
    run does not bench; each corpus entry keeps the settings, commit and start it was run with.

    >>> old = {"started_at": "t0", "commit": "a", "settings": {"steps": 40}, "corpora": {"x": {}, "y": {}},
    ...        "rows": [{"corpus": "x", "f1": 0.5}, {"corpus": "y", "f1": 0.9}]}
    >>> new = kept_from(old, {"started_at": "t1", "commit": "b", "settings": {"steps": 60}, "corpora": {},
    ...                       "rows": []}, ["y"])
    >>> new["rows"], new["corpora"]["x"]["run"]
    ([{'corpus': 'x', 'f1': 0.5}], {'started_at': 't0', 'commit': 'a', 'settings': {'steps': 40}})
    """
    merged = {**data, "corpora": {}, "rows": [r for r in earlier.get("rows", []) if r["corpus"] not in corpora]}
    for corpus, found in earlier.get("corpora", {}).items():
        if corpus not in corpora:
            merged["corpora"][corpus] = {"run": run_of(earlier), **found}
    return merged


def run_of(results: dict[str, Any]) -> dict[str, Any]:
    """What a corpus entry records of the run that benched it."""
    return {key: results.get(key) for key in ("started_at", "commit", "settings")}


def gold_text_passages(examples: list) -> list:
    """The `gold_text` examples, each passage once (its first candidate set, id `…/0`): what the benches score."""
    return [e for e in examples if e.setting == "gold_text" and e.id.endswith("/0")]


def bench_corpus(corpus: str, args, stamp: str, folder: Path, results: Results) -> None:
    ensure_corpus(CORPORA / corpus, corpus, DEFAULT_EMBEDDING_MODEL)
    started = time.monotonic()
    report = build_examples(corpus, seed=args.seed)
    print(f"{corpus}: {report.summary()} ({time.monotonic() - started:.0f} s)", flush=True)
    found: dict[str, Any] = {"run": run_of(results.data), "data": report.summary(), "curves": {}}
    results.data["corpora"][corpus] = found
    train = report.split("train")
    val = gold_text_passages(report.split("val"))
    val = val[: args.val] if args.val else val
    results.add(row(corpus, "gold_text", "rule", evaluate_rule(val)))
    base = resolve_base(args.base)
    if not args.skip_base:
        results.add(row(corpus, "gold_text", "base", evaluate_model(base, val)))
    common = dict(
        collection=corpus,
        lora=True,
        lora_top_layers=args.lora_top_layers,
        sft_batch_size=4,
        learning_rate=args.learning_rate,
        prompts_per_step=1,
        num_generations=args.group,
        eval_examples=0,
        checkpoint_every=0,
        balance_plans=args.balance_plans,
        seed=args.seed,
    )
    work = Path(tempfile.mkdtemp(prefix=f"m2io-learning-{corpus}-"))
    config = TrainConfig(name=f"{corpus}-grpo-{stamp}", sft_steps=args.sft_steps, steps=args.steps, **common)
    # the warm-up alone first (its own run and model), then GRPO from it: the sft row is exactly GRPO's start
    sft_config = TrainConfig(
        name=f"{corpus}-sft-{stamp}",
        sft_steps=args.sft_steps,
        steps=0,
        **{
            **common,
            "sft_lora": args.sft_lora,
            "sft_learning_rate": args.sft_learning_rate,
            "sft_top_layers": args.sft_top_layers,
        },
    )
    sft_dir, sft_log, sft_seconds, sft_run = train_recorded(sft_config, train, work / "sft", f"{corpus} sft")
    models: dict[str, tuple[Path, float, RunLog, uuid.UUID, TrainConfig]] = {
        "sft": (sft_dir, sft_seconds, sft_log, sft_run, sft_config)
    }
    config.sft_steps, config.base_model = 0, str(sft_dir)
    grpo_dir, grpo_log, grpo_seconds, grpo_run = train_recorded(config, train, work / "grpo", f"{corpus} grpo")
    models["grpo"] = (grpo_dir, grpo_seconds, grpo_log, grpo_run, config)
    for alpha in args.alphas:
        weights = (1.0, alpha, round(1.0 - alpha, 4), 1.0)
        variant = TrainConfig(
            name=f"{corpus}-grpo-alpha-{alpha:g}-{stamp}",
            sft_steps=0,
            steps=args.alpha_steps,
            base_model=str(sft_dir),
            reward_weights=weights,
            **common,
        )
        label = f"grpo-alpha-{alpha:g}"
        out, log, seconds, run_id = train_recorded(variant, train, work / label, f"{corpus} {label}")
        models[label] = (out, seconds, log, run_id, variant)
    for name, (model_dir, seconds, log, _run, model_config) in models.items():
        grpo_steps = [s for s in log.steps if s["phase"] == "grpo"]
        step_seconds = [s["step_time"] for s in grpo_steps if "step_time" in s]
        metrics = evaluate_model(str(model_dir), val)
        found["curves"][name] = log.steps
        results.add(
            row(
                corpus,
                "gold_text",
                name,
                metrics,
                train_seconds=round(seconds + (sft_seconds if name != "sft" else 0), 1),
                steps=model_config.steps or model_config.sft_steps,
                s_per_grpo_step=round(statistics.median(step_seconds), 2) if step_seconds else None,
            )
        )
    if args.end_to_end:
        questions, count = val_questions(corpus, {e.doc_key for e in report.split("val")}, folder)
        print(f"  end_to_end: {count} questions of held-out documents", flush=True)
        client = Client()
        results.add(row(corpus, "end_to_end", "rule", served(client, corpus, questions, "rule")))
        for name in ("sft", "grpo"):
            model_dir, _, _, run_id, model_config = models[name]
            registered = register_model(run_id, model_config, model_dir, {"bench": "inserter_learning"})
            results.add(row(corpus, "end_to_end", name, served(client, corpus, questions, f"checkpoint:{registered}")))


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's aims, each said true or false from the rows."""
    said = []
    for corpus in sorted({r["corpus"] for r in rows}):
        f1 = {(r["setting"], r["inserter"]): r["f1"] for r in rows if r["corpus"] == corpus}
        rule, sft, grpo = f1.get(("gold_text", "rule")), f1.get(("gold_text", "sft")), f1.get(("gold_text", "grpo"))
        if None not in (rule, grpo):
            said.append(f"{corpus}: grpo >= rule + 0.05 in gold_text: {grpo >= rule + 0.05} ({grpo} vs {rule})")
        if None not in (sft, grpo):
            said.append(f"{corpus}: grpo > sft in gold_text: {grpo > sft} ({grpo} vs {sft})")
        rule_e2e, grpo_e2e = f1.get(("end_to_end", "rule")), f1.get(("end_to_end", "grpo"))
        if None not in (rule_e2e, grpo_e2e):
            said.append(f"{corpus}: grpo >= rule in end_to_end: {grpo_e2e >= rule_e2e} ({grpo_e2e} vs {rule_e2e})")
    return said


def stopped(signum: int, _frame) -> None:
    raise SystemExit(f"stopped by signal {signal.Signals(signum).name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpora", nargs="+", default=["recipes", "qgc_manual"])
    parser.add_argument("--base", default=TrainConfig.base_model, help="base model (default: the bundled one)")
    parser.add_argument("--sft-steps", type=int, default=20)
    parser.add_argument("--steps", type=int, default=40, help="GRPO steps of the `grpo` run (alpha 0.8)")
    parser.add_argument("--alpha-steps", type=int, default=12, help="GRPO steps of each alpha variant")
    parser.add_argument("--alphas", type=float, nargs="*", default=[a for a in ALPHAS if a != 0.8])
    parser.add_argument("--group", type=int, default=4, help="completions per prompt (GRPO's group)")
    parser.add_argument("--lora-top-layers", type=int, default=8)
    parser.add_argument("--sft-learning-rate", type=float, default=5e-5)
    parser.add_argument(
        "--sft-top-layers", type=int, default=0, help="the warm-up trains the top N layers only (0: every weight)"
    )
    parser.add_argument(
        "--sft-lora",
        action="store_true",
        help="LoRA in the warm-up too (default: full fine-tuning, which learns the"
        " format in a few steps; GRPO always uses LoRA on the top layers)",
    )
    parser.add_argument("--learning-rate", type=float, default=5e-5, help="GRPO learning rate (LoRA)")
    parser.add_argument("--val", type=int, default=30, help="held-out gold_text examples scored (0: all)")
    parser.add_argument(
        "--balance-plans", action="store_true", help="plans of 0, 1, 2, 3+ images weigh alike (rarer ones repeated)"
    )
    parser.add_argument("--skip-base", action="store_true")
    parser.add_argument("--no-end-to-end", dest="end_to_end", action="store_false")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/inserter_learning.json"))
    parser.add_argument(
        "--add",
        action="store_true",
        help="keep the rows of the other corpora already in --out (one corpus per run, one results file)",
    )
    args = parser.parse_args()
    # `kill` (SIGTERM) stops the bench as Ctrl-C does: the run in training is recorded as failed with the reason,
    # instead of staying "running" on the dashboard's Training page
    signal.signal(signal.SIGTERM, stopped)

    stamp = datetime.now(UTC).strftime("%m%d%H%M")
    data: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "hardware": hardware(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "corpora": {},
        "rows": [],
    }
    if args.add and args.out.exists():
        data = kept_from(json.loads(args.out.read_text(encoding="utf-8")), data, args.corpora)
    results = Results(args.out, data)
    with tempfile.TemporaryDirectory(prefix="m2io-learning-") as folder:
        for corpus in args.corpora:
            bench_corpus(corpus, args, stamp, Path(folder), results)
    results.write()
    for line in data["verdicts"]:
        print(line)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
