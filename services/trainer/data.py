"""Inserter training data from an ingested collection, drawn from the distribution the inserter is served.

For each passage (chunk) that holds images whose place in it can be found (from the context stored beside each
image at ingest), a question is synthesised from its heading path the way users ask ("What is <heading>?",
"How do I use <heading>?") and run through the real retriever (`retrieve`, the serving candidate count). Then:
  - `gold_text` examples: the passage's own sentences as plain text, without provenance (as an LM's answer
    arrives), with serving's candidates for that question (the passage's gold images put in where the retriever
    missed them); the target plan is the images' original places. `resamples` candidate sets per passage: the
    first takes the retriever's order, the others draw the distractors from a pool twice as deep.
  - a `serving` example: the extractive generator's answer to the question (units with provenance) and exactly
    serving's candidates; the target places each candidate that stood between the answer's source units where
    it stood (nothing else: an image is only known to belong where it stood).
Every example carries the prompt the `llm` / `checkpoint:` inserter is served with (services/inserter/prompt.py),
built by the same function from the same stored vectors, so a model is trained on exactly what it will see.
Examples are split by document (a document's passages and answers all land in one split), deterministically from
the seed: held-out documents are never trained on.
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

from services.common.contracts import DEFAULT_CANDIDATES, AnswerUnit, CandidateImage, Placement
from services.common.db import session_scope
from services.common.embedding import get_embedder
from services.common.models import Chunk, Collection, Document, Image
from services.common.text import parse_markdown
from services.common.vectors import QueryVectors
from services.generator.core import generate
from services.inserter.core import source_plan
from services.inserter.prompt import build_prompt, format_plan
from services.retriever.search import candidate_of, retrieve

# Passages with more sentences than this make prompts longer than a small model reads well (and slow on CPU).
MAX_UNITS = 24
MATCH_CHARS = 80  # compared at each end of a unit when locating an image by its stored context
SETTINGS = ("gold_text", "serving")


class TrainingExample(BaseModel):
    id: str
    split: str  # train | val
    setting: str = "gold_text"  # gold_text | serving (see the module's docstring)
    collection: str
    doc_key: str
    chunk_id: int
    question: str | None = None
    units: list[str]
    unit_sources: list[dict[str, Any] | None] = []  # each unit's provenance (UnitSource fields), serving examples
    candidates: list[dict[str, Any]]  # CandidateImage fields, in retrieval order (as serving gets them)
    gold: list[dict[str, Any]]  # [{"image": source name, "after": sentence}]
    # derived columns the rewards read (see services/trainer/rewards.py)
    unit_count: int
    candidate_names: list[str]  # source names in the prompt's order: `img<k>` is candidate_names[k - 1]
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
            **{f"{setting}_examples": sum(e.setting == setting for e in self.examples) for setting in SETTINGS},
            "train_documents": len({e.doc_key for e in train}),
            "val_documents": len({e.doc_key for e in val}),
            "gold_images": sum(len(e.gold) for e in self.examples),
            "distractors": sum(len(e.candidates) - len(e.gold) for e in self.examples),
            "candidates_per_example": max((len(e.candidates) for e in self.examples), default=0),
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


def synthesised_question(heading: str | None, doc_key: str) -> str:
    """A question a user might ask of a section, from its heading path ("Page > Section > Sub"), in the two
    forms the corpora's questions take; which one is fixed by the heading (the same data every build).

    >>> synthesised_question("Apple Chicken > Directions", "apple-chicken")
    'How do I use Directions in Apple Chicken?'
    >>> synthesised_question("Fly View", "FlyView")
    'How do I use Fly View?'
    >>> synthesised_question(None, "my_doc-name")
    'What is my doc name?'
    """
    path = [part.strip() for part in (heading or "").split(">") if part.strip()]
    if not path:
        path = [" ".join(doc_key.replace("_", " ").replace("-", " ").split())]
    subject = path[-1] if len(path) == 1 else f"{path[-1]} in {path[0]}"
    form = int.from_bytes(hashlib.sha256(subject.encode()).digest()[:2], "big") % 2
    return f"How do I use {subject}?" if form else f"What is {subject}?"


def candidate_set(
    pool: list[CandidateImage], gold: list[CandidateImage], size: int, rng: random.Random | None
) -> list[CandidateImage]:
    """`size` candidates holding every gold image: the distractors are the pool's first (rng None) or a random
    draw from it; everything keeps the retriever's order, and a gold image the retriever missed goes to a random
    place.

    >>> def c(name): return CandidateImage(image_id=0, source_name=name, s3_key="k", caption=None,
    ...     context_before=None, context_after=None, doc_key="d", score=0, reasons=[])
    >>> [x.source_name for x in candidate_set([c("a"), c("g"), c("b"), c("c")], [c("g")], 3, None)]
    ['a', 'g', 'b']
    """
    gold_names = {candidate.source_name for candidate in gold}
    rank = {candidate.source_name: index for index, candidate in enumerate(pool)}
    others = [candidate for candidate in pool if candidate.source_name not in gold_names]
    room = max(0, size - len(gold))
    chosen = (
        others[:room]
        if rng is None
        else sorted(rng.sample(others, min(room, len(others))), key=lambda c: rank[c.source_name])
    )
    keyed = [(float(rank[c.source_name]), c) for c in chosen]
    for candidate in gold:
        if candidate.source_name in rank:
            keyed.append((float(rank[candidate.source_name]), candidate))
        else:
            spot = (rng or random.Random(candidate.source_name)).uniform(0, len(chosen))
            keyed.append((spot, candidate))
    return [candidate for _, candidate in sorted(keyed, key=lambda pair: pair[0])]


def build_examples(
    collection: str,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    candidates: int = DEFAULT_CANDIDATES,
    resamples: int = 2,
    serving: bool = True,
) -> BuildReport:
    """Every example the collection yields (see the module's docstring), split by document."""
    report = BuildReport()
    rng = random.Random(seed)
    with session_scope() as session:
        owner = session.execute(select(Collection).where(Collection.name == collection)).scalar_one_or_none()
        if owner is None:
            known = session.scalars(select(Collection.name).order_by(Collection.name)).all()
            raise LookupError(f"no collection {collection!r} (collections: {', '.join(known) or 'none'})")
        embedder = get_embedder(owner.embedding_model)
        vectors = QueryVectors(embedder, session)
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
            doc_key = doc_keys[chunk.document_id]
            question = synthesised_question(chunk.heading, doc_key)
            pool = retrieve(session, owner, question, embedder, max_candidates=2 * candidates).candidates
            gold_candidates = [candidate_of(image, doc_key, 0.0, ["passage"]) for image in placed]
            plain = [AnswerUnit(text=text) for text in units]
            for draw in range(resamples):
                chosen = candidate_set(pool, gold_candidates, candidates, None if draw == 0 else rng)
                report.examples.append(
                    make_example(
                        collection,
                        doc_key,
                        chunk.id,
                        plain,
                        chosen,
                        gold,
                        splits[doc_key],
                        vectors,
                        setting="gold_text",
                        question=question,
                        variant=draw,
                    )
                )
            if serving:
                retrieval = retrieve(session, owner, question, embedder, max_candidates=candidates)
                answer = generate(retrieval, "extractive", vectors)
                if not answer.units or len(answer.units) > MAX_UNITS:
                    report.skipped["served answer empty or over the sentence limit"] += 1
                    continue
                # the split of the document the answer quotes: a held-out document is never a training answer
                quoted = next((u.source.doc_key for u in answer.units if u.source is not None), doc_key)
                report.examples.append(
                    make_example(
                        collection,
                        quoted,
                        chunk.id,
                        answer.units,
                        retrieval.candidates,
                        source_plan(answer.units, retrieval.candidates),  # the images' original places
                        splits.get(quoted, splits[doc_key]),
                        vectors,
                        setting="serving",
                        question=question,
                    )
                )
    return report


def make_example(
    collection: str,
    doc_key: str,
    chunk_id: int,
    units: list[AnswerUnit],
    candidates: list[CandidateImage],
    gold: list[Placement],
    split: str,
    vectors,
    *,
    setting: str = "gold_text",
    question: str | None = None,
    variant: int = 0,
) -> TrainingExample:
    gold = sorted(gold, key=lambda p: p.after)
    prompt = build_prompt(units, candidates, vectors)
    names = [c.source_name for c in prompt.candidates]  # img<k> is names[k - 1]
    return TrainingExample(
        id=f"{collection}/{doc_key}#{chunk_id}/{setting}/{variant}",
        split=split,
        setting=setting,
        collection=collection,
        doc_key=doc_key,
        chunk_id=chunk_id,
        question=question,
        units=[unit.text for unit in units],
        unit_sources=[unit.source.model_dump(mode="json") if unit.source else None for unit in units],
        candidates=[c.model_dump(mode="json") for c in candidates],
        gold=[p.model_dump(mode="json") for p in gold],
        unit_count=len(units),
        candidate_names=names,
        prompt=prompt.messages,
        completion=[{"role": "assistant", "content": format_plan(gold, names)}],
    )


def balanced_by_plan_size(
    examples: list[TrainingExample], seed: int = 0, largest: int = 3, most_repeats: int = 4
) -> list[TrainingExample]:
    """`examples`, shuffled, with those of rarer plan sizes (images in the gold plan: 0, 1, 2, `largest` or more)
    repeated until each size weighs as much as the commonest, each example at most `most_repeats` times.

    Most passages hold one image, so a small model learns to place exactly one. On qgc_manual every plan of
    the trained model (warm-up + GRPO) on 30 held-out passages placed one image, `img1` at its best match.

    >>> one = lambda n: TrainingExample.model_construct(gold=[{"image": "a", "after": 1}] * n)
    >>> sizes = [len(e.gold) for e in balanced_by_plan_size([one(1)] * 6 + [one(2)] * 2 + [one(0)])]
    >>> sorted(sizes)
    [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2]
    """
    groups: dict[int, list[TrainingExample]] = {}
    for example in examples:
        groups.setdefault(min(len(example.gold), largest), []).append(example)
    commonest = max((len(group) for group in groups.values()), default=0)
    balanced = []
    for size in sorted(groups):
        group = groups[size]
        balanced += [group[i % len(group)] for i in range(min(commonest, most_repeats * len(group)))]
    random.Random(seed).shuffle(balanced)
    return balanced


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
