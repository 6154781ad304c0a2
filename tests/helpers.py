"""What many tests share: task factories, one scripted backend for injecting faults, and a
runner for the real `datagen` entry point. Fixtures stay in conftest.py.

    from tests.helpers import ScriptedBackend, make_task, run_cli, write_tasks
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from datagen.io import rejects_path, write_jsonl_atomic
from datagen.records import Instance, Reject, Task
from datagen.teachers.base import BackendCounters, Completion, Request, ResultCallback

# -- tasks ----------------------------------------------------------------------------------------


def make_task(task_id: str, instruction: str, *pairs: tuple[str, str], **fields) -> Task:
    """A task with one instance per (input, output) pair (one inputless instance if none)."""
    instances = [Instance(input=i, output=o) for i, o in pairs] or [Instance(output="A fine answer.")]
    return Task(id=task_id, instruction=instruction, instances=instances, **fields)


def write_tasks(path: Path, tasks: Iterable[Task], rejects: Sequence[Reject] = ()) -> Path:
    """`tasks` as a task JSONL at `path` (and `rejects` beside it, as a run would leave them)."""
    write_jsonl_atomic(path, list(tasks))
    if rejects:
        write_jsonl_atomic(rejects_path(path), rejects)
    return path


# -- a teacher backend that answers from a script --------------------------------------------------

Reply = Callable[[str], "Completion | str"]


class ScriptedBackend:
    """A `Backend` that answers each request instantly from `reply(last user message)`.

    `reply` returns the text (finish reason "stop", token counts from word counts) or a
    whole `Completion`, which is how a test injects a fault: `Completion("", "error",
    error="HTTP 500")`, a reply cut off at the length limit, garbage. Every prompt seen is
    kept in `seen`, so a test can pin the exact prompt text.
    """

    def __init__(self, reply: Reply, name: str = "scripted", model: str = "script"):
        self.reply = reply
        self.name = name
        self.model = model
        self.counters = BackendCounters()
        self.seen: list[str] = []

    def generate(self, requests: Sequence[Request], on_result: ResultCallback) -> None:
        for index, request in enumerate(requests):
            prompt = request.messages[-1][1]
            self.seen.append(prompt)
            answer = self.reply(prompt)
            if isinstance(answer, str):
                answer = Completion(answer, "stop", len(prompt.split()), len(answer.split()))
            on_result(index, answer)

    def close(self) -> None:
        pass


# -- the command line ------------------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the real `datagen` entry point in a subprocess (as a user would)."""
    return subprocess.run(
        [sys.executable, "-m", "datagen.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def single_error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a failed command printed on stderr (asserting it is one, with no traceback)."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]
