"""A light index of every task and reject line under a run: what the Tasks table pages over.

Read in a background thread when `datagen view` starts (`TaskIndex.start`), a batch of lines
at a time, so the first page comes from the first rows while the rest is read. Each line is
parsed with the standard library's `json` (no pydantic) and leaves behind its byte offset and
the few columns the table, the facets and the lineage links need; the full record is read
back from its offset when a task page asks for it. A big file's parsed rows are cached beside
it (`index_cache`), so opening it again skips the parse.

    index = TaskIndex.build(discover(Path("out/distill")))   # or TaskIndex(files).start() and index.wait()
    page = index.query(search="poem", filters={"status": ["rejected"]}, sort="round", offset=0, limit=50)
    record = index.record(page["rows"][0]["row"])

Kept and rejected: rows of a task file are `kept`, rows of a `*.rejects.jsonl` are
`rejected` (with their stage, reason and `duplicate_of`). When a filter's `*.stats.json`
names the file it read, the input file's tasks that reappear in the filter's output or
rejects are shown once, as the filter left them.
"""

from __future__ import annotations

import gc
import json
import os
import threading
import time
from array import array
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from datagen.io import REJECTS_SUFFIX, STATS_SUFFIX, SUMMARY_SUFFIX
from datagen.rejects import INVALID_LINE, STAGE_READ
from datagen.view.index_cache import CACHE_MIN_BYTES, load_rows, save_rows

# The judge's tags a record may carry in its `tags` column (Magpie), each a facet of its own.
TAG_FACETS = ("task_category", "difficulty", "quality")
# Columns with a facet: value counts shown beside the table, a click filters on them.
FACETS = ("status", "method", "operation", "round", "teacher", "stage", "reason", "classification",
          "language", "mark", "file", *TAG_FACETS)
SORTABLE = ("id", "instruction", "instances", *FACETS)
STATUS_KEPT, STATUS_REJECTED = "kept", "rejected"
NO_VALUE = "-"  # a facet value for "not set" (e.g. the stage of a kept task)
SHOWN_CHARS = 240  # instruction characters sent per table row


@dataclass
class DataFiles:
    """What `discover` found under PATH, relative paths throughout."""

    root: Path
    tasks: list[str] = field(default_factory=list)  # task JSONL files
    rejects: list[str] = field(default_factory=list)  # *.rejects.jsonl
    summaries: list[str] = field(default_factory=list)  # *.summary.json (generate)
    stats: list[str] = field(default_factory=list)  # *.stats.json (filter)
    plots: list[str] = field(default_factory=list)  # card/*.png (export)
    reports: list[str] = field(default_factory=list)  # eval report.json
    overrides: list[str] = field(default_factory=list)  # keep/drop marks

    def servable(self) -> set[str]:
        return {*self.tasks, *self.rejects, *self.summaries, *self.stats, *self.plots, *self.reports}


def _first_record(path: Path) -> dict | None:
    with path.open("rb") as handle:
        for raw in handle:
            if raw.strip():
                try:
                    value = json.loads(raw)
                except ValueError:
                    return None
                return value if isinstance(value, dict) else None
    return None


def inside(root: Path, path: Path) -> bool:
    """Whether `path`, with every symlink resolved, lies under `root` (itself resolved)."""
    try:
        return Path(os.path.realpath(path)).is_relative_to(root)
    except (OSError, ValueError):
        return False


