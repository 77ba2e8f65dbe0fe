"""The trainer: rewards (table tests), the training data builder on a real ingested collection, real SFT + GRPO
runs (TRL, CPU) with a tiny model, a checkpoint that reloads and serves a parseable plan, and the trainer worker
running queued runs end to end against the real cluster (Postgres, Redis, S3, Celery)."""

from __future__ import annotations

import doctest
import json
import os
import signal
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select, update

from services.common.db import session_scope
from services.common.models import RegisteredModel, TrainingRun, TrainingStep
from services.common.storage import get_store
from services.trainer import core, data, evaluation, rewards
from services.trainer.rewards import plan_text
from tests.conftest import REPO_ROOT
from tests.corpus_fixtures import write_markdown_corpus
from tests.test_ingest import ingest_in_process
from tests.test_jobs import last_line, m2io, start_pipeline, write_questions

GOLD = [{"image": "a.jpg", "after": 1}, {"image": "b.jpg", "after": 3}]
NAMES = ["x.jpg", "a.jpg", "y.jpg", "b.jpg"]


@pytest.mark.unit
def test_doctests_of_the_trainer_the_prompt_and_the_learning_bench():
    from bench import inserter_evidence, inserter_learning
    from services.inserter import prompt, scores

    for module in (rewards, data, core, prompt, scores, inserter_learning, inserter_evidence):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__


@pytest.mark.unit
@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        # format, recall, position, precision
        (plan_text(NAMES, ("a.jpg", 1), ("b.jpg", 3)), (1.0, 1.0, 1.0, 1.0)),
        (plan_text(NAMES, ("a.jpg", 1), ("b.jpg", 2)), (1.0, 1.0, 0.5, 1.0)),
        (plan_text(NAMES, ("a.jpg", 1)), (1.0, 0.5, 1.0, 1.0)),
        (plan_text(NAMES, ("a.jpg", 1), ("b.jpg", 3), ("x.jpg", 2), ("y.jpg", 0)), (1.0, 1.0, 1.0, 0.5)),  # everything
        (plan_text(NAMES, ("x.jpg", 2)), (1.0, 0.0, 0.0, 0.0)),  # only a distractor
        (plan_text(NAMES), (1.0, 0.0, 0.0, 0.0)),  # nothing
        (plan_text(NAMES, ("a.jpg", 9)), (0.0, 0.0, 0.0, 0.0)),  # no such sentence
        ('<answer>[["img2",1],["img2",2]]</answer>', (0,) * 4),  # one image twice
        ('<think>a is step 1</think><answer>[["img2",1]]</answer>', (1.0, 0.5, 1.0, 1.0)),  # reasoning is optional
        ('<answer>[{"image": "a.jpg", "after": 1}]</answer>', (0.0, 0.0, 0.0, 0.0)),  # the old format
        ('<answer>[["img9",1]]</answer>', (0.0, 0.0, 0.0, 0.0)),  # no such candidate id
        ("a.jpg goes after sentence 1", (0.0, 0.0, 0.0, 0.0)),
        ([{"role": "assistant", "content": plan_text(NAMES, ("b.jpg", 3))}], (1.0, 0.5, 1.0, 1.0)),  # conversational
    ],
)
def test_reward_components(completion, expected):
    columns = {"unit_count": [4], "candidate_names": [NAMES], "gold": [GOLD]}
    got = tuple(function([completion], **columns)[0] for function in rewards.REWARD_FUNCTIONS)
    assert got == pytest.approx(expected)


@pytest.mark.unit
def test_the_total_reward_cannot_be_gamed_by_placing_every_image():
    columns = {"unit_count": [4] * 4, "candidate_names": [NAMES] * 4, "gold": [GOLD] * 4}
    exact = plan_text(NAMES, ("a.jpg", 1), ("b.jpg", 3))
    half_right = plan_text(NAMES, ("a.jpg", 1))
    everything = plan_text(NAMES, ("a.jpg", 1), ("b.jpg", 3), ("x.jpg", 2), ("y.jpg", 0))
    nothing = plan_text(NAMES)
    totals = rewards.total_reward([exact, half_right, everything, nothing], **columns)
    assert totals[0] > totals[2] and totals[0] > totals[1] > totals[3]
    assert totals[1] > totals[2]  # one right image beats every image, the wrong ones included


