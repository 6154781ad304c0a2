"""The shape every filter pass shares: tasks in, (kept, rejections) out, nothing dropped silently.

Every pass has one signature, `run(tasks, context) -> (kept, rejections)`, and is
registered as a `FilterPass` (its entry point, the `filter:` section that configures it,
and how `--engine` shards it) in `datagen.filters.registry.PASSES`. The `PassContext` gives
a pass its own settings, the teacher (made on first use, shared by the run: `LazyTeacher`),
a `report` dict whose contents land in stats.json beside the pass's counts, and `memo`, for
what a pass builds once and reuses when a sharded run calls it chunk by chunk.

A *check* is a pure function `task -> reason | None`. `check_pass` turns a list of
checks into a pass that keeps a task only when every check returns None and records,
for each rejected task, the first reason. Stateful passes (dedup, novelty, the LLM
judge) return the same `PassResult` directly.

    from datagen.filters.base import check_pass
    kept, rejected = check_pass([too_short, refusal])(tasks)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from datagen.records import Task

Check = Callable[[Task], "str | None"]
Fields = Literal["instruction", "instruction+input", "task"]


@dataclass(frozen=True)
class Rejection:
    """A task a pass removed, why, and (for duplicates) which kept task it repeats."""

    task: Task
    reason: str
    detail: str | None = None
    duplicate_of: str | None = None


PassResult = tuple[list[Task], list[Rejection]]


@dataclass
class PassContext:
    """What a pass gets besides the tasks."""

    settings: Any  # the pass's own section of `filter:` (e.g. a DedupConfig)
    teacher: Callable[[], Any]  # the run's teacher, made on first call
    report: dict[str, Any] = field(default_factory=dict)  # extra figures for stats.json
    # what the pass builds once (an index of eval files ...): a sharded run hands the same
    # context to every chunk of a shard, so it is built once a shard, not once a chunk
    memo: dict[str, Any] = field(default_factory=dict)


# How `--engine datatrove|ray|slurm` runs a pass (`FilterPass.sharding`):
PER_TASK = "per-task"  # a task's fate depends on it alone: each shard streams its tasks through it in chunks
DEDUP = "dedup"  # exact-dedup / near-dedup: the sharded dedup stages (datagen.engines.sharded_dedup)
WHOLE_SET = "whole-set"  # each task against the whole set kept before it (novelty): refused sharded
# None: the entry does not say; refused sharded too, until its registry line gives one of these

# Reports: `merge_reports(settings, reports)` joins the reports of a per-task pass's chunks
# (none, if no shard had a task) into the one a single-process run writes
ReportMerge = Callable[[Any, Sequence[dict[str, Any]]], dict[str, Any]]


@dataclass(frozen=True)
class FilterPass:
    """A registered pass: its entry point, the `filter:` section (name, model) it reads (None for
    a pass without settings), how `--engine` shards it (PER_TASK, DEDUP; WHOLE_SET or None: not at all),
    whether it asks the run's teacher, and how a sharded run joins its chunks' reports (None:
    they are not written; a pass whose report matters sharded gives one)."""

    run: Callable[[Sequence[Task], PassContext], PassResult]
    section: str | None = None
    settings: type[BaseModel] | None = None
    sharding: str | None = None
    uses_teacher: bool = False
    merge_reports: ReportMerge | None = None

    def section_of(self, settings: Any) -> Any:
        """This pass's own section of a loaded `filter:` config (None for a pass without settings)."""
        return getattr(settings, self.section) if self.section else None


class LazyTeacher:
    """The run's teacher, made on first use (only passes that use one make it) and closed by the
    run. With `config.max_cost` it reserves in the run's ledger at `spend` (`KEPT.spend.json`)."""

    def __init__(self, config, spend: Path | None = None) -> None:
        self.config = config
        self.spend = spend
        self.teacher = None

    def __call__(self):
        if self.teacher is None:
            from datagen.teachers.spending import SpendingLedger, check_priced
            from datagen.teachers.teacher import make_teacher

            self.teacher = make_teacher(self.config)
            if self.config.max_cost and self.spend is not None:
                check_priced(self.config, self.teacher.backend.name, "the judge")
                self.teacher.ledger = SpendingLedger(self.spend, self.config.max_cost)
        return self.teacher


def check_pass(checks: Sequence[Check]) -> Callable[[Sequence[Task]], PassResult]:
    def run(tasks: Sequence[Task]) -> PassResult:
        kept, rejected = [], []
        for task in tasks:
            reason = next((r for check in checks if (r := check(task)) is not None), None)
            if reason is None:
                kept.append(task)
            else:
                rejected.append(Rejection(task, reason))
        return kept, rejected

    return run


def text_of(task: Task, fields: Fields = "instruction") -> str:
    """The text a comparison looks at: the instruction, plus inputs, or the whole task."""
    if fields == "instruction":
        return task.instruction
    inputs = [instance.input for instance in task.instances if instance.input]
    if fields == "instruction+input":
        return "\n".join([task.instruction, *inputs])
    outputs = [instance.output for instance in task.instances]
    return "\n".join([task.instruction, *inputs, *outputs])
