"""The generator: a text answer from retrieved passages. Images are seen as descriptions (caption +
surrounding text), which M2RAG found better than raw pixels.

Backends, chosen per job:
- `extractive`: answers with the source text of the section the retriever found for the question
  (`Retrieval.sections`: whole, in source order, headings, lists, numbering and tables intact, each
  unit knowing where it stood). Only when no section fits the question (or the documents were
  indexed before sections were kept) it picks and orders the most relevant units of the passages
  (MMR: relevant, not redundant) in document order. It never invents text; the answer says which
  mode answered and why;
- `local` / `local:<model>`: a transformers causal LM (SmolLM2-135M-Instruct offline by default);
- `openai` / `openai:<model>`: any OpenAI-compatible chat endpoint (vLLM, Ollama, OpenAI).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from services.common.contracts import AnswerUnit, CandidateImage, Passage, Retrieval, SourceSection, TextAnswer
from services.common.embedding import Embedder
from services.common.text import parse_markdown
from services.common.vectors import QueryVectors, query_vectors

# The generator backends a job may name (`JobConfig.generator`): `extractive`, `local[:model]`, `openai[:model]`.
BACKENDS = ("extractive", "local", "openai")
MMR_LAMBDA = 0.75  # relevance weighs 3x redundancy: answers to how-to questions repeat vocabulary
MAX_UNITS = 14
MAX_WORDS = 260
MIN_RELEVANCE = 0.2  # a unit less similar than this to the question is noise, not answer
MAX_NEW_TOKENS = 320
MIN_FOCUSED_UNITS = 3
SECTION_MARGIN = 0.1  # cosine: how much better a sub-section's heading must match than its parent's


class GenerationError(RuntimeError):
    pass


@dataclass
class PassageUnit:
    text: str
    kind: str
    passage_rank: int  # 0-based rank of its passage
    order: tuple[int, int, int]  # (document, chunk, unit): where it stands in its source
    unit: AnswerUnit | None = None  # as the retriever gave it, with provenance


def passage_units(passages: list[Passage]) -> list[PassageUnit]:
    """The units of each passage, without the heading-path line the chunker puts first: the
    retriever's units with provenance when it gave them, else the passage's text parsed."""
    units: list[PassageUnit] = []
    documents: dict[int, int] = {}
    for rank, passage in enumerate(passages):
        if passage.units:
            document_order = documents.setdefault(passage.document_id, len(documents))
            for unit in passage.units:
                position = unit.source.position if unit.source else 0
                units.append(PassageUnit(unit.text, unit.kind, rank, (document_order, position, 0), unit))
            continue
        body = passage.text
        if passage.heading and body.startswith(passage.heading):
            body = body[len(passage.heading) :].lstrip("\n")
        document_order = documents.setdefault(passage.document_id, len(documents))
        for index, unit in enumerate(parse_markdown(body).units):
            if unit.kind == "heading":
                continue
            units.append(PassageUnit(unit.text, unit.kind, rank, (document_order, passage.chunk_id, index)))
    return units


def ancestors(heading: str) -> list[str]:
    """`A > B > C` -> [`A`, `A > B`]: the enclosing sections, outermost first."""
    parts = heading.split(" > ")
    return [" > ".join(parts[:n]) for n in range(1, len(parts))]


def focused_passages(
    passages: list[Passage],
    question_vector: np.ndarray | None = None,
    vectors: QueryVectors | None = None,
    min_units: int = MIN_FOCUSED_UNITS,
) -> list[Passage]:
    """The passages the answer is made from: the best passage's document and, within it, the section
    whose heading path best matches the question (with its sub-sections). Manuals answer one section
    of long pages; a whole document brings other sections' images along, and other documents more so
    (bench/README.md). Falls back to the document, then to all passages, when the focus is too short.
    Only for documents indexed before sections were kept: their headings are embedded now."""
    if not passages:
        return []
    top = passages[0]
    document = [p for p in passages if p.document_id == top.document_id]
    if len(passage_units(document)) < min_units:
        return passages
    headings = sorted({p.heading for p in document if p.heading})
    if question_vector is None or vectors is None or len(headings) < 2:
        return document
    similarity = dict(zip(headings, vectors.embed(headings) @ question_vector, strict=True))
    best = max(headings, key=similarity.get)
    # Prefer the enclosing section when it matches almost as well: "How do I make X?" is about the
    # whole recipe, not its Directions; "Fly View: Instrument Panel?" is about that one section.
    for ancestor in ancestors(best):
        if ancestor in similarity and similarity[ancestor] >= similarity[best] - SECTION_MARGIN:
            best = ancestor
            break
    section = [p for p in document if p.heading and (p.heading == best or p.heading.startswith(best + " > "))]
    return section if len(passage_units(section)) >= min_units else document


def extractive_answer(
    question: str,
    passages: list[Passage],
    vectors: QueryVectors | Embedder,
    max_units: int = MAX_UNITS,
    max_words: int = MAX_WORDS,
    focus: bool = True,
    question_vector: list[float] | None = None,
) -> list[AnswerUnit]:
    """MMR picks of the passages' units. The units' vectors are the stored ones (`vectors` with a
    session); the question's is the retriever's when given."""
    vectors = query_vectors(vectors)
    if question_vector is not None:
        query = np.asarray(question_vector, dtype=np.float32)
    else:
        query = vectors.embed([question])[0]
    units = passage_units(focused_passages(passages, query, vectors) if focus else passages)
    if not units:
        return []
    unit_vectors = vectors.of_units([unit.unit or AnswerUnit(text=unit.text, kind=unit.kind) for unit in units])
    # Relevance: similarity to the question, nudged by how the retriever ranked the passage.
    relevance = unit_vectors @ query + np.array([0.1 / (1 + unit.passage_rank) for unit in units])
    chosen: list[int] = []
    words = 0
    candidates = [i for i in range(len(units)) if relevance[i] >= MIN_RELEVANCE]
    while candidates and len(chosen) < max_units:
        if chosen:
            redundancy = (unit_vectors[candidates] @ unit_vectors[chosen].T).max(axis=1)
        else:
            redundancy = np.zeros(len(candidates))
        scores = MMR_LAMBDA * relevance[candidates] - (1 - MMR_LAMBDA) * redundancy
        best = candidates[int(np.argmax(scores))]
        candidates.remove(best)
        if redundancy.size and (unit_vectors[best] @ unit_vectors[chosen].T).max(initial=0) > 0.95:
            continue  # a near-duplicate (the same step in two passages)
        unit_words = len(units[best].text.split())
        if chosen and words + unit_words > max_words:
            continue
        chosen.append(best)
        words += unit_words
    chosen.sort(key=lambda i: units[i].order)  # source order: steps stay in sequence
    return [units[i].unit or AnswerUnit(text=units[i].text, kind=units[i].kind) for i in chosen]


# A section fits the question when its heading path is this similar to it (MiniLM cosine; unrelated
# headings of one manual score 0.3-0.6 against a question), or holds half of the question's content
# words. Holding the best passage is not enough: some passage is always best.
SECTION_MIN_SIMILARITY = 0.6
SECTION_MIN_TERMS = 0.5


def section_fits(section: SourceSection) -> bool:
    evidence = section.evidence
    return bool(section.units) and (
        evidence.get("heading_similarity", 0.0) >= SECTION_MIN_SIMILARITY
        or evidence.get("heading_terms", 0.0) >= SECTION_MIN_TERMS
    )


def section_answer(section: SourceSection) -> list[AnswerUnit]:
    """The section's units; a cut answer ends with a line that says where the rest is."""
    units = list(section.units)
    if section.truncated:
        units.append(AnswerUnit(text=f"(The answer stops here; “{section.path}” continues in {section.doc_key}.)"))
    return units


