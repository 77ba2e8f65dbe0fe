"""The foundation's end-to-end check (`m2io smoke`): a message through every queue, an image
through S3 and a vector through pgvector, each recorded as a stage run of a `smoke` job.

Retriever -> generator -> inserter -> merger are chained as in the answer pipeline; the trainer
gets its own message. The retriever's hop writes and searches a vector; the merger's hop reads
the image back from S3 and checks its sha256.
"""

from __future__ import annotations

import io
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any

from celery import Task
from sqlalchemy import select, text
from sqlalchemy.dialects.postgresql import insert

from services.common.celery_app import app
from services.common.contracts import SmokeProbe
from services.common.db import session_scope, vector_literal
from services.common.models import Chunk, Collection, Document, Job, Query, StageRun
from services.common.queues import PIPELINE, Stage, next_stage
from services.common.storage import ObjectStore, sha256_hex
from services.common.tasks import stage_task, worker_name

SMOKE_COLLECTION = "_smoke"
SMOKE_DIM = 384  # the dimension of the default embedding model, so its vector index is exercised
SMOKE_DISTRACTORS = 50
DISTANCE = f"embedding::halfvec({SMOKE_DIM}) <=> CAST(:query AS halfvec({SMOKE_DIM}))"


def unit_vector(seed: int, dim: int = SMOKE_DIM) -> list[float]:
    rng = random.Random(seed)
    values = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = sum(v * v for v in values) ** 0.5
    return [v / norm for v in values]


def pgvector_roundtrip(probe_id: uuid.UUID) -> dict[str, Any]:
    """Store the probe's vector among distractors, search it by cosine distance, expect it first."""
    probe_vector = unit_vector(probe_id.int % (2**31))
    with session_scope() as session:
        collection_id = session.execute(
            insert(Collection)
            .values(name=SMOKE_COLLECTION, embedding_model="random-unit-vectors", embedding_dim=SMOKE_DIM)
            .on_conflict_do_update(index_elements=["name"], set_={"updated_at": text("now()")})
            .returning(Collection.id)
        ).scalar_one()
        document_id = session.execute(
            insert(Document)
            .values(collection_id=collection_id, doc_key="probe", content_sha256="-", text="smoke probe")
            .on_conflict_do_update(index_elements=["collection_id", "doc_key"], set_={"text": "smoke probe"})
            .returning(Document.id)
        ).scalar_one()
        rows = [{"ordinal": 0, "vector": probe_vector, "text": f"probe {probe_id}"}]
        rows += [
            {"ordinal": i, "vector": unit_vector(i), "text": f"distractor {i}"} for i in range(1, SMOKE_DISTRACTORS)
        ]
        for row in rows:
            session.execute(
                insert(Chunk)
                .values(
                    document_id=document_id,
                    collection_id=collection_id,
                    ordinal=row["ordinal"],
                    text=row["text"],
                    embedding=row["vector"],
                    embedding_dim=SMOKE_DIM,
                )
                .on_conflict_do_update(
                    index_elements=["document_id", "ordinal"],
                    set_={"embedding": row["vector"], "text": row["text"]},
                )
            )
        session.flush()
        nearest = session.execute(
            text(
                # The same expression as the partial IVFFlat index (migration 0010), so the planner can use it.
                f"SELECT ordinal, {DISTANCE} AS distance FROM chunks "
                f"WHERE collection_id = :collection AND embedding_dim = {SMOKE_DIM} "
                f"ORDER BY {DISTANCE} LIMIT 3"
            ),
            {"query": vector_literal(probe_vector), "collection": collection_id},
        ).all()
    if not nearest or nearest[0].ordinal != 0 or nearest[0].distance > 1e-4:
        raise ValueError(f"pgvector search did not return the probe vector first: {nearest}")
    return {"nearest_distance": round(float(nearest[0].distance), 6), "searched_vectors": len(rows)}


def s3_roundtrip(store: ObjectStore, key: str) -> dict[str, Any]:
    data = store.get(key)
    digest = sha256_hex(data)
    if not key.endswith(digest):
        raise ValueError(f"object {key} holds bytes with sha256 {digest}: stored content is corrupt")
    return {"key": key, "bytes": len(data), "sha256": digest}


def run_probe(stage: Stage, probe: SmokeProbe, worker: str) -> dict[str, Any]:
    if probe.hold_seconds:
        time.sleep(probe.hold_seconds)
    output: dict[str, Any] = {"worker": worker}
    if stage is Stage.RETRIEVER:
        output["pgvector"] = pgvector_roundtrip(probe.query_id)
    if stage is Stage.MERGER and probe.image_key:
        from services.common.storage import get_store

        output["s3"] = s3_roundtrip(get_store(), probe.image_key)
    return output


