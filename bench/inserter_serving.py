"""Issue 15: what one plan of a learned inserter costs when served, by decoding setting.

The whole serving call, `insert(units, candidates, "checkpoint:…", QueryVectors(…))` as the inserter worker makes
it (the prompt built from the stored vectors, the model's greedy plan, the strict parse), on a collection's held-out
`gold_text` examples; the same model object in four settings, alternated example by example so that all see the
same machine load:
  - `plain`: one forward pass per token, the whole prompt prefilled every time (transformers' `generate`);
  - `lookup`: prompt lookup drafts (`LocalChatModel`'s loop), the whole prompt prefilled every time;
  - `lookup+prefix`: drafts, and the kept cache of the prompt head that repeats across calls;
  - `lookup+prefix+rule` (the default): as `lookup+prefix`, and the rule's plan drafted whole in the prompt's pass.
It also checks that all settings give the same plans (each keeps the greedy result). With `--end-to-end NAME`, the
model is also registered as NAME and the corpus's held-out questions go through the cluster (extractive generator)
with `--inserter rule` and `--inserter checkpoint:NAME`: scores, and the served plan's seconds as the worker
records them (its default settings, its torch threads).

    PYTHONPATH=. HF_HUB_OFFLINE=1 python -m bench.inserter_serving --corpus qgc_manual \
        --model <registered name or folder> \
        [--val 30] [--rounds 2] [--threads 1] [--end-to-end <name to register>]

The corpus must be ingested in the running local cluster (`m2io up`; bench.inserter_learning does both).
Results: bench/results/inserter_serving.json and bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.inserter_learning import gold_text_passages, served, val_questions
from bench.inserter_training import hardware
from bench.job_load import git_commit
from services.client import Client
from services.common.db import session_scope
from services.common.embedding import get_embedder
from services.common.llm import LocalChatModel
from services.common.llm.local import PROMPT_LOOKUP_TOKENS
from services.common.vectors import QueryVectors
from services.inserter.core import insert
from services.inserter.registry import download_checkpoint
from services.jobs.status import percentile
from services.trainer.core import TrainConfig
from services.trainer.data import build_examples
from services.trainer.evaluation import example_inputs
from services.trainer.runs import register_model


class Timed:
    """The model as `insert` calls it, keeping the last reply (its generation seconds and token counts); the rule's
    plan `insert` offers as a draft is passed on only when `drafts` is set."""

    def __init__(self, model: LocalChatModel):
        self.model, self.last, self.drafts = model, None, True

    def chat(self, messages, draft=None, **options):
        self.last = self.model.chat(messages, draft=draft if self.drafts else None, **options)
        return self.last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="qgc_manual", help="an ingested collection")
    parser.add_argument("--model", required=True, help="a registered inserter model's name, or a model folder")
    parser.add_argument("--val", type=int, default=30, help="held-out gold_text examples (0: all)")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the examples (the first warms caches)")
    parser.add_argument("--lookup", type=int, default=PROMPT_LOOKUP_TOKENS, help="prompt lookup tokens (on)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: as an inserter worker of `m2io up`)")
    parser.add_argument("--end-to-end", metavar="NAME", help="register the model as NAME and serve held-out questions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/inserter_serving.json"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    folder = Path(args.model)
    if not (folder / "config.json").is_file():
        folder = download_checkpoint(args.model)  # UnknownModel names the registered ones
    report = build_examples(args.corpus, seed=args.seed)
    val = gold_text_passages(report.split("val"))
    val = val[: args.val] if args.val else val
    model = LocalChatModel(str(folder))
    model.warm_up()
    settings = {
        "plain": (0, False, False),
        "lookup": (args.lookup, False, False),
        "lookup+prefix": (args.lookup, True, False),
        "lookup+prefix+rule": (args.lookup, True, True),
    }
    seconds: dict[str, list[float]] = {name: [] for name in settings}
    generation: dict[str, list[float]] = {name: [] for name in settings}
    tokens: list[tuple[int, int, int, int | None]] = []  # prompt, plan, kept prompt tokens; forward passes
    timed = Timed(model)
    plans: dict[str, dict[str, Any]] = {name: {} for name in settings}
    embedder = get_embedder()
    for round_ in range(args.rounds):
        for index, example in enumerate(val):
            units, candidates = example_inputs(example)
            # rotate which setting goes first, so none always follows another's cache warm-up
            order = list(settings.items())
            order = order[index % len(order) :] + order[: index % len(order)]
            for name, (lookup, prefix, drafts) in order:
                model.prompt_lookup, model.prefix_cache, timed.drafts = lookup, prefix, drafts
                with session_scope() as session:
                    started = time.perf_counter()
                    plan = insert(units, candidates, "checkpoint:bench", QueryVectors(embedder, session), timed)
                    elapsed = time.perf_counter() - started
                if round_ == args.rounds - 1:
                    seconds[name].append(elapsed)
                    generation[name].append(timed.last.seconds)
                    if drafts:
                        reply = timed.last
                        tokens.append(
                            (reply.prompt_tokens, reply.completion_tokens, reply.cached_tokens, reply.forward_passes)
                        )
                plans[name][example.id] = (plan.raw_output, plan.fallback_reason)
    names = list(settings)
    same = {
        name: f"{sum(plans[names[0]][key] == plans[name][key] for key in plans[names[0]])}/{len(plans[names[0]])}"
        for name in names[1:]
    }
    rows = [
        {
            "setting": name,
            "prompt_lookup": lookup,
            "prefix_cache": prefix,
            "rule_draft": drafts,
            "p50_s": round(statistics.median(seconds[name]), 3),
            "p90_s": round(percentile(seconds[name], 0.9), 3),
            "mean_s": round(statistics.fmean(seconds[name]), 3),
            "generation_p50_s": round(statistics.median(generation[name]), 3),
            "plans": len(seconds[name]),
            "fallbacks": sum(1 for _raw, reason in plans[name].values() if reason),
        }
        for name, (lookup, prefix, drafts) in settings.items()
    ]
    result = {
        "bench": "inserter_serving",
        "corpus": args.corpus,
        "model": args.model,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "hardware": hardware(),
        "torch_threads": args.threads,
        "rows": rows,
        "p50_speedup_over_plain": {row["setting"]: round(rows[0]["p50_s"] / row["p50_s"], 2) for row in rows[1:]},
        "plans_identical_to_plain": same,
        "prompt_tokens_p50": statistics.median(t[0] for t in tokens),
        "cached_prompt_tokens_p50": statistics.median(t[2] for t in tokens),
        "completion_tokens_p50": statistics.median(t[1] for t in tokens),
        "forward_passes_p50": statistics.median(t[3] for t in tokens),
        "one_pass_plans": f"{sum(t[3] == 1 for t in tokens)}/{len(tokens)}",
    }
    if args.end_to_end:
        result["end_to_end"] = end_to_end(args.corpus, report, folder, args.end_to_end)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


def end_to_end(corpus: str, report, folder: Path, name: str) -> dict[str, Any]:
    """The held-out documents' questions served with `rule` and with the model registered as `name`."""
    registered = register_model(None, TrainConfig(collection=corpus, name=name), folder, {"bench": "inserter_serving"})
    questions, count = val_questions(corpus, {e.doc_key for e in report.split("val")}, Path(tempfile.mkdtemp()))
    client = Client()
    rows = {"questions": count}
    for inserter in ("rule", f"checkpoint:{registered}"):
        metrics = served(client, corpus, questions, inserter)
        keys = ("image_f1", "ordering", "position_accuracy", "parse_rate", "seconds_per_plan", "failed")
        rows[inserter] = {key: metrics.get(key) for key in keys}
    return rows


if __name__ == "__main__":
    main()