def extractive(retrieval: Retrieval, vectors: QueryVectors) -> tuple[list[AnswerUnit], str, list[str], str]:
    """The extractive answer: (units, mode, sections answered, why)."""
    best = retrieval.sections[0] if retrieval.sections else None
    if best is not None and section_fits(best):
        evidence = ", ".join(f"{key} {value:g}" for key, value in best.evidence.items())
        scope = "with its sub-sections" if best.subsections else "its own text"
        reason = f"section “{best.path}” of {best.doc_key}, {scope} ({evidence})"
        return section_answer(best), "section", [best.path], reason
    if best is not None:
        reason = (
            f"no section fits the question (best: “{best.path}” of {best.doc_key}, {best.evidence}); "
            "sentences of the passages"
        )
        units = extractive_answer(
            retrieval.question, retrieval.passages, vectors, focus=False, question_vector=retrieval.question_vector
        )
    else:
        reason = "the documents carry no sections (indexed before they were kept; re-ingest); sentences of the passages"
        units = extractive_answer(
            retrieval.question, retrieval.passages, vectors, question_vector=retrieval.question_vector
        )
    return units, "sentences", [], reason


def describe_candidate(candidate: CandidateImage) -> str:
    parts = [f"[{candidate.source_name}]"]
    if candidate.caption:
        parts.append(f"caption: {candidate.caption}")
    context = " ".join(filter(None, [candidate.context_before, candidate.context_after]))
    if context:
        parts.append(f"context: {context[:300]}")
    if candidate.image_text:
        parts.append(f"text in the image: {candidate.image_text[:300]}")
    return " ".join(parts)


