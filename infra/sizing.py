"""How big a default local cluster is: worker processes per stage and torch threads per process, from the
machine's cores. `m2io up` uses it for what the user did not set (`--concurrency`, M2IO_WORKER_CONCURRENCY,
M2IO_TORCH_THREADS win).

Why these numbers (bench/README.md, "Job load"): torch's default, a thread per core in every process, in four
stage processes on 2 cores halved the throughput; one thread per process fills the cores with processes. Only
the retriever embeds at query time (the question, one short text: a thread is enough); the other stages read
rows, compare stored vectors and write, and spend much of a task waiting on Postgres, S3 and Redis, which
more processes fill. Measured on 2 cores, 1,000 questions (issue 14): one process per stage 15.6 questions/s
(the cores 84% busy), two retrievers and one of each other stage 17.1 (98%), two per stage 18.3 (94%). So
each answer stage gets a process per core; past `MAX_PROCESSES` per stage, run more workers (on other
machines) instead: a process holds a model and a few hundred MB. Only 2 cores were measured.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from services.common.queues import PIPELINE, Stage

MAX_PROCESSES = 16  # per stage and machine
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
    """Processes per stage and torch threads for `cores` cores: a process per core for each answer stage
    (at most `MAX_PROCESSES`), one trainer, a torch thread each.

    >>> plan_workers(2).processes[Stage.RETRIEVER], plan_workers(2).answer_processes
    (2, 8)
    >>> {stage.value: n for stage, n in plan_workers(8).processes.items()}
    {'retriever': 8, 'generator': 8, 'inserter': 8, 'merger': 8, 'trainer': 1}
    """
    per_stage = min(MAX_PROCESSES, max(1, cores))
    processes = {stage: per_stage for stage in PIPELINE}
    processes[Stage.TRAINER] = TRAINER_PROCESSES
    return WorkerPlan(processes=processes, torch_threads=TORCH_THREADS)


def machine_cores() -> int:
    """The cores this process may run on (its affinity, as a container's CPU set), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1
