"""The `openai-batch` backend: OpenAI's Batch API (or a compatible provider's) as the teacher.

The Batch API answers within a 24-hour window at half the price of the same requests sent one
by one. Every method works with it unchanged, since each Teacher call (all the requests the
cache cannot answer) becomes one batch:

1. each request is one line of a JSONL file: `{"custom_id": <its request cache key>, "method":
   "POST", "url": "/v1/chat/completions", "body": <the body the openai backend sends>}`, split
   over several files past `batch_max_lines` lines or 200 MB;
2. the submission is recorded before anything is uploaded, the file uploaded (`purpose:
   batch`), recorded, the batch created with our submission id in its metadata, recorded;
3. the batches are polled every `batch_poll_s` seconds, with a progress line on stderr
   (`openai-batch: 120/400 (30%) ... status in_progress`); the output and error files are
   read and each reply handed to the Teacher, which caches it at once;
4. lines that expired (not done in the window) or failed for a passing reason (429, 5xx,
   `batch_expired`, ...) go into a new batch, up to `batch_retries` times; the rest, and those
   still failing, become failed completions carrying the provider's reason (a generator makes
   them rejects with that reason).

Resume: the records (`batches.sqlite` in the cache folder: submission id, file, batch id,
state, and the custom ids each covers) outlive the process. A run killed while it waits,
started again, finds the open batch of its pending requests and polls it instead of paying
again; replies of an adopted batch that this call did not ask for go straight into the
request cache. A run killed between upload and create looks the batch up by its metadata
before creating it, so a created batch is never created twice; a file uploaded by a run
killed before it was recorded stays at the provider unused (harmless: files are not billed
by the Batch API; delete them there if you like).

    datagen generate --method orca --backend openai-batch --model gpt-4o-mini --out orca.jsonl
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from datagen.errors import ConfigError, TeacherError
from datagen.progress import PlainProgress, clock, interval_seconds
from datagen.teachers.base import BackendCounters, Completion, Request, ResultCallback
from datagen.teachers.cache import RequestCache, cache_folder, request_key
from datagen.teachers.openai_api import (
    OPENAI_URL,
    api_key_for,
    backoff_seconds,
    chat_body,
    check_server,
    classify_error,
    completion_from_body,
    fatal_error,
    run_to_end,
)

if TYPE_CHECKING:  # a type hint only: the teacher module imports this one
    from datagen.teachers.teacher import TeacherConfig

BATCH_BACKEND = "openai-batch"
BATCH_DISCOUNT = 0.5  # what the Batch API charges, as a share of the per-request price (OpenAI's)
ENDPOINT = "/v1/chat/completions"
COMPLETION_WINDOW = "24h"
MAX_FILE_BYTES = 200_000_000  # OpenAI's limit per batch input file (200 MB)
SUBMISSION_KEY = "datagen_submission"  # the batch metadata key that names our submission
TERMINAL = {"completed", "failed", "expired", "cancelled"}
# per-line error codes worth a new batch: the request was not (or not successfully) processed
RETRYABLE_CODES = {"batch_expired", "rate_limit_exceeded", "token_limit_exceeded", "server_error",
                   "internal_error", "timeout", "service_unavailable"}
LIST_LIMIT = 1000  # batches looked through when checking whether ours was created

T = TypeVar("T")


@dataclass
class Submission:
    """One batch as recorded: `state` is uploading -> creating -> submitted -> done."""

    tag: str
    state: str
    created: float
    file_id: str | None = None
    batch_id: str | None = None
    custom_ids: list[str] = field(default_factory=list)


class BatchRecords:
    """The durable record of our batches (SQLite beside the request cache), so a rerun polls an
    open batch instead of paying for its requests again."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        # used from the thread that runs the event loop (another one when called inside a loop)
        self._db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS submissions (tag TEXT PRIMARY KEY, base_url TEXT NOT NULL,"
            " state TEXT NOT NULL, created REAL NOT NULL, file_id TEXT, batch_id TEXT)")
        self._db.execute("CREATE TABLE IF NOT EXISTS lines (custom_id TEXT NOT NULL, tag TEXT NOT NULL,"
                         " PRIMARY KEY (custom_id, tag))")

    def open_for(self, base_url: str, custom_ids: Sequence[str]) -> list[Submission]:
        """The submissions not done yet on `base_url` that cover any of `custom_ids`, oldest first."""
        tags: set[str] = set()
        ids = list(custom_ids)
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            rows = self._db.execute(
                "SELECT DISTINCT s.tag FROM submissions s JOIN lines l ON l.tag = s.tag WHERE s.state != 'done'"
                f" AND s.base_url = ? AND l.custom_id IN ({','.join('?' * len(chunk))})", (base_url, *chunk))
            tags.update(tag for (tag,) in rows)
        found = [self._load(tag) for tag in tags]
        return sorted(found, key=lambda s: s.created)

    def _load(self, tag: str) -> Submission:
        state, created, file_id, batch_id = self._db.execute(
            "SELECT state, created, file_id, batch_id FROM submissions WHERE tag = ?", (tag,)).fetchone()
        ids = [cid for (cid,) in self._db.execute("SELECT custom_id FROM lines WHERE tag = ?", (tag,))]
        return Submission(tag, state, created, file_id, batch_id, ids)

    def begin(self, base_url: str, custom_ids: Sequence[str]) -> Submission:
        submission = Submission(uuid.uuid4().hex, "uploading", time.time(), custom_ids=list(custom_ids))
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("INSERT INTO submissions VALUES (?, ?, ?, ?, NULL, NULL)",
                             (submission.tag, base_url, submission.state, submission.created))
            self._db.executemany("INSERT OR IGNORE INTO lines VALUES (?, ?)",
                                 [(cid, submission.tag) for cid in custom_ids])
        return submission

    def update(self, submission: Submission, state: str, **values: str) -> None:
        submission.state = state
        for name, value in values.items():
            setattr(submission, name, value)
        self._db.execute("UPDATE submissions SET state = ?, file_id = ?, batch_id = ? WHERE tag = ?",
                         (state, submission.file_id, submission.batch_id, submission.tag))

    def close(self) -> None:
        self._db.close()


