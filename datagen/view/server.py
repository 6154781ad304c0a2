"""The HTTP side of `datagen view`: the standard library's ThreadingHTTPServer, JSON in and out.

    server, state = make_server(Path("out/distill"), host="127.0.0.1", port=0)
    server.serve_forever()

Routes:

    GET  /                      the page (static/index.html; app.js and style.css under /static/)
    GET  /api/tasks             one page of the table: q, sort, desc, offset, limit, f.FACET=value...
    GET  /api/task?row=N|id=ID  one task: record, lineage chain, children, similar instructions, mark
    GET  /api/run               summaries, filter stats, card plots, eval reports
    GET  /files/REL             a file discovery found under PATH (card plots), nothing else
    POST /api/mark              {"id", "decision": keep|drop|clear, "note"} -> appended to the overrides JSONL

Safety: only files that discovery listed (under PATH, symlinks resolved) are served; a
request whose Host header is not the address served (DNS rebinding) or a POST from another
origin is refused; every response carries a Content-Security-Policy that allows no inline
script, and the page itself renders data with `textContent` only.
"""

from __future__ import annotations

import json
import posixpath
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files as package_files
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from datagen.errors import ConfigError, InputError
from datagen.filters.manual import DECISIONS, append_override, read_overrides
from datagen.view.detail import TaskDetails
from datagen.view.index import FACETS, DataFiles, TaskIndex, discover, inside
from datagen.view.run_files import run_overview

STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}
CONTENT_TYPES = {".png": "image/png", ".json": "application/json", ".jsonl": "application/json"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_BODY = 64 * 1024
PAGE_LIMIT = 500
FIRST_PAGE_WAIT = 2.0  # seconds a page waits for its rows while the index is read (then shows what there is)
FIND_WAIT = 30.0  # seconds a task asked for by id waits for the index to reach it


def overrides_file(path: Path) -> Path:
    """Where marks go: `FOLDER/overrides.jsonl` for a run folder, `X.overrides.jsonl` beside a file `X.jsonl`."""
    path = Path(path)
    if path.is_dir():
        return path / "overrides.jsonl"
    return path.with_name(path.name.removesuffix(".jsonl") + ".overrides.jsonl")


TASKS_NAME = "tasks.jsonl"  # what a file in another format is shown as


def _as_tasks(path: Path, input_format: str | None, split: str | None):
    """The tasks of `path` (any format `datagen.readers` reads) as a task JSONL in a temporary
    folder, removed with the returned object; ids are the readers' stable ones, so marks made
    here apply when `datagen filter --overrides` reads the same file."""
    import tempfile

    from datagen.io import write_jsonl_atomic
    from datagen.readers import read_tasks_any

    tasks = read_tasks_any(path, input_format, split)
    folder = tempfile.TemporaryDirectory(prefix="datagen-view-")
    write_jsonl_atomic(Path(folder.name) / TASKS_NAME, tasks)
    return folder


class ViewState:
    """The index (filled in a background thread), the task details, the marks file, and the
    lock that serialises changes to them (the index's own)."""

    def __init__(self, path: Path, input_format: str | None = None, split: str | None = None) -> None:
        from datagen.readers import is_task_jsonl

        if not Path(path).exists() and is_task_jsonl(path):
            raise InputError(f"{path}: no such file or folder")
        self.path = Path(path)
        self._converted = None
        if not is_task_jsonl(self.path, input_format, split):  # another format: its tasks, read once
            self._converted = _as_tasks(self.path, input_format, split)
        self.files: DataFiles = discover(Path(self._converted.name) / TASKS_NAME if self._converted else self.path)
        self.overrides = overrides_file(self.path)
        self.index = TaskIndex(self.files, self._read_marks())
        self.lock = self.index.lock
        self.index.start()
        self.details = TaskDetails(self.index)
        self.servable = self.files.servable()

    def _read_marks(self) -> dict[str, Any]:
        return read_overrides(self.overrides) if self.overrides.exists() else {}

    def page(self, offset: int = 0, limit: int = 50, **query: Any) -> dict[str, Any]:
        """One page of the table (`TaskIndex.query`); while the index is being read, from the rows
        so far once there are enough for this page (or FIRST_PAGE_WAIT has passed)."""
        if not self.index.refresh():  # lines appended since they were read get indexed too
            return self.index.query(offset=offset, limit=limit, **query)
        self.index.wait_for_rows(offset + limit, FIRST_PAGE_WAIT)
        return self.index.query(offset=offset, limit=limit, **query)

    def row_of(self, task_id: str) -> int | None:
        """The row of a task id; one not indexed yet is waited for while indexing goes on."""
        row = self.index.row_of_id.get(task_id)
        if row is None and self.index.indexing:
            self.index.wait(FIND_WAIT)
            row = self.index.row_of_id.get(task_id)
        return row

    def mark(self, task_id: str, decision: str, note: str) -> dict[str, Any]:
        with self.lock:
            append_override(self.overrides, task_id, decision, note)
            self.index.apply_marks(self._read_marks())
            mark = self.index.marks.get(task_id)
            return {"id": task_id, "mark": mark.model_dump() if mark else None, "overrides": str(self.overrides)}

    def warm_up_later(self) -> threading.Thread:
        """Once the index is read, fill the language facet, then build the ROUGE-L pool, in a
        background thread: both take seconds on a big run, and no page waits for them."""
        def work() -> None:
            from datagen.export.languages import detect_language

            self.index.wait()
            self.index.children("")  # the parent -> children map, built once here rather than by a task page
            self.index.detect_languages(detect_language)
            self.details.similar_ready()

        thread = threading.Thread(target=work, name="datagen-view-languages", daemon=True)
        thread.start()
        return thread


class _Refused(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def _int(query: dict[str, list[str]], name: str, default: int) -> int:
    try:
        return int(query.get(name, [default])[0])
    except ValueError:
        raise _Refused(HTTPStatus.BAD_REQUEST, f"{name}: expected a whole number") from None


class ViewHandler(BaseHTTPRequestHandler):
    server_version = "datagen-view"
    state: ViewState  # set on the subclass make_server builds
    allowed_hosts: frozenset[str] | None = None  # None: any Host (served on a non-loopback address)

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        pass  # quiet: the terminal shows the URL, warnings and errors only

    # -- plumbing --------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, value: Any, status: int = HTTPStatus.OK) -> None:
        self._send(status, json.dumps(value, ensure_ascii=False).encode("utf-8"), "application/json; charset=utf-8")

    def _check_host(self) -> None:
        host = self.headers.get("Host")
        if host is None or host.lower() not in self.allowed_hosts:
            raise _Refused(HTTPStatus.FORBIDDEN, f"unexpected Host header {host!r}")

    def _handle(self, route) -> None:
        try:
            self._check_host()
            route()
        except _Refused as refused:
            self._json({"error": str(refused)}, refused.status)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as error:  # a bug or an unreadable file: say so, keep serving
            self.log_error("%s %s: %r", self.command, self.path, error)
            self._json({"error": f"{type(error).__name__}: {error}"}, HTTPStatus.INTERNAL_SERVER_ERROR)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._handle(self._get)

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._handle(self._post)

    # -- routes ----------------------------------------------------------------------------

    def _get(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        path = url.path
        if path in ("/", "/index.html"):
            self._static("index.html")
        elif path.startswith("/static/"):
            self._static(unquote(path.removeprefix("/static/")))
        elif path == "/api/tasks":
            self._tasks(query)
        elif path == "/api/task":
            self._task(query)
        elif path == "/api/run":
            self._json(run_overview(self.state.files))
        elif path.startswith("/files/"):
            self._file(unquote(path.removeprefix("/files/")))
        else:
            raise _Refused(HTTPStatus.NOT_FOUND, "not found")

    def _static(self, name: str) -> None:
        if name not in STATIC:
            raise _Refused(HTTPStatus.NOT_FOUND, "not found")
        body = (package_files("datagen.view") / "static" / name).read_bytes()
        self._send(HTTPStatus.OK, body, STATIC[name])

    def _file(self, relative: str) -> None:
        # only names discovery listed, compared after normalising, and only if the file
        # (symlinks resolved) is still under PATH: no "..", no absolute paths, no links out
        normal = posixpath.normpath(relative)
        root = self.state.files.root
        if normal not in self.state.servable or not inside(root, root / normal):
            raise _Refused(HTTPStatus.NOT_FOUND, "not found")
        suffix = posixpath.splitext(normal)[1]
        self._send(HTTPStatus.OK, (root / normal).read_bytes(), CONTENT_TYPES.get(suffix, "application/octet-stream"))

    def _tasks(self, query: dict[str, list[str]]) -> None:
        filters = {name: query.get(f"f.{name}", []) for name in FACETS}
        limit = _int(query, "limit", 50)
        if not 1 <= limit <= PAGE_LIMIT:
            raise _Refused(HTTPStatus.BAD_REQUEST, f"limit: between 1 and {PAGE_LIMIT}")
        page = self.state.page(search=query.get("q", [""])[0], filters=filters, sort=query.get("sort", [None])[0],
                               descending=query.get("desc", ["0"])[0] == "1", offset=_int(query, "offset", 0),
                               limit=limit)
        page["overrides"] = str(self.state.overrides)
        page["root"] = str(self.state.path)
        self._json(page)

    def _task(self, query: dict[str, list[str]]) -> None:
        index = self.state.index
        if "id" in query:
            row = self.state.row_of(query["id"][0])
        else:
            row = _int(query, "row", -1)
        if row is None or not 0 <= row < len(index):
            raise _Refused(HTTPStatus.NOT_FOUND, "no such task")
        self._json(self.state.details.page(row))

    def _post(self) -> None:
        if urlsplit(self.path).path != "/api/mark":
            raise _Refused(HTTPStatus.NOT_FOUND, "not found")
        origin = self.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc.lower() != (self.headers.get("Host") or "").lower():
            raise _Refused(HTTPStatus.FORBIDDEN, "cross-origin request refused")
        if not (self.headers.get("Content-Type") or "").startswith("application/json"):
            raise _Refused(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "expected application/json")
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY:
            raise _Refused(HTTPStatus.BAD_REQUEST, "expected a small JSON body")
        try:
            body = json.loads(self.rfile.read(length))
        except ValueError:
            raise _Refused(HTTPStatus.BAD_REQUEST, "invalid JSON") from None
        note = body.get("note", "") if isinstance(body, dict) else None
        if not isinstance(body, dict) or body.get("decision") not in DECISIONS or not isinstance(note, str):
            raise _Refused(HTTPStatus.BAD_REQUEST, f"expected {{id, decision: {'|'.join(DECISIONS)}, note}}")
        task_id = body.get("id")
        if not isinstance(task_id, str) or self.state.row_of(task_id) is None:
            raise _Refused(HTTPStatus.NOT_FOUND, "no such task")
        self._json(self.state.mark(task_id, body["decision"], body.get("note", "")))


def make_server(path: Path, host: str = "127.0.0.1", port: int = 8765,
                state: ViewState | None = None) -> tuple[ThreadingHTTPServer, ViewState]:
    """A server for PATH, bound but not yet serving (port 0 picks a free one)."""
    state = state or ViewState(Path(path))
    server_class = ThreadingHTTPServer
    if ":" in host:  # an IPv6 address
        server_class = type("ViewServer6", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6})
    server = server_class((host, port), ViewHandler)
    server.daemon_threads = True
    bound_port = server.server_address[1]
    # The Host header is always checked (DNS rebinding): loopback names, and off loopback the
    # bound address and this machine's names.
    names = {"127.0.0.1", "localhost", "[::1]"}
    if host not in LOOPBACK:
        names |= {f"[{host}]" if ":" in host else host, socket.gethostname(), socket.getfqdn()}
    allowed = frozenset(f"{name}:{bound_port}".lower() for name in names)
    handler = type("BoundViewHandler", (ViewHandler,), {"state": state, "allowed_hosts": allowed})
    server.RequestHandlerClass = handler
    return server, state


def serve(path: Path, host: str = "127.0.0.1", port: int = 8765, announce=print, input_format: str | None = None,
          split: str | None = None) -> None:
    """Serve PATH (a run folder, or data in any format `datagen.readers` reads) until interrupted;
    `announce` gets the URL and any warning lines."""
    state = ViewState(Path(path), input_format, split)  # reading the run first: its errors are not the server's
    try:
        server, state = make_server(path, host, port, state)
    except OSError as error:
        raise ConfigError(f"--host {host} --port {port}: cannot serve there ({error.strerror or error})") from None
    bound_host, bound_port = server.server_address[:2]
    state.warm_up_later()
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    announce(f"datagen view: {len(state.files.tasks) + len(state.files.rejects)} files under {state.files.root} "
             f"(read in the background: the page fills in as they are)")
    announce(f"marks go to {state.overrides}")
    announce(f"open http://{shown}:{bound_port}/  (Ctrl-C stops)")

    def when_indexed() -> None:
        state.index.wait()
        announce(f"datagen view: {len(state.index)} tasks indexed in {state.index.index_seconds:.1f} s")

    threading.Thread(target=when_indexed, name="datagen-view-announce", daemon=True).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # Ctrl-C is how a user stops it, not an interruption to resume
        announce("datagen view: stopped")
    finally:
        server.server_close()