def generation_messages(retrieval: Retrieval) -> list[dict[str, str]]:
    passages = "\n\n".join(f"Passage {i}: {p.text}" for i, p in enumerate(retrieval.passages, 1))
    images = "\n".join(describe_candidate(c) for c in retrieval.candidates) or "(none)"
    return [
        {
            "role": "system",
            "content": "You answer questions using only the given passages. Write clear sentences; "
            "for procedures, write numbered steps. Do not mention the passages.",
        },
        {
            "role": "user",
            "content": f"Passages:\n{passages}\n\nImages available (described in words):\n{images}\n\n"
            f"Question: {retrieval.question}\nAnswer:",
        },
    ]


def split_answer(text: str) -> list[AnswerUnit]:
    """An LM's answer as units: sentences split, list steps kept whole (the retriever's parser)."""
    return [AnswerUnit(text=unit.text, kind=unit.kind) for unit in parse_markdown(text).units]


def no_answer(retrieval: Retrieval, backend: str) -> TextAnswer:
    """The answer when the router found that no collection holds one: it says so, in one sentence, and
    no backend is asked to write from passages that do not answer (it would invent)."""
    searched = ", ".join(score.name for score in retrieval.routing.considered)
    return TextAnswer(
        units=[AnswerUnit(text=f"None of the collections searched ({searched}) holds an answer to this question.")],
        backend=backend,
        mode="none",
        reason=retrieval.routing.reason,
    )


def generate(retrieval: Retrieval, backend: str, vectors: QueryVectors | Embedder | None) -> TextAnswer:
    """The text answer. `vectors` gives the stored vectors (an Embedder: embed what is needed now)."""
    started = time.perf_counter()
    if retrieval.routing is not None and not retrieval.routing.answerable:
        return no_answer(retrieval, backend)
    vectors = query_vectors(vectors)
    match backend.split(":", 1)[0]:
        case "extractive":
            units, mode, sections, reason = extractive(retrieval, vectors)
            return TextAnswer(
                units=units,
                backend=backend,
                seconds=round(time.perf_counter() - started, 4),
                mode=mode,
                sections=sections,
                reason=reason,
                truncated=mode == "section" and retrieval.sections[0].truncated,
                embedded=vectors.embedded,
            )
        case "local" | "openai":
            from services.common.llm import LLMError, get_chat_model

            if not retrieval.passages:
                return TextAnswer(units=[], backend=backend)
            try:
                result = get_chat_model(backend).chat(generation_messages(retrieval), max_new_tokens=MAX_NEW_TOKENS)
            except LLMError as error:
                raise GenerationError(f"{backend} generator failed: {error}") from error
            return TextAnswer(
                units=split_answer(result.text),
                backend=backend,
                mode="lm",
                seconds=round(time.perf_counter() - started, 4),
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
            )
        case _:
            raise GenerationError(f"unknown generator backend {backend!r} (extractive, local[:model], openai[:model])")
