"""Negative examples for Natural-Instructions files, from three sources in this order:

1. wrong outputs in the rejects of the run (`negatives_from_rejects`);
2. for a classification task, another label of the task on a positive example, the
   explanation naming the right label (`label_negative`; no teacher needed);
3. the teacher (`templates/negative_example.jinja`, `teacher_negatives`): a task whose
   reply is unusable is asked again on a different example with a different sampling
   seed, and when no try gives one, each try's reason is reported (`REASON_*`).

    from datagen.export.negatives import negatives_from_rejects, read_rejects
    rejects, unreadable = read_rejects([Path("raw.rejects.jsonl")])
    found = negatives_from_rejects(tasks, rejects)   # task id -> [{input, output, explanation}]
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from pydantic import ValidationError

from datagen.config import SamplingParams
from datagen.io import read_lines_tolerant
from datagen.prompts import load_template
from datagen.records import Instance, Reject, Task
from datagen.rejects import INSTANCE_PREFIX, NOT_ABOUT_OUTPUT_REASONS, NOT_ABOUT_OUTPUT_STAGES, TEACHER_ERROR
from datagen.teachers.base import Message

NEGATIVE_TEMPLATE = "negative_example.jinja"

def _instruction_key(text: str) -> str:
    return " ".join(text.split()).casefold()


def _rejected_instances(reject: Reject) -> tuple[str | None, str | None, list[Instance]]:
    """(task id, instruction, instances) a reject shows as wrong outputs, or no instances.

    A rejected instance (Self-Instruct: the instance JSON in `raw`, the instruction in
    `detail`) counts; so does a rejected task with exactly one instance, the reason then
    being about that instance's output. A rejected task with several instances does not:
    the reason may concern only one of them.
    """
    if reject.stage in NOT_ABOUT_OUTPUT_STAGES or reject.reason in NOT_ABOUT_OUTPUT_REASONS or reject.duplicate_of:
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
        reason = reject.reason.removeprefix(INSTANCE_PREFIX)
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
        for number, line in read_lines_tolerant(path):
            if line is None:
                unreadable.append(f"{path}:{number}")
            elif line.strip():
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


REASON_TEACHER_ERROR = TEACHER_ERROR
REASON_NO_WRONG_LINE = 'no "Wrong answer:" line'
REASON_EMPTY_WRONG = 'empty "Wrong answer:"'
REASON_CORRECT_AGAIN = "gave the correct answer as the wrong one"
REASON_NOTHING_TO_SHOW = "no example to ask about"


def _parse_or_reason(text: str, correct_output: str) -> tuple[str, str] | str:
    wrong_at = _WRONG.search(text)
    if not wrong_at:
        return REASON_NO_WRONG_LINE
    why_at = _WHY.search(text, wrong_at.end())
    wrong = text[wrong_at.end() : why_at.start() if why_at else len(text)].strip()
    why_lines = text[why_at.end() :].strip().splitlines() if why_at else []
    why = why_lines[0].strip() if why_lines else ""
    if not wrong:
        return REASON_EMPTY_WRONG
    if wrong.casefold() == correct_output.strip().casefold():
        return REASON_CORRECT_AGAIN
    return wrong, why or f'The correct answer is "{correct_output.strip()}".'


def parse_negative(text: str, correct_output: str) -> tuple[str, str] | None:
    """(wrong answer, why it is wrong) from a reply in the template's form; None when there is
    no "Wrong answer:" line or it is empty or the correct answer. Small teachers often leave
    out the "Why it is wrong:" line; the explanation then names the correct answer."""
    parsed = _parse_or_reason(text, correct_output)
    return parsed if isinstance(parsed, tuple) else None


def _shown(data: dict) -> list[tuple[str, str]]:
    """(input, correct output) pairs a negative can be asked about: the positive examples,
    then the instances."""
    return [(e["input"], e["output"]) for e in data["Positive Examples"]] + [
        (i["input"], i["output"][0]) for i in data["Instances"]
    ]


def label_negative(task: Task, data: dict) -> dict | None:
    """A negative example for a classification task without any teacher: the first positive
    example (else instance) answered with another label of the task (the most frequent
    other one), the explanation naming the right label. None when the task is not a
    classification task or has a single label."""
    if not task.is_classification:
        return None
    labels = Counter(o.strip() for i in data["Instances"] for o in i["output"] if o.strip())
    labels.update(e["output"].strip() for e in data["Positive Examples"] if e["output"].strip())
    for text, correct in _shown(data):
        accepted = {o.strip().casefold() for t, o in _shown(data) if t == text}
        others = [label for label, _n in sorted(labels.items(), key=lambda kv: (-kv[1], kv[0]))
                  if label.casefold() not in accepted]
        if others:
            return {"input": text, "output": others[0],
                    "explanation": f'The correct label is "{correct.strip()}"; "{others[0]}" is another label of '
                                   "this task that does not fit this input."}
    return None


def teacher_negatives(
    tasks: Sequence[Task], files: dict[str, dict], complete: Callable, params: SamplingParams, attempts: int = 2
) -> dict[str, str]:
    """Ask the teacher for one negative example per task in `tasks` and set it in
    `files[task.id]`. Try k (of `attempts`) shows the k-th positive example (then
    instance; the first again when there are fewer) with sampling seed `params.seed + k`,
    so a retry is a different sample, not a replay of the cached reply. Returns task id ->
    why no reply was usable, for the tasks that got none. `complete` is `Teacher.complete`."""
    reasons: dict[str, list[str]] = {task.id: [] for task in tasks}
    waiting = [task for task in tasks if _shown(files[task.id])]
    for task in tasks:
        if not _shown(files[task.id]):
            reasons[task.id].append(REASON_NOTHING_TO_SHOW)
    for attempt in range(attempts):
        if not waiting:
            break
        asked = []
        for task in waiting:
            shown = _shown(files[task.id])
            asked.append((task, *shown[attempt % len(shown)]))
        seed = (params.seed or 0) + attempt
        replies = complete([negative_prompt(task.instruction, text, output) for task, text, output in asked],
                           params.model_copy(update={"seed": seed}))
        waiting = []
        for (task, text, output), [reply] in zip(asked, replies):
            parsed = _parse_or_reason(reply.text, output) if reply.ok else f"{REASON_TEACHER_ERROR} ({reply.error})"
            if isinstance(parsed, tuple):
                wrong, why = parsed
                files[task.id]["Negative Examples"] = [{"input": text, "output": wrong, "explanation": why}]
                reasons.pop(task.id)
            else:
                reasons[task.id].append(parsed)
                waiting.append(task)
    return {task_id: _tries_line(why) for task_id, why in reasons.items()}


def _tries_line(why: list[str]) -> str:
    if why == [REASON_NOTHING_TO_SHOW]:
        return REASON_NOTHING_TO_SHOW
    return f"teacher: {len(why)} {'try' if len(why) == 1 else 'tries'}, none usable: " + "; ".join(why)
