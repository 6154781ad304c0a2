"""Content-addressed request cache: a finished request is never sent (or paid for) twice.

The key is the sha256 of the backend, model, messages, sampling parameters (seed
included), sample index, and the raw prefix and reply schema when a request has them;
the value is the completion text, finish reason and token usage. Nothing else goes in,
so no credential can end up on disk. Entries are
committed one by one as results arrive (SQLite in WAL mode), so a killed run keeps
every reply it received, and a rerun or an offline replay (`cache: only`) reads them.

    cache = RequestCache(Path("~/.cache/datagen").expanduser() / "requests.sqlite")
    key = request_key("openai", "gpt-4o-mini", request)
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path

from datagen.teachers.base import Completion, Request


def cache_folder(configured: str | None) -> Path:
    """`teacher.cache_dir`, else $DATAGEN_CACHE_DIR, else ~/.cache/datagen."""
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("DATAGEN_CACHE_DIR") or Path.home() / ".cache" / "datagen")


def request_key(backend: str, model: str, request: Request) -> str:
    params = request.params
    payload = {
        "backend": backend,
        "model": model,
        "messages": [list(message) for message in request.messages],
        "sampling": {
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
            "stop": list(params.stop),
            "seed": params.seed,
        },
        "sample_index": request.sample_index,
    }
    # Only when set, so every key made before these fields existed still matches.
    if request.prefix is not None:
        payload["prefix"] = request.prefix
    if request.schema is not None:
        payload["schema"] = request.schema
    canonical = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class RequestCache:
    """A SQLite table of key -> completion, safe to share between runs."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS completions ("
            " key TEXT PRIMARY KEY, text TEXT NOT NULL, finish_reason TEXT NOT NULL,"
            " prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL)"
        )

    def get(self, key: str) -> Completion | None:
        row = self._db.execute(
            "SELECT text, finish_reason, prompt_tokens, completion_tokens"
            " FROM completions WHERE key = ?",
            (key,),
        ).fetchone()
        if row is None:
            return None
        text, finish_reason, prompt_tokens, completion_tokens = row
        return Completion(text, finish_reason, prompt_tokens, completion_tokens, cached=True)

    def put(self, key: str, completion: Completion) -> None:
        """Store a successful completion; failures are not cached so they are retried."""
        if not completion.ok:
            return
        self._db.execute(
            "INSERT OR REPLACE INTO completions VALUES (?, ?, ?, ?, ?)",
            (
                key,
                completion.text,
                completion.finish_reason,
                completion.prompt_tokens,
                completion.completion_tokens,
            ),
        )

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM completions").fetchone()[0]

    def close(self) -> None:
        self._db.close()
