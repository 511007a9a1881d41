"""A scripted OpenAI-compatible chat server on loopback, for fault tests.

What it does with a request is decided by a hash of the last user message, so a test knows in
advance which requests fail and how (about 30% fail permanently):

    0: 429 with Retry-After on the first attempt, then a normal answer
    1: 500 every time
    2: no answer, every time: the request is held until the client gives up and hangs up (or
       the server stops), so it times out whatever the client's deadline and however slow the
       machine; no answer meant to succeed has to beat a clock
    3: a 200 whose body is not JSON, every time
    4: a normal answer cut by max_tokens (finish_reason "length")
    5-9: a normal answer

Every request is logged (content, behaviour, time, authorization header). The server runs in a
daemon thread, binds 127.0.0.1 on a free port and stops when its context manager exits.
"""

from __future__ import annotations

import hashlib
import json
import select
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RETRY_AFTER_S = 0.2


class _Server(ThreadingHTTPServer):
    # The default listen backlog (5) drops connections under a burst of concurrent clients,
    # which then wait a full TCP retransmit (1 s) and look like server timeouts.
    request_queue_size = 256
    daemon_threads = True
    block_on_close = False


def behaviour(content: str) -> int:
    return hashlib.sha256(content.encode()).digest()[0] % 10


class FaultServer:
    def __init__(self):
        self.log: list[dict] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._seen_429: set[str] = set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server._handle(self, body)

        self._httpd = _Server(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> FaultServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopping.set()  # lets go of the requests still held
        self._httpd.shutdown()
        self._httpd.server_close()

    def contents(self) -> list[str]:
        with self._lock:
            return [entry["content"] for entry in self.log]

    def _handle(self, handler: BaseHTTPRequestHandler, body: dict) -> None:
        content = body["messages"][-1]["content"]
        kind = behaviour(content)
        with self._lock:
            self.log.append(
                {
                    "content": content,
                    "kind": kind,
                    "t": time.monotonic(),
                    "auth": handler.headers.get("Authorization"),
                    "body": body,
                }
            )
            first_429 = kind == 0 and content not in self._seen_429
            if first_429:
                self._seen_429.add(content)
        if first_429:
            return self._send(
                handler,
                429,
                {"error": {"message": "slow down"}},
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        if kind == 1:
            return self._send(handler, 500, {"error": {"message": "internal error"}})
        if kind == 2:
            return self._hold(handler)
        if kind == 3:
            return self._send_raw(handler, 200, b'{"choices": [ {"index": 0, "mess')
        n = body.get("n", 1)
        schema = body.get("response_format")
        text = '{"verdict": "Equal"}' if schema else f"echo: {content}"
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text if schema else f"{text} #{i}"},
                "finish_reason": "length" if kind == 4 else "stop",
            }
            for i in range(n)
        ]
        payload = {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": choices,
            "usage": {"prompt_tokens": 7, "completion_tokens": 4 * n, "total_tokens": 7 + 4 * n},
        }
        return self._send(handler, 200, payload)

    def _hold(self, handler: BaseHTTPRequestHandler) -> None:
        """Answer nothing until the client hangs up (its timeout fired) or the server stops."""
        handler.close_connection = True
        while not self._stopping.is_set():
            readable, _, _ = select.select([handler.connection], [], [], 0.05)
            if readable:  # end of file: the client closed the connection
                return

    def _send(self, handler, status: int, payload: dict, headers: dict | None = None) -> None:
        self._send_raw(handler, status, json.dumps(payload).encode(), headers)

    def _send_raw(self, handler, status: int, data: bytes, headers: dict | None = None) -> None:
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout) before the answer was ready
