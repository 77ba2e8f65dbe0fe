"""Generator, inserter and merger: pure functions on hand-made cases, then the whole pipeline through
the four queues with real workers, the real embedding model, Postgres and S3."""

from __future__ import annotations

import time
import uuid

import pytest
from sqlalchemy import select

from services.common.contracts import AnswerUnit, CandidateImage, InsertionPlan, Passage, Placement
from services.common.db import session_scope
from services.common.embedding import get_embedder
from services.common.models import Answer, Job, Query
from services.generator.core import extractive_answer
from services.inserter.core import PlanFormatError, insert, parse_plan, provenance_rule_plan, rule_plan
from services.merger.core import interleave, merge, to_markdown

PASSAGE = Passage(
    chunk_id=1,
    document_id=1,
    doc_key="pancakes",
    heading="Pancakes > Directions",
    score=1.0,
    text="Pancakes > Directions\n1. Mix flour, eggs and milk into a batter.\n2. Fry each pancake in butter.\n"
    "3. Serve with maple syrup.",
)
OTHER = Passage(
    chunk_id=2,
    document_id=2,
    doc_key="tax",
    heading="Taxes",
    score=0.5,
    text="Taxes\nFile your tax return before April.",
)


def candidate(
    name: str, before: str | None, after: str | None, caption: str | None, image_id: int, doc_key: str = "pancakes"
) -> CandidateImage:
    return CandidateImage(
        image_id=image_id,
        source_name=name,
        s3_key=f"k/{name}",
        caption=caption,
        context_before=before,
        context_after=after,
        doc_key=doc_key,
        score=0.1,
        reasons=["passage"],
    )


FRYING = candidate(
    "images/frying.jpg", "2. Fry each pancake in butter.", "3. Serve with maple syrup.", "Pancake frying in a pan", 2
)
STACK = candidate("images/stack.jpg", "Pancakes", "Fluffy pancakes for breakfast.", "A stack of pancakes", 1)
CAR = candidate("images/car.jpg", "Change the oil every year.", "Check the tyres.", "A red car", 9, doc_key="cars")


@pytest.fixture(scope="module")
def embedder():
    return get_embedder()


def test_extractive_answer_copies_units_in_source_order(embedder):
    units = extractive_answer("How do I fry pancakes?", [PASSAGE, OTHER], embedder)
    texts = [unit.text for unit in units]
    assert all(text in PASSAGE.text or text in OTHER.text for text in texts)  # never invents text
    steps = [t for t in texts if t[0].isdigit()]
    assert steps == sorted(steps) and "2. Fry each pancake in butter." in steps
    assert "File your tax return before April." not in texts  # the other section stays out


def test_rule_places_an_image_after_the_unit_it_followed(embedder):
    units = [
        AnswerUnit(text="1. Mix flour, eggs and milk into a batter.", kind="item"),
        AnswerUnit(text="2. Fry each pancake in butter.", kind="item"),
        AnswerUnit(text="3. Serve with maple syrup.", kind="item"),
    ]
    plan = rule_plan(units, [FRYING, CAR], embedder)
    assert [(p.image, p.after, p.evidence) for p in plan] == [("images/frying.jpg", 2, "context")]
    assert plan[0].similarity > 0.8


def test_rule_keeps_document_order_and_one_image_per_slot(embedder):
    units = [AnswerUnit(text="Fluffy pancakes for breakfast."), AnswerUnit(text="2. Fry each pancake in butter.")]
    plan = rule_plan(units, [STACK, FRYING], embedder)
    assert [p.image for p in plan] == ["images/stack.jpg", "images/frying.jpg"]
    assert len({p.after for p in plan}) == len(plan)


