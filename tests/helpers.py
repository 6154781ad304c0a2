"""What many tests share: task factories, one scripted backend for injecting faults, and a
runner for the real `datagen` entry point in this process. Fixtures stay in conftest.py.

    from tests.helpers import ScriptedBackend, make_task, run_cli, write_tasks
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import random
import re
import subprocess
import sys
import traceback
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


# -- a scripted Alpaca teacher (tests/test_alpaca.py, tests/test_ray_generate.py) ---------------

WORDS = ("river bakery ledger comet violin harbor pepper glacier tunnel orchard lantern compass meadow "
         "quarry falcon pillow satchel thistle beacon canyon walnut saddle cobalt ferry marble nectar "
         "oyster parcel quiver ribbon summit timber umbrella velvet wagon yarrow zephyr anchor bramble").split()
VERBS = ("Describe", "Explain", "Summarize", "List", "Compare", "Rewrite", "Classify", "Suggest")


def alpaca_reply(prompt: str, salt: str = "") -> Completion:
    """A deterministic Alpaca reply for `prompt` (and `salt`, e.g. the sampling seed): five
    items, mostly valid and varied, some blacklisted, malformed, sharing an input, or cut off."""
    rng = random.Random(f"{prompt}|{salt}")
    pieces = []
    for number in range(4, 9):
        words = rng.sample(WORDS, 4)
        instruction = f"{rng.choice(VERBS)} the {words[0]} {words[1]} near a {words[2]} {words[3]}."
        if rng.random() < 0.1:
            instruction = f"Play some music about a {words[0]}."
        text = rng.choice(["<noinput>", f"A {words[1]} by the {words[3]}.", "The shared input of many tasks."])
        output = "" if rng.random() < 0.05 else f"It is about the {words[2]}."
        fields = [f"{number}. Instruction: {instruction}", f"{number}. Input:\n{text}", f"{number}. Output:\n{output}"]
        if rng.random() < 0.1:
            fields.pop(1)  # malformed
        pieces.append("\n".join(fields) + "\n")
    text = "###\n".join(pieces)
    finish = "stop"
    if rng.random() < 0.2:
        text, finish = text[: len(text) - 15], "length"
    return Completion(" " + text.split(". Instruction: ", 1)[1], finish, 600, len(text.split()))


# -- a simulated Self-Instruct engine (tests/test_self_instruct.py, bench/self_instruct_engine.py) --

SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
# 4,900 made-up words: instructions drawn from them rarely pass ROUGE-L 0.7 with each other by
# chance, so a 10,000-task run is not swamped by "too similar" rejects
MADE_UP_WORDS = [a + b for a in SYLLABLES for b in SYLLABLES]
TASK_FORMS = (
    "Describe the {} of a {} {} near the {}.",
    "Explain why a {} {} needs a {} and a {}.",
    "List three ways to turn a {} into a {} {} {}.",
    "Write a short note about the {} {} {} of {}.",
    "Decide whether the {} is a {}, a {} or a {}.",
)


def self_instruct_reply(prompt: str, salt: str) -> Completion:
    """A deterministic reply to any Self-Instruct prompt, from the prompt and `salt` (the
    request's seed and sample): new numbered tasks (sometimes one copied from the list, or a
    reply cut off), "Yes" or "No", and examples in the format each instance prompt asks for."""
    rng = random.Random(f"{prompt}|{salt}")

    def words(count: int) -> list[str]:
        return rng.sample(MADE_UP_WORDS, count)

    def phrase() -> str:
        return " ".join(words(rng.randint(3, 6))).capitalize() + "."

    if prompt.startswith("Below is a numbered list"):
        listed = re.findall(r"^\d+\. (.+)$", prompt, flags=re.MULTILINE)
        tasks = [rng.choice(TASK_FORMS).format(*words(4)) for _ in range(rng.randint(2, 5))]
        if len(tasks) > 2 and rng.random() < 0.15:  # a near copy of the reply's first task
            tasks[1] = tasks[0].rsplit(" ", 1)[0] + f" {words(1)[0]}."
        if listed and rng.random() < 0.1:
            tasks[-1] = rng.choice(listed)
        first = len(listed) + 1
        text = " " + "\n".join(f"{first + i}. {t}" if i else t for i, t in enumerate(tasks))
        if rng.random() < 0.05:
            return Completion(text, "length", 300, 1024)
        return Completion(text, "stop", 300, 12 * len(tasks))
    if prompt.startswith("For each task, decide"):
        return Completion("Yes" if rng.random() < 0.3 else "No", "stop", 250, 1)
    if prompt.startswith("Each task below is a classification"):
        labels = words(2)
        text = "\n".join(f"Class label: {label}\nInput: {phrase()}" for label in labels)
    elif prompt.startswith("Write examples for each task."):
        outputs = [phrase() if rng.random() > 0.1 else "" for _ in range(rng.randint(1, 3))]
        text = "\n".join(f"Example {n}\nInput: {phrase()}\nOutput: {out}" for n, out in enumerate(outputs, 1))
    elif prompt.endswith("Class label:"):
        text = f" {rng.choice(words(2))}\nInput: {phrase()}"
    elif prompt.endswith("Input:") and "\nClass label:" in prompt:
        text = f" {phrase()}"
    else:  # a later round's "Example N\nInput:"
        text = f" {phrase()}\nOutput: {phrase()}"
    return Completion(text, "stop", 200, len(text.split()))


class SimulatedEngine:
    """A `Backend` standing in for a GPU serving engine: `slots` sequences at once, each
    call taking `latency_s` per wave of `slots` requests (ceil(n / slots) waves), counted on
    a virtual clock (`engine_seconds`) instead of slept, so a 10,000-task loop runs in its
    CPU time. Replies come from `self_instruct_reply`."""

    name = "simulated-engine"

    def __init__(self, slots: int = 256, latency_s: float = 1.0, model: str = "stand-in"):
        self.slots, self.latency_s, self.model = slots, latency_s, model
        self.counters = BackendCounters()
        self.engine_seconds = 0.0
        self.calls = self.requests = 0
        self.sizes: list[int] = []  # requests per call

    def generate(self, requests: Sequence[Request], on_result: ResultCallback) -> None:
        self.calls += 1
        self.requests += len(requests)
        self.sizes.append(len(requests))
        self.engine_seconds += math.ceil(len(requests) / self.slots) * self.latency_s
        for index, request in enumerate(requests):
            salt = f"{request.params.seed}|{request.params.temperature}|{request.sample_index}"
            on_result(index, self_instruct_reply(request.messages[-1][1], salt))

    def close(self) -> None:
        pass


# -- the command line ------------------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `datagen ARGS` in this process through `datagen.cli.main`, the console script's entry
    point, with `env` added to the environment; its exit code, stdout and stderr come back as a
    subprocess would give them (torchrun's ranks included: the launcher relays their lines). A
    fresh interpreter costs seconds of imports per call; the tests about the installed script,
    `--help`'s imports and killed runs start real processes themselves."""
    from datagen.cli import main

    changed = {name: os.environ.get(name) for name in env or {}}
    saved_argv = sys.argv
    stdout, stderr = io.StringIO(), io.StringIO()
    os.environ.update(env or {})
    sys.argv = ["datagen", *args]
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                main(list(args))
                code = 0
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
                if stop.code is not None and not isinstance(stop.code, int):
                    print(stop.code, file=sys.stderr)
            except Exception:  # what an uncaught error does to a real process: a traceback, exit 1
                traceback.print_exc()
                code = 1
    finally:
        # only what was added or changed: other threads (a server's log reader) may be reading
        for name, value in changed.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        sys.argv = saved_argv
    return subprocess.CompletedProcess(["datagen", *args], code, stdout.getvalue(), stderr.getvalue())


def single_error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a failed command printed on stderr (asserting it is one, with no traceback)."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]
