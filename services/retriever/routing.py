"""Routing a question across several collections (after R1-Router: when and where to retrieve).

Per question, from evidence that costs little:
- a dense probe in each candidate collection (its best chunks' cosine to the question, on the same index the
  search uses), a full-text probe (how many chunks hold every content word of the question), and the cosine to the
  collection's mean chunk vector (its centroid, computed once per process and collection and kept a minute);
- the collections whose score is within `AMBIGUOUS` of the best are all retrieved from, and the retrieval
  whose answer evidence is strongest is kept;
- when the best probe is weak (`WEAK`), one follow-up probe with the question reformulated (its content words
  only, the way a keyword search reads it) may find a better collection;
- when even that finds nothing close (`NO_ANSWER`) and no chunk holds all its content words, no collection answers:
  the retrieval is empty and says why, so the answer says so and places no image.

Every decision is recorded (`contracts.Routing`: considered with scores, chosen, steps) on the retrieval.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from cachetools import TTLCache
from sqlalchemy import text
from sqlalchemy.orm import Session

from services.common.contracts import CollectionScore, Retrieval, Routing, RoutingStep
from services.common.db import vector_literal
from services.common.embedding import Embedder
from services.common.models import Collection
from services.common.vectors import QueryVectors
from services.retriever.search import retrieve, vector_hits
from services.retriever.sections import STOP_WORDS, WORD

# How many best chunks the dense probe averages: one lucky chunk should not win a collection, and three is
# still a "few best", not the collection's average.
PROBE_DEPTH = 3
TEXT_PROBE_DEPTH = 20  # full-text hits counted, at most (a count, not a ranking)
# The full-text probe counts chunks that hold EVERY content word of the question (the search itself ORs
# them: one shared common word, "cup" or "set", matches almost any collection, and says nothing).
ALL_WORDS_PROBE = text(
    "SELECT count(*) FROM (SELECT 1 FROM chunks WHERE collection_id = :c "
    "AND tsv @@ plainto_tsquery('english', :words) LIMIT :limit) AS hits"
)
# The centroid's weight: a collection whose mean chunk is near the question's topic wins ties between
# collections that each hold one close chunk. Small, since a collection's mean blurs its many topics.
CENTROID_WEIGHT = 0.25
# all-MiniLM-L6-v2 cosines (bench/README.md "Routing"): the dev questions' own collection's best chunk is
# 0.49-0.9, off-topic questions' best 0.12-0.32. Below WEAK a reformulated follow-up is tried; below
# NO_ANSWER, with no chunk holding all the content words either, no collection answers.
WEAK = 0.45
NO_ANSWER = 0.35
AMBIGUOUS = 0.03  # collections within this score of the best are all retrieved from
CENTROID_TTL_S = 60  # a collection's centroid is recomputed at most once a minute per process
MAX_STEPS = 2  # the first probe and one follow-up

CENTROIDS: TTLCache[int, np.ndarray | None] = TTLCache(maxsize=256, ttl=CENTROID_TTL_S)


class NoCollections(LookupError):
    pass


@dataclass(frozen=True)
class Probe:
    collection: Collection
    dense: float
    text_hits: int
    centroid: float | None

    @property
    def score(self) -> float:
        return round(self.dense + CENTROID_WEIGHT * (self.centroid or 0.0), 6)

    def record(self) -> CollectionScore:
        return CollectionScore(
            name=self.collection.name,
            dense=round(self.dense, 6),
            text_hits=self.text_hits,
            centroid=None if self.centroid is None else round(self.centroid, 6),
            score=self.score,
        )


def reformulate(question: str) -> str:
    """The question as a keyword search reads it: its content words, in order, function words dropped.

    >>> reformulate("How do I make the best apple pie?")
    'make best apple pie'
    >>> reformulate("What is it?")
    ''
    """
    return " ".join(word for word in WORD.findall(question) if word.lower() not in STOP_WORDS)


def centroid(session: Session, collection: Collection) -> np.ndarray | None:
    """The collection's mean chunk vector (unit length), cached per process for `CENTROID_TTL_S`."""
    if collection.id in CENTROIDS:
        return CENTROIDS[collection.id]
    dim = collection.embedding_dim
    raw = session.execute(
        text(
            f"SELECT avg(embedding::vector({dim}))::text FROM chunks WHERE collection_id = :c AND embedding_dim = {dim}"
        ),
        {"c": collection.id},
    ).scalar()
    vector = None
    if raw:
        values = np.array([float(x) for x in raw.strip("[]").split(",")], dtype=np.float32)
        norm = float(np.linalg.norm(values))
        vector = values / norm if norm > 0 else None
    CENTROIDS[collection.id] = vector
    return vector


