"""A light index of every task and reject line under a run: what the Tasks table pages over.

Built once when `datagen view` starts. Each line is parsed with the standard library's
`json` (no pydantic: a 100,000-task file must open in about a second) and leaves behind its
byte offset and the few columns the table, the facets and the lineage links need; the full
record is read back from its offset when a task page asks for it.

    index = TaskIndex.build(discover(Path("out/distill")))
    page = index.query(search="poem", filters={"status": ["rejected"]}, sort="round", offset=0, limit=50)
    record = index.record(page["rows"][0]["row"])

Kept and rejected: rows of a task file are `kept`, rows of a `*.rejects.jsonl` are
`rejected` (with their stage, reason and `duplicate_of`). When a filter's `*.stats.json`
names the file it read, the input file's tasks that reappear in the filter's output or
rejects are shown once, as the filter left them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from datagen.io import REJECTS_SUFFIX, STATS_SUFFIX, SUMMARY_SUFFIX

# Columns with a facet: value counts shown beside the table, a click filters on them.
FACETS = ("status", "method", "operation", "round", "teacher", "stage", "reason", "classification",
          "language", "mark", "file")
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


def _teacher(lineage: dict) -> str:
    backend, model = lineage.get("teacher_backend"), lineage.get("teacher_model")
    if backend and model:
        return f"{backend}:{model}"
    return backend or model or NO_VALUE


class _Column:
    """A categorical column: one small int code per row and the values the codes stand for.

    While the index is built a column is a plain list of values (appending is the hot loop);
    `freeze` turns it into codes once."""

    def __init__(self) -> None:
        self.raw: list[str] = []
        self.values: list[str] = []
        self.code_of: dict[str, int] = {}

    def freeze(self) -> None:
        code_of = self.code_of
        codes = [code_of.setdefault(value, len(code_of)) for value in self.raw]
        self.values = list(code_of)
        self.array = np.asarray(codes, dtype=np.int32)
        del self.raw

    def set(self, row: int, value: str) -> None:
        code = self.code_of.get(value)
        if code is None:
            code = self.code_of[value] = len(self.values)
            self.values.append(value)
        self.array[row] = code


class TaskIndex:
    """Every indexed line: where it is, the table's columns, and the lineage links between rows."""

    def __init__(self, files: DataFiles) -> None:
        self.files = files
        self.file_of: list[int] = []
        self.offset: list[int] = []
        self.line: list[int] = []
        self.ids: list[str] = []
        self.instruction: list[str] = []
        self.haystack: list[str] = []  # lower-cased id, instruction, reason: what search looks in
        self.instances: list[int] = []
        self.parents: dict[int, list[str]] = {}  # row -> parent ids (rows that have some)
        self.columns = {name: _Column() for name in FACETS}
        self.row_of_id: dict[str, int] = {}
        self.rejected_rows: set[int] = set()
        self.children: dict[str, list[int]] = {}
        self.marks: dict[str, Any] = {}
        self._orders: dict[str, np.ndarray] = {}
        self._searches: dict[str, np.ndarray] = {}

    # -- building --------------------------------------------------------------------------

    @classmethod
    def build(cls, files: DataFiles, marks: dict[str, Any] | None = None) -> TaskIndex:
        index = cls(files)
        hidden = index._superseded_ids()
        sources = [(name, False) for name in files.tasks] + [(name, True) for name in files.rejects]
        for number, (name, is_rejects) in enumerate(sources):
            index._add_file(number, name, is_rejects, hidden.get(name, ()))
        index.sources = [name for name, _ in sources]
        for column in index.columns.values():
            column.freeze()
        index.apply_marks(marks or {})
        return index

    def _superseded_ids(self) -> dict[str, set[str]]:
        """Input file -> ids its filter's output or rejects show again (shown there, not twice)."""
        hidden: dict[str, set[str]] = {}
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
            ids = hidden.setdefault(source_name, set())
            for downstream in (base + ".jsonl", base + REJECTS_SUFFIX):
                if downstream in self.files.tasks or downstream in self.files.rejects:
                    ids.update(_ids_in(root / downstream))
        return hidden

    def _add_file(self, number: int, name: str, is_rejects: bool, hidden: Iterable[str]) -> None:
        # the hot loop of opening a run: plain list appends, one stdlib JSON parse a line
        hidden = set(hidden)
        decode = json.JSONDecoder().raw_decode
        col = {key: column.raw.append for key, column in self.columns.items()}
        status_of, method_of, operation_of, round_of = col["status"], col["method"], col["operation"], col["round"]
        teacher_of, stage_of, reason_of, class_of = col["teacher"], col["stage"], col["reason"], col["classification"]
        language_of, mark_of, file_of = col["language"], col["mark"], col["file"]
        ids, rejected_rows, row_of_id = self.ids, self.rejected_rows, self.row_of_id
        with (self.files.root / name).open("rb") as handle:
            offset = 0
            for line_number, raw in enumerate(handle, start=1):
                start, offset = offset, offset + len(raw)
                text = raw.decode("utf-8", "replace").strip()
                if not text:
                    continue
                try:
                    record, end = decode(text)
                except ValueError:
                    record, end = None, 0
                if not isinstance(record, dict) or end != len(text):
                    record, rejected = {"reason": "invalid line", "stage": "read", "raw": text}, True
                else:
                    rejected = is_rejects
                task = record.get("task") if rejected else record
                if not isinstance(task, dict):
                    task = {}
                task_id = task.get("id")
                task_id = str(task_id) if task_id else f"{name}:{line_number}"
                if task_id in hidden:
                    continue
                row = len(ids)
                instruction = task.get("instruction")
                shown = str(instruction) if instruction else "(raw) " + str(record.get("raw") or "")
                lineage = task.get("lineage")
                if not isinstance(lineage, dict):
                    lineage = {}
                reason = str(record.get("reason") or NO_VALUE) if rejected else NO_VALUE
                self.file_of.append(number)
                self.offset.append(start)
                self.line.append(line_number)
                ids.append(task_id)
                self.instruction.append(shown[:SHOWN_CHARS])
                self.haystack.append(f"{task_id}\n{shown}\n{reason}".lower())
                instances = task.get("instances")
                self.instances.append(len(instances) if isinstance(instances, list) else 0)
                round_number = lineage.get("round")
                status_of(STATUS_REJECTED if rejected else STATUS_KEPT)
                method_of(str(lineage.get("generator") or NO_VALUE))
                operation_of(str(lineage.get("operation") or NO_VALUE))
                round_of(NO_VALUE if round_number is None else str(round_number))
                teacher_of(_teacher(lineage))
                stage_of(str(record.get("stage") or NO_VALUE) if rejected else NO_VALUE)
                reason_of(reason)
                class_of("yes" if task.get("is_classification") else "no")
                language_of(NO_VALUE)  # filled by detect_languages()
                mark_of(NO_VALUE)
                file_of(name)
                parent_ids = lineage.get("parent_ids")
                if isinstance(parent_ids, list) and parent_ids:
                    parents = self.parents[row] = [str(p) for p in parent_ids]
                    for parent in parents:
                        self.children.setdefault(parent, []).append(row)
                if rejected:
                    rejected_rows.add(row)
                # an id in two files links to its kept row
                earlier = row_of_id.get(task_id)
                if earlier is None or (not rejected and earlier in rejected_rows):
                    row_of_id[task_id] = row

    def status(self, row: int) -> str:
        return STATUS_REJECTED if row in self.rejected_rows else STATUS_KEPT

    def value(self, name: str, row: int) -> str:
        column = self.columns[name]
        return column.values[column.array[row]]

    def detect_languages(self, detect, lock) -> None:
        """Fill the language column with `detect(instruction)`; meant for a background thread
        started after the first page is served (it takes about as long as building the index)."""
        found = [detect(text) if text and not text.startswith("(raw) ") else NO_VALUE for text in self.instruction]
        with lock:
            column = self.columns["language"]
            for row, language in enumerate(found):
                column.set(row, language)
            self._orders.pop("language", None)
            self.languages_ready = True

    def apply_marks(self, marks: dict[str, Any]) -> None:
        """Show each task's standing keep/drop mark (id -> Override) in the `mark` column."""
        self.marks = dict(marks)
        column = self.columns["mark"]
        if len(self):
            column.array[:] = column.code_of[NO_VALUE]  # every row starts unmarked
        for task_id, mark in self.marks.items():
            row = self.row_of_id.get(task_id)
            if row is not None:
                column.set(row, mark.decision)
        for row, task_id in enumerate(self.ids):  # an id shown in two files carries its mark in both
            if task_id in self.marks and row != self.row_of_id.get(task_id):
                column.set(row, self.marks[task_id].decision)
        self._orders.pop("mark", None)

    def __len__(self) -> int:
        return len(self.ids)

    # -- querying --------------------------------------------------------------------------

    def _search_mask(self, search: str) -> np.ndarray:
        needle = search.strip().lower()
        if not needle:
            return np.ones(len(self), dtype=bool)
        if needle not in self._searches:
            if len(self._searches) > 16:
                self._searches.clear()
            self._searches[needle] = np.fromiter((needle in text for text in self.haystack), dtype=bool,
                                                 count=len(self))
        return self._searches[needle]

    def _order(self, sort: str) -> np.ndarray:
        if sort not in self._orders:
            if sort == "id":
                keys: list[Any] = self.ids
            elif sort == "instruction":
                keys = [text.lower() for text in self.instruction]
            elif sort == "instances":
                keys = self.instances
            elif sort == "round":
                keys = [(value == NO_VALUE, int(value) if value.lstrip("-").isdigit() else 0, value)
                        for value in (self.columns["round"].values[c] for c in self.columns["round"].array)]
            else:
                column = self.columns[sort]
                rank = np.argsort(np.argsort(np.asarray(column.values, dtype=object), kind="stable"), kind="stable")
                return self._orders.setdefault(sort, np.argsort(rank[column.array], kind="stable"))
            self._orders[sort] = np.asarray(sorted(range(len(self)), key=keys.__getitem__), dtype=np.int64)
        return self._orders[sort]

    def query(self, search: str = "", filters: dict[str, list[str]] | None = None, sort: str | None = None,
              descending: bool = False, offset: int = 0, limit: int = 50) -> dict[str, Any]:
        """One page of rows matching `search` and every facet filter, with facet counts.

        A facet's counts apply the search and the *other* facets' filters, so a user can
        see what picking another value of the same facet would give.
        """
        filters = {name: values for name, values in (filters or {}).items() if name in FACETS and values}
        search_mask = self._search_mask(search)
        facet_masks = {}
        for name, values in filters.items():
            column = self.columns[name]
            codes = [column.code_of[v] for v in values if v in column.code_of]
            facet_masks[name] = np.isin(column.array, codes)
        mask = search_mask.copy()
        for facet_mask in facet_masks.values():
            mask &= facet_mask
        facets = {}
        for name in FACETS:
            others = search_mask.copy()
            for other, facet_mask in facet_masks.items():
                if other != name:
                    others &= facet_mask
            column = self.columns[name]
            counts = np.bincount(column.array[others], minlength=len(column.values))
            facets[name] = sorted(([column.values[c], int(n)] for c, n in enumerate(counts) if n),
                                  key=lambda pair: (-pair[1], pair[0]))
        if sort in SORTABLE:
            order = self._order(sort)
            if descending:
                order = order[::-1]
            matching = order[mask[order]]
        else:
            matching = np.flatnonzero(mask)
        offset = max(0, offset)
        page = matching[offset: offset + max(1, min(limit, 500))]
        return {"total": int(mask.sum()), "all": len(self), "offset": offset, "rows": [self.row(int(r)) for r in page],
                "facets": facets, "languages_ready": getattr(self, "languages_ready", False)}

    def row(self, row: int) -> dict[str, Any]:
        """The table's columns for one row."""
        return {"row": row, "id": self.ids[row], "instruction": self.instruction[row],
                "instances": self.instances[row], "line": self.line[row],
                **{name: self.value(name, row) for name in FACETS}}

    def record(self, row: int) -> dict[str, Any]:
        """The full record of a row, read back from its file."""
        with (self.files.root / self.sources[self.file_of[row]]).open("rb") as handle:
            handle.seek(self.offset[row])
            raw = handle.readline()
        try:
            value = json.loads(raw)
        except ValueError:
            value = None
        return value if isinstance(value, dict) else {"reason": "invalid line", "stage": "read",
                                                      "raw": raw.decode("utf-8", "replace")}


def _ids_in(path: Path) -> set[str]:
    ids = set()
    with path.open("rb") as handle:
        for raw in handle:
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if isinstance(record, dict):
                task = record.get("task", record) if "reason" in record else record
                if isinstance(task, dict) and task.get("id"):
                    ids.add(str(task["id"]))
    return ids
