"""A local stand-in for a provider's files and batches endpoints (OpenAI's Batch API), for the
openai-batch backend's tests. Every line it answers is answered by a real OpenAI-compatible
server (vLLM's, on 127.0.0.1): it forwards the line's body to `/chat/completions` there.

What it serves, as OpenAI does:

    POST /v1/files                  multipart upload (purpose "batch")
    GET  /v1/files/{id}/content     a file's bytes (inputs, outputs, errors)
    POST /v1/batches                create a batch from an uploaded file (with metadata)
    GET  /v1/batches/{id}           the batch: status, request_counts, output/error file ids
    GET  /v1/batches?limit&after    newest first, paged
    GET  /v1/models                 forwarded to the real server

Knobs for faults (a line is picked by a marker in its messages):

    hold=True            batches stay in_progress until `release()` (a client can be killed mid-poll)
    expire={m: k}        a line with marker m is left undone in its first k batches, which end
                         "expired" with a `batch_expired` entry in the error file (or none at all,
                         `expired_in_error_file=False`: the line is simply missing)
    fail={m: (status, code, message)}   a line with marker m gets that HTTP error as its response

It counts what a provider would bill: `answered[custom_id]`, the lines it had the real server
answer, so a test can check that no line was paid twice.
"""

from __future__ import annotations

import email.parser
import itertools
import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlparse

from tests.local_server import LocalServer, forward