@dataclass
class LineResult:
    """What a batch said about one line: a completion, or why not and whether to try again."""

    completion: Completion | None = None
    reason: str = ""
    retry_as: str | None = None  # the retry reason when a new batch may succeed


def line_result(entry: dict[str, Any]) -> LineResult:
    """One line of a batch's output or error file."""
    response = entry.get("response") or {}
    error = entry.get("error") or {}
    status = response.get("status_code")
    if status == 200 and not error:
        try:
            return LineResult(completion_from_body(response.get("body") or {}))
        except ValueError as unreadable:
            return LineResult(reason=f"unreadable reply: {unreadable}")
    body_error = (response.get("body") or {}).get("error") if isinstance(response.get("body"), dict) else None
    detail = error or body_error or {}
    code = detail.get("code") or detail.get("type") or (str(status) if status else "error")
    reason = f"{code}: {detail.get('message') or 'no message'}" + (f" (HTTP {status})" if status else "")
    retryable = code in RETRYABLE_CODES or (status is not None and (status in (408, 409, 429) or status >= 500))
    return LineResult(reason=reason[:500], retry_as=str(code) if retryable else None)


def missing_line(batch) -> LineResult:
    """A line in neither the output nor the error file of a finished batch."""
    if batch.status == "failed":
        errors = getattr(batch.errors, "data", None) or []
        said = "; ".join(f"{e.code}: {e.message}" + (f" (line {e.line})" if e.line else "") for e in errors[:3])
        return LineResult(reason=f"batch {batch.id} failed: {said or 'no reason given'}"[:500])
    if batch.status == "cancelled":
        return LineResult(reason=f"batch {batch.id} was cancelled before this request ran")
    return LineResult(reason=f"batch_expired: batch {batch.id} ended {batch.status} without this request",
                      retry_as="batch_expired")


