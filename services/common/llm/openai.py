"""A client of any OpenAI-compatible chat server."""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
from typing import Any

from services.common.llm.base import ChatResult, LLMError, LLMTimeout

log = logging.getLogger(__name__)


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
        draft: str | None = None,
    ) -> ChatResult:
        """`timeout_s` bounds each attempt (default: the client's); retries come on top of it. `draft` (an expected
        reply, which a local model checks in one pass) is not sent: the chat completions API has no field for it
        that OpenAI-compatible servers share."""
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