def send_probe(stage: Stage, probe: SmokeProbe) -> None:
    app.send_task(f"{stage.value}.smoke", args=[probe.model_dump(mode="json")])


def smoke_task(stage: Stage) -> Task:
    """The `<stage>.smoke` task: runs the probe, then hands it to the next stage of the pipeline."""

    def forward(probe: SmokeProbe) -> None:
        following = next_stage(stage)
        if probe.chain and following is not None:
            send_probe(following, probe)

    @stage_task(stage, "smoke", SmokeProbe, then=forward)
    def smoke(probe: SmokeProbe, task: Task) -> dict[str, Any]:
        return run_probe(stage, probe, worker_name(task))

    return smoke


# ------------------------------------------------------------------ the client side (CLI)
@dataclass
class CheckResult:
    check: str
    ok: bool
    detail: str
    seconds: float | None = None


def tiny_png() -> bytes:
    """A real 32x32 PNG (a gradient), made here so the check needs no file on disk."""
    from PIL import Image

    image = Image.new("RGB", (32, 32))
    image.putdata([(x * 8, y * 8, 128) for y in range(32) for x in range(32)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def create_probe_query(hold_seconds: float = 0.0, image_key: str | None = None) -> SmokeProbe:
    with session_scope() as session:
        job = Job(kind="smoke", config={"hold_seconds": hold_seconds})
        session.add(job)
        session.flush()
        query = Query(job_id=job.id, external_id="smoke", question="does every queue answer?")
        session.add(query)
        session.flush()
        return SmokeProbe(query_id=query.id, hold_seconds=hold_seconds, image_key=image_key)


def stage_runs_of(query_id: uuid.UUID) -> list[StageRun]:
    with session_scope() as session:
        return list(session.scalars(select(StageRun).where(StageRun.query_id == query_id).order_by(StageRun.id)))


def wait_for_stages(query_id: uuid.UUID, stages: list[Stage], timeout: float) -> dict[str, StageRun]:
    """The succeeded run of each stage, waiting up to `timeout` seconds (missing stages are absent)."""
    deadline = time.monotonic() + timeout
    while True:
        done = {run.stage: run for run in stage_runs_of(query_id) if run.status in ("succeeded", "failed")}
        if all(stage.value in done for stage in stages) or time.monotonic() > deadline:
            return done
        time.sleep(0.2)


def run_smoke_check(store: ObjectStore, timeout: float = 60.0) -> list[CheckResult]:
    results: list[CheckResult] = []
    started = time.monotonic()
    stored = store.put_content(tiny_png(), "image/png", prefix="smoke")
    image_back = s3_roundtrip(store, stored.key)
    results.append(
        CheckResult(
            "s3: image stored and read back",
            True,
            f"{stored.key} ({image_back['bytes']} bytes, sha256 verified)",
            time.monotonic() - started,
        )
    )
    probe = create_probe_query(image_key=stored.key)
    sent_at = time.monotonic()
    send_probe(Stage.RETRIEVER, probe)
    send_probe(Stage.TRAINER, probe.model_copy(update={"chain": False}))
    every_stage = [*PIPELINE, Stage.TRAINER]
    runs = wait_for_stages(probe.query_id, every_stage, timeout)
    for stage in every_stage:
        run = runs.get(stage.value)
        if run is None:
            results.append(
                CheckResult(
                    f"queue {stage.queue}",
                    False,
                    f"no worker answered within {timeout:.0f}s: is worker-{stage.value} up?",
                )
            )
            continue
        elapsed = (run.finished_at - run.started_at).total_seconds() if run.finished_at else None
        detail = f"worker {run.worker}, attempt {run.attempt}"
        if run.status != "succeeded":
            results.append(CheckResult(f"queue {stage.queue}", False, f"{detail}: {run.error}", elapsed))
            continue
        results.append(CheckResult(f"queue {stage.queue}", True, detail, elapsed))
        if "pgvector" in run.output:
            found = run.output["pgvector"]
            results.append(
                CheckResult(
                    "pgvector: vector stored and found by IVFFlat/cosine search",
                    True,
                    f"nearest of {found['searched_vectors']} at distance {found['nearest_distance']}",
                )
            )
        if "s3" in run.output:
            results.append(
                CheckResult(
                    "s3: image read back by the merger worker",
                    True,
                    f"{run.output['s3']['bytes']} bytes, sha256 verified",
                )
            )
    results.append(
        CheckResult(
            "whole pipeline",
            all(r.ok for r in results),
            f"message through {len(every_stage)} queues",
            time.monotonic() - sent_at,
        )
    )
    return results
