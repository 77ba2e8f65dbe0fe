"""Issue 15: which evidence tells the training-free inserter's right picks from its wrong ones?

The learned inserter can only beat `rule` where its prompt carries something that separates the rule's wrong picks
from its right ones. This bench runs `rule` on a collection's `gold_text` examples (each passage's own text, as the
learning bench scores it), labels each placement right (the image is one of the passage's own) or wrong, and scores
candidate signals by their ROC AUC (the chance that a right pick scores higher than a wrong one; 0.5 = no signal):

  - `rule_similarity`: the cosine that placed it (the prompt shows it, as `fits <unit>:<score>`);
  - `description_passage`: its caption and surrounding text against the whole passage;
  - `image_words_unit`, `image_words_passage`: the words inside the image (OCR, read here from the stored bytes with
    the ingest's own reader) against the unit it follows and against the passage; only images with words count;
  - `retrieval_rank`: its place among serving's candidates (first = best; the compact prompt does not show it).
A signal with a high AUC is worth a model's attention only if acting on it lifts F1 on the documents it would be
trained on as well as on the held-out ones: `rank_filter` scores, per split, the rule's plans with its unsure picks
dropped when they rank k-th or lower among the candidates.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python -m bench.inserter_evidence --corpus qgc_manual

The corpus must be ingested in the running local cluster (`m2io up`); OCR needs Debian's tesseract-ocr (setup.sh).
Results: bench/results/inserter_evidence-<corpus>.json and bench/README.md.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bench.inserter_learning import gold_text_passages
from bench.job_load import git_commit
from services.common.db import session_scope
from services.common.embedding import get_embedder
from services.common.settings import get_settings
from services.common.storage import get_store
from services.common.vectors import QueryVectors
from services.inserter.core import insert
from services.retriever.ocr import clean_image_text, ocr_lines
from services.trainer.data import build_examples
from services.trainer.evaluation import aggregate, example_inputs, score_plan

UNSURE_BELOW = 0.9995  # a rule similarity under this is not an exact match of the image's context
SIGNALS = ("rule_similarity", "description_passage", "image_words_unit", "image_words_passage", "retrieval_rank")
RANK_CUTS = (1, 2, 3, 4, 6, 8)


def auc(right: list[float], wrong: list[float]) -> float | None:
    """The chance that a value of `right` exceeds one of `wrong` (ties count half); None without both.

    >>> auc([0.9, 0.8], [0.1]), auc([0.5], [0.5]), auc([0.2], [0.4, 0.1]), auc([], [0.3])
    (1.0, 0.5, 0.5, None)
    """
    if not right or not wrong:
        return None
    wins = sum((r > w) + 0.5 * (r == w) for r in right for w in wrong)
    return round(wins / (len(right) * len(wrong)), 3)


def picks_of(corpus: str, seed: int) -> tuple[list[dict], dict[str, list[float | None]]]:
    """Every placement `rule` makes on the corpus's gold_text examples, with its signals; and per split, the F1 of the
    rule's plans and of `rank_filter`'s variants (`RANK_CUTS`)."""
    report = build_examples(corpus, seed=seed)
    examples = gold_text_passages(report.examples)
    val = {example.id for example in report.split("val")}
    filtered: dict[str, list[list[dict]]] = {"train": [], "val": []}
    store, embedder = get_store(), get_embedder()
    timeout = get_settings().ocr_timeout_s
    words_of: dict[str, str] = {}
    picks = []
    for example in examples:
        units, candidates = example_inputs(example)
        with session_scope() as session:
            plan = insert(units, candidates, "rule", QueryVectors(embedder, session))
        gold = {g["image"] for g in example.gold}
        by_name = {c.source_name: c for c in candidates}
        rank = {c.source_name: index for index, c in enumerate(candidates)}
        rows = filtered["val" if example.id in val else "train"]
        rows.append(
            [score_plan(plan.placements, example)]
            + [
                score_plan(
                    [p for p in plan.placements if (p.similarity or 0) >= UNSURE_BELOW or rank[p.image] < k], example
                )
                for k in RANK_CUTS
            ]
        )
        passage = " ".join(unit.text for unit in units)
        for placement in plan.placements:
            candidate = by_name[placement.image]
            if candidate.s3_key not in words_of:
                words_of[candidate.s3_key] = clean_image_text(ocr_lines(store.get(candidate.s3_key), timeout))
            description = " ".join(filter(None, (candidate.caption, candidate.context_before, candidate.context_after)))
            picks.append(
                {
                    "example": example.id,
                    "right": placement.image in gold,
                    "rule_similarity": placement.similarity,
                    "words": words_of[candidate.s3_key],
                    "unit": units[max(placement.after, 1) - 1].text,
                    "passage": passage,
                    "description": description,
                    "retrieval_rank": -rank[placement.image],
                }
            )
    fields = ("words", "unit", "passage", "description")
    texts = [pick[field] or "-" for pick in picks for field in fields]
    vectors = embedder.encode(texts).reshape(len(picks), len(fields), -1)
    for pick, (words, unit, passage, description) in zip(picks, vectors, strict=True):
        pick["description_passage"] = float(np.dot(description, passage))
        pick["image_words_unit"] = float(np.dot(words, unit)) if pick["words"] else None
        pick["image_words_passage"] = float(np.dot(words, passage)) if pick["words"] else None
    rank_filter = {
        split: [round(aggregate([row[column] for row in rows])["image_f1"], 4) for column in range(len(RANK_CUTS) + 1)]
        for split, rows in filtered.items()
        if rows
    }
    return picks, rank_filter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="qgc_manual", help="an ingested collection")
    parser.add_argument("--seed", type=int, default=0, help="the data split's seed (as bench.inserter_learning)")
    parser.add_argument("--out", type=Path, help="default: bench/results/inserter_evidence-<corpus>.json")
    args = parser.parse_args()
    picks, rank_filter = picks_of(args.corpus, args.seed)
    # all picks, and those the rule is not sure of: a unit that repeats the image's own context scores 1.0 and is
    # almost always right, which alone lifts `rule_similarity`'s AUC; the wrong picks are among the others
    subsets = {"all": picks, "similarity_below_1": [p for p in picks if (p["rule_similarity"] or 0) < UNSURE_BELOW]}
    signals: dict[str, dict] = {}
    for subset, chosen in subsets.items():
        for signal in SIGNALS:
            right = [p[signal] for p in chosen if p["right"] and p[signal] is not None]
            wrong = [p[signal] for p in chosen if not p["right"] and p[signal] is not None]
            signals.setdefault(subset, {})[signal] = {
                "auc": auc(right, wrong),
                "right_picks": len(right),
                "wrong_picks": len(wrong),
            }
    result = {
        "bench": "inserter_evidence",
        "corpus": args.corpus,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "picks": len(picks),
        "right": sum(p["right"] for p in picks),
        "with_image_words": sum(bool(p["words"]) for p in picks),
        "signals": signals,
        # image F1 of the rule's plans (first) and with its unsure picks ranked k-th or lower dropped, per RANK_CUTS
        "rank_filter": {"cuts": ["rule", *(f"rank<{k}" for k in RANK_CUTS)], **rank_filter},
    }
    out = args.out or Path(f"bench/results/inserter_evidence-{args.corpus}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
