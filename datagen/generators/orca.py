"""Orca-style explanation tuning (Mukherjee et al. 2023 "Orca"; Mitra et al. 2023 "Orca 2").

Takes tasks that already exist (the bundled seeds, Self-Instruct or Evol-Instruct output,
any task JSONL) and has the teacher answer their instances again, this time under a
*system message* that asks for a particular way of reasoning, so each answer comes with
the explanation that leads to it. The student later learns the reasoning, not just the
answer.

The method, per input task, in input order:

1. *Pick a system message* from `SYSTEM_MESSAGES` (16 of our own wording, from "answer
   briefly" to "explain it to a five-year-old"; Orca 1 likewise hand-wrote 16 and sampled
   one per query). The pick is `random.Random(f"orca:{seed}:{task id}")`, so a rerun picks
   the same one; `OrcaConfig.system_messages` restricts the ids, `system_weights` weights
   them. Some messages only suit some tasks (`translator` only translation tasks,
   `labels` only classification tasks); a task no allowed message suits is rejected.
2. *Answer* the task's first `max_instances_per_task` distinct inputs (a task with no
   instances is answered once, on its instruction alone). The system message goes in the
   system turn; the user turn is the instruction, the input, and a request to end with a
   line `Final answer: ...` (for a classification task: the label alone).
3. *Parse* each reply (`parse_answer`): the text before the last line starting with
   "Final answer:" is the explanation (`Instance.explanation`, None when there is none: a
   direct answer is a legitimate strategy), the text after it is the answer
   (`Instance.output`; for a classification task only its first line, cleaned to a bare
   label). A reply without that line is rejected as "parse failure" with its raw text,
   never kept whole as the output: the output field would then hold the explanation too,
   and a label task would get a paragraph as its label. A reply cut off at `max_tokens` is
   rejected ("reply hit the length limit"): its answer may be incomplete. An empty answer
   is rejected. With `check_labels` (the default), a classification answer whose label
   differs from the instance's original output is rejected: an explanation that argues for
   the wrong label teaches the wrong reasoning.
4. *Record* one output task per input task: same instruction, the answered instances,
   `system` set to the message, id `stable_id("orca", parent id, system id)`, lineage
   `generator="orca"`, `operation="orca:<system id>"`, `parent_ids=[parent id]`. A task
   whose every instance failed is rejected as "no instance answered"; each failed instance
   is rejected on its own, with the teacher's raw text.

Orca 2's *prompt erasure* is a training-time choice: the training messages come from
`datagen.chat` (`training_messages` here is `datagen.chat.orca_messages`), which with
`prompt_erasure=True` replaces the detailed system message by a generic one
(`OrcaConfig.generic_system`), so the student learns to pick the strategy itself instead
of being told it. Export applies it (`--prompt-erasure`), and so does `datagen finetune`
on an Orca task file (`finetune.prompt_erasure`).

Resume is replay: every choice is deterministic (system message per (seed, task id), one
fixed sampling seed), so a rerun skips input tasks whose output id is already in OUT,
answers everything else from the request cache where it was asked before (failed
requests are not cached, so they are retried), and does not write again a reject that is
already in OUT's rejects file. The generic `--instances-per-task` of other methods does not
apply (Orca answers existing instances); `max_instances_per_task` caps them.

    datagen generate --method orca --seeds raw.jsonl --num 100 --out orca.jsonl

    from datagen.generators.orca import OrcaConfig, run_orca, training_messages
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator

from datagen.chat import FINAL_ANSWER, GENERIC_SYSTEM, user_turn
from datagen.chat import orca_messages as training_messages  # noqa: F401  (the Orca name for it)
from datagen.config import SamplingParams, Strict
from datagen.generators.common import ReplayedRejects, RunContext, lineage, stable_id
from datagen.prompts import load_template
from datagen.records import Instance, Task
from datagen.rejects import (
    DUPLICATE_INPUT_TASK_ID,
    LENGTH_LIMIT,
    NO_INSTANCE_ANSWERED,
    PARSE_FAILURE,
    STAGE_ORCA,
    TEACHER_ERROR,
)
from datagen.teachers.base import Completion, Message

ANSWER = "orca_answer.jinja"

TaskKind = Literal["open", "classification", "translation"]
ALL_KINDS: frozenset[str] = frozenset({"open", "classification", "translation"})
NO_SUITABLE_SYSTEM_MESSAGE = "no allowed system message suits the task"


@dataclass(frozen=True)
class SystemMessage:
    """One entry of the catalogue: a short stable id, the text, and the task kinds it suits."""

    id: str
    text: str
    kinds: frozenset[str] = ALL_KINDS


SYSTEM_MESSAGES: tuple[SystemMessage, ...] = (
    SystemMessage(
        "terse",
        "Answer briefly. Give the single most important reason for your answer in one or two "
        "sentences, then the answer.",
    ),
    SystemMessage(
        "step_by_step",
        "Think the task through step by step. Number the steps, and after each one say in a "
        "sentence why it is justified by what came before.",
    ),
    SystemMessage(
        "eli5",
        "Explain your answer as if you were talking to a five-year-old: short sentences, everyday "
        "words, and a comparison to something a small child already knows.",
        frozenset({"open", "classification"}),
    ),
    SystemMessage(
        "translator",
        "You are a faithful translator. Keep the meaning, tone and level of formality of the source "
        "and add or drop nothing. Before the translation, point out any word or phrase that cannot "
        "be carried over literally and say how you rendered it.",
        frozenset({"translation"}),
    ),
    SystemMessage(
        "teacher",
        "You are a teacher. First explain the general method for solving this kind of task, then "
        "apply the method to this case one step at a time, and only then state the answer.",
    ),
    SystemMessage(
        "restate",
        "Begin by restating the task in your own words: what you are given and what the answer has "
        "to look like. Then solve it.",
    ),
    SystemMessage(
        "alternatives",
        "Before you commit to an answer, consider at least two different possible answers or "
        "approaches. Compare them, say which is better and why, and then give that one.",
    ),
    SystemMessage(
        "recall",
        "First write down the facts, definitions or rules this task depends on. Then reason from "
        "them to the answer.",
    ),
    SystemMessage(
        "decompose",
        "Break the task into smaller parts, solve the parts one after another, and then combine "
        "them into the answer.",
    ),
    SystemMessage(
        "self_check",
        "Solve the task, then check your answer against every requirement the task states. If the "
        "check finds a problem, correct the answer before you give it.",
    ),
    SystemMessage(
        "grounded",
        "Use only what the task and its input tell you. For each step, point to the words of the "
        "input that support it, and make no assumption the input does not back up.",
    ),
    SystemMessage(
        "labels",
        "Go through the possible labels one at a time. For each, say whether the input fits it and "
        "why, rule out those that do not fit, and choose the label that remains.",
        frozenset({"classification"}),
    ),
    SystemMessage(
        "plain_language",
        "Write for an adult reader with no special background. Avoid jargon; where a technical term "
        "cannot be avoided, define it the first time you use it.",
    ),
    SystemMessage(
        "thorough",
        "Give a detailed, thorough answer. Explain your reasoning fully, so that a reader could "
        "check every part of it without looking anything up.",
    ),
    SystemMessage(
        "ambiguity",
        "Work like a careful reviewer: name any assumption you have to make and any other way the "
        "task could be read, decide which reading is most likely, and answer that one.",
    ),
    SystemMessage(
        "example_first",
        "Start from a small, concrete example of the problem, use it to show how the answer is "
        "found, and then give the answer for the task itself.",
        frozenset({"open", "classification"}),
    ),
)
CATALOGUE: dict[str, SystemMessage] = {message.id: message for message in SYSTEM_MESSAGES}


class OrcaConfig(Strict):
    """Orca settings. Sampling: 0.7 keeps some variety between the answers to a task's
    instances (a fixed seed keeps it reproducible), and 1024 tokens covers the long
    explanations `thorough`/`teacher`/`step_by_step` ask for: a reply cut off at the limit
    is rejected, so the budget has to cover the long tail, not the median."""

    # ids from SYSTEM_MESSAGES to draw from; None = all of them
    system_messages: tuple[str, ...] | None = None
    # relative weights by id (ids left out weigh 1.0; 0 never picks it); None = uniform
    system_weights: dict[str, float] | None = None
    # answer at most this many distinct inputs of each input task (the first ones)
    max_instances_per_task: int = Field(4, ge=1)
    # input tasks per teacher call (and per flush of the output)
    items_per_batch: int = Field(32, ge=1)
    # classification tasks: reject an answer whose label differs from the original output
    check_labels: bool = True
    answer_sampling: SamplingParams = SamplingParams(temperature=0.7, top_p=1.0, max_tokens=1024)
    # Orca 2 prompt erasure, read by export: train on `generic_system` instead of the message
    prompt_erasure: bool = False
    generic_system: str = Field(GENERIC_SYSTEM, min_length=1)

    @field_validator("system_messages")
    @classmethod
    def _known_ids(cls, ids: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if ids is not None:
            if not ids:
                raise ValueError("list at least one system message id (or leave it out for all)")
            _check_ids(ids)
        return ids

    @field_validator("answer_sampling")
    @classmethod
    def _one_sample(cls, params: SamplingParams) -> SamplingParams:
        if params.n != 1:
            raise ValueError("n must be 1: each instance gets one answer")
        return params

    @field_validator("system_weights")
    @classmethod
    def _known_weights(cls, weights: dict[str, float] | None) -> dict[str, float] | None:
        if weights is not None:
            _check_ids(weights)
            negative = [key for key, value in weights.items() if value < 0]
            if negative:
                raise ValueError(f"weight of {negative[0]!r} is negative")
        return weights

    def allowed_messages(self) -> tuple[SystemMessage, ...]:
        """The messages to draw from, in catalogue order (so the order ids are listed in
        the config does not change which one a task gets)."""
        allowed = set(self.system_messages) if self.system_messages is not None else set(CATALOGUE)
        return tuple(m for m in SYSTEM_MESSAGES if m.id in allowed)


def _check_ids(ids) -> None:
    unknown = [i for i in ids if i not in CATALOGUE]
    if unknown:
        raise ValueError(f"unknown system message id {unknown[0]!r} (known: {', '.join(CATALOGUE)})")


# -- pure functions: system message choice, prompts, parsing, training examples ---------------


def task_kind(task: Task) -> TaskKind:
    """"translation" when the instruction asks to translate, else classification or open."""
    if re.search(r"\btranslat(?:e|es|ed|ing|ion)\b", task.instruction, flags=re.IGNORECASE):
        return "translation"
    return "classification" if task.is_classification else "open"


def choose_system_message(
    task: Task, allowed: Sequence[SystemMessage], weights: Mapping[str, float] | None, seed: int
) -> SystemMessage | None:
    """The message for `task`: a weighted draw among the allowed ones that suit its kind,
    from `random.Random(f"orca:{seed}:{task.id}")`; None when none suits it."""
    kind = task_kind(task)
    weights = weights or {}
    candidates = [m for m in allowed if kind in m.kinds and weights.get(m.id, 1.0) > 0]
    if not candidates:
        return None
    rng = random.Random(f"orca:{seed}:{task.id}")
    return rng.choices(candidates, weights=[weights.get(m.id, 1.0) for m in candidates])[0]


def answer_messages(instruction: str, instance_input: str, is_classification: bool, system: str) -> list[Message]:
    """What the teacher is sent: the system message, then the task and the answer format."""
    user = load_template(ANSWER).render(
        task=user_turn(instruction, instance_input), is_classification=is_classification
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


@dataclass(frozen=True)
class ParsedAnswer:
    explanation: str | None
    answer: str


@dataclass(frozen=True)
class ParseFailure:
    reason: str  # "parse failure", "empty final answer" or "reply hit the length limit"
    detail: str | None = None


# a line starting "Final answer:", also "**Final answer:**", "**Final Answer**:", "The final answer:"
_MARKER = re.compile(
    r"^[ \t>#]*(?:\*\*|__)?[ \t]*(?:the[ \t]+)?final[ \t]+answer[ \t]*(?:\*\*|__)?[ \t]*[:：]"
    r"(?:[ \t]*(?:\*\*|__)(?=[ \t]|$))?[ \t]*",
    flags=re.IGNORECASE | re.MULTILINE,
)
_WRAPPERS = ("**", "__", "*", "`", '"', "'")


def _unwrap(text: str) -> str:
    """`**x**`, `"x"`, `` `x` `` -> x for a one-line answer whose inside has no such mark
    (so `"Hi," she said. "Bye."` stays whole)."""
    changed = True
    while changed and "\n" not in text:
        changed = False
        for mark in _WRAPPERS:
            inner = text[len(mark) : -len(mark)].strip()
            wrapped = len(text) > 2 * len(mark) and text.startswith(mark) and text.endswith(mark)
            if wrapped and inner and mark not in inner:
                text, changed = inner, True
                break
    return text


def clean_label(text: str) -> str:
    """A classification answer as a bare label: first non-empty line, unwrapped, no final '.'."""
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    line = _unwrap(line).rstrip(".").strip()
    return _unwrap(line)


def parse_answer(
    text: str, *, is_classification: bool = False, finish_reason: str = "stop"
) -> ParsedAnswer | ParseFailure:
    """Split a reply at its last "Final answer:" line into explanation and answer."""
    if finish_reason == "length":
        return ParseFailure(LENGTH_LIMIT)
    matches = list(_MARKER.finditer(text))
    if not matches:
        return ParseFailure(PARSE_FAILURE, f'no line starting with "{FINAL_ANSWER}"')
    last = matches[-1]
    explanation = text[: last.start()].strip() or None
    answer = text[last.end() :].strip()
    answer = clean_label(answer) if is_classification else _unwrap(answer)
    if not answer:
        return ParseFailure("empty final answer")
    return ParsedAnswer(explanation, answer)


def _label_key(label: str) -> str:
    return re.sub(r"\s+", " ", label).strip().rstrip(".").casefold()


def matching_label(answer: str, original: str) -> str | None:
    """The original label when `answer` is the same label (case and final '.' aside), else None."""
    return original.strip() if _label_key(answer) == _label_key(original) else None


def instances_to_answer(task: Task, limit: int) -> list[Instance]:
    """The first `limit` instances with distinct inputs; one empty-input instance for a task
    that has none (it is answered on its instruction alone)."""
    chosen: list[Instance] = []
    seen: set[str] = set()
    for instance in task.instances:
        key = instance.input.strip()
        if key not in seen:
            seen.add(key)
            chosen.append(instance)
        if len(chosen) == limit:
            break
    return chosen or [Instance(input="", output="")]


# -- the loop ---------------------------------------------------------------------------------


@dataclass
class _Job:
    parent: Task
    message: SystemMessage
    instances: list[Instance]
    start: int = 0  # position of its first request in the batch

    def conversations(self) -> list[list[Message]]:
        """The job's requests: one answer per instance, in instance order."""
        return [
            answer_messages(self.parent.instruction, i.input, self.parent.is_classification, self.message.text)
            for i in self.instances
        ]


