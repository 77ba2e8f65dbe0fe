"""A real OpenAI-compatible chat server for tests: stdlib `http.server` in a thread on a free 127.0.0.1 port,
answering `POST /v1/chat/completions` with a real LocalChatModel, plus switches to misbehave.

    with OpenAIServer(model) as server:
        server.fail_first = 2          # the next 2 requests get 503
        server.sleep_s = 5             # every request sleeps this long before answering
        server.bad_request = "nope"    # every request gets 400 with this message
        OpenAIChatModel(server.base_url, "smollm2").chat(...)
        server.requests                # how many chat requests arrived
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from services.common.llm import LocalChatModel


class OpenAIServer:
    def __init__(self, model: LocalChatModel, api_key: str | None = None):
        self.model = model
        self.api_key = api_key  # when set, requests without `Authorization: Bearer <key>` get 401
        self.fail_first = 0
        self.sleep_s = 0.0
        self.bad_request: str | None = None
        self.requests = 0
        self.authorizations: list[str | None] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="openai-test-server", daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> OpenAIServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stopping.set()  # wakes sleeping handlers
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def reset(self) -> None:
        with self._lock:
            self.fail_first, self.sleep_s, self.bad_request, self.requests = 0, 0.0, None, 0
            self.authorizations.clear()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args):  # quiet test output
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up
                    self.wfile.write(data)

            def _error(self, status: int, message: str, kind: str) -> None:
                self._send(status, {"error": {"message": message, "type": kind, "param": None, "code": None}})

            def _client_gone(self) -> bool:
                readable, _, _ = select.select([self.connection], [], [], 0)
                try:
                    return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
                except OSError:
                    return True

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._error(404, f"no route {self.path}", "invalid_request_error")
                    return
                with server._lock:
                    server.requests += 1
                    server.authorizations.append(self.headers.get("Authorization"))
                    failing = server.fail_first > 0
                    if failing:
                        server.fail_first -= 1
                    sleep_s, bad_request = server.sleep_s, server.bad_request
                if sleep_s and (server._stopping.wait(sleep_s) or self._client_gone()):
                    return  # nobody to answer: do not spend the CPU on generating
                if failing:
                    self._error(503, "the server is overloaded, try again", "server_error")
                    return
                if bad_request is not None:
                    self._error(400, bad_request, "invalid_request_error")
                    return
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    self._error(401, "invalid api key", "invalid_request_error")
                    return
                try:
                    body = json.loads(raw)
                    messages = body["messages"]
                except (ValueError, KeyError, TypeError):
                    self._error(400, "body must be JSON with `messages`", "invalid_request_error")
                    return
                max_tokens = int(body.get("max_tokens") or 256)
                result = server.model.chat(
                    messages, max_new_tokens=max_tokens, temperature=float(body.get("temperature") or 0.0)
                )
                self._send(
                    200,
                    {
                        "id": f"chatcmpl-{uuid.uuid4().hex}",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": body.get("model") or server.model.name,
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": result.text},
                                "finish_reason": "length" if result.completion_tokens >= max_tokens else "stop",
                            }
                        ],
                        "usage": {
                            "prompt_tokens": result.prompt_tokens,
                            "completion_tokens": result.completion_tokens,
                            "total_tokens": result.prompt_tokens + result.completion_tokens,
                        },
                    },
                )

        return Handler
