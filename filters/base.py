"""The shape every filter pass shares: tasks in, (kept, rejections) out, nothing dropped silently.

Every pass has one signature, `run(tasks, context) -> (kept, rejections)`, and is
registered as a `FilterPass` (its entry point plus the `filter:` section that configures
it) in `datagen.filtering.PASSES`. The `PassContext` gives a pass its own settings, the
teacher (made on first use, shared by the run) and a `report` dict whose contents land
in stats.json beside the pass's counts.

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


@dataclass(frozen=True)
class FilterPass:
    """A registered pass: its entry point and the `filter:` section (name, model) it reads
    (None for a pass without settings)."""

    run: Callable[[Sequence[Task], PassContext], PassResult]
    section: str | None = None
    settings: type[BaseModel] | None = None


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