def test_the_builder_turns_documents_into_examples(servers, tmp_path):
    name = f"train-data-{uuid.uuid4().hex[:8]}"
    ingest_in_process(write_markdown_corpus(tmp_path / "corpus"), name)
    report = data.build_examples(name, val_fraction=0.34, seed=3)
    texts = [e for e in report.examples if e.setting == "gold_text"]
    frying = next(e for e in texts if any(g["image"].endswith("frying.jpg") for g in e.gold))
    assert [g["after"] for g in frying.gold] == [2]  # after "2. Fry each pancake in butter."
    assert "Fry each pancake" in frying.units[1] and frying.unit_sources == [None] * len(frying.units)
    soup = next(e for e in texts if any(g["image"].endswith("soup.png") for g in e.gold))
    assert soup.gold[0]["after"] == 1 and soup.units[0] == "A warm soup of roasted tomatoes."
    stack = next(e for e in texts if any(g["image"].endswith("pancakes.png") for g in e.gold))
    assert stack.gold[0]["after"] == 0  # it stands right under the title, before the first sentence
    assert {e.setting for e in report.examples} == {"gold_text", "serving"}
    for example in report.examples:
        assert {g["image"] for g in example.gold} <= set(example.candidate_names)
        assert example.prompt[-1]["content"].startswith("Sentences:\n1. ")
        assert example.question and example.question.endswith("?")
        if example.gold:  # the warm-up target earns the full reward
            assert rewards.total_reward(
                [example.completion], [example.unit_count], [example.candidate_names], [example.gold]
            ) == [pytest.approx(3.0)]
    served = [e for e in report.examples if e.setting == "serving"]
    assert all(any(source is not None for source in e.unit_sources) for e in served)  # answers with provenance
    assert any(e.gold for e in served)

    # the serving distribution: exactly the candidates serving retrieves for the question (count and order; the
    # prompt lists them in its own order, candidate_names), and
    # gold_text examples with serving's count, here 2 of the corpus's 5 images
    from services.common.embedding import get_embedder
    from services.retriever.search import get_collection, retrieve

    small = data.build_examples(name, val_fraction=0.34, seed=3, candidates=2)
    assert {len(e.candidates) for e in small.examples if e.setting == "gold_text"} == {2}
    with session_scope() as session:
        collection = get_collection(session, name)
        for example in (e for e in small.examples if e.setting == "serving"):
            retrieval = retrieve(session, collection, example.question, get_embedder(), max_candidates=2)
            assert [c["source_name"] for c in example.candidates] == [c.source_name for c in retrieval.candidates]
            assert sorted(example.candidate_names) == sorted(c.source_name for c in retrieval.candidates)
    assert {e.split for e in report.examples} == {"train", "val"}
    splits_per_doc = {}
    for example in report.examples:
        splits_per_doc.setdefault(example.doc_key, set()).add(example.split)
    assert all(len(s) == 1 for s in splits_per_doc.values())  # split by document

    out = tmp_path / "data"
    written = m2io("train-data", "--collection", name, "--out", str(out), "--val-fraction", "0.34", "--seed", "3")
    assert written.returncode == 0, written.stderr
    assert "examples" in written.stderr and "distractors" in written.stderr
    again = data.read_examples(out / "train.jsonl") + data.read_examples(out / "val.jsonl")
    assert sorted(e.id for e in again) == sorted(e.id for e in report.examples)
    assert json.loads((out / "summary.json").read_text())["examples"] == len(report.examples)
    missing = m2io("train-data", "--collection", "no-such-collection", "--out", str(out))
    assert missing.returncode == 1 and "no collection 'no-such-collection'" in missing.stderr
    (out / "bad.jsonl").write_text(again[0].model_dump_json() + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2"):
        data.read_examples(out / "bad.jsonl")


# ------------------------------------------------------------------ real training with a tiny model
@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer Llama with SmolLM2's tokenizer and chat template, random weights: real TRL training in seconds."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from services.common.llm import DEFAULT_LOCAL_MODEL, ensure_converted

    source = ensure_converted(DEFAULT_LOCAL_MODEL)
    config = AutoConfig.from_pretrained(source)
    config.update(
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
        }
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    folder = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def examples(servers, tmp_path_factory) -> data.BuildReport:
    name = f"trainer-{uuid.uuid4().hex[:8]}"
    ingest_in_process(write_markdown_corpus(tmp_path_factory.mktemp("corpus")), name)
    report = data.build_examples(name, val_fraction=0.34, seed=3)
    report.collection = name
    return report


class Recorder(core.TrainingHooks):
    def __init__(self):
        self.metrics: list[tuple[str, int, dict]] = []
        self.checkpoints: list[core.Checkpoint] = []

    def on_metrics(self, phase, step, metrics):
        self.metrics.append((phase, step, metrics))

    def on_checkpoint(self, checkpoint):
        self.checkpoints.append(checkpoint)


TINY_RUN = {
    "sft_steps": 2,
    "sft_batch_size": 2,
    "steps": 2,
    "prompts_per_step": 1,
    "num_generations": 2,
    "max_completion_length": 12,
    "beta": 0.02,  # the KL term's path too (the default 0 skips the reference model)
    "eval_examples": 1,
    "checkpoint_every": 1,
}


@pytest.mark.slow
def test_the_token_budgets_fit_the_longest_plans(examples, tiny_model):
    """Serving's budget fits a plan that places every candidate at a far sentence; GRPO's fits every target."""
    from transformers import AutoTokenizer

    from services.common.contracts import Placement
    from services.inserter.prompt import format_plan, plan_token_budget

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)  # SmolLM2's
    for count in (1, 6, 7, 12, 20):
        names = [f"{k}.png" for k in range(count + 9)]  # ids img10 and up: the longest
        placements = [Placement(image=name, after=199) for name in names[9:]]
        plan = format_plan(placements, names) + tokenizer.eos_token
        assert len(tokenizer(plan).input_ids) <= plan_token_budget(count), count
    train = examples.split("train")
    lengths = [len(tokenizer(e.completion[-1]["content"]).input_ids) for e in train]
    config = core.TrainConfig(collection=examples.collection, max_completion_length=4)
    assert core.completion_budget(config, train, tokenizer) == max(lengths) + 2 > 4
    roomy = core.TrainConfig(collection=examples.collection, max_completion_length=500)
    assert core.completion_budget(roomy, train, tokenizer) == 500