def test_the_learned_inserters_prompt_shows_the_rules_plan_first(embedder):
    """The compact prompt carries `rule N` for exactly the images the rule places (its proposal, which the model
    keeps, drops or moves), lists them first, as img1, img2... in the rule's order, and ends with the rule's whole
    plan in the answer's syntax; the plan's ids are read against the prompt's order."""
    from services.inserter.prompt import build_prompt, parse_plan

    units = [AnswerUnit(text="Fluffy pancakes for breakfast."), AnswerUnit(text="2. Fry each pancake in butter.")]
    candidates = [CAR, FRYING, STACK]  # the rule places stack (before or after unit 1) and frying (after unit 2)
    proposal = provenance_rule_plan(units, candidates, embedder)
    assert [p.image for p in proposal] == ["images/stack.jpg", "images/frying.jpg"]
    prompt = build_prompt(units, candidates, embedder)
    assert [c.source_name for c in prompt.candidates] == ["images/stack.jpg", "images/frying.jpg", "images/car.jpg"]
    lines = prompt.messages[1]["content"].split("Images:\n", 1)[1].splitlines()
    rule_line = lines.pop()  # the rule's whole plan, last, in the answer's syntax
    assert [line.split()[:3] for line in lines[:2]] == [["img1", "doc1", "rule"], ["img2", "doc1", "rule"]]
    assert [int(line.split()[3]) for line in lines[:2]] == [p.after for p in proposal]
    assert all(" rule " not in line for line in lines[2:])
    assert "rule N: the rule's pick" in prompt.messages[0]["content"]
    # the rule's own plan, written by a model, places what the rule places
    first, second = (p.after for p in proposal)
    answer = f'<answer>[["img1",{first}],["img2",{second}]]</answer>'
    assert rule_line == f"Rule: {answer.removeprefix('<answer>').removesuffix('</answer>')}"
    assert prompt.rule_reply == answer  # the draft a local model checks first (LocalChatModel.chat(draft=...))
    assert "Rule: the rule's plan" in prompt.messages[0]["content"]
    assert [(p.image, p.after) for p in parse_plan(answer, units, prompt.candidates)] == [
        (p.image, p.after) for p in proposal
    ]
    # built again from the candidates in the prompt's order, the prompt is the same
    assert build_prompt(units, prompt.candidates, embedder).messages == prompt.messages
    # the text match is computed once for the evidence and the rule's plan: an LM's units are embedded once
    from services.common.vectors import QueryVectors
    from services.inserter.scores import slot_scores

    once, built = QueryVectors(embedder), QueryVectors(embedder)
    slot_scores(units, candidates, once)
    build_prompt(units, candidates, built)
    assert built.embedded == once.embedded > 0


def test_edge_cases_have_defined_results(embedder):
    assert rule_plan([], [FRYING], embedder) == []  # an answer with no sentences
    bare = candidate("images/bare.jpg", None, None, None, 5)  # no caption, no context
    assert rule_plan([AnswerUnit(text="Anything at all.")], [bare], embedder) == []
    assert insert([], [FRYING], "llm", embedder).placements == []  # no LM call for an empty answer
    with pytest.raises(ValueError, match="unknown inserter backend"):
        insert([AnswerUnit(text="x")], [FRYING], "magic", embedder)


UNITS = [AnswerUnit(text="One."), AnswerUnit(text="Two.")]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("output", "error"),
    [
        ('<answer>[["img1",1]]</answer>', None),
        ('<think>step 1 shows frying</think><answer>[["img1", 2]]</answer>', None),
        ("<answer>[]</answer>", None),
        ('<answer>[["img1",1]]</answer> trailing', "not <answer>"),
        ("img1 after 1", "not <answer>"),
        ("<answer>{not json}</answer>", "not JSON"),
        ('<answer>{"img1": 1}</answer>', "not a JSON list"),
        ('<answer>[{"image": "images/frying.jpg", "after": 1}]</answer>', "is not \\[image, sentence\\]"),
        ('<answer>[["img2",1]]</answer>', "not a candidate"),
        ('<answer>[["img0",1]]</answer>', "not a candidate"),
        ('<answer>[["images/frying.jpg",1]]</answer>', "not a candidate"),
        ('<answer>[["img1",3]]</answer>', "0..2"),
        ('<answer>[["img1",true]]</answer>', "sentence number"),
        ('<answer>[["img1",1,2]]</answer>', "is not"),
        ('<answer>[["img1",1],["img1",2]]</answer>', "twice"),
    ],
)
def test_plan_parser_is_strict(output, error):
    if error is None:
        plan = parse_plan(output, UNITS, [FRYING])
        assert all(isinstance(p, Placement) for p in plan)
    else:
        with pytest.raises(PlanFormatError, match=error):
            parse_plan(output, UNITS, [FRYING])