def discover(path: Path) -> DataFiles:
    """The data files of a run folder (walked, hidden folders skipped) or of one task JSONL and its sidecars."""
    path = Path(path)
    explicit = None
    if path.is_file():
        root = Path(os.path.realpath(path.parent))
        explicit = Path(os.path.realpath(path)).name
        stem = path.name.removesuffix(".jsonl")
        names = [path.name] + [stem + s for s in (REJECTS_SUFFIX, SUMMARY_SUFFIX, STATS_SUFFIX)]
        candidates = [root / name for name in names if (root / name).is_file()]
    else:
        root = Path(os.path.realpath(path))
        candidates = []
        for folder, subfolders, files in os.walk(root):  # symlinked folders are not followed
            subfolders[:] = sorted(s for s in subfolders if not s.startswith("."))
            candidates += [Path(folder) / name for name in sorted(files) if not name.startswith(".")]
    found = DataFiles(root)
    for candidate in candidates:
        if not inside(root, candidate):
            continue  # a symlink leading out of PATH
        relative = candidate.relative_to(root).as_posix()
        name = candidate.name
        if name.endswith(".overrides.jsonl") or name == "overrides.jsonl":
            found.overrides.append(relative)
        elif name.endswith(REJECTS_SUFFIX):
            found.rejects.append(relative)
        elif name.endswith(".jsonl"):
            first = _first_record(candidate)
            if name == explicit or (first is not None and "instruction" in first):
                found.tasks.append(relative)
        elif name.endswith(SUMMARY_SUFFIX):
            found.summaries.append(relative)
        elif name.endswith(STATS_SUFFIX):
            found.stats.append(relative)
        elif name.endswith(".png") and candidate.parent.name == "card":
            found.plots.append(relative)
        elif name == "report.json":
            found.reports.append(relative)
    return found


def _teacher(backend: Any, model: Any) -> str:
    if backend and model:
        return f"{backend}:{model}"
    return str(backend or model or NO_VALUE)


# The facets a row's own line fixes, in the order of a row's interned tuple (`TaskIndex._combos`);
# the language and mark facets are set later (detection, curation), one code a row.
PARSED_FACETS = ("status", "method", "operation", "round", "teacher", "stage", "reason", "classification", "file",
                 *TAG_FACETS)
SET_LATER = ("language", "mark")
FIRST_BATCH_LINES = 200  # published at once: the first page must not wait for the rest of the file
BATCH_LINES = 5000  # then rows are published this many lines at a time
_BLANK = object()  # what a blank line parses to
_NO_LINEAGE: dict = {}


class _Column:
    """A categorical column's values and the small int code standing for each (codes only grow)."""

    def __init__(self) -> None:
        self.values: list[str] = []
        self.code_of: dict[str, int] = {}

    def code(self, value: str) -> int:
        code = self.code_of.get(value)
        if code is None:
            code = self.code_of[value] = len(self.values)
            self.values.append(value)
        return code


@dataclass
class _Cursor:
    """How far one file has been read: the next byte and line number, and which file it was."""

    number: int
    name: str
    is_rejects: bool
    offset: int = 0
    line: int = 1
    identity: tuple[int, int] | None = None  # (st_dev, st_ino) when first opened
    hidden: set[str] | None = None  # ids a filter's output shows instead (None: not worked out yet)
    torn: int = 0  # bytes of an unfinished last line: no newline and not a whole record yet


@dataclass
class _Batch:
    """Rows parsed from consecutive lines of one file, before they are published to queries."""

    end: int = 0  # byte offset after the last line consumed
    next_line: int = 1
    torn: int = 0
    offsets: list[int] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # the whole instruction (or "(raw) " and the raw text)
    instances: list[int] = field(default_factory=list)
    combos: list[int] = field(default_factory=list)  # codes into TaskIndex._combos
    rejected: list[bool] = field(default_factory=list)
    parents: list[tuple[int, list]] = field(default_factory=list)  # (position in batch, parent ids as parsed)

    def without(self, hidden: set[str]) -> _Batch:
        """The rows whose id is not in `hidden` (a filter's output shows those instead)."""
        keep = [position for position, task_id in enumerate(self.ids) if task_id not in hidden]
        if len(keep) == len(self.ids):
            return self
        new_position = {old: new for new, old in enumerate(keep)}
        kept = _Batch(self.end, self.next_line, self.torn,
                      parents=[(new_position[p], ids) for p, ids in self.parents if p in new_position])
        for name in ("offsets", "lines", "ids", "texts", "instances", "combos", "rejected"):
            column = getattr(self, name)
            setattr(kept, name, [column[position] for position in keep])
        return kept

    def rows_from(self, start: int) -> _Batch:
        """This batch from its row `start` on."""
        tail = _Batch(self.end, self.next_line, self.torn,
                      parents=[(position - start, ids) for position, ids in self.parents if position >= start])
        for name in ("offsets", "lines", "ids", "texts", "instances", "combos", "rejected"):
            setattr(tail, name, getattr(self, name)[start:])
        return tail

    def extend(self, other: _Batch) -> None:
        """Append `other`'s rows, the lines that follow this batch's (a file's batches into one, for the cache)."""
        shift = len(self.ids)
        for name in ("offsets", "lines", "ids", "texts", "instances", "combos", "rejected"):
            getattr(self, name).extend(getattr(other, name))
        self.parents += [(position + shift, ids) for position, ids in other.parents]
        self.end, self.next_line, self.torn = other.end, other.next_line, other.torn