class BatchAPIBackend:
    name = BATCH_BACKEND

    def __init__(self, config: TeacherConfig):
        import openai  # noqa: F401  (fail here, clearly, if the client is missing)

        if isinstance(config.base_url, list):
            raise ConfigError("teacher.base_url: the openai-batch backend takes one URL (a batch goes to one "
                               "provider, which spreads the work itself)")
        self.config = config
        self.model = config.model
        self.base_url = (config.base_url or OPENAI_URL).rstrip("/")
        self.counters = BackendCounters()
        self._api_key = api_key_for(config, self.base_url)
        self._folder = cache_folder(config.cache_dir)
        self.records = BatchRecords(self._folder / "batches.sqlite")
        self._checked = False
        self._rng = random.Random(0)

    # -- public --------------------------------------------------------------------------

    def generate(self, requests: Sequence[Request], on_result: ResultCallback) -> None:
        if any(request.prefix is not None for request in requests):  # its lines are chat bodies
            raise TeacherError("the openai-batch backend sends chat requests only; a raw prefix (Magpie) needs the "
                               "local or vllm backend, or the openai backend on a server with /v1/completions")
        run_to_end(self._generate_all(requests, on_result))

    def submitted(self, requests: Sequence[Request]) -> set[int]:
        """Positions of `requests` already in an open batch (a killed run's): paid for there,
        so the spending cap does not reserve them again (the killed run's reservation became
        spend when this run started)."""
        ids = self._custom_ids(requests)
        covered = {cid for submission in self.records.open_for(self.base_url, ids) for cid in submission.custom_ids
                   if submission.state != "uploading"}
        return {index for index, cid in enumerate(ids) if cid in covered}

    def close(self) -> None:
        self.records.close()

    # -- internals -----------------------------------------------------------------------

    def _custom_ids(self, requests: Sequence[Request]) -> list[str]:
        """Each request's cache key; a repeat within the call (only with the cache off) gets `#k`."""
        seen: dict[str, int] = {}
        ids = []
        for request in requests:
            key = request_key(self.name, self.model, request)
            seen[key] = seen.get(key, 0) + 1
            ids.append(key if seen[key] == 1 else f"{key}#{seen[key] - 1}")
        return ids

    def _client(self):
        from openai import AsyncOpenAI

        return AsyncOpenAI(base_url=self.base_url, api_key=self._api_key, max_retries=0,
                           timeout=self.config.timeout_s)

    async def _generate_all(self, requests: Sequence[Request], on_result: ResultCallback) -> None:
        ids = self._custom_ids(requests)
        index_of = {cid: index for index, cid in enumerate(ids)}
        pending = dict(index_of)  # custom id -> position, until it has its final answer
        last_reason: dict[str, str] = {}
        async with self._client() as client:
            if not self._checked:
                await check_server(client, self.base_url, self.model, self.config)
                self._checked = True
            adopted = self.records.open_for(self.base_url, list(pending))
            for attempt in range(self.config.batch_retries + 1):
                if not pending:
                    break
                submissions = [s for s in [await self._resume(client, s) for s in adopted] if s is not None]
                adopted = []
                covered = {cid for submission in submissions for cid in submission.custom_ids}
                submissions += [await self._submit(client, chunk)
                                for chunk in self._chunks([c for c in pending if c not in covered], requests, index_of)]
                for submission, batch in await self._wait(client, submissions):
                    results = await self._read(client, batch)
                    self._keep({cid: results[cid].completion for cid in submission.custom_ids
                                if cid not in index_of and cid in results and results[cid].completion is not None})
                    for cid in submission.custom_ids:
                        if cid not in pending:
                            continue
                        result = results.get(cid) or missing_line(batch)
                        if result.completion is not None:
                            on_result(pending.pop(cid), result.completion)
                        elif result.retry_as is None or attempt == self.config.batch_retries:
                            on_result(pending.pop(cid), Completion("", "error", error=self._why(result, attempt)))
                        else:
                            last_reason[cid] = result.reason
                            self.counters.count_retry(result.retry_as)
                    self.records.update(submission, "done")
            for cid, index in pending.items():  # e.g. a retry round with nothing left to submit
                on_result(index, Completion("", "error", error=last_reason.get(cid, "no result from the batch")))

    def _why(self, result: LineResult, attempt: int) -> str:
        if result.retry_as is None or attempt == 0:
            return result.reason
        return f"{result.reason} (in {attempt + 1} batches)"

    def _keep(self, replies: dict[str, Completion]) -> None:
        """Replies of an adopted batch that this call did not ask for (an earlier run did): paid
        for, so they go into the request cache for the call that asks for them."""
        replies = {cid: reply for cid, reply in replies.items() if "#" not in cid}
        if not replies or self.config.cache == "off":
            return
        cache = RequestCache(self._folder / "requests.sqlite")
        try:
            for cid, reply in replies.items():
                cache.put(cid, reply)
        finally:
            cache.close()

    def _chunks(self, fresh: list[str], requests: Sequence[Request], index_of: dict[str, int]) -> list[list[bytes]]:
        """The JSONL lines of `fresh`, split into files within the line and byte limits."""
        chunks: list[list[bytes]] = []
        size = 0
        for cid in fresh:
            line = json.dumps({"custom_id": cid, "method": "POST", "url": ENDPOINT,
                               "body": chat_body(self.model, requests[index_of[cid]])},
                              ensure_ascii=False).encode("utf-8") + b"\n"
            if not chunks or len(chunks[-1]) >= self.config.batch_max_lines or size + len(line) > MAX_FILE_BYTES:
                chunks.append([])
                size = 0
            chunks[-1].append(line)
            size += len(line)
        return chunks

    async def _submit(self, client, lines: list[bytes]) -> Submission:
        ids = [json.loads(line)["custom_id"] for line in lines]
        submission = self.records.begin(self.base_url, ids)  # before upload: see the module docstring
        uploaded = await self._call("upload the batch file", lambda _attempt: client.files.create(
            file=(f"datagen-{submission.tag}.jsonl", b"".join(lines), "application/jsonl"), purpose="batch"))
        self.records.update(submission, "creating", file_id=uploaded.id)
        return await self._create(client, submission)

    async def _resume(self, client, submission: Submission) -> Submission | None:
        """An open submission a killed run left: the batch to poll, or None when there is none
        (its requests go into a new batch; a file it uploaded stays at the provider unused)."""
        if submission.state == "creating":  # killed between upload and create: did create go through?
            found = await self._find(client, submission)
            if found is not None:
                self.records.update(submission, "submitted", batch_id=found.id)
        if submission.state == "submitted":
            batch = await self._call("poll the batch", lambda _n: client.batches.retrieve(submission.batch_id),
                                     missing_ok=True)
            if batch is None:  # deleted, or another account's: nothing to wait for
                print(f"warning: {self.name}: batch {submission.batch_id} is gone from {self.base_url}; "
                      "sending its requests again", file=sys.stderr)
            else:
                print(f"{self.name}: resuming batch {submission.batch_id} ({len(submission.custom_ids)} requests, "
                      "submitted by an earlier run): polling it, not paying again", file=sys.stderr)
                return submission
        self.records.update(submission, "done")
        return None

    async def _create(self, client, submission: Submission) -> Submission:
        """Create the batch, unless a try that seemed to fail (a timeout, a dropped connection,
        a 5xx) created it after all: that one is found by its metadata."""

        async def attempt(number: int):
            if number:
                found = await self._find(client, submission)
                if found is not None:
                    return found
            return await client.batches.create(
                input_file_id=submission.file_id, endpoint=ENDPOINT, completion_window=COMPLETION_WINDOW,
                metadata={SUBMISSION_KEY: submission.tag})

        batch = await self._call("create the batch", attempt)
        self.records.update(submission, "submitted", batch_id=batch.id)
        print(f"{self.name}: batch {batch.id} submitted ({len(submission.custom_ids)} requests, file "
              f"{submission.file_id}); if this run stops, a rerun polls it instead of paying again",
              file=sys.stderr)
        return submission

    async def _find(self, client, submission: Submission):
        """Our batch among the provider's latest, by the submission id in its metadata."""
        import openai

        seen = 0
        try:
            async for batch in client.batches.list(limit=100):
                if (batch.metadata or {}).get(SUBMISSION_KEY) == submission.tag:
                    return batch
                seen += 1
                if seen >= LIST_LIMIT or (batch.created_at and batch.created_at < submission.created - 3600):
                    break
        except openai.APIError as error:
            print(f"warning: {self.name}: cannot list the batches at {self.base_url} to see whether file "
                  f"{submission.file_id} was submitted already ({type(error).__name__}: {error}); submitting it "
                  "(check the provider for a second batch of the same file)", file=sys.stderr)
        return None

    async def _wait(self, client, submissions: list[Submission]) -> list[tuple[Submission, Any]]:
        """Poll until every batch has ended; show progress; give up after `batch_give_up_s`."""
        if not submissions:
            return []
        ended: dict[str, Any] = {}
        counted = 0
        total = sum(len(s.custom_ids) for s in submissions)
        states = {s.batch_id: "submitted" for s in submissions}
        bar = PlainProgress(self.name, total, 0, ("status",), sys.stderr, interval_seconds(),
                            detail=lambda: ", ".join(f"{b} {s}" for b, s in states.items()))
        bar.start()
        finished = False
        try:
            while len(ended) < len(submissions):
                done_now = 0
                for submission in submissions:
                    if submission.tag in ended:
                        done_now += len(submission.custom_ids)
                        continue
                    batch = await self._call("poll the batch", lambda _attempt, s=submission:
                                             client.batches.retrieve(s.batch_id))
                    states[batch.id] = batch.status
                    counts = batch.request_counts
                    done_now += (counts.completed + counts.failed) if counts else 0
                    if batch.status in TERMINAL:
                        ended[submission.tag] = batch
                    elif time.time() - (batch.created_at or submission.created) > self.config.batch_give_up_s:
                        raise TeacherError(
                            f"batch {batch.id} is still {batch.status} after "
                            f"{clock(time.time() - batch.created_at)} (teacher.batch_give_up_s "
                            f"{self.config.batch_give_up_s:g}); it stays recorded, so a rerun polls it again "
                            "(or cancel it at the provider)")
                if done_now > counted:
                    bar.advance(done_now - counted, status=", ".join(sorted(set(states.values()))))
                    counted = done_now
                if len(ended) < len(submissions):
                    await asyncio.sleep(self.config.batch_poll_s)
            finished = True
        finally:
            bar.stop(finished)
        return [(s, ended[s.tag]) for s in submissions]

    async def _read(self, client, batch) -> dict[str, LineResult]:
        """Each line's result from the batch's output and error files, by custom id."""
        results: dict[str, LineResult] = {}
        for file_id in (batch.error_file_id, batch.output_file_id):  # a reply wins over an error
            if not file_id:
                continue
            content = await self._call("read the batch results", lambda _attempt, f=file_id: client.files.content(f),
                                       missing_ok=True)
            if content is None:  # deleted at the provider: its lines count as missing, so are sent again
                print(f"warning: {self.name}: file {file_id} of batch {batch.id} is gone from {self.base_url}; "
                      "its requests go into a new batch", file=sys.stderr)
                continue
            for line in content.text.splitlines():
                if line.strip():
                    entry = json.loads(line)
                    results[entry["custom_id"]] = line_result(entry)
        return results

    async def _call(self, what: str, attempt: Callable[[int], Awaitable[T]], missing_ok: bool = False) -> T:
        """One call of the files or batches API, retried on 429, 5xx, timeouts and dropped
        connections (`max_retries`, with backoff); a fatal error or one no retry cures is one
        line (a 404 with `missing_ok` gives None)."""
        import openai

        number = 0
        while True:
            try:
                return await attempt(number)
            except Exception as error:  # noqa: BLE001 - sorted into fatal, retryable or not below
                if missing_ok and isinstance(error, openai.NotFoundError):
                    return None  # type: ignore[return-value]
                fatal = fatal_error(error, self.base_url, self.config)
                if fatal is not None:
                    raise fatal from None
                reason, wait = classify_error(error)
                if reason is None or number >= self.config.max_retries:
                    said = f"{self.base_url}: cannot {what}: {type(error).__name__}: {error}"
                    raise TeacherError(said[:500]) from None
                self.counters.count_retry(reason)
                if wait is None:
                    wait = backoff_seconds(number, self.config.backoff_base_s, self.config.backoff_max_s, self._rng)
                await asyncio.sleep(min(wait, self.config.backoff_max_s))
                number += 1
