"""How big a default local cluster is: worker processes per stage and torch threads per process, from the
machine's cores. `m2io up` uses it for what the user did not set (`--concurrency`, M2IO_WORKER_CONCURRENCY,
M2IO_TORCH_THREADS win).

Why these numbers (bench/README.md, "Job load"): torch's default, a thread per core in every process, in four
stage processes on 2 cores halved the throughput; one thread per process, and processes a little over the
cores, kept the cores busy. Only the retriever embeds at query time (the question, one short text: a thread
is enough, more threads per process only contend); the other stages read rows, match text and write, and wait
on Postgres, S3 and Redis part of the time, which the extra processes fill.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from services.common.queues import PIPELINE, Stage

# Each answer stage's share of the CPU a question takes, in parts: the retriever's embedding and vector search
# about twice any other stage's work.
WEIGHTS: dict[Stage, int] = {Stage.RETRIEVER: 2, Stage.GENERATOR: 1, Stage.INSERTER: 1, Stage.MERGER: 1}
# One trainer process whatever the machine: a training run uses every core (and the GPU) by itself.
TRAINER_PROCESSES = 1
TORCH_THREADS = 1


@dataclass(frozen=True)
class WorkerPlan:
    processes: dict[Stage, int]
    torch_threads: int

    @property
    def answer_processes(self) -> int:
        return sum(self.processes[stage] for stage in PIPELINE)


def plan_workers(cores: int) -> WorkerPlan:
    """Processes per stage and torch threads for `cores` cores: the answer stages' processes add up to the
    cores and a quarter more (at least one more), shared by `WEIGHTS`, each stage at least one.

    >>> plan_workers(2).processes[Stage.RETRIEVER], plan_workers(2).answer_processes
    (1, 4)
    >>> {stage.value: n for stage, n in plan_workers(8).processes.items()}
    {'retriever': 4, 'generator': 2, 'inserter': 2, 'merger': 2, 'trainer': 1}
    """
    cores = max(1, cores)
    total = cores + max(1, cores // 4)
    parts = sum(WEIGHTS.values())
    processes = {stage: max(1, round(total * WEIGHTS[stage] / parts)) for stage in PIPELINE}
    processes[Stage.TRAINER] = TRAINER_PROCESSES
    return WorkerPlan(processes=processes, torch_threads=TORCH_THREADS)


def machine_cores() -> int:
    """The cores this process may run on (its affinity, as a container's CPU set), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1
