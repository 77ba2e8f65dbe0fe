"""Inserter models registered by the trainer: a row in `models` naming an S3 prefix that holds a
transformers checkpoint. Served with the `llm` prompt through a local causal LM."""

from __future__ import annotations

import hashlib
import os
import shutil
from functools import lru_cache
from pathlib import Path

from sqlalchemy import select

from services.common.db import session_scope
from services.common.llm.base import LLMError
from services.common.models import RegisteredModel
from services.common.settings import get_settings
from services.common.storage import get_store


class UnknownModel(LookupError):
    pass


class PromptMismatch(LLMError):
    """The model was trained on another version of the inserter's prompt than this code builds: its plans would
    answer a prompt it never saw. Serving falls back to `rule` and the plan says why."""


def cache_root() -> Path:
    configured = getattr(get_settings(), "model_cache_dir", None)
    return Path(configured) if configured else Path.home() / ".cache" / "m2io" / "models"


def registered_prefix(name: str) -> str:
    """The S3 prefix of the registered inserter model `name`; UnknownModel (naming those registered)
    when there is none. One query: what submit checks before it stores a job."""
    return registered_model(name)[0]


def registered_model(name: str) -> tuple[str, dict]:
    """The S3 prefix and the metadata of the registered inserter model `name` (UnknownModel when none)."""
    with session_scope() as session:
        model = session.execute(
            select(RegisteredModel).where(RegisteredModel.name == name, RegisteredModel.kind == "inserter")
        ).scalar_one_or_none()
        if model is None:
            known = session.scalars(select(RegisteredModel.name).where(RegisteredModel.kind == "inserter")).all()
            raise UnknownModel(f"no registered inserter model {name!r} (registered: {', '.join(known) or 'none'})")
        return model.s3_prefix.rstrip("/") + "/", dict(model.meta or {})


def download_checkpoint(name: str) -> Path:
    """The checkpoint's files in a local folder (downloaded once per prefix)."""
    prefix = registered_prefix(name)
    target = cache_root() / "registered" / f"{name}-{hashlib.sha256(prefix.encode()).hexdigest()[:12]}"
    if (target / "config.json").exists():
        return target
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    count = get_store().download_prefix(prefix, partial)
    if not (partial / "config.json").exists():
        shutil.rmtree(partial, ignore_errors=True)
        raise UnknownModel(f"model {name!r}: s3 prefix {prefix} holds {count} files but no config.json")
    try:
        partial.rename(target)  # a crash never leaves half a checkpoint where a loader would find it
    except OSError:
        # another process of the worker downloaded the same prefix first: its copy stands, ours goes
        shutil.rmtree(partial, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target


def load_registered_model(name: str):
    """The registered model, loaded once per process; PromptMismatch when it was trained on another prompt version
    than this code builds (a model registered by hand, without a recorded version, is served as it is)."""
    from services.inserter.prompt import PROMPT_VERSION

    trained_on = registered_model(name)[1].get("prompt_version")
    if trained_on and trained_on != PROMPT_VERSION:
        raise PromptMismatch(
            f"model {name!r} was trained on inserter prompt {trained_on}; this inserter builds {PROMPT_VERSION}"
            " (train it again on this collection)"
        )
    return loaded_model(name)


@lru_cache(maxsize=4)
def loaded_model(name: str):
    from services.common.llm import LocalChatModel

    return LocalChatModel(str(download_checkpoint(name)))
