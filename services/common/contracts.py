"""Typed payloads of every queue hop. A message carries ids and object keys, never blobs."""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Contract(BaseModel):
    # Unknown fields are an error: a typo in a producer must not pass silently.
    model_config = ConfigDict(extra="forbid", frozen=True)


class QueryRef(Contract):
    """The payload of every answer-pipeline hop: the stage reads its input from Postgres."""

    query_id: uuid.UUID


class SmokeProbe(Contract):
    """The foundation's end-to-end check: one message through each queue, recorded as stage runs."""

    query_id: uuid.UUID
    # Keeps the task busy so a test can kill its worker mid-task; bounded so a bad value cannot
    # park a worker.
    hold_seconds: float = Field(default=0.0, ge=0.0, le=120.0)
    # Whether the stage enqueues the next stage of the pipeline when done.
    chain: bool = True
    # S3 key of an image the merger reads back and checks against its sha256.
    image_key: str | None = None


# ------------------------------------------------------------------ jobs
DEFAULT_TOP_K = 5  # passages per question: enough for the answer's section and a neighbour or two
DEFAULT_CANDIDATES = 12  # candidate images offered to the inserter


class JobConfig(Contract):
    """What a job asks of every stage, validated once at submit (`services.jobs.commands`) and stored
    with the job; each stage reads it with `model_validate`, none with a default of its own."""

    # One collection to answer from, or several for the router to choose among per question
    # (services/retriever/routing.py); a question's own `collection` pins it to that one.
    collection: str | None = Field(default=None, min_length=1, max_length=200)
    collections: tuple[str, ...] = Field(default=(), max_length=100)
    top_k: int = Field(default=DEFAULT_TOP_K, ge=1, le=100)
    candidates: int = Field(default=DEFAULT_CANDIDATES, ge=1, le=100)
    # backend specs: "extractive" | "local[:model]" | "openai[:model]"; "rule" | "llm[:model]" | "checkpoint:<name>".
    # None until submit fills in the settings' defaults (M2IO_GENERATOR_BACKEND, M2IO_INSERTER_BACKEND).
    generator: str | None = Field(default=None, min_length=1)
    inserter: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def names_a_collection(self) -> JobConfig:
        if not self.collection and not self.collections:
            raise ValueError("name a collection to answer from (or several)")
        if any(not name.strip() for name in self.collections):
            raise ValueError("a collection name is empty")
        return self

    @property
    def searched(self) -> list[str]:
        """The collections a question of this job may be answered from (the router's choice when several)."""
        return list(dict.fromkeys(self.collections)) if self.collections else [self.collection]

    def with_defaults(self, generator: str, inserter: str) -> JobConfig:
        """The config with unset backends filled in (jobs stored before backends were always set have none)."""
        return self.model_copy(update={"generator": self.generator or generator, "inserter": self.inserter or inserter})


# ------------------------------------------------------------------ retrieval
class UnitSource(BaseModel):
    """Where an answer unit stood in its source: the document, the chunk, and its unit number there
    (1-based, as `services.common.text` counts units; an image at position p follows unit p)."""

    document_id: int
    doc_key: str
    position: int = Field(ge=1)
    chunk_id: int | None = None
    section: str | None = None  # the heading path of its section


class AnswerUnit(BaseModel):
    """A sentence of an answer; list steps, headings, code and tables are kept whole."""

    text: str
    kind: str = "sentence"  # sentence | item | heading | code | table
    level: int | None = Field(default=None, ge=1, le=6)  # a heading's level in its source
    source: UnitSource | None = None  # None for text an LM wrote: it is matched, not looked up


class Passage(BaseModel):
    chunk_id: int
    document_id: int
    doc_key: str
    heading: str | None
    text: str
    score: float
    vector_rank: int | None = None  # 1-based rank in the vector search, None if not found there
    text_rank: int | None = None  # 1-based rank in the full-text search
    dense: float | None = None  # cosine similarity of the passage's vector to the question's
    text_score: float | None = None  # its full-text rank value (ts_rank_cd), when the full-text search found it
    first_unit: int | None = None  # the document units it holds (None: indexed before units were kept)
    last_unit: int | None = None
    units: list[AnswerUnit] = []  # its units with provenance (headings left out), when its document keeps them


class CandidateImage(BaseModel):
    image_id: int
    source_name: str
    s3_key: str
    caption: str | None
    context_before: str | None
    context_after: str | None
    doc_key: str
    score: float
    document_id: int | None = None
    position: int | None = None  # units of its document before it (0 = it opens the document)
    image_text: str | None = None  # the words inside the image (OCR at ingest), when read
    # why it is a candidate: "passage" (it stands in a retrieved passage), "description" (its
    # caption and context match the question), or both
    reasons: list[str]


class SourceSection(BaseModel):
    """A section of a source document that may answer the question (the retriever's choice, best
    first): its body as answer units with provenance, and the evidence that ranked it."""

    document_id: int
    doc_key: str
    path: str  # heading path, "Page > Section > Sub-section" ("" for text before any heading)
    level: int = 0  # its heading's level; 0 for a document's text before its first heading
    units: list[AnswerUnit]  # its own text, and its sub-sections when the question asks for them
    subsections: bool = False  # whether `units` hold its sub-sections
    truncated: bool = False  # the body was cut at a section or list boundary (length budget)
    score: float
    evidence: dict[str, float] = {}  # heading similarity, passage support, full-text rank ...


