"""The default size of a local cluster (infra/sizing.py): processes per stage and torch threads from the
cores, used by `m2io up` for what the user did not set."""

from __future__ import annotations

import doctest
import os

import pytest

from infra import sizing
from infra.cluster import LocalCluster
from infra.sizing import machine_cores, plan_workers
from services.common.queues import PIPELINE, Stage
from services.common.settings import Settings

pytestmark = pytest.mark.unit


def test_doctests():
    assert doctest.testmod(sizing).failed == 0


@pytest.mark.parametrize(
    ("cores", "expected"),
    [(1, 1), (2, 2), (4, 4), (8, 8), (16, 16), (64, sizing.MAX_PROCESSES)],
)
def test_the_plan_of_a_machine(cores, expected):
    plan = plan_workers(cores)
    assert {stage.value: plan.processes[stage] for stage in PIPELINE} == {stage.value: expected for stage in PIPELINE}
    assert plan.processes[Stage.TRAINER] == 1
    assert plan.torch_threads == 1  # a thread per process: processes, not threads, fill the cores


@pytest.mark.parametrize("cores", [1, 2, 3, 4, 6, 8, 12, 16, 32, 64, 128])
def test_every_stage_gets_a_process_per_core_up_to_the_cap(cores):
    plan = plan_workers(cores)
    assert set(plan.processes) == set(Stage)
    assert all(1 <= plan.processes[stage] <= sizing.MAX_PROCESSES for stage in Stage)
    assert plan.answer_processes >= min(cores, sizing.MAX_PROCESSES) * len(PIPELINE)  # every core has work
    assert len({plan.processes[stage] for stage in PIPELINE}) == 1


def test_zero_or_negative_cores_count_as_one():
    assert plan_workers(0) == plan_workers(1) == plan_workers(-3)


def test_machine_cores_is_this_process_affinity():
    assert 1 <= machine_cores() <= (os.cpu_count() or 1)


def test_up_uses_the_plan_unless_told(tmp_path, monkeypatch):
    monkeypatch.delenv("M2IO_TORCH_THREADS", raising=False)
    monkeypatch.setattr("infra.cluster.machine_cores", lambda: 8)
    cluster = LocalCluster(Settings(state_dir=tmp_path), start_dashboard=False)
    assert {stage: cluster.processes_of(stage) for stage in Stage} == plan_workers(8).processes
    argv = cluster.worker_argv(Stage.RETRIEVER)
    assert argv[argv.index("--concurrency") + 1] == "8"
    assert cluster.workers.process_env({})["M2IO_TORCH_THREADS"] == "1"

    # Explicit settings win: a concurrency (the option, else M2IO_WORKER_CONCURRENCY) for the answer stages...
    told = LocalCluster(Settings(state_dir=tmp_path, worker_concurrency=3), start_dashboard=False)
    assert [told.processes_of(stage) for stage in PIPELINE] == [3] * len(PIPELINE)
    assert told.processes_of(Stage.TRAINER) == 1
    assert (
        LocalCluster(Settings(state_dir=tmp_path, worker_concurrency=3), worker_concurrency=2).processes_of(
            Stage.MERGER
        )
        == 2
    )
    # ... and M2IO_TORCH_THREADS, from the environment or from cluster.env.
    assert cluster.workers.process_env({"M2IO_TORCH_THREADS": "4"})["M2IO_TORCH_THREADS"] == "4"
    monkeypatch.setenv("M2IO_TORCH_THREADS", "2")
    assert cluster.workers.process_env({})["M2IO_TORCH_THREADS"] == "2"
