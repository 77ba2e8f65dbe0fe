"""Celery entry points of the retriever stage: thin wrappers (validate, call core, persist, enqueue next).

The stage's own logic lands in `core.py`; until then the stage answers the foundation's probe.
"""

from services.common.queues import Stage
from services.common.smoke import smoke_task

smoke = smoke_task(Stage.RETRIEVER)