def test_llm_inserter_falls_back_to_rule_when_the_lm_times_out(embedder):
    from services.common.llm import LocalChatModel, OpenAIChatModel
    from tests.openai_server import OpenAIServer

    # The server's model is never reached: the client gives up first (constructing it loads nothing).
    with OpenAIServer(LocalChatModel("HuggingFaceTB/SmolLM2-135M-Instruct")) as server:
        server.sleep_s = 3.0  # longer than the client's timeout
        model = OpenAIChatModel(server.base_url, "m", timeout_s=0.5, retries=0)
        units = [AnswerUnit(text="2. Fry each pancake in butter.", kind="item")]
        plan = insert(units, [FRYING, CAR], "llm", embedder, chat_model=model)
    assert plan.fallback_reason and plan.fallback_reason.startswith("LLMTimeout")
    assert plan.placements == rule_plan(units, [FRYING, CAR], embedder)
    # what `rule` left out, with its reason (the fallback's, not "the model's plan leaves it out")
    assert [r.image for r in plan.rejected] == ["images/car.jpg"] and plan.rejected[0].reason.startswith("best ")


def test_merger_outputs_and_a_vanished_image(servers):
    from services.common.storage import get_store
    from tests.corpus_fixtures import png

    store = get_store()
    store.ensure_bucket()
    stored = store.put_content(png((9, 9, 9)), "image/png", prefix="images")
    here = FRYING.model_copy(update={"s3_key": stored.key})
    gone = STACK.model_copy(update={"s3_key": "images/00/00/vanished"})
    units = [
        AnswerUnit(text="Fluffy pancakes."),
        AnswerUnit(text="They are good."),
        AnswerUnit(text="2. Fry each pancake in butter.", kind="item"),
    ]
    plan = InsertionPlan(
        backend="rule",
        placements=[Placement(image=gone.source_name, after=0), Placement(image=here.source_name, after=3)],
    )
    merged, page = merge("How?", units, plan, [here, gone], store)
    assert [b.type for b in merged.blocks] == ["image", "text", "text", "image"]
    assert merged.blocks[1].text == "Fluffy pancakes. They are good."  # sentences make one paragraph
    assert merged.markdown == (
        "![A stack of pancakes](images/stack.jpg)\n\nFluffy pancakes. They are good.\n\n"
        "2. Fry each pancake in butter.\n\n![Pancake frying in a pan](images/frying.jpg)\n"
    )
    assert "data:image/png;base64," in page
    assert "[image images/stack.jpg unavailable]" in page
    assert merged.warnings == ["image images/stack.jpg is missing from storage (images/00/00/vanished)"]
    assert to_markdown(interleave([], InsertionPlan(backend="rule", placements=[]), [])) == "\n"


def wait_for_queries(query_ids: list[uuid.UUID], timeout: float) -> dict[uuid.UUID, Query]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope() as session:
            queries = {q.id: q for q in session.scalars(select(Query).where(Query.id.in_(query_ids)))}
        if all(q.status in ("succeeded", "failed") for q in queries.values()):
            return queries
        time.sleep(0.5)
    raise AssertionError(f"queries not done after {timeout}s: {[q.status for q in queries.values()]}")


@pytest.mark.slow
def test_pipeline_through_the_four_queues(workers, tmp_path):
    from services.common.celery_app import app
    from services.common.storage import get_store
    from tests.corpus_fixtures import write_markdown_corpus
    from tests.test_ingest import ingest_in_process

    name = f"pipeline-{uuid.uuid4().hex[:8]}"
    ingest_in_process(write_markdown_corpus(tmp_path / "corpus"), name)
    for stage in ("retriever", "generator", "inserter", "merger"):
        workers.start(stage)
    with session_scope() as session:
        job = Job(kind="answer", config={"collection": name, "generator": "extractive", "inserter": "rule"})
        broken = Job(kind="answer", config={"collection": "no-such-collection"})
        session.add_all([job, broken])
        session.flush()
        queries = [
            Query(job_id=job.id, external_id="q1", question="How do I fry pancakes?"),
            Query(job_id=job.id, external_id="q2", question="What is in the tomato soup?"),
            Query(job_id=broken.id, external_id="q3", question="Anything?"),
        ]
        session.add_all(queries)
        session.flush()
        ids = [q.id for q in queries]
    for query_id in ids:
        app.send_task("retriever.retrieve", args=[{"query_id": str(query_id)}])
    done = wait_for_queries(ids, 180)
    assert done[ids[0]].status == "succeeded" and done[ids[1]].status == "succeeded"
    assert done[ids[2]].status == "failed" and "no collection named 'no-such-collection'" in done[ids[2]].error
    with session_scope() as session:
        answer = session.execute(select(Answer).where(Answer.query_id == ids[0])).scalar_one()
    images = [b["source_name"] for b in answer.blocks if b["type"] == "image"]
    assert "images/frying.jpg" in images
    text = " ".join(b["text"] for b in answer.blocks if b["type"] == "text")
    assert "Fry each pancake in butter." in text
    page = get_store().get(answer.html_key).decode()
    assert "data:image/" in page and "Fry each pancake" in page