class BatchStandIn(LocalServer):
    def __init__(self, upstream: str, hold: bool = False, expire: dict[str, int] | None = None,
                 fail: dict[str, tuple[int, str, str]] | None = None, expired_in_error_file: bool = True,
                 workers: int = 4):
        self.upstream = upstream.rstrip("/")
        self.expire = dict(expire or {})
        self.fail = dict(fail or {})
        self.expired_in_error_file = expired_in_error_file
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.created: list[str] = []  # batch ids, in the order they were created
        self.uploads = 0
        self.polls: Counter[str] = Counter()  # GET /v1/batches/{id}, per batch
        self.answered: Counter[str] = Counter()  # lines the real server answered (what is billed)
        self._released = threading.Event()
        if not hold:
            self._released.set()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers)
        super().__init__(self._handler_class())

    def __exit__(self, *exc_info: object) -> None:
        self._released.set()
        super().__exit__(*exc_info)
        self._pool.shutdown(wait=True)

    def release(self) -> None:
        """Let held batches run."""
        self._released.set()

    # -- the provider's side ---------------------------------------------------------------

    def _new_id(self, prefix: str) -> str:
        with self._lock:
            return f"{prefix}_{next(self._ids)}"

    def _store(self, content: bytes) -> str:
        file_id = self._new_id("file")
        self.files[file_id] = content
        return file_id

    def _create(self, request: dict) -> dict:
        lines = self.files[request["input_file_id"]].decode("utf-8").splitlines()
        now = int(time.time())
        batch = {"id": self._new_id("batch"), "object": "batch", "endpoint": request["endpoint"],
                 "errors": None, "input_file_id": request["input_file_id"],
                 "completion_window": request["completion_window"], "status": "validating", "output_file_id": None,
                 "error_file_id": None, "created_at": now, "in_progress_at": None, "expires_at": now + 86400,
                 "completed_at": None, "expired_at": None, "failed_at": None,
                 "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
                 "metadata": request.get("metadata")}
        with self._lock:
            self.batches[batch["id"]] = batch
            self.created.append(batch["id"])
        threading.Thread(target=self._run, args=(batch, lines), daemon=True).start()
        return batch

    def _marker(self, line: dict, markers) -> str | None:
        text = " ".join(str(m.get("content", "")) for m in line["body"].get("messages", []))
        return next((marker for marker in markers if marker in text), None)

    def _run(self, batch: dict, lines: list[str]) -> None:
        batch["status"], batch["in_progress_at"] = "in_progress", int(time.time())
        self._released.wait()
        parsed = [json.loads(line) for line in lines]
        outputs, errors = [], []
        undone = set()
        for line in parsed:
            marker = self._marker(line, self.expire)
            with self._lock:
                if marker is not None and self.expire[marker] > 0:
                    self.expire[marker] -= 1
                    undone.add(line["custom_id"])
            if line["custom_id"] in undone and self.expired_in_error_file:
                errors.append({"id": self._new_id("batch_req"), "custom_id": line["custom_id"], "response": None,
                               "error": {"code": "batch_expired", "message": "This request could not be "
                                         "executed before the completion window expired."}})
        done = [line for line in parsed if line["custom_id"] not in undone]
        for line, (status, body) in zip(done, self._pool.map(self._answer, done)):
            entry = {"id": self._new_id("batch_req"), "custom_id": line["custom_id"],
                     "response": {"status_code": status, "request_id": self._new_id("req"), "body": body},
                     "error": None}
            (outputs if status == 200 else errors).append(entry)
            counts = batch["request_counts"]
            counts["completed" if status == 200 else "failed"] += 1
        batch["request_counts"]["failed"] += len(undone)  # as OpenAI counts them once the window closes
        batch["status"] = "finalizing"
        if outputs:
            batch["output_file_id"] = self._store("".join(json.dumps(e) + "\n" for e in outputs).encode())
        if errors:
            batch["error_file_id"] = self._store("".join(json.dumps(e) + "\n" for e in errors).encode())
        now = int(time.time())
        if undone:
            batch["status"], batch["expired_at"] = "expired", now
        else:
            batch["status"], batch["completed_at"] = "completed", now

    def _answer(self, line: dict) -> tuple[int, dict]:
        marker = self._marker(line, self.fail)
        if marker is not None:
            status, code, message = self.fail[marker]
            return status, {"error": {"message": message, "type": "invalid_request_error", "code": code}}
        status, _headers, body = forward(self.upstream + "/chat/completions", "POST", json.dumps(line["body"]).encode(),
                                         {"Content-Type": "application/json"})
        if status == 200:
            with self._lock:
                self.answered[line["custom_id"]] += 1
        return status, json.loads(body)

    def _listing(self, query: dict) -> dict:
        limit = int(query.get("limit", ["20"])[0])
        newest_first = list(reversed(self.created))
        if "after" in query:
            newest_first = newest_first[newest_first.index(query["after"][0]) + 1:]
        page = [self.batches[batch_id] for batch_id in newest_first[:limit]]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(newest_first) > limit}

    def _handler_class(self):
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, body: bytes | dict, content_type: str = "application/json") -> None:
                data = json.dumps(body).encode() if isinstance(body, dict) else body
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                url = urlparse(self.path)
                parts = url.path.strip("/").split("/")  # ["v1", ...]
                if parts[1:] == ["models"]:
                    status, _headers, body = forward(stand_in.upstream + "/models", "GET", None)
                    self._send(status, body)
                elif parts[1:2] == ["files"] and parts[3:] == ["content"] and parts[2] in stand_in.files:
                    self._send(200, stand_in.files[parts[2]], "application/octet-stream")
                elif parts[1:] == ["batches"]:
                    self._send(200, stand_in._listing(parse_qs(url.query)))
                elif parts[1:2] == ["batches"] and parts[2] in stand_in.batches:
                    with stand_in._lock:
                        stand_in.polls[parts[2]] += 1
                    self._send(200, stand_in.batches[parts[2]])
                else:
                    self._send(404, {"error": {"message": f"no {url.path}", "type": "invalid_request_error"}})

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/v1/files":
                    message = email.parser.BytesParser().parsebytes(
                        f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + body)
                    fields = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
                              for part in message.get_payload()}
                    with stand_in._lock:
                        stand_in.uploads += 1
                    file_id = stand_in._store(fields["file"])
                    self._send(200, {"id": file_id, "object": "file", "bytes": len(fields["file"]),
                                     "created_at": int(time.time()), "filename": "batch.jsonl",
                                     "purpose": fields["purpose"].decode(), "status": "processed"})
                elif self.path == "/v1/batches":
                    self._send(200, stand_in._create(json.loads(body)))
                else:
                    self._send(404, {"error": {"message": f"no {self.path}", "type": "invalid_request_error"}})

        return Handler