@dataclass(frozen=True)
class _Skip:
    """An input task turned away before any request, with the reject it gets."""

    parent: Task
    reason: str
    detail: str


def _plan(seeds: Sequence[Task], settings: OrcaConfig, seed: int, done: set[str]) -> Iterator[_Job | _Skip]:
    """The input tasks in order, each as a job to answer or a skip (a repeated id, no
    suitable system message); tasks whose output id is in `done` are left out. Both engines
    walk this one plan: the local loop batches it, `planned_requests` streams it to Ray."""
    allowed = settings.allowed_messages()
    seen_parents: set[str] = set()
    for parent in seeds:
        if parent.id in seen_parents:
            yield _Skip(parent, DUPLICATE_INPUT_TASK_ID, f"task {parent.id} appears again in the input")
            continue
        seen_parents.add(parent.id)
        message = choose_system_message(parent, allowed, settings.system_weights, seed)
        if message is None:
            yield _Skip(parent, NO_SUITABLE_SYSTEM_MESSAGE, f"task {parent.id} is a {task_kind(parent)} task")
            continue
        if stable_id("orca", parent.id, message.id) not in done:
            yield _Job(parent, message, instances_to_answer(parent, settings.max_instances_per_task))


def _answer_params(settings: OrcaConfig, seed: int) -> SamplingParams:
    return settings.answer_sampling.model_copy(update={"seed": seed})


