"""Inserter training data from an ingested collection: the images' original places in their documents are the
supervision.

For each passage (chunk) that holds images, one example:
  - the passage's sentences (the units the generator would number: headings dropped, images removed),
  - its gold images, each with the sentence it followed in the document (0 = before the first),
  - distractors at a 1:1 ratio: hard negatives, the images of *other* documents whose descriptions (caption and
    context, the vectors stored at ingest) are nearest to each gold image's,
  - the prompt the `llm` / `checkpoint:` inserter is served with (services/inserter/core.plan_messages), so a
    model is trained on exactly what it will see.
Examples are split by document (a document's passages all land in one split), deterministically from the seed.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from sqlalchemy import func, select

from services.common.contracts import AnswerUnit, CandidateImage, Placement
from services.common.db import session_scope
from services.common.models import Chunk, Collection, Document, Image
from services.common.text import parse_markdown
from services.inserter.core import format_plan, plan_messages
from services.retriever.search import candidate_of

# Passages with more sentences than this make prompts longer than a small model reads well (and slow on CPU).
MAX_UNITS = 24
MATCH_CHARS = 80  # compared at each end of a unit when locating an image by its stored context


class TrainingExample(BaseModel):
    id: str
    split: str  # train | val
    collection: str
    doc_key: str
    chunk_id: int
    units: list[str]
    candidates: list[dict[str, Any]]  # CandidateImage fields
    gold: list[dict[str, Any]]  # [{"image": source name, "after": sentence}]
    # derived columns the rewards read (see services/trainer/rewards.py)
    unit_count: int
    candidate_names: list[str]
    prompt: list[dict[str, str]]
    completion: list[dict[str, str]]  # the target plan, for the supervised warm-up


@dataclass
class BuildReport:
    examples: list[TrainingExample] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # reason -> passages (or images) left out

    def split(self, name: str) -> list[TrainingExample]:
        return [e for e in self.examples if e.split == name]

    def summary(self) -> dict[str, Any]:
        train, val = self.split("train"), self.split("val")
        return {
            "examples": len(self.examples),
            "train": len(train),
            "val": len(val),
            "train_documents": len({e.doc_key for e in train}),
            "val_documents": len({e.doc_key for e in val}),
            "gold_images": sum(len(e.gold) for e in self.examples),
            "distractors": sum(len(e.candidates) - len(e.gold) for e in self.examples),
            "skipped": dict(self.skipped),
        }


def normalise(text: str | None) -> str:
    return " ".join((text or "").split())


def passage_sentences(chunk: Chunk) -> list[str]:
    """The chunk's units as the generator sees a passage: without the heading-path line, headings dropped."""
    body = chunk.text
    if chunk.heading and body.startswith(chunk.heading):
        body = body[len(chunk.heading) :].lstrip("\n")
    return [unit.text for unit in parse_markdown(body).units if unit.kind != "heading"]


def locate(image: Image, units: list[str]) -> int | None:
    """The sentence an image followed, found from the context stored beside it at ingest (the text just before
    and just after it in its document); None when no slot matches.

    >>> class I: context_before, context_after = "Heat the pan. Add oil.", "Fry the eggs. Serve."
    >>> locate(I, ["Heat the pan.", "Add oil.", "Fry the eggs.", "Serve."])
    2
    >>> locate(I, ["Something else."]) is None
    True
    """
    before, after = normalise(image.context_before), normalise(image.context_after)
    best, best_score = None, 0
    for slot in range(len(units) + 1):
        score = 0
        if slot >= 1 and before and before.endswith(normalise(units[slot - 1])[-MATCH_CHARS:]):
            score += 1
        if slot < len(units) and after and after.startswith(normalise(units[slot])[:MATCH_CHARS]):
            score += 1
        if score > best_score:  # the first best slot: an image between two identical sentences goes to the first
            best, best_score = slot, score
    return best