def _lenient(raw: bytes) -> Any:
    """A line the fast parse refused: blank, bad UTF-8 inside strings (replaced), or not JSON (None)."""
    text = raw.decode("utf-8", "replace").strip()
    if not text:
        return _BLANK
    try:
        value, end = json.JSONDecoder().raw_decode(text)
    except ValueError:
        return None
    return value if end == len(text) else None


def _normal_combo(key: tuple) -> tuple[str, ...]:
    """A row's facet values as the table shows them, from the raw values `_parse` keyed on."""
    status, generator, operation, round_number, backend, model, stage, reason, classification, name, *tags = key
    return (status, str(generator or NO_VALUE), str(operation or NO_VALUE),
            NO_VALUE if round_number is None else str(round_number), _teacher(backend, model),
            stage, reason, "yes" if classification else "no", name, *(str(tag or NO_VALUE) for tag in tags))


class TaskIndex:
    """Every indexed line: where it is, the table's columns, and the lineage links between rows.

    Rows are only ever appended, so a row number stays valid. `start()` indexes in a
    background thread and publishes rows a batch at a time under `lock`: a query answers from
    the rows so far (`indexing` says whether more are coming); `build()` indexes at once.
    A file's unfinished last line (no newline, not a whole record: still being written) is left
    until it is complete; `refresh()` indexes what was appended to a file since it was read.
    """

    def __init__(self, files: DataFiles, marks: dict[str, Any] | None = None) -> None:
        self.files = files
        self.lock = threading.RLock()
        self._changed = threading.Condition(self.lock)
        self.file_of: list[int] = []
        self.offset: list[int] = []
        self.line: list[int] = []
        self.ids: list[str] = []
        self.instruction: list[str] = []
        self.haystack: list[str] = []  # lower-cased id, instruction, reason: what search looks in
        self.instances: list[int] = []
        self._parents: dict[int, list] = {}  # row -> parent ids as parsed (rows that have some)
        self.columns = {name: _Column() for name in FACETS}
        self.row_of_id: dict[str, int] = {}
        self.rejected_rows: set[int] = set()
        self._children: dict[str, list[int]] = {}  # parent id -> rows, filled on first use (`children`)
        self._children_seen = 0  # how many of _parents' rows _children holds
        self.marks: dict[str, Any] = dict(marks or {})
        self.changed_files: set[str] = set()  # shrunk or replaced since read: the index no longer matches
        self.languages_ready = False
        # a row's parsed facets, interned: row -> code into _combos (the builder's), _combo_table (published)
        self._combo = array("i")
        self._combo_of: dict[tuple, int] = {}
        self._combos: list[tuple[str, ...]] = []
        self._combo_table: list[list[int]] = []
        self._later = {name: np.zeros(0, dtype=np.int32) for name in SET_LATER}
        for name in SET_LATER:
            self.columns[name].code(NO_VALUE)  # code 0: not set
        self._snapshot: tuple[int, dict[str, np.ndarray]] = (-1, {})
        self._orders: dict[str, tuple[int, np.ndarray]] = {}
        self._searches: dict[str, np.ndarray] = {}
        self._detect: Callable[[str], str] | None = None
        self._languages_done = 0
        self._running = False
        self._thread: threading.Thread | None = None
        self._to_cache: list[tuple[Path, os.stat_result, _Batch]] = []  # files read whole, to cache
        self.index_seconds: float | None = None  # how long the first full pass took
        self._cursors = self._plan()
        self.sources = [cursor.name for cursor in self._cursors]

    # -- building --------------------------------------------------------------------------

    @classmethod
    def build(cls, files: DataFiles, marks: dict[str, Any] | None = None) -> TaskIndex:
        """The whole index, read now in this thread."""
        index = cls(files, marks)
        with index.lock:
            index._running = True
        index._index_all()
        return index

    def start(self) -> threading.Thread:
        """Index in a background thread (or return the one already at it)."""
        with self.lock:
            if self._running and self._thread is not None:
                return self._thread
            self._running = True
            self._thread = threading.Thread(target=self._index_all, name="datagen-view-index", daemon=True)
            self._thread.start()
            return self._thread

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until no indexing is going on; whether that is so."""
        with self.lock:
            return self._changed.wait_for(lambda: not self._running, timeout)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the background thread to end: indexing, then the cache files it writes."""
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_for_rows(self, rows: int, timeout: float) -> None:
        """Wait until `rows` rows are indexed or indexing stops (a first page wants its rows)."""
        with self.lock:
            self._changed.wait_for(lambda: len(self.ids) >= rows or not self._running, timeout)

    @property
    def indexing(self) -> bool:
        return self._running

    def refresh(self) -> bool:
        """Start indexing lines appended to a file since it was read; whether indexing is going on."""
        with self.lock:
            if self._running:
                return True
            grown = False
            for cursor in self._cursors:
                try:
                    stat = os.stat(self.files.root / cursor.name)
                except OSError:
                    self.changed_files.add(cursor.name)
                    continue
                if (stat.st_dev, stat.st_ino) != cursor.identity or stat.st_size < cursor.offset:
                    self.changed_files.add(cursor.name)
                elif stat.st_size > cursor.offset + cursor.torn:
                    grown = True
            if grown:
                self.start()
            return grown

    def _plan(self) -> list[_Cursor]:
        """The files in the order they are read: a filter's output and rejects before its input,
        so the input's tasks that reappear there are known (and skipped) when the input is read."""
        sources = [(name, False) for name in self.files.tasks] + [(name, True) for name in self.files.rejects]
        self._downstream = self._downstream_files()
        depth = dict.fromkeys((name for name, _ in sources), 0)
        for _ in sources:  # longest chain of filters, at most one step per file (a loop stops)
            moved = False
            for source, names in self._downstream.items():
                want = max(depth[name] + 1 for name in names)
                if want > depth[source]:
                    depth[source], moved = want, True
            if not moved:
                break
        order = sorted(range(len(sources)), key=lambda i: (depth[sources[i][0]], i))
        return [_Cursor(number, *sources[i]) for number, i in enumerate(order)]

    def _downstream_files(self) -> dict[str, list[str]]:
        """Input file -> the indexed output and rejects of a filter that read it (from `*.stats.json`)."""
        downstream: dict[str, list[str]] = {}
        root = self.files.root
        for stats_name in self.files.stats:
            try:
                source = json.loads((root / stats_name).read_text(encoding="utf-8")).get("input")
            except (OSError, ValueError, AttributeError):
                continue
            if not isinstance(source, str):
                continue
            source_path = Path(source) if Path(source).is_absolute() else (root / stats_name).parent / source
            try:
                source_name = Path(os.path.realpath(source_path)).relative_to(root).as_posix()
            except ValueError:
                continue
            if source_name not in self.files.tasks:
                continue
            base = stats_name.removesuffix(STATS_SUFFIX)
            names = [name for name in (base + ".jsonl", base + REJECTS_SUFFIX)
                     if name != source_name and (name in self.files.tasks or name in self.files.rejects)]
            if names:
                downstream.setdefault(source_name, []).extend(names)
        return downstream

    def _superseded(self, name: str) -> set[str]:
        """Ids of `name`'s tasks that a filter's output or rejects (already read) show again."""
        numbers = {cursor.number for cursor in self._cursors if cursor.name in self._downstream.get(name, ())}
        if not numbers:
            return set()
        with self.lock:
            return {task_id for number, task_id in zip(self.file_of, self.ids) if number in numbers}

    def _index_all(self) -> None:
        started = time.perf_counter()
        # Parsing makes ~10 containers a line and keeps them all: the cyclic collector would
        # walk every row read so far again and again (a quarter of the time on 100k tasks).
        # It is paused while the files are read and restored as it was.
        collecting = gc.isenabled()
        gc.disable()
        try:
            for cursor in self._cursors:
                self._read_more(cursor)
        finally:
            if collecting:
                gc.enable()
            with self.lock:
                self._running = False
                if self.index_seconds is None:
                    self.index_seconds = time.perf_counter() - started
                self._changed.notify_all()
        while self._to_cache:  # after the index is complete: queries need not wait for these
            path, stat, whole = self._to_cache.pop()
            save_rows(path, stat, self._cache_rows(whole))

    def _read_more(self, cursor: _Cursor) -> None:
        """Index `cursor`'s file from where it was left to its last complete line."""
        try:
            handle = (self.files.root / cursor.name).open("rb")
        except OSError:
            with self.lock:
                self.changed_files.add(cursor.name)
            return
        with handle:
            stat = os.fstat(handle.fileno())
            identity = (stat.st_dev, stat.st_ino)
            if cursor.identity is None:
                cursor.identity = identity
            elif identity != cursor.identity or stat.st_size < cursor.offset:
                with self.lock:
                    self.changed_files.add(cursor.name)
                return
            if cursor.hidden is None:
                cursor.hidden = self._superseded(cursor.name)
            whole = _Batch() if cursor.offset == 0 and stat.st_size >= CACHE_MIN_BYTES else None  # to cache
            handle.seek(cursor.offset)
            limit = FIRST_BATCH_LINES if not self.ids else BATCH_LINES
            while lines := list(islice(handle, limit)):
                batch = self._parse(cursor, lines)
                self._publish_visible(cursor, batch)
                if whole is not None:
                    whole.extend(batch)
                    if len(whole.ids) == len(batch.ids) and not batch.torn:  # first batch out: the rest from a cache?
                        cached = load_rows(self.files.root / cursor.name, stat, len(PARSED_FACETS))
                        if cached is not None:
                            self._publish_visible(cursor, self._from_cache(cached, cursor.offset))
                            handle.seek(cursor.offset)
                            whole = None
                if batch.torn:
                    break
                limit = BATCH_LINES
            if whole is not None and whole.end + whole.torn == stat.st_size:
                self._to_cache.append((self.files.root / cursor.name, stat, whole))

    def _publish_visible(self, cursor: _Cursor, batch: _Batch) -> None:
        if cursor.hidden:
            batch = batch.without(cursor.hidden)
        with self.lock:
            self._publish(cursor, batch)

    def _from_cache(self, rows: dict[str, Any], offset: int) -> _Batch:
        """The cached rows from byte `offset` on (the lines before it are already indexed)."""
        codes = []
        for combo in rows["combo_values"]:
            key = tuple(combo)
            code = self._combo_of.get(key)
            if code is None:
                code = self._combo_of[key] = len(self._combos)
                self._combos.append(key)
            codes.append(code)
        batch = _Batch(rows["end"], rows["next_line"], rows["torn"], offsets=rows["offsets"], lines=rows["lines"],
                       ids=rows["ids"], texts=rows["texts"], instances=rows["instances"],
                       combos=[codes[code] for code in rows["combos"]], rejected=rows["rejected"],
                       parents=[(position, ids) for position, ids in rows["parents"]])
        return batch.rows_from(bisect_left(batch.offsets, offset))

    def _cache_rows(self, batch: _Batch) -> dict[str, Any]:
        """A whole file's parsed rows as `index_cache.save_rows` stores them."""
        local: dict[int, int] = {}
        combos = [local.setdefault(code, len(local)) for code in batch.combos]
        return {"offsets": batch.offsets, "lines": batch.lines, "ids": batch.ids, "texts": batch.texts,
                "instances": batch.instances, "combos": combos, "rejected": batch.rejected,
                "combo_values": [list(self._combos[code]) for code in local],
                "parents": [[position, ids] for position, ids in batch.parents],
                "end": batch.end, "next_line": batch.next_line, "torn": batch.torn}

    def _parse(self, cursor: _Cursor, lines: list[bytes]) -> _Batch:
        # the hot loop of opening a run: one stdlib JSON parse a line, plain list appends, and
        # the row's facet values looked up as one tuple (few distinct ones in a run)
        loads = json.loads
        name, is_rejects = cursor.name, cursor.is_rejects
        combo_of, combos = self._combo_of, self._combos
        batch = _Batch()
        offsets, line_numbers, ids, texts = batch.offsets, batch.lines, batch.ids, batch.texts
        instances_of, combo_codes, rejected_flags = batch.instances, batch.combos, batch.rejected
        offset, line_number = cursor.offset, cursor.line
        for raw in lines:
            try:
                record = loads(raw)
            except ValueError:
                record = _lenient(raw)
            this_line = line_number
            if raw[-1:] == b"\n":
                line_number += 1
            elif record is not _BLANK and not isinstance(record, dict):
                batch.torn = len(raw)  # still being written: read again once it is complete
                break
            start, offset = offset, offset + len(raw)
            if record is _BLANK:
                continue
            if isinstance(record, dict):
                rejected = is_rejects
            else:
                text = raw.decode("utf-8", "replace").strip()
                record, rejected = {"reason": INVALID_LINE, "stage": STAGE_READ, "raw": text}, True
            task = record.get("task") if rejected else record
            if not isinstance(task, dict):
                task = _NO_LINEAGE
            task_id = task.get("id")
            task_id = str(task_id) if task_id else f"{name}:{this_line}"
            instruction = task.get("instruction")
            shown = str(instruction) if instruction else "(raw) " + str(record.get("raw") or "")
            lineage = task.get("lineage")
            if not isinstance(lineage, dict):
                lineage = _NO_LINEAGE
            if rejected:
                reason, stage = str(record.get("reason") or NO_VALUE), str(record.get("stage") or NO_VALUE)
            else:
                reason = stage = NO_VALUE
            tags = task.get("tags")
            if not isinstance(tags, dict):
                tags = _NO_LINEAGE
            key = (STATUS_REJECTED if rejected else STATUS_KEPT, lineage.get("generator"), lineage.get("operation"),
                   lineage.get("round"), lineage.get("teacher_backend"), lineage.get("teacher_model"), stage, reason,
                   task.get("is_classification"), name, *(tags.get(facet) for facet in TAG_FACETS))
            try:
                code = combo_of.get(key)
            except TypeError:  # an unhashable value (a list where a string belongs): key on its text
                key = _normal_combo(key)
                code = combo_of.get(key)
            if code is None:
                code = combo_of[key] = len(combos)
                combos.append(_normal_combo(key))
            offsets.append(start)
            line_numbers.append(this_line)
            ids.append(task_id)
            texts.append(shown)
            instances = task.get("instances")
            instances_of.append(len(instances) if isinstance(instances, list) else 0)
            combo_codes.append(code)
            rejected_flags.append(rejected)
            parent_ids = lineage.get("parent_ids")
            if parent_ids and isinstance(parent_ids, list):  # kept as parsed: `parent_ids()` makes them text
                batch.parents.append((len(ids) - 1, parent_ids))
        batch.end, batch.next_line = offset, line_number
        return batch

    def _publish(self, cursor: _Cursor, batch: _Batch) -> None:
        """Make a parsed batch's rows visible to queries (called with the lock held)."""
        base, count = len(self.ids), len(batch.ids)
        for combo in self._combos[len(self._combo_table):]:
            self._combo_table.append([self.columns[name].code(value) for name, value in zip(PARSED_FACETS, combo)])
        self.file_of.extend([cursor.number] * count)
        self.offset.extend(batch.offsets)
        self.line.extend(batch.lines)
        self.ids.extend(batch.ids)
        self.instruction.extend([text[:SHOWN_CHARS] for text in batch.texts])
        reason_of = PARSED_FACETS.index("reason")
        combos = self._combos
        self.haystack.extend([f"{task_id}\n{text}\n{combos[code][reason_of]}".lower()
                              for task_id, text, code in zip(batch.ids, batch.texts, batch.combos)])
        self.instances.extend(batch.instances)
        self._combo.extend(batch.combos)
        for name in SET_LATER:
            self._later[name] = np.concatenate([self._later[name], np.zeros(count, dtype=np.int32)])
        for position, parents in batch.parents:
            self._parents[base + position] = parents
        row_of_id, rejected_rows, first_row_of = self.row_of_id, self.rejected_rows, self.row_of_id.setdefault
        for row, task_id, rejected in zip(range(base, base + count), batch.ids, batch.rejected):
            if rejected:
                rejected_rows.add(row)
            earlier = first_row_of(task_id, row)
            if earlier != row and not rejected and earlier in rejected_rows:
                row_of_id[task_id] = row  # an id in two files links to its kept row
        if self.marks:
            for row, task_id in enumerate(batch.ids, start=base):
                if task_id in self.marks:
                    self._later["mark"][row] = self.columns["mark"].code(self.marks[task_id].decision)
        if self._detect is not None:  # rows appended after detection ran: detect theirs now
            self._set_languages(base, [self._detect_one(text) for text in self.instruction[base:]])
        cursor.offset, cursor.line, cursor.torn = batch.end, batch.next_line, batch.torn
        self._changed.notify_all()

    # -- columns set after indexing --------------------------------------------------------

    def _detect_one(self, text: str) -> str:
        return self._detect(text) if text and not text.startswith("(raw) ") else NO_VALUE

    def _set_languages(self, start: int, languages: list[str]) -> None:
        column, codes = self.columns["language"], self._later["language"]
        for row, language in enumerate(languages, start=start):
            codes[row] = column.code(language)
        self._languages_done = max(self._languages_done, start + len(languages))
        self._orders.pop("language", None)

    def detect_languages(self, detect: Callable[[str], str]) -> None:
        """Fill the language column with `detect(instruction)`; meant for a background thread
        started once the index is built (it takes about as long as building it). Rows appended
        later get theirs as they are indexed."""
        while True:
            with self.lock:
                start, end = self._languages_done, len(self.ids)
                if start >= end:
                    self._detect, self.languages_ready = detect, True
                    return
                texts = self.instruction[start:end]
            found = [detect(text) if text and not text.startswith("(raw) ") else NO_VALUE for text in texts]
            with self.lock:
                self._set_languages(start, found)

    def apply_marks(self, marks: dict[str, Any]) -> None:
        """Show each task's standing keep/drop mark (id -> Override) in the `mark` column."""
        with self.lock:
            self.marks = dict(marks)
            column, codes = self.columns["mark"], self._later["mark"]
            codes[:] = 0  # NO_VALUE: every row starts unmarked
            if self.marks:
                for row, task_id in enumerate(self.ids):  # an id shown in two files carries its mark in both
                    mark = self.marks.get(task_id)
                    if mark is not None:
                        codes[row] = column.code(mark.decision)
            self._orders.pop("mark", None)

    # -- reading rows ----------------------------------------------------------------------

    def status(self, row: int) -> str:
        return STATUS_REJECTED if row in self.rejected_rows else STATUS_KEPT

    def value(self, name: str, row: int) -> str:
        if name in self._later:
            return self.columns[name].values[self._later[name][row]]
        return self._combos[self._combo[row]][PARSED_FACETS.index(name)]

    def parent_ids(self, row: int) -> list[str]:
        return [str(parent) for parent in self._parents.get(row, ())]

    def children(self, task_id: str) -> list[int]:
        """The rows whose `lineage.parent_ids` name `task_id`."""
        with self.lock:
            if self._children_seen < len(self._parents):  # rows indexed since the map was last brought up to date
                for row, parents in islice(self._parents.items(), self._children_seen, None):
                    for parent in parents:
                        self._children.setdefault(str(parent), []).append(row)
                self._children_seen = len(self._parents)
            return list(self._children.get(task_id, ()))

    def __len__(self) -> int:
        return len(self.ids)

    def progress(self) -> dict[str, Any]:
        """How far indexing is: whether it goes on, files with an unfinished last line, files changed since read."""
        with self.lock:
            return {"indexing": self._running, "languages_ready": self.languages_ready,
                    "unfinished_lines": sorted(c.name for c in self._cursors if c.torn),
                    "changed_files": sorted(self.changed_files), "index_seconds": self.index_seconds}

    # -- querying (with the lock held: rows may be arriving) -------------------------------

    def _arrays(self) -> dict[str, np.ndarray]:
        """Every facet column as one code a row, for the rows published so far."""
        rows = len(self.ids)
        if self._snapshot[0] != rows:
            combo = np.array(self._combo, dtype=np.int32)
            table = np.asarray(self._combo_table, dtype=np.int32).reshape(-1, len(PARSED_FACETS))
            arrays = {name: table[combo, position] for position, name in enumerate(PARSED_FACETS)}
            self._snapshot = (rows, arrays)
        arrays = dict(self._snapshot[1])
        arrays.update(self._later)
        return arrays

    def _search_mask(self, search: str) -> np.ndarray:
        rows = len(self.ids)
        needle = search.strip().lower()
        if not needle:
            return np.ones(rows, dtype=bool)
        known = self._searches.get(needle)
        if known is None or len(known) < rows:  # rows never move: only new ones need a look
            if known is None and len(self._searches) > 16:
                self._searches.clear()
            done = 0 if known is None else len(known)
            fresh = np.fromiter((needle in text for text in self.haystack[done:rows]), dtype=bool, count=rows - done)
            self._searches[needle] = known = fresh if known is None else np.concatenate([known, fresh])
        return known

    def _order(self, sort: str, arrays: dict[str, np.ndarray]) -> np.ndarray:
        rows = len(self.ids)
        known = self._orders.get(sort)
        if known is not None and known[0] == rows:
            return known[1]
        if sort in ("id", "instruction", "instances", "round"):
            if sort == "id":
                keys: list[Any] = self.ids
            elif sort == "instruction":
                keys = [text.lower() for text in self.instruction]
            elif sort == "instances":
                keys = self.instances
            else:
                values = self.columns["round"].values
                keys = [(value == NO_VALUE, int(value) if value.lstrip("-").isdigit() else 0, value)
                        for value in (values[code] for code in arrays["round"])]
            order = np.asarray(sorted(range(rows), key=keys.__getitem__), dtype=np.int64)
        else:
            column = self.columns[sort]
            rank = np.argsort(np.argsort(np.asarray(column.values, dtype=object), kind="stable"), kind="stable")
            order = np.argsort(rank[arrays[sort]], kind="stable")
        self._orders[sort] = (rows, order)
        return order

    def query(self, search: str = "", filters: dict[str, list[str]] | None = None, sort: str | None = None,
              descending: bool = False, offset: int = 0, limit: int = 50) -> dict[str, Any]:
        """One page of rows matching `search` and every facet filter, with facet counts.

        A facet's counts apply the search and the *other* facets' filters, so a user can
        see what picking another value of the same facet would give. While indexing goes
        on, everything is over the rows indexed so far (`indexing` is true).
        """
        with self.lock:
            arrays = self._arrays()
            filters = {name: values for name, values in (filters or {}).items() if name in FACETS and values}
            search_mask = self._search_mask(search)
            facet_masks = {}
            for name, values in filters.items():
                column = self.columns[name]
                codes = [column.code_of[v] for v in values if v in column.code_of]
                facet_masks[name] = np.isin(arrays[name], codes)
            mask = search_mask.copy()
            for facet_mask in facet_masks.values():
                mask &= facet_mask
            facets = {}
            for name in FACETS:
                others = search_mask.copy()
                for other, facet_mask in facet_masks.items():
                    if other != name:
                        others &= facet_mask
                values = self.columns[name].values
                counts = np.bincount(arrays[name][others], minlength=len(values))
                facets[name] = sorted(([values[c], int(n)] for c, n in enumerate(counts) if n),
                                      key=lambda pair: (-pair[1], pair[0]))
            if sort in SORTABLE:
                order = self._order(sort, arrays)
                if descending:
                    order = order[::-1]
                matching = order[mask[order]]
            else:
                matching = np.flatnonzero(mask)
            offset = max(0, offset)
            page = matching[offset: offset + max(1, min(limit, 500))]
            return {"total": int(mask.sum()), "all": len(self), "offset": offset,
                    "rows": [self.row(int(r)) for r in page], "facets": facets, **self.progress()}

    def row(self, row: int) -> dict[str, Any]:
        """The table's columns for one row."""
        combo = self._combos[self._combo[row]]
        return {"row": row, "id": self.ids[row], "instruction": self.instruction[row],
                "instances": self.instances[row], "line": self.line[row],
                **dict(zip(PARSED_FACETS, combo)),
                **{name: self.columns[name].values[codes[row]] for name, codes in self._later.items()}}

    def record(self, row: int) -> dict[str, Any]:
        """The full record of a row, read back from its file."""
        with (self.files.root / self.sources[self.file_of[row]]).open("rb") as handle:
            handle.seek(self.offset[row])
            raw = handle.readline()
        try:
            value = json.loads(raw)
        except ValueError:
            value = None
        return value if isinstance(value, dict) else {"reason": INVALID_LINE, "stage": STAGE_READ,
                                                      "raw": raw.decode("utf-8", "replace")}
