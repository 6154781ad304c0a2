"""The shape every filter pass shares: tasks in, (kept, rejections) out, nothing dropped silently.

A *check* is a pure function `task -> reason | None`. `check_pass` turns a list of
checks into a pass that keeps a task only when every check returns None and records,
for each rejected task, the first reason. Stateful passes (dedup, novelty, the LLM
judge) return the same `PassResult` directly.

    from datagen.filters.base import check_pass
    kept, rejected = check_pass([too_short, refusal])(tasks)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

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
