"""A fault-injecting HTTP proxy for testing the openai backend against a real server.

It sits in front of a real OpenAI-compatible server (vLLM's) on 127.0.0.1 and, for a
chat request whose user message contains a planned marker, answers the first
attempts with faults before letting one through:

    "429"      429 with Retry-After: 1
    "quota"    429 with OpenAI's insufficient_quota body (a spent quota, not a rate limit)
    "500"      500 with a JSON error body
    "stall"    no answer for `stall_seconds` (past the client's timeout), then hang up
    "truncate" the real answer's headers but only half its body, then hang up
    "garbage"  200 with a body that is not JSON

It counts, per marker, how many real answers it delivered, so a test can check that
every request completed exactly once, and notes when each POST arrived (`arrivals`), so a
test can measure the rate a client sends at.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler

from tests.local_server import LocalServer, forward


class FaultProxy(LocalServer):
    def __init__(self, upstream: str, plan: dict[str, list[str]], stall_seconds: float = 6.0):
        self.upstream = upstream.rstrip("/")
        self.plan = plan
        self.stall_seconds = stall_seconds
        self.attempts: Counter[str] = Counter()
        self.delivered: Counter[str] = Counter()
        self.faults_sent: dict[str, list[str]] = defaultdict(list)
        self.arrivals: list[float] = []  # time.monotonic() of each POST, as it arrived
        self._lock = threading.Lock()
        super().__init__(self._handler_class())

    def _marker(self, body: bytes) -> str | None:
        try:
            messages = json.loads(body).get("messages", [])
        except (ValueError, AttributeError):
            return None
        text = " ".join(str(m.get("content", "")) for m in messages)
        return next((marker for marker in self.plan if marker in text), None)

    def _next_fault(self, marker: str | None) -> str | None:
        if marker is None:
            return None
        with self._lock:
            attempt = self.attempts[marker]
            self.attempts[marker] += 1
            faults = self.plan[marker]
            fault = faults[attempt] if attempt < len(faults) else None
            if fault:
                self.faults_sent[marker].append(fault)
            return fault

    def _forward(self, method: str, path: str, body: bytes | None, headers) -> tuple[int, dict, bytes]:
        return forward(self.upstream + path, method, body, headers)

    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, body: bytes, extra: dict[str, str] | None = None,
                      declared_length: int | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(declared_length or len(body)))
                for name, value in (extra or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()

            def do_GET(self) -> None:
                status, _headers, body = proxy._forward("GET", self.path.removeprefix("/v1"), None, self.headers)
                self._send(status, body)

            def do_POST(self) -> None:
                with proxy._lock:
                    proxy.arrivals.append(time.monotonic())
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                marker = proxy._marker(body)
                fault = proxy._next_fault(marker)
                error = json.dumps({"error": {"message": f"injected {fault}", "type": "fault"}}).encode()
                if fault == "429":
                    self._send(429, error, {"Retry-After": "1"})
                    return
                if fault == "quota":
                    self._send(429, json.dumps({"error": {
                        "message": "You exceeded your current quota, please check your plan and billing details.",
                        "type": "insufficient_quota", "code": "insufficient_quota"}}).encode())
                    return
                if fault == "500":
                    self._send(500, error)
                    return
                if fault == "stall":
                    time.sleep(proxy.stall_seconds)
                    self.close_connection = True
                    return
                if fault == "garbage":
                    self._send(200, b'{"id": "chatcmpl-broken", "choices": [')
                    return
                status, _headers, answer = proxy._forward("POST", self.path.removeprefix("/v1"), body, self.headers)
                if fault == "truncate":
                    self._send(status, answer[: len(answer) // 2], declared_length=len(answer))
                    self.close_connection = True
                    return
                if marker is not None and status == 200:
                    with proxy._lock:
                        proxy.delivered[marker] += 1
                self._send(status, answer)

        return Handler