def planned_requests(
    seeds: Sequence[Task], settings: OrcaConfig, run: RunContext
) -> Iterator[tuple[list[Message], SamplingParams]]:
    """The requests `run_orca` will send for `seeds`, in its order, for an engine that
    answers them ahead of the loop (engine: ray): those of the first `num` jobs (minus the
    tasks already in OUT), all of which the loop asks for. Whatever more it needs when
    tasks fail goes out when it asks, so nothing is answered and then thrown away."""
    params = _answer_params(settings, run.seed)
    wanted = run.num - len(run.sink.existing)
    for item in _plan(seeds, settings, run.seed, {task.id for task in run.sink.existing}):
        if wanted <= 0:
            return
        if isinstance(item, _Job):
            wanted -= 1
            for conversation in item.conversations():
                yield conversation, params


def run_orca(seeds: Sequence[Task], settings: OrcaConfig, run: RunContext) -> None:
    """Re-answer the tasks in `seeds` (in order) into `sink` until it holds `num` tasks
    (tasks already there count) or the input runs out.

    `instances_per_task` is the generic "instances to create" setting of other methods and
    is not used: Orca answers existing instances, capped by `settings.max_instances_per_task`.
    `batches_done` only continues the batch count passed to `on_batch_done`; what is skipped
    on a rerun is decided by output id, not by batch number.
    """
    teacher, sink, num, seed = run.teacher, run.sink, run.num, run.seed
    params = _answer_params(settings, seed)
    backend = (teacher.backend.name, teacher.backend.model)
    template = load_template(ANSWER)
    reject = ReplayedRejects(sink, STAGE_ORCA)
    have = len(sink.existing)
    plan = _plan(seeds, settings, seed, {task.id for task in sink.existing})
    batch = run.batches_done
    exhausted = False
    while have < num and not exhausted:
        sink.at(batch)
        jobs: list[_Job] = []
        while len(jobs) < min(settings.items_per_batch, num - have):
            item = next(plan, None)
            if item is None:
                exhausted = True
                break
            if isinstance(item, _Skip):
                reject(item.reason, task=item.parent, detail=item.detail)
            else:
                jobs.append(item)
        if not jobs:
            break
        conversations: list[list[Message]] = []
        for job in jobs:
            job.start = len(conversations)
            conversations += job.conversations()
        replies = [samples[0] for samples in teacher.complete(conversations, params)]
        candidates = [
            _answer_task(
                job,
                replies[job.start : job.start + len(job.instances)],
                settings,
                params,
                seed,
                backend,
                template,
                reject,
            )
            for job in jobs
        ]
        fresh = sink.accept([task for task in candidates if task is not None])
        sink.flush()
        have += len(fresh)
        batch += 1
        run.on_batch_done(batch)
        run.progress(len(fresh))
    sink.flush()