def probe(session: Session, collection: Collection, query: np.ndarray, words: str) -> Probe:
    """The dense and full-text probes of one collection for a question's vector and words."""
    nearest = vector_hits(session, "chunks", collection, vector_literal(query), PROBE_DEPTH)  # the search's own
    sims = [similarity for _, similarity in nearest]
    hits = (
        session.execute(ALL_WORDS_PROBE, {"words": words, "c": collection.id, "limit": TEXT_PROBE_DEPTH}).scalar()
        if words
        else 0
    )
    mean = centroid(session, collection)
    return Probe(
        collection=collection,
        dense=float(np.mean(sims)) if sims else 0.0,
        text_hits=hits,
        centroid=float(query @ mean) if mean is not None and len(mean) == len(query) else None,
    )


def ranked(probes: list[Probe]) -> list[Probe]:
    return sorted(probes, key=lambda p: (-p.score, p.collection.name))


def answer_strength(retrieval: Retrieval) -> float:
    """How well a retrieval answers: its best section's score, else its best passage's fused score."""
    if retrieval.sections:
        return retrieval.sections[0].score
    return max((p.score for p in retrieval.passages), default=0.0)


def route(
    session: Session,
    collections: list[Collection],
    question: str,
    embedder: Embedder,
    top_k: int,
    max_candidates: int,
) -> Retrieval:
    """Probe every collection, retrieve from the best (several when close), follow up once when weak.
    The retrieval carries the routing; when no collection answers it is empty and says why."""
    if not collections:
        raise NoCollections("no collection to route among")
    vectors = QueryVectors(embedder, session)
    query = vectors.embed([question])[0]  # once: the retrieval below reuses it
    started = time.perf_counter()  # the router's own cost: the probes (and a follow-up's embedding)
    words = reformulate(question)
    probes = ranked([probe(session, c, query, words) for c in collections])
    steps = [
        RoutingStep(
            query=question,
            collections=[p.collection.name for p in probes],
            best=probes[0].score,
            reason="first probe of every collection (dense + full text + centroid)",
        )
    ]
    if probes[0].dense < WEAK and words and words != question and len(steps) < MAX_STEPS:
        follow_query = vectors.embed([words])[0]
        follow = ranked([probe(session, p.collection, follow_query, words) for p in probes])
        steps.append(
            RoutingStep(
                query=words,
                collections=[p.collection.name for p in follow],
                best=follow[0].score,
                reason=f"weak first probe (best chunk cosine {probes[0].dense:.2f} < {WEAK}): the content words alone",
            )
        )
        if follow[0].score > probes[0].score:
            probes = follow
    best = probes[0]
    considered = [p.record() for p in probes]
    if best.dense < NO_ANSWER and not any(p.text_hits for p in probes):
        reason = (
            f"no collection holds an answer: the closest passage ({best.collection.name}) has cosine "
            f"{best.dense:.2f} to the question (below {NO_ANSWER}), and no passage holds all its content words"
        )
        routing = Routing(
            considered=considered,
            chosen=[],
            steps=steps,
            answerable=False,
            reason=reason,
            seconds=round(time.perf_counter() - started, 4),
        )
        return Retrieval(
            collection=best.collection.name,
            question=question,
            passages=[],
            candidates=[],
            question_vector=[round(float(x), 7) for x in query],
            embedded=vectors.embedded,
            routing=routing,
        )
    close = [p for p in probes if best.score - p.score <= AMBIGUOUS]
    routing_seconds = time.perf_counter() - started
    retrievals = [
        retrieve(session, p.collection, question, embedder, top_k=top_k, max_candidates=max_candidates, query=query)
        for p in close
    ]
    kept = max(retrievals, key=answer_strength) if len(retrievals) > 1 else retrievals[0]
    reason = (
        f"{best.collection.name} scored best ({best.score:.3f})"
        if len(close) == 1
        else f"{len(close)} collections within {AMBIGUOUS} of the best were searched; {kept.collection} "
        f"held the strongest answer ({answer_strength(kept):.3f})"
    )
    routing = Routing(
        considered=considered,
        chosen=[kept.collection],
        steps=steps,
        reason=reason,
        seconds=round(routing_seconds, 4),
    )
    return kept.model_copy(update={"routing": routing, "embedded": vectors.embedded + kept.embedded})
