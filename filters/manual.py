"""`manual` pass: apply keep/drop marks made by hand (in `datagen view`) from an overrides JSONL.

The overrides file is an append-only log, one mark a line; the last line for an id wins:

    {"id": "si-3f2a", "decision": "drop", "note": "answer is wrong", "time": "2025-05-01T10:02:11Z"}
    {"id": "si-9b10", "decision": "keep", "note": "", "time": "2025-05-01T10:03:40Z"}
    {"id": "si-3f2a", "decision": "clear", "note": "", "time": "2025-05-01T10:05:00Z"}

`drop` removes the task (reason `dropped by hand`, the note as detail); `keep` and `clear`
leave it in. Marks for ids not in the input are counted in stats.json, not an error (the
marks may cover several files of one run).

    datagen filter kept.jsonl --out curated.jsonl --passes manual --overrides kept.overrides.jsonl
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from datagen.errors import ConfigError
from datagen.filters.base import PassContext, PassResult, Rejection
from datagen.io import JsonlAppender, read_records
from datagen.records import Task

REASON_DROPPED_BY_HAND = "dropped by hand"
DECISIONS = ("keep", "drop", "clear")


class ManualConfig(BaseModel):
    """`filter.manual`: the overrides JSONL to apply (`--overrides FILE`)."""

    model_config = ConfigDict(extra="forbid")
    overrides: str | None = None


class Override(BaseModel):
    """One mark: keep, drop or clear (forget an earlier mark) the task `id`, with a note."""

    model_config = ConfigDict(extra="forbid")
    id: str
    decision: Literal["keep", "drop", "clear"]
    note: str = ""
    time: str | None = None


def read_overrides(path: str | Path) -> dict[str, Override]:
    """The standing mark per task id (the last line for an id wins; `clear` removes it)."""
    marks: dict[str, Override] = {}
    for mark in read_records(path, Override):
        if mark.decision == "clear":
            marks.pop(mark.id, None)
        else:
            marks[mark.id] = mark
    return marks


def append_override(path: str | Path, task_id: str, decision: str, note: str = "") -> Override:
    """Append one mark to the overrides log (flushed to disk) and return it."""
    mark = Override(id=task_id, decision=decision, note=note,
                    time=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    with JsonlAppender(path) as log:
        log.write_many([mark])
    return mark


def run_manual_pass(tasks: Sequence[Task], context: PassContext) -> PassResult:
    """Drop the tasks marked `drop` in `context.settings.overrides`; keep the rest in order."""
    if not context.settings.overrides:
        raise ConfigError("filter.manual.overrides: the manual pass needs an overrides file (--overrides FILE)")
    marks = read_overrides(context.settings.overrides)
    kept, rejected = [], []
    for task in tasks:
        mark = marks.get(task.id)
        if mark is not None and mark.decision == "drop":
            rejected.append(Rejection(task, REASON_DROPPED_BY_HAND, detail=mark.note or None))
        else:
            kept.append(task)
    seen = {task.id for task in tasks}
    context.report.update(overrides=str(context.settings.overrides), marks=len(marks),
                          marked_keep=sum(m.decision == "keep" for m in marks.values()),
                          marks_for_other_ids=sum(task_id not in seen for task_id in marks))
    return kept, rejected


def merge_manual_reports(settings: ManualConfig, reports: Sequence[dict]) -> dict:
    """The report of the pass over all of a sharded run's chunks, as one run over every task
    words it: a chunk's marks for ids it saw are its marks less its `marks_for_other_ids`, and
    task ids are unique in a run, so the marks for ids no chunk saw are the marks less their sum."""
    context = PassContext(settings=settings, teacher=lambda: None)
    run_manual_pass([], context)  # the report with no task seen
    seen = sum(report["marks"] - report["marks_for_other_ids"] for report in reports)
    context.report["marks_for_other_ids"] -= seen
    return context.report