def _answer_task(
    job: _Job,
    replies: list[Completion],
    settings: OrcaConfig,
    params: SamplingParams,
    seed: int,
    backend: tuple[str, str],
    template,
    reject: ReplayedRejects,
) -> Task | None:
    parent, message = job.parent, job.message
    task_id = stable_id("orca", parent.id, message.id)
    answered: list[Instance] = []
    for index, (instance, reply) in enumerate(zip(job.instances, replies)):
        where = f"task {parent.id}, instance {index}, system {message.id}"
        if not reply.ok:
            reject(TEACHER_ERROR, detail=f"{where}: {reply.error}")
            continue
        parsed = parse_answer(reply.text, is_classification=parent.is_classification, finish_reason=reply.finish_reason)
        if isinstance(parsed, ParseFailure):
            reject(parsed.reason, raw=reply.text, detail=where + (f": {parsed.detail}" if parsed.detail else ""))
            continue
        output = parsed.answer
        if parent.is_classification and settings.check_labels and instance.output.strip():
            label = matching_label(output, instance.output)
            if label is None:
                # the wrong answer as a one-instance task: export shows it as a negative example
                wrong = Instance(input=instance.input, output=output, explanation=parsed.explanation)
                reject(
                    "label differs from the original output",
                    raw=reply.text,
                    detail=f"{where}: answered {output!r}, original {instance.output.strip()!r}",
                    task=Task(id=task_id, instruction=parent.instruction, instances=[wrong], is_classification=True),
                )
                continue
            output = label
        answered.append(Instance(input=instance.input, output=output, explanation=parsed.explanation))
    task = Task(
        id=task_id,
        name=parent.name or task_id,
        instruction=parent.instruction,
        instances=answered,
        is_classification=parent.is_classification,
        system=message.text,
        lineage=lineage(
            generator="orca",
            operation=f"orca:{message.id}",
            teacher_name=backend,
            templates=[template],
            sampling=params,
            seed=seed,
            completions=replies,
            parent_ids=[parent.id],
            system_message_id=message.id,
        ),
    )
    if not answered:
        reject(NO_INSTANCE_ANSWERED, task=task, detail=f"all {len(replies)} instances of task {parent.id} failed")
        return None
    return task
