"""A local OpenAI-compatible judge for tests: a tiny HTTP server on 127.0.0.1 that answers chat
completions by preferring the answer with more liked words (the tiny reward models' preference)."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from workers.tiny_models import liked_fraction

_ANSWERS = re.compile(r"\[Answer A\]\n(.*?)\n\n\[Answer B\]\n(.*)\Z", re.DOTALL)


class FakeJudge:
    def __init__(self) -> None:
        self.requests: list[dict] = []

    def verdict(self, text: str) -> str:
        match = _ANSWERS.search(text)
        if match is None:
            return "I cannot tell."
        a, b = (liked_fraction(x) for x in match.groups())
        return "A" if a >= b else "B"  # ties go to the first answer: a position bias to cancel


@contextmanager
def fake_judge() -> Iterator[tuple[str, FakeJudge]]:
    """Yields (base URL ending in /v1, the judge with the requests it saw)."""
    judge = FakeJudge()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 — http.server's naming
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            judge.requests.append(body)
            if self.path != "/v1/chat/completions":
                self.send_response(404)
                self.end_headers()
                return
            reply = judge.verdict(body["messages"][-1]["content"])
            data = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": reply}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", judge
    finally:
        server.shutdown()
        server.server_close()