def test_a_real_sft_and_grpo_run_on_cpu(examples, tiny_model, tmp_path):
    config = core.TrainConfig(collection=examples.collection, base_model=str(tiny_model), **TINY_RUN)
    hooks = Recorder()
    result = core.train_inserter(config, examples.split("train"), examples.split("val"), tmp_path, hooks)
    phases = {phase for phase, _, _ in hooks.metrics}
    assert {"sft", "grpo", "eval"} <= phases
    sft = [m for phase, _, m in hooks.metrics if phase == "sft"]
    grpo = [(step, m) for phase, step, m in hooks.metrics if phase == "grpo"]
    assert len(sft) == 2 and all("loss" in m for m in sft)
    assert [step for step, _ in grpo] == [1, 2]
    from transformers import AutoTokenizer

    # the configured 12 tokens, raised to fit the longest target plan
    budget = core.completion_budget(config, examples.split("train"), AutoTokenizer.from_pretrained(tiny_model))
    for _, metrics in grpo:  # each reward component, the loss, the KL and the completion length, per step
        assert {"reward_format", "reward_recall", "reward_position", "reward_precision", "loss", "kl"} <= set(metrics)
        assert 0 < metrics["completion_length"] <= budget
    assert [(c.phase, c.step) for c in hooks.checkpoints] == [("sft", 2), ("grpo", 1), ("grpo", 2)]
    assert (result.model_dir / "config.json").exists() and result.phases["grpo"]["steps"] == 2
    assert set(result.phases["sft"]["val"]) >= {"image_f1", "parse_rate", "position_accuracy"}

    # a run that resumes from the GRPO checkpoint at step 1 takes only the step left, numbered 2
    resumed = Recorder()
    config.sft_steps = 0
    core.train_inserter(config, examples.split("train"), [], tmp_path / "resumed", resumed, resume=hooks.checkpoints[1])
    assert [step for phase, step, _ in resumed.metrics if phase == "grpo"] == [2]

    with pytest.raises(ValueError, match="no training examples"):
        core.train_inserter(config, [], [], tmp_path / "empty")