class RejectedPassage(BaseModel):
    """A retrieved passage that the point-wise filter dropped before generation, and why."""

    chunk_id: int
    doc_key: str
    heading: str | None = None
    dense: float | None = None
    text_rank: int | None = None
    reason: str


class CollectionScore(BaseModel):
    """One collection as the router saw it for a question: the cheap evidence and the score it made."""

    name: str
    dense: float  # the best chunk's cosine similarity to the question (the dense probe)
    text_hits: int  # chunks the full-text probe found (up to the probe's depth)
    centroid: float | None = None  # cosine of the question to the collection's mean chunk vector
    score: float


class RoutingStep(BaseModel):
    """One retrieval the router made: the text searched, where, what came back, and why it was made."""

    query: str
    collections: list[str]
    best: float  # the best collection's score on this step
    reason: str


class Routing(BaseModel):
    """Which collections a question was answered from, among which, and the steps that decided it."""

    considered: list[CollectionScore]
    chosen: list[str]
    steps: list[RoutingStep]
    answerable: bool = True  # False: no collection holds an answer (the answer says so, with no images)
    reason: str | None = None
    seconds: float = 0.0  # the router's own time: the probes and any follow-up, not the question's embedding


class Retrieval(BaseModel):
    """The retriever's output for one question: what the generator and the inserter work from."""

    collection: str
    question: str
    passages: list[Passage]
    candidates: list[CandidateImage]
    sections: list[SourceSection] = []  # empty for documents indexed before units were stored
    # The question's vector, for the generator (the question is embedded once, here), and the texts
    # embedded at query time: the question alone when the collection's vectors are stored.
    question_vector: list[float] | None = None
    embedded: int = 0
    routing: Routing | None = None  # set when the job names several collections (or to say none answers)
    rejected: list[RejectedPassage] = []  # passages the point-wise filter dropped, with why


class StagedImage(Contract):
    """An image of a staged document: verified and stored in S3 (by sha256) before indexing."""

    link: str  # the reference as the document writes it (path, or MRAMG image id)
    source_name: str  # path relative to the corpus root: the image's name in answers and evaluations
    caption: str = ""
    s3_key: str
    sha256: str
    mime_type: str
    width: int
    height: int


class StagedDocument(Contract):
    """The ingest payload of one document (`ingest_items.payload`): what the CLI read and stored,
    for a retriever worker to index. Its images' bytes are already in S3."""

    doc_key: str
    markdown: str  # Markdown; `pic` documents use <PIC> markers that stand for `pic_images` in order
    source_path: str
    title: str | None = None
    pic_images: list[str] = []  # links, in marker order (MRAMG)
    meta: dict[str, Any] = {}
    images: list[StagedImage] = []


class IngestBatch(Contract):
    """Documents of an ingest run for one retriever worker to index (ids of ingest items)."""

    run_id: uuid.UUID
    item_ids: list[int] = Field(min_length=1, max_length=64)


class TrainRef(Contract):
    """The trainer's message: the run to train; its config is in `training_runs`."""

    run_id: uuid.UUID


# ------------------------------------------------------------------ answer stages
class TextAnswer(BaseModel):
    """The generator's output: the answer as numbered units (1-based in prompts and plans)."""

    units: list[AnswerUnit]
    backend: str
    seconds: float = 0.0
    # how the extractive backend answered: "section" (whole source sections), "sentences" (MMR picks
    # across passages, when no section fits) or "lm"; the sections' heading paths; why, in words
    mode: str | None = None
    sections: list[str] = []
    reason: str | None = None
    truncated: bool = False  # a length budget cut the answer (at a section or list boundary)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    embedded: int = 0  # texts embedded at query time (0 when every vector was stored at ingest)


class Placement(BaseModel):
    image: str  # source name of a candidate image
    after: int = Field(ge=0)  # the unit it follows; 0 = before the first
    # what placed it: "source" (it stood there in the answer's own source), "context" / "caption" /
    # "image_text" (a text match, with its cosine similarity), "model" (an LM's plan)
    evidence: str | None = None
    similarity: float | None = None


class RejectedImage(BaseModel):
    """A candidate image the inserter did not place, and why (in words an operator can check)."""

    image: str  # source name
    reason: str


class InsertionPlan(BaseModel):
    placements: list[Placement]
    rejected: list[RejectedImage] = []  # candidates not placed, with why
    backend: str
    seconds: float = 0.0
    fallback_reason: str | None = None  # set when an LM's output was unusable and `rule` answered
    raw_output: str | None = None  # what an LM wrote, for inspection
    embedded: int = 0  # texts embedded at query time (0 when every vector was stored at ingest)


class AnswerBlock(BaseModel):
    type: str  # text | image
    text: str | None = None  # Markdown
    kind: str | None = None  # of a text block: paragraph | item | heading | code | table
    level: int | None = None  # of a heading block
    source_name: str | None = None
    caption: str | None = None


class MergeOutput(BaseModel):
    """The merger's stored output: where the answer went (its text is in `answers`)."""

    html_key: str
    images: int
    warnings: list[str] = []


class MergedAnswer(BaseModel):
    markdown: str
    blocks: list[AnswerBlock]
    html_key: str | None = None
    warnings: list[str] = []