def test_checkpoint_backend_serves_a_registered_model(servers, tmp_path, monkeypatch, embedder):
    """A registered inserter model (as the trainer registers them) is fetched from S3 once, loaded
    as a causal LM and prompted; this tiny random model writes no valid plan, so `rule` answers and
    the plan says why."""
    import transformers

    from services.common.embedding import resolve_model_source
    from services.common.models import RegisteredModel
    from services.common.settings import get_settings
    from services.common.storage import get_store
    from services.inserter import registry

    tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_model_source("all-MiniLM-L6-v2"))
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    folder = tmp_path / "tiny"
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    store = get_store()
    store.ensure_bucket()
    name = f"tiny-{uuid.uuid4().hex[:6]}"
    for path in folder.iterdir():
        store.put_named(f"models/{name}/{path.name}", path.read_bytes())
    with session_scope() as session:
        session.add(
            RegisteredModel(name=name, kind="inserter", base_model="random tiny llama", s3_prefix=f"models/{name}")
        )
    monkeypatch.setattr(get_settings(), "model_cache_dir", tmp_path / "cache")
    units = [AnswerUnit(text="2. Fry each pancake in butter.", kind="item")]
    plan = insert(units, [FRYING], f"checkpoint:{name}", embedder)
    assert (tmp_path / "cache" / "registered").exists()  # downloaded from S3
    assert plan.raw_output is not None  # the model was loaded and generated
    assert plan.fallback_reason.startswith("PlanFormatError")
    assert plan.placements == rule_plan(units, [FRYING], embedder)
    with pytest.raises(registry.UnknownModel, match="no registered inserter model"):
        registry.download_checkpoint("never-registered")


def test_openai_generator_through_a_real_server_and_its_failure(monkeypatch, embedder):
    """The `openai` generator against a real OpenAI-compatible server (backed by the local model);
    a server that refuses gives a readable GenerationError (the task records it on the query)."""
    from services.common import llm
    from services.common.contracts import Retrieval
    from services.common.settings import get_settings
    from services.generator.core import GenerationError, generate
    from tests.openai_server import OpenAIServer

    retrieval = Retrieval(collection="c", question="How do I fry pancakes?", passages=[PASSAGE], candidates=[FRYING])
    with OpenAIServer(llm.LocalChatModel("HuggingFaceTB/SmolLM2-135M-Instruct")) as server:
        monkeypatch.setattr(get_settings(), "openai_base_url", server.base_url)
        monkeypatch.setattr(get_settings(), "openai_retries", 0)
        monkeypatch.setattr(get_settings(), "openai_timeout_s", 600.0)  # a busy 2-core CPU, a first load
        monkeypatch.setattr("services.generator.core.MAX_NEW_TOKENS", 32)  # keep the test short
        llm._chat_model.cache_clear()
        answer = generate(retrieval, "openai:smollm2", embedder)
        assert answer.units and answer.completion_tokens > 0
        assert all(unit.text.strip() for unit in answer.units)
        server.bad_request = "model not found"
        llm._chat_model.cache_clear()
        with pytest.raises(GenerationError, match="openai:smollm2 generator failed: .*model not found"):
            generate(retrieval, "openai:smollm2", embedder)
    llm._chat_model.cache_clear()


def test_documents_indexed_before_sections_answer_from_sentences_and_say_why(embedder):
    """A collection indexed before documents kept their units has no sections: the answer is made of
    the passages' sentences (as before), and its reason says a re-ingest brings whole sections."""
    from services.common.contracts import Retrieval
    from services.generator.core import generate

    retrieval = Retrieval(collection="old", question="How do I fry pancakes?", passages=[PASSAGE, OTHER], candidates=[])
    answer = generate(retrieval, "extractive", embedder)
    assert answer.mode == "sentences" and "re-ingest" in answer.reason
    assert "2. Fry each pancake in butter." in [unit.text for unit in answer.units]
    assert all(unit.source is None for unit in answer.units)  # no provenance to invent
    assert answer.embedded > 0  # nothing was stored for them: the question and units are embedded now, counted