@pytest.mark.slow
def test_lora_adapters_are_trained_and_merged_into_a_plain_checkpoint(examples, tiny_model, tmp_path):
    config = core.TrainConfig(
        collection=examples.collection, base_model=str(tiny_model), lora=True, lora_r=4, **{**TINY_RUN, "steps": 1}
    )
    hooks = Recorder()
    result = core.train_inserter(config, examples.split("train"), [], tmp_path, hooks)
    assert [phase for phase, _, _ in hooks.metrics].count("grpo") == 1
    assert (result.model_dir / "config.json").exists()
    assert not list(result.model_dir.glob("adapter_*"))  # merged: a plain model, as the registry serves it
    from services.common.llm import LocalChatModel

    reply = LocalChatModel(str(result.model_dir)).chat([{"role": "user", "content": "hi"}], max_new_tokens=3)
    assert reply.completion_tokens > 0


def test_a_warm_up_of_the_top_layers_changes_only_those_weights(examples, tiny_model, tmp_path):
    """`sft_top_layers`: the lower layers and the (tied) embeddings keep the base model's weights, the top layer and
    the final norm are trained."""
    import torch
    from transformers import AutoModelForCausalLM

    config = core.TrainConfig(
        collection=examples.collection,
        base_model=str(tiny_model),
        sft_steps=2,
        sft_batch_size=2,
        sft_learning_rate=1e-2,
        sft_top_layers=1,
        steps=0,
        eval_examples=0,
    )
    result = core.train_inserter(config, examples.split("train"), [], tmp_path)
    before = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    after = AutoModelForCausalLM.from_pretrained(result.model_dir).state_dict()
    changed = {name for name, weight in after.items() if not torch.equal(weight, before[name])}
    assert changed and all(name.startswith(("model.layers.1.", "model.norm.")) for name in changed), changed
    assert any(name.startswith("model.layers.1.mlp.") for name in changed)
    with pytest.raises(ValueError, match="sft_top_layers"):
        core.TrainConfig(collection="c", sft_top_layers=-1).validate()


@pytest.mark.unit
def test_top_layer_training_refuses_a_model_it_cannot_cut_with_a_clear_error():
    """GPT-2 keeps its layers at `transformer.h`, not `model.layers`: a ValueError that says what to do, not an
    AttributeError from deep inside the warm-up."""
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    with pytest.raises(ValueError, match="Llama-style model .*GPT2LMHeadModel.*sft_top_layers=0"):
        core.train_top_layers(gpt2, 1)


def memorised_model(tiny_model: Path, example: data.TrainingExample, folder: Path) -> Path:
    """The tiny model taught one plan by heart (plain SFT, many steps on one example)."""
    config = core.TrainConfig(
        collection=example.collection,
        base_model=str(tiny_model),
        sft_steps=60,
        sft_batch_size=1,
        sft_learning_rate=3e-3,
        steps=0,
        eval_examples=0,
    )
    return core.train_inserter(config, [example], [], folder).model_dir


