"""A scripted OpenAI-compatible chat server on loopback, for tests that run `evolforge` in a
subprocess (where the scripted fake engine cannot be injected).

Replies are chosen from the request's system message, so every prompt template of the data flow
gets a well-formed answer: evolutions are new word problems (distinct per parent, so dedup keeps
most), the answer probe and chain-of-thought answer 7, programs print 7, judges reply with JSON.
Every request is logged; `delay_s` slows each reply so that a test can kill a run mid-batch.
Requests are answered on threads, each sleeping on its own: a sleeping engine that serves many
clients at once, as a model server does, so that shards on several Ray nodes (which reach it by
its URL) overlap their waits. `delay_s` may be changed while it serves.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def reply_for(messages: list[dict]) -> str:
    system = next((m["content"] for m in messages if m["role"] == "system"), "")
    user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    digest = int(hashlib.sha256(user.encode()).hexdigest()[:8], 16)
    if "rewrite math problems" in system or "write math problems" in system:
        # The parent's own words plus a new condition: evolutions of different parents differ
        # as much as their parents do, so dedup treats them as a real evolver's would be.
        words = [w for w in user.split() if w.isalpha()][-24:]
        a, b = 10 + digest % 89, 2 + digest % 7
        return f"{' '.join(words)}. Then {a} more arrive in {b} groups. How many are there now?"
    if "compare math problems" in system:
        return json.dumps({"verdict": "Not Equal"})
    if "check math problems" in system:
        return json.dumps({"solvable": True, "reason": "well posed"})
    if "answers with Python" in system:
        return "```python\nprint(7)\n```"
    return "First add the numbers.\nThe answer is: 7"


class ScriptedServer:
    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s
        self.log: list[str] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                """Quiet: the test reads `server.log`, not stderr."""

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server._answer(self, body)

        class Server(ThreadingHTTPServer):
            request_queue_size = 256
            daemon_threads = True
            block_on_close = False

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.log)

    def _answer(self, handler: BaseHTTPRequestHandler, body: dict) -> None:
        key = json.dumps(
            [body.get("messages"), body.get("seed"), body.get("n"), body.get("max_tokens")],
            sort_keys=True,
        )
        if self.delay_s:
            time.sleep(self.delay_s)
        text = reply_for(body["messages"])
        n = int(body.get("n") or 1)
        payload = {
            "id": "chatcmpl-scripted",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "scripted"),
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
                for i in range(n)
            ],
            "usage": {
                "prompt_tokens": sum(len(m["content"].split()) for m in body["messages"]),
                "completion_tokens": n * len(text.split()),
                "total_tokens": 0,
            },
        }
        data = json.dumps(payload).encode()
        with self._lock:
            self.log.append(key)
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
