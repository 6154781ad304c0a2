"""Negative examples for Natural-Instructions files: wrong outputs taken from the rejects
of the run, else asked of the teacher (`templates/negative_example.jinja`).

    from datagen.export.negatives import negatives_from_rejects, read_rejects
    rejects, unreadable = read_rejects([Path("raw.rejects.jsonl")])
    found = negatives_from_rejects(tasks, rejects)   # task id -> [{input, output, explanation}]
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from pydantic import ValidationError

from datagen.config import SamplingParams
from datagen.prompts import load_template
from datagen.records import Instance, Reject, Task
from datagen.teachers.base import Message

NEGATIVE_TEMPLATE = "negative_example.jinja"

# Rejections that say nothing about an output being wrong: duplicates, novelty,
# contamination, prompt-level failures.
_NOT_ABOUT_OUTPUT_STAGES = frozenset({"exact-dedup", "near-dedup", "novelty", "decontaminate", "bootstrap", "read"})
_NOT_ABOUT_OUTPUT_REASONS = frozenset({
    "conflicting outputs for the same input", "surplus beyond num", "duplicate input task id",
    "no valid instances", "no instance answered", "teacher error", "instance: input already present",
    "instance: input missing",
})


def _instruction_key(text: str) -> str:
    return " ".join(text.split()).casefold()


def _rejected_instances(reject: Reject) -> tuple[str | None, str | None, list[Instance]]:
    """(task id, instruction, instances) a reject shows as wrong outputs, or no instances.

    A rejected instance (Self-Instruct: the instance JSON in `raw`, the instruction in
    `detail`) counts; so does a rejected task with exactly one instance, the reason then
    being about that instance's output. A rejected task with several instances does not:
    the reason may concern only one of them.
    """
    if reject.stage in _NOT_ABOUT_OUTPUT_STAGES or reject.reason in _NOT_ABOUT_OUTPUT_REASONS or reject.duplicate_of:
        return None, None, []
    if reject.task is not None:
        instances = reject.task.instances if len(reject.task.instances) == 1 else []
        return reject.task.id, reject.task.instruction, instances
    if reject.raw and reject.detail:
        try:
            instance = Instance.model_validate_json(reject.raw)
        except ValidationError:
            return None, None, []
        return None, reject.detail, [instance]
    return None, None, []


def negatives_from_rejects(tasks: Sequence[Task], rejects: Iterable[Reject], limit: int = 2) -> dict[str, list[dict]]:
    """Task id -> up to `limit` negative examples `{input, output, explanation}` from rejects
    matched by task id, else by instruction (case and white space folded). The explanation
    is the rejection reason. Empty outputs and outputs the task accepts for that input are
    left out."""
    by_id = {task.id: task for task in tasks}
    by_instruction: dict[str, list[Task]] = {}
    for task in tasks:
        by_instruction.setdefault(_instruction_key(task.instruction), []).append(task)
    found: dict[str, list[dict]] = {}
    for reject in rejects:
        task_id, instruction, instances = _rejected_instances(reject)
        if not instances:
            continue
        targets = [by_id[task_id]] if task_id in by_id else by_instruction.get(_instruction_key(instruction or ""), [])
        reason = reject.reason.removeprefix("instance: ")
        for target in targets:
            accepted = {(i.input, i.output.strip()) for i in target.instances}
            examples = found.setdefault(target.id, [])
            for instance in instances:
                output = instance.output.strip()
                example = {"input": instance.input, "output": output,
                           "explanation": f"This output was rejected ({reject.stage}): {reason}."}
                if output and (instance.input, output) not in accepted and len(examples) < limit and all(
                    (e["input"], e["output"]) != (instance.input, output) for e in examples
                ):
                    examples.append(example)
    return {task_id: examples for task_id, examples in found.items() if examples}


def read_rejects(paths: Iterable[Path]) -> tuple[list[Reject], list[str]]:
    """Rejects from each existing file, and "file:line" of lines that are not rejects (a run
    killed mid-line leaves one; rejects only add examples, so they are skipped and counted)."""
    rejects, unreadable = [], []
    for path in paths:
        if not path.exists():
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rejects.append(Reject.model_validate_json(line))
                except ValidationError:
                    unreadable.append(f"{path}:{number}")
    return rejects, unreadable


def negative_prompt(instruction: str, example_input: str, correct_output: str) -> list[Message]:
    """What the teacher is asked for a task without a rejected output to show."""
    text = load_template(NEGATIVE_TEMPLATE).render(
        instruction=instruction.strip(), input=example_input.strip(), output=correct_output.strip()
    )
    return [{"role": "user", "content": text}]


# "Wrong answer:", also "**Wrong answer:**" and "**Wrong answer**:" (chat models like bold)
_WRONG = re.compile(r"^\W*wrong answer\W*?:(?:\*\*|__)?[ \t]*", re.IGNORECASE | re.MULTILINE)
_WHY = re.compile(r"^\W*why it is wrong\W*?:(?:\*\*|__)?[ \t]*", re.IGNORECASE | re.MULTILINE)


def parse_negative(text: str, correct_output: str) -> tuple[str, str] | None:
    """(wrong answer, why it is wrong) from a reply in the template's form; None when there is
    no "Wrong answer:" line or it is empty or the correct answer. Small teachers often leave
    out the "Why it is wrong:" line; the explanation then names the correct answer."""
    wrong_at = _WRONG.search(text)
    if not wrong_at:
        return None
    why_at = _WHY.search(text, wrong_at.end())
    wrong = text[wrong_at.end() : why_at.start() if why_at else len(text)].strip()
    why_lines = text[why_at.end() :].strip().splitlines() if why_at else []
    why = why_lines[0].strip() if why_lines else ""
    if not wrong or wrong.casefold() == correct_output.strip().casefold():
        return None
    return wrong, why or f'The correct answer is "{correct_output.strip()}".'


def teacher_negatives(tasks: Sequence[Task], files: dict[str, dict], complete: Callable, params: SamplingParams) -> int:
    """Ask the teacher for one negative example per task in `tasks`, on the input of its first
    positive example (else its first instance); set it in `files[task.id]`. Returns how many
    replies were usable. `complete` is `Teacher.complete`."""
    asked = []
    for task in tasks:
        data = files[task.id]
        shown = data["Positive Examples"][:1] or [
            {"input": i["input"], "output": i["output"][0]} for i in data["Instances"][:1]
        ]
        if shown:
            asked.append((task, shown[0]["input"], shown[0]["output"]))
    if not asked:
        return 0
    replies = complete([negative_prompt(task.instruction, text, output) for task, text, output in asked], params)
    usable = 0
    for (task, text, output), [reply] in zip(asked, replies):
        parsed = parse_negative(reply.text, output) if reply.ok else None
        if parsed:
            wrong, why = parsed
            files[task.id]["Negative Examples"] = [{"input": text, "output": wrong, "explanation": why}]
            usable += 1
    return usable