@pytest.mark.slow
def test_a_registered_checkpoint_reloads_and_serves_a_parseable_plan(examples, tiny_model, tmp_path):
    from services.common.embedding import get_embedder
    from services.common.vectors import QueryVectors
    from services.inserter.core import insert
    from services.inserter.prompt import PROMPT_VERSION, plan_messages
    from services.inserter.registry import load_registered_model
    from services.trainer.runs import register_model

    example = next(e for e in examples.examples if e.setting == "serving" and len(e.gold) == 1)
    folder = memorised_model(tiny_model, example, tmp_path / "memorised")
    name = f"tiny-{uuid.uuid4().hex[:8]}"
    config = core.TrainConfig(collection=example.collection, base_model=str(tiny_model), name=name)
    register_model(None, config, folder, {"note": "test"})
    with session_scope() as session:
        row = session.execute(select(RegisteredModel).where(RegisteredModel.name == name)).scalar_one()
        assert row.kind == "inserter" and row.s3_prefix == f"models/{name}/"
    assert get_store().exists(f"models/{name}/config.json")

    units, candidates = evaluation.example_inputs(example)
    with session_scope() as session:  # the inserter stage's own vectors (services/inserter/tasks.py)
        vectors = QueryVectors(get_embedder(), session)
        assert plan_messages(units, candidates, vectors) == example.prompt  # training and serving: one prompt
        plan = insert(units, candidates, f"checkpoint:{name}", vectors)
    assert plan.fallback_reason is None, plan.raw_output  # the model's own plan parsed
    assert [{"image": p.image, "after": p.after} for p in plan.placements] == [
        {"image": g["image"], "after": g["after"]} for g in example.gold
    ]
    assert all(p.evidence == "model" for p in plan.placements)  # the plan says the model placed them
    assert load_registered_model(name).source is not None  # loaded from the folder downloaded from S3
    assert row.meta["prompt_version"] == PROMPT_VERSION  # recorded at registration
    # A model trained on another version of the prompt is not served it: `rule` answers, and the plan says why.
    with session_scope() as session:
        session.execute(
            update(RegisteredModel)
            .where(RegisteredModel.name == name)
            .values(meta={**row.meta, "prompt_version": "compact-0"})
        )
    with session_scope() as session:
        stale = insert(units, candidates, f"checkpoint:{name}", QueryVectors(get_embedder(), session))
    assert stale.fallback_reason.startswith("PromptMismatch") and "compact-0" in stale.fallback_reason
    assert stale.raw_output is None and all(p.evidence != "model" for p in stale.placements)


# ------------------------------------------------------------------ the trainer worker against the cluster
def wait_for_run(run_id: str, statuses: tuple[str, ...], timeout: float = 300) -> TrainingRun:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope() as session:
            run = session.get(TrainingRun, uuid.UUID(run_id))
            if run is not None and run.status in statuses:
                session.expunge(run)
                return run
        time.sleep(0.5)
    raise AssertionError(f"run {run_id} did not reach {statuses} in {timeout}s")


def steps_of(run_id: str) -> list[tuple[str, int, dict]]:
    with session_scope() as session:
        rows = session.execute(
            select(TrainingStep.phase, TrainingStep.step, TrainingStep.metrics).where(
                TrainingStep.run_id == uuid.UUID(run_id)
            )
        ).all()
    return [tuple(row) for row in rows]