def split_of(doc_key: str, val_fraction: float, seed: int) -> str:
    digest = hashlib.sha256(f"{seed}:{doc_key}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def think_text(gold: list[Placement], candidate_count: int) -> str:
    """A short reasoning line for the warm-up target (kept short: every token costs in GRPO's sampling).

    >>> think_text([Placement(image="a.jpg", after=1), Placement(image="b.jpg", after=4)], 4)
    '2 of 4 images match sentences 1, 4.'
    """
    if not gold:
        return f"None of the {candidate_count} images matches these sentences."
    return f"{len(gold)} of {candidate_count} images match sentences {', '.join(str(p.after) for p in gold)}."


def build_examples(collection: str, *, val_fraction: float = 0.2, seed: int = 0) -> BuildReport:
    """Every example the collection yields, split by document."""
    report = BuildReport()
    rng = random.Random(seed)
    with session_scope() as session:
        owner = session.execute(select(Collection).where(Collection.name == collection)).scalar_one_or_none()
        if owner is None:
            known = session.scalars(select(Collection.name).order_by(Collection.name)).all()
            raise LookupError(f"no collection {collection!r} (collections: {', '.join(known) or 'none'})")
        rows = session.execute(select(Document.id, Document.doc_key).where(Document.collection_id == owner.id))
        doc_keys = {document_id: key for document_id, key in rows}
        splits = {key: split_of(key, val_fraction, seed) for key in doc_keys.values()}
        if len(doc_keys) >= 2 and len(set(splits.values())) < 2:
            # tiny collections: make sure both splits exist (the last document by key validates)
            splits[max(splits)] = "val" if "val" not in splits.values() else "train"
        chunks = session.scalars(
            select(Chunk)
            .where(Chunk.collection_id == owner.id, func.jsonb_array_length(Chunk.image_ids) > 0)
            .order_by(Chunk.document_id, Chunk.ordinal)
        ).all()
        for chunk in chunks:
            units = passage_sentences(chunk)
            if not units:
                report.skipped["passage without sentences"] += 1
                continue
            if len(units) > MAX_UNITS:
                report.skipped[f"passage over {MAX_UNITS} sentences"] += 1
                continue
            images = session.scalars(select(Image).where(Image.id.in_(chunk.image_ids)).order_by(Image.id)).all()
            gold: list[Placement] = []
            placed: list[Image] = []
            for image in images:
                if image.source_name in {p.image for p in gold}:
                    report.skipped["image shown twice in one passage"] += 1
                    continue
                slot = locate(image, units)
                if slot is None:
                    report.skipped["image not located in its passage"] += 1
                    continue
                gold.append(Placement(image=image.source_name, after=slot))
                placed.append(image)
            if not gold:
                report.skipped["passage without locatable images"] += 1
                continue
            distractors = hard_negatives(session, placed, owner.id, exclude={p.image for p in gold})
            if len(distractors) < len(placed):
                report.skipped["fewer distractors than gold images"] += 1
            doc_key = doc_keys[chunk.document_id]
            candidates = [candidate_of(image, doc_key, 0.0, ["training"]) for image in placed] + [
                candidate_of(image, doc_keys.get(image.document_id, "?"), 0.0, ["training"]) for image in distractors
            ]
            rng.shuffle(candidates)  # the gold images must not always come first
            report.examples.append(
                make_example(collection, doc_key, chunk.id, units, candidates, gold, splits[doc_key])
            )
    return report


def hard_negatives(session, gold_images: list[Image], collection_id: int, exclude: set[str]) -> list[Image]:
    """One distractor per gold image: the nearest image of another document by description embedding."""
    chosen: list[Image] = []
    taken = set(exclude)
    own_documents = {image.document_id for image in gold_images}
    for image in gold_images:
        if image.embedding is None:
            continue
        nearest = session.scalars(
            select(Image)
            .where(
                Image.collection_id == collection_id,
                Image.document_id.not_in(own_documents),
                Image.embedding_dim == image.embedding_dim,
                Image.source_name.not_in(taken),
            )
            .order_by(Image.embedding.cosine_distance(image.embedding))
            .limit(1)
        ).first()
        if nearest is not None:
            chosen.append(nearest)
            taken.add(nearest.source_name)
    return chosen


def make_example(
    collection: str,
    doc_key: str,
    chunk_id: int,
    units: list[str],
    candidates: list[CandidateImage],
    gold: list[Placement],
    split: str,
) -> TrainingExample:
    answer_units = [AnswerUnit(text=text) for text in units]
    gold = sorted(gold, key=lambda p: p.after)
    return TrainingExample(
        id=f"{collection}/{doc_key}#{chunk_id}",
        split=split,
        collection=collection,
        doc_key=doc_key,
        chunk_id=chunk_id,
        units=units,
        candidates=[c.model_dump(mode="json") for c in candidates],
        gold=[p.model_dump(mode="json") for p in gold],
        unit_count=len(units),
        candidate_names=[c.source_name for c in candidates],
        prompt=plan_messages(answer_units, candidates),
        completion=[{"role": "assistant", "content": format_plan(gold, think_text(gold, len(candidates)))}],
    )


def write_examples(report: BuildReport, out_dir: Path) -> dict[str, Path]:
    """`train.jsonl`, `val.jsonl` and `summary.json` in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in ("train", "val"):
        path = out_dir / f"{name}.jsonl"
        with path.open("w", encoding="utf-8") as handle:
            for example in report.split(name):
                handle.write(example.model_dump_json() + "\n")
        paths[name] = path
    (out_dir / "summary.json").write_text(json.dumps(report.summary(), indent=2) + "\n")
    paths["summary"] = out_dir / "summary.json"
    return paths


def read_examples(path: Path) -> list[TrainingExample]:
    """A JSONL file written by `write_examples`; a bad line is an error naming the line."""
    examples = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            examples.append(TrainingExample.model_validate_json(line))
        except ValueError as error:
            raise ValueError(f"{path}: line {number}: not a training example: {error}") from error
    return examples
