"""Splits by task and the training views of task records: chat `messages`, Alpaca
`{instruction, input, output}` and `{prompt, completion}` rows, and the files they are
written to (`train`/`validation`/`test`).

Every view is made from `datagen.chat.instance_messages`, so the student sees one user
turn for an instance whichever format it is trained from: the messages' user turn, the
prompt-completion `prompt`, and `datagen.chat.user_turn(instruction, input)` of an Alpaca
row (Alpaca rows keep the instruction and input apart, as data; the trainer joins them).

    from datagen.export.formats import chat_examples, split_by_task
    splits = split_by_task(tasks, validation=0.1, test=0.1, seed=0)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from datagen.chat import GENERIC_SYSTEM, instance_messages
from datagen.errors import ConfigError
from datagen.io import atomic_write_json, write_jsonl_atomic
from datagen.records import Task

SPLITS = ("train", "validation", "test")


def split_by_task(
    tasks: list[Task], *, validation: float = 0.1, test: float = 0.1, seed: int = 0
) -> dict[str, list[Task]]:
    """Tasks into "train", "validation" and "test", each task (all records with its id) wholly
    in one split, input order kept within a split.

    Deterministic: tasks are ranked by sha256(seed, task id), so the split does not depend
    on input order. Counts are `round(fraction * tasks)`, except that test gets at least one
    task when there are two or more and `test > 0`, validation at least one when there are
    three or more and `validation > 0`, and train always keeps at least one.
    """
    if validation < 0 or test < 0 or validation + test >= 1:
        raise ConfigError("export: validation and test must be >= 0 and leave some tasks for train")
    ids = list(dict.fromkeys(task.id for task in tasks))
    ranked = sorted(ids, key=lambda task_id: hashlib.sha256(f"{seed}\x1f{task_id}".encode()).hexdigest())
    total = len(ids)
    n_test, n_validation = round(test * total), round(validation * total)
    if test > 0 and total >= 2:
        n_test = max(n_test, 1)
    if validation > 0 and total >= 3:
        n_validation = max(n_validation, 1)
    while total and n_test + n_validation > total - 1:  # train keeps one; validation gives way first
        if n_validation:
            n_validation -= 1
        else:
            n_test -= 1
    side = {task_id: "test" for task_id in ranked[:n_test]}
    side.update({task_id: "validation" for task_id in ranked[n_test : n_test + n_validation]})
    splits: dict[str, list[Task]] = {name: [] for name in SPLITS}
    for task in tasks:
        splits[side.get(task.id, "train")].append(task)
    return splits


def chat_examples(
    tasks: list[Task], *, prompt_erasure: bool = False, generic_system: str = GENERIC_SYSTEM
) -> list[dict]:
    """One `{"messages", "task_id", "instance_index"}` per instance, in task order."""
    return [
        {
            "messages": instance_messages(task, instance, prompt_erasure=prompt_erasure, generic_system=generic_system),
            "task_id": task.id,
            "instance_index": index,
        }
        for task in tasks
        for index, instance in enumerate(task.instances)
    ]


def single_turn_only(tasks: list[Task], fmt: str) -> None:
    """Alpaca and prompt-completion rows hold one exchange: a multi-turn conversation is refused
    (one line naming it) rather than cut to its first turn."""
    for task in tasks:
        for index, instance in enumerate(task.instances):
            if instance.followups:
                raise ConfigError(f"--format {fmt}: task {task.id!r} (instance {index}) is a conversation of "
                                  f"{len(instance.followups) + 1} turns, and {fmt} rows hold one; export it with "
                                  "--format messages or hf")


def alpaca_examples(tasks: list[Task], **chat: Any) -> list[dict]:
    """Alpaca's `{instruction, input, output}`; an Orca output carries its explanation and the
    "Final answer:" line, as in the chat view (Alpaca has no system message). The prompt
    to train on is `datagen.chat.user_turn(instruction, input)`, the messages' user turn.
    Keys an instance was read with and does not use (an Alpaca file's `text`, `category`...)
    come back out after them, so a file read, filtered and exported as Alpaca keeps its fields."""
    single_turn_only(tasks, "alpaca")
    rows = []
    for task in tasks:
        for example in chat_examples([task], **chat):
            instance = task.instances[example["instance_index"]]
            row = {"instruction": task.instruction, "input": instance.input,
                   "output": example["messages"][-1]["content"]}
            rows.append({**row, **{k: v for k, v in (instance.model_extra or {}).items() if k not in row}})
    return rows


def prompt_completion_examples(tasks: list[Task], **chat: Any) -> list[dict]:
    """`{prompt, completion, system, task_id, instance_index}`: the user turn as the prompt,
    the assistant turn as the completion, and the system message (None when there is none)
    beside them, so the prompt is the same user turn as in the messages view."""
    single_turn_only(tasks, "prompt-completion")
    examples = []
    for example in chat_examples(tasks, **chat):
        messages = example["messages"]
        system = next((m["content"] for m in messages if m["role"] == "system"), None)
        user = next(m["content"] for m in messages if m["role"] == "user")
        examples.append({
            "prompt": user,
            "completion": messages[-1]["content"],
            "system": system,
            "task_id": example["task_id"],
            "instance_index": example["instance_index"],
        })
    return examples


def write_split_files(fmt: str, splits: dict[str, list[Task]], out_dir: Path, chat: dict) -> list[Path]:
    written = []
    for name, tasks in splits.items():
        if fmt == "alpaca":
            path = out_dir / f"{name}.json"
            atomic_write_json(path, alpaca_examples(tasks, **chat))
        else:
            path = out_dir / f"{name}.jsonl"
            rows = chat_examples(tasks, **chat) if fmt == "messages" else prompt_completion_examples(tasks, **chat)
            write_jsonl_atomic(path, (json.dumps(row, ensure_ascii=False) for row in rows))
        written.append(path)
    return written
