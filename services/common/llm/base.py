"""What every chat model shares: the `ChatModel` protocol, its `ChatResult` and its errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class LLMError(RuntimeError):
    pass


class LLMTimeout(LLMError):
    def __init__(self, message: str, partial: ChatResult | None = None):
        super().__init__(message)
        self.partial = partial  # what was generated before the deadline (local models only)


@dataclass
class ChatResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    cached_tokens: int = 0  # prompt tokens whose keys and values came from a kept prefix (local models)
    forward_passes: int | None = None  # the model's passes for this reply (local greedy decoding with drafts)

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


class ChatModel(Protocol):
    """What the stages, the trainer and the benchmarks call on a model, local or remote."""

    def warm_up(self) -> None:
        """Load whatever the model needs (once per process); the first `chat` does it otherwise."""
        ...

    def chat(
        self,
        messages: list[dict[str, str]],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        timeout_s: float | None = None,
        draft: str | None = None,
    ) -> ChatResult:
        """The assistant's reply to `messages` (greedy when temperature == 0); LLMTimeout past `timeout_s`.
        `draft`: a reply the caller expects; a model may use it to decode faster, never to answer differently."""
        ...