def train_args(collection: str, tiny_model: Path, *extra: str) -> list[str]:
    return [
        "train", "--collection", collection, "--base", str(tiny_model), "--sft-steps", "2", "--steps", "2",
        "--num-generations", "2", "--prompts-per-step", "1", "--max-completion-length", "12",
        "--eval-examples", "1", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_the_trainer_worker_runs_a_queued_run_end_to_end(workers, examples, tiny_model, tmp_path):
    workers.start("trainer")
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    started = m2io(*train_args(examples.collection, tiny_model, "--name", name, "--wait"), timeout=600)
    assert started.returncode == 0, started.stderr[-3000:]
    run_id = last_line(started.stdout)
    assert "grpo" in started.stderr and "reward_format" in started.stderr  # --wait shows the steps as they come
    run = wait_for_run(run_id, ("succeeded",))
    assert run.config["name"] == name and run.config["steps"] == 2 and run.attempts == 1
    assert run.heartbeat_at is not None and run.finished_at is not None and run.error is None
    assert run.last_checkpoint_key == f"training/{run_id}/grpo-step-00002/"
    assert get_store().exists(run.last_checkpoint_key + "config.json")
    phases = {(phase, step) for phase, step, _ in steps_of(run_id)}
    assert {("data", 0), ("sft", 1), ("sft", 2), ("grpo", 1), ("grpo", 2)} <= phases
    with session_scope() as session:
        model = session.execute(select(RegisteredModel).where(RegisteredModel.name == name)).scalar_one()
        assert model.training_run_id == uuid.UUID(run_id) and "train_examples" in model.meta
    listed = m2io("train-status", run_id, "--json")
    assert json.loads(listed.stdout)["status"] == "succeeded"
    assert name in m2io("models").stdout

    # the registered model serves a job through the pipeline
    start_pipeline(workers)
    questions = write_questions(tmp_path / "q.jsonl", [{"id": "fry", "question": "How do I fry pancakes?"}])
    job = m2io("submit", str(questions), "--collection", examples.collection, "--inserter", f"checkpoint:{name}",
               "--wait", timeout=600)  # fmt: skip
    assert job.returncode == 0, job.stderr[-3000:]
    status = json.loads(m2io("status", last_line(job.stdout), "--json").stdout)
    assert status["counts"] == {"succeeded": 1}

    # refused before anything is queued
    assert m2io(*train_args(examples.collection, tiny_model, "--name", name)).returncode == 1  # name taken
    refused = m2io(*train_args("no-such-collection", tiny_model))
    assert refused.returncode == 1 and "no collection" in refused.stderr


@pytest.mark.slow
def test_a_run_can_be_cancelled_and_a_bad_base_model_fails_with_its_reason(workers, examples, tiny_model):
    workers.start("trainer", extra_env={"M2IO_TRAINER_HEARTBEAT_S": "0.5"})
    queued = m2io(*train_args(examples.collection, tiny_model, "--steps", "1000"))
    run_id = last_line(queued.stdout)
    deadline = time.monotonic() + 240
    while not any(phase == "grpo" for phase, _, _ in steps_of(run_id)):
        assert time.monotonic() < deadline, "no GRPO step logged"
        time.sleep(0.5)
    cancelled = m2io("train-cancel", run_id)
    assert cancelled.returncode == 0 and "cancel requested" in cancelled.stdout
    run = wait_for_run(run_id, ("cancelled", "failed", "succeeded"), timeout=120)
    assert run.status == "cancelled" and "cancelled by request" in run.error
    assert run.last_checkpoint_key and get_store().exists(run.last_checkpoint_key + "config.json")
    assert "last checkpoint" in run.error

    broken = m2io(*train_args(examples.collection, REPO_ROOT / "no-such-model"))
    run = wait_for_run(last_line(broken.stdout), ("failed", "succeeded"), timeout=120)
    assert run.status == "failed" and "no-such-model" in run.error


@pytest.mark.slow
def test_a_run_whose_worker_dies_is_resumed_by_another_from_its_checkpoint(workers, examples, tiny_model):
    fast = {"M2IO_TRAINER_HEARTBEAT_S": "0.5", "M2IO_TRAINER_STALE_AFTER_S": "4"}
    first = workers.start("trainer", extra_env=fast)
    queued = m2io(*train_args(examples.collection, tiny_model, "--steps", "30", "--checkpoint-every", "1"))
    run_id = last_line(queued.stdout)
    deadline = time.monotonic() + 240
    while not any(phase == "grpo" and step >= 2 for phase, step, _ in steps_of(run_id)):
        assert time.monotonic() < deadline, "no GRPO step logged"
        time.sleep(0.2)
    os.killpg(first.process.pid, signal.SIGKILL)
    first.process.wait(timeout=10)
    workers.start("trainer", extra_env=fast)
    run = wait_for_run(run_id, ("succeeded", "failed"), timeout=300)
    assert run.status == "succeeded", run.error
    assert run.attempts == 2  # taken over once
    grpo_steps = sorted(step for phase, step, _ in steps_of(run_id) if phase == "grpo")
    assert grpo_steps == list(range(1, 31))  # every step once: the resumed part continues the numbering
