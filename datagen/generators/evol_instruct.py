"""Evol-Instruct (Xu et al. 2023, "WizardLM"), following the paper and nlpxucan/WizardLM.

Evol-Instruct rewrites each instruction of a pool, round after round, into a harder one
(in-depth evolving) or into a new, rarer one from the same domain (in-breadth evolving),
has the teacher answer each new instruction, and throws away the evolutions that failed.

One round (there are `rounds` of them, M = 4 by default):

1. *Evolve*: every pool item gets one operation, drawn uniformly from `operations` by a
   `random.Random` seeded with (seed, round, item id), so a rerun draws the same. The
   in-depth operations (`evol_depth.jinja`) are `evol:add_constraints`, `evol:deepen`,
   `evol:concretize`, `evol:increase_reasoning` and `evol:complicate_input`; the
   in-breadth one (`evol_breadth.jinja`) is `evol:breadth`. The depth prompts allow the
   rewriter to add only 10 to 20 words and forbid the template's own labels in its reply.
2. *Clean* the rewriter's reply (`parse_rewrite`): a leading "#Rewritten Prompt#:" style
   label and wrapping quotes are removed; an empty reply is a "parse failure".
3. *Eliminate* (the paper's four rules, cheapest first, so failed items cost no answer):
   (4) the new instruction copies rewriter words such as "#Rewritten Prompt#" or
   "given prompt" (`copied_words_reason`); (1) the teacher, asked with the paper's
   "are these two instructions equal in constraints and requirements, depth and
   breadth?" prompt (`evol_judge.jinja`), finds no information gain over the parent
   (`information_gain_reason`; a reply that is neither "Equal" nor "Not Equal" is a
   "parse failure"); then the teacher answers the new instruction, as it is, and
   (2) an answer with "sorry" in it and under 80 words shows the teacher could not
   respond (`sorry_reason`), and (3) an answer of only punctuation and stop words is
   no answer (`stop_words_reason`); an answer cut off by the length limit is rejected
   before these rules.
4. A survivor becomes a task (instruction = the evolved prompt, one instance whose output
   is the answer) and replaces its parent in the pool; a failure is written to the rejects
   file with its reason, the raw text and the candidate task, and its parent stays in the
   pool for the next round. Every task and reject records its operation and round.

The prompt evolved from an input task is its instruction plus, when its first instance
has a non-empty input, "\\n\\n" and that input (the reference joins instruction and input
the same way). Input tasks may be seed tasks or any task JSONL, Self-Instruct output
included. Only evolved tasks are written, never the input tasks themselves.

Where we go past the reference: its published code lacks the "complicate input" operation
(here: add a table, JSON, code, a formula... that the answer must use; the format is drawn
with the operation) and the whole elimination step, and it evolves each instruction once;
this module runs all M rounds with the pool and elimination of the paper. Also: a rewrite
identical to its parent counts as "no information gain" without asking the judge; a
rewrite cut off by the length limit is rejected ("rewrite hit the length limit"), being
half an instruction, and so is an answer cut off by it ("answer hit the length limit"; raise
`answer_sampling.max_tokens` to keep long answers); an empty answer is rejected as "empty
answer", and rule (3) spares one-word answers and answers with "yes" or "no" in them
("Yes.", "No, it is not.", "Both." are answers, not stop words); the reference's
system message ("You are a helpful assistant.") is not sent (the teacher's chat
template supplies its own). All prompt wording is ours; the facts are the reference's.

Resume is by replay: every draw and every sampling seed is a function of (seed, round,
item), so a rerun recomputes the rounds from the start with every finished request
answered from the request cache, and `TaskSink.accept` skips tasks already on disk.
`batches_done` (batches flushed by the earlier run) is used only to avoid writing those
batches' rejects a second time.

On `engine: ray` (`RunContext.lookahead` > 0) the loop first answers a window of whole
batches (at least `lookahead` pool items) stage by stage, one teacher call (one Ray
pipeline) per stage, into the request cache, and then runs those batches exactly as above
from the cache: the same tasks, the same rejects with the same batch numbers, the same stop
at `num` (at most one window is answered past it) and the same resume. Without the cache
(`teacher.cache: off`) it does not look ahead: each batch's stages are pipelines of their own.

    datagen generate --method evol-instruct --seeds raw.jsonl --num 100 --out evol.jsonl
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field, field_validator

from datagen.config import SamplingParams, Strict
from datagen.generators.common import RunContext, TaskSink, lineage, stable_id
from datagen.prompts import Template, load_template
from datagen.records import Instance, Task
from datagen.rejects import PARSE_FAILURE, STAGE_EVOL, TEACHER_ERROR
from datagen.teachers.base import Completion, Message
from datagen.teachers.teacher import Teacher

ADD_CONSTRAINTS = "evol:add_constraints"
DEEPEN = "evol:deepen"
CONCRETIZE = "evol:concretize"
INCREASE_REASONING = "evol:increase_reasoning"
COMPLICATE_INPUT = "evol:complicate_input"
BREADTH = "evol:breadth"
DEPTH_OPERATIONS = (ADD_CONSTRAINTS, DEEPEN, CONCRETIZE, INCREASE_REASONING, COMPLICATE_INPUT)
OPERATIONS = (*DEPTH_OPERATIONS, BREADTH)

DEPTH = "evol_depth.jinja"
BREADTH_TEMPLATE = "evol_breadth.jinja"
JUDGE = "evol_judge.jinja"

# What "complicate input" adds to a prompt (the paper's examples: XML, SQL, code, formulas...).
DATA_FORMATS = (
    "a small table in Markdown",
    "a JSON object",
    "an XML snippet",
    "a SQL table with a few rows",
    "a short Python code snippet",
    "a shell command",
    "a LaTeX formula",
    "a few lines of CSV data",
)

# Rule (4): words of the rewriting prompts that must not leak into an evolved instruction.
# Checked in this order, so the most specific phrase is the one reported.
COPIED_PHRASES = (
    "#The Given Prompt#",
    "#Given Prompt#",
    "#Rewritten Prompt#",
    "#Created Prompt#",
    "given prompt",
    "rewritten prompt",
    "created prompt",
)

# Rule (3): a small English stop-word list (function words that carry no content).
STOP_WORDS = frozenset(
    """
    a about above after again against all am an and any are aren't as at be because been
    before being below between both but by can can't cannot could couldn't did didn't do
    does doesn't doing don't down during each few for from further had hadn't has hasn't
    have haven't having he he'd he'll he's her here here's hers herself him himself his how
    how's i i'd i'll i'm i've if in into is isn't it it's its itself just let's me more most
    mustn't my myself no nor not now of off on once only or other ought our ours ourselves
    out over own same shan't she she'd she'll she's should shouldn't so some such than that
    that's the their theirs them themselves then there there's these they they'd they'll
    they're they've this those through to too under until up very was wasn't we we'd we'll
    we're we've were weren't what what's when when's where where's which while who who's
    whom why why's will with won't would wouldn't yes you you'd you'll you're you've your
    yours yourself yourselves ok okay oh um uh well
    """.split()
)

NO_GAIN = "no information gain"
COULD_NOT_ANSWER = "teacher could not answer"
ONLY_STOP_WORDS = "answer is only punctuation and stop words"
EMPTY_ANSWER = "empty answer"
REWRITE_CUT_OFF = "rewrite hit the length limit"
ANSWER_CUT_OFF = "answer hit the length limit"
# "yes" and "no" answer a question: they count as content for rule (3)
ANSWER_WORDS = frozenset({"yes", "no"})


class EvolInstructConfig(Strict):
    """Evol-Instruct settings; the defaults follow the paper (M = 4 rounds, six operations)."""

    rounds: int = Field(4, ge=1)
    # drawn uniformly per item and round; "deepen" is accepted for "evol:deepen"
    operations: tuple[str, ...] = OPERATIONS
    items_per_batch: int = Field(32, ge=1)  # pool items evolved per teacher batch
    # Rewriting wants variety: the reference's temperature 1 / top_p 0.95. 512 tokens is
    # ample for a prompt that may add 10-20 words, or a table or code for complicate input.
    rewrite_sampling: SamplingParams = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=512)
    # Answers should be right rather than varied (variety comes from the instructions);
    # the reference's 2048 tokens, since an answer cut off by the limit is rejected.
    answer_sampling: SamplingParams = SamplingParams(temperature=0.7, top_p=1.0, max_tokens=2048)
    # The verdict is "Equal" or "Not Equal" (a few tokens); greedy, so it is reproducible.
    judge_sampling: SamplingParams = SamplingParams(temperature=0.0, max_tokens=8)
    # rule (2): an answer saying "sorry" in fewer words than this means the teacher gave up
    min_answer_words_for_sorry: int = Field(80, ge=1)

    @field_validator("operations")
    @classmethod
    def _known_operations(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        names = tuple(name if name.startswith("evol:") else f"evol:{name}" for name in value)
        if not names:
            raise ValueError("give at least one operation")
        unknown = next((name for name in names if name not in OPERATIONS), None)
        if unknown:
            raise ValueError(f"unknown operation {unknown!r} (choose from {', '.join(OPERATIONS)})")
        if len(set(names)) < len(names):
            raise ValueError("an operation is listed twice")
        return names


# -- pure functions: sampling, prompts, parsing, elimination rules ----------------------------


def user(text: str) -> list[Message]:
    return [{"role": "user", "content": text}]


def evolution_source(task: Task) -> str:
    """The prompt to evolve: the instruction, plus the first instance's input when it has one."""
    text = task.instruction.strip()
    first_input = task.instances[0].input.strip() if task.instances else ""
    return f"{text}\n\n{first_input}" if first_input else text


def plan_evolution(
    seed: int, round_number: int, task_id: str, operations: Sequence[str] = OPERATIONS
) -> tuple[str, str | None]:
    """(operation, data format for complicate input or None) for one item in one round.

    Drawn from a `random.Random` seeded with a string of (seed, round, id): string seeds
    hash the same in every process, so a rerun draws the same plan.
    """
    rng = random.Random(f"evol-instruct:{seed}:{round_number}:{task_id}")
    operation = rng.choice(list(operations))
    data_format = rng.choice(DATA_FORMATS) if operation == COMPLICATE_INPUT else None
    return operation, data_format


def rewrite_template(operation: str) -> Template:
    return load_template(BREADTH_TEMPLATE if operation == BREADTH else DEPTH)


def evolution_messages(operation: str, prompt: str, data_format: str | None = None) -> list[Message]:
    """The rewriting prompt that applies `operation` to `prompt`."""
    if operation not in OPERATIONS:
        raise ValueError(f"unknown operation {operation!r}")
    if operation == COMPLICATE_INPUT and not data_format:
        raise ValueError("complicate input needs a data format")
    text = rewrite_template(operation).render(operation=operation, prompt=prompt.strip(), data_format=data_format)
    return user(text)


def judge_messages(parent: str, evolved: str) -> list[Message]:
    """The paper's equality prompt: does `evolved` add anything over `parent`?"""
    return user(load_template(JUDGE).render(first=parent.strip(), second=evolved.strip()))


def answer_messages(instruction: str) -> list[Message]:
    """The teacher answers the evolved instruction as it is, with no template (as the reference)."""
    return user(instruction)


_LEADING_LABEL = re.compile(
    r"^[\s*_`]*(?:#\s*(?:the\s+)?(?:rewritten|created)\s+prompt\s*#[\s*_`]*:?"
    r"|(?:the\s+)?(?:rewritten|created)\s+prompt[\s*_`]*:)[\s*_`]*",
    re.IGNORECASE,
)
_QUOTES = {'"': '"', "'": "'", "“": "”", "«": "»"}


def parse_rewrite(text: str) -> str | None:
    """The evolved instruction in a rewriter reply, or None when nothing is left.

    Cleaning only: a leading label ("#Rewritten Prompt#:", "**Created Prompt:**") and one
    pair of quotes around the whole reply are removed. Rewriter words anywhere else stay,
    for `copied_words_reason` to reject.
    """
    text = _LEADING_LABEL.sub("", text.strip(), count=1).strip()
    closing = _QUOTES.get(text[:1])
    if closing and len(text) > 1 and text.endswith(closing) and text[0] not in text[1:-1] and closing not in text[1:-1]:
        text = text[1:-1].strip()
    return text or None


_VERDICT_LABEL = re.compile(r"^(?:your\s+)?(?:judge?ment|answer|verdict)\s*:\s*", re.IGNORECASE)


def parse_judge_reply(text: str) -> bool | None:
    """True for "Equal", False for "Not Equal", None for anything else.

    Strict: the first non-empty line must be the verdict alone, give or take case,
    surrounding quotes or markdown, a final period and a "Judgement:" label.
    """
    line = next((line for line in text.splitlines() if line.strip()), "")
    line = _VERDICT_LABEL.sub("", line.strip().strip("*_`\"'").strip())
    verdict = re.sub(r"\s+", " ", line.strip("*_`\"'.! ").lower())
    if verdict == "equal":
        return True
    if verdict in ("not equal", "not-equal", "unequal"):
        return False
    return None


def information_gain_reason(judge_reply: str) -> str | None:
    """Rule (1): the judge found the evolved instruction equal to its parent."""
    verdict = parse_judge_reply(judge_reply)
    if verdict is None:
        return PARSE_FAILURE
    return NO_GAIN if verdict else None


def sorry_reason(answer: str, min_words: int = 80) -> str | None:
    """Rule (2): "sorry" in a short answer means the teacher could not respond."""
    if "sorry" in answer.lower() and len(answer.split()) < min_words:
        return COULD_NOT_ANSWER
    return None


def stop_words_reason(answer: str) -> str | None:
    """Rule (3): an answer made only of punctuation and stop words (or nothing) is no answer.

    A one-word answer ("Both.", "42") is an answer, and "yes" / "no" count as content
    ("No, it is not." answers a question): the rule is for replies with nothing in them.
    """
    if not answer.strip():
        return EMPTY_ANSWER
    words = re.findall(r"\w+(?:'\w+)*", answer.lower().replace("’", "'"))
    if len(words) == 1 or any(word in ANSWER_WORDS for word in words):
        return None
    if all(word in STOP_WORDS for word in words):
        return ONLY_STOP_WORDS
    return None


_COPIED = [
    (phrase, re.compile(re.escape(phrase) if phrase.startswith("#") else rf"(?<![a-z]){re.escape(phrase)}(?![a-z])",
                        re.IGNORECASE))
    for phrase in COPIED_PHRASES
]


def copied_words_reason(instruction: str) -> str | None:
    """Rule (4): the evolved instruction copies words of the rewriting prompt (any case).

    The bare phrases count as whole words only: "given prompts of users" is not a copy.
    """
    folded = re.sub(r"\s+", " ", instruction)
    hit = next((phrase for phrase, pattern in _COPIED if pattern.search(folded)), None)
    return f"copies rewriter words: {hit}" if hit else None


# -- the loop ---------------------------------------------------------------------------------


@dataclass
class _Evolution:
    parent: Task
    round: int
    operation: str
    data_format: str | None
    source: str
    position: int  # index of the parent in its batch
    completions: list[Completion] = field(default_factory=list)
    instruction: str = ""
    answer: Completion | None = None


def _have(sink: TaskSink) -> int:
    return len(sink.existing) + sink.produced


def run_evol_instruct(seeds: Sequence[Task], settings: EvolInstructConfig, run: RunContext) -> None:
    """Evolve `seeds` into `sink` until it holds `num` tasks or all rounds are done.

    Tasks already in the sink count toward `num`. Every evolved prompt gets one answer, so
    `instances_per_task` is ignored. Resume is by replay (see the module docstring): the
    rounds are recomputed from the start, from the cache, so `batches_done` is not needed
    to skip work; it only stops the rejects of batches flushed before from being written
    again. `on_batch_done(k)` is called after the k-th batch is flushed.
    """
    teacher, sink, num, seed = run.teacher, run.sink, run.num, run.seed
    if _have(sink) >= num:
        return
    backend = (teacher.backend.name, teacher.backend.model)
    pool = list(seeds)
    batch = 0
    # engine: ray answers a window of whole batches ahead, stage by stage (a pipeline each),
    # into the request cache; the batches below then run exactly as on engine: local
    look_ahead = run.lookahead > 0 and teacher.cache is not None
    for round_number in range(1, settings.rounds + 1):
        next_pool = list(pool)
        answered_to = 0
        for start in range(0, len(pool), settings.items_per_batch):
            if look_ahead and start >= answered_to:
                answered_to = start + run.lookahead_batches(settings.items_per_batch) * settings.items_per_batch
                with teacher.answering_ahead():
                    _evolve_batch(pool[start:answered_to], round_number, teacher, settings, seed, backend, _discard)
            replayed = batch < run.batches_done
            sink.at(batch, round_number)
            reject = _discard if replayed else sink.reject
            items = pool[start : start + settings.items_per_batch]
            survivors = _evolve_batch(items, round_number, teacher, settings, seed, backend, reject)
            fresh = []
            for index, task in survivors:
                next_pool[start + index] = task
                if _have(sink) < num:
                    fresh += sink.accept([task])
            sink.flush()
            batch += 1
            run.on_batch_done(batch)
            run.progress(len(fresh))
            if _have(sink) >= num:
                return
        pool = next_pool


def _discard(_reason: str, _stage: str, **_fields: Any) -> None:
    """Stands in for `sink.reject` while replaying a batch whose rejects are already on disk."""


def _evolve_batch(
    items: list[Task],
    round_number: int,
    teacher: Teacher,
    settings: EvolInstructConfig,
    seed: int,
    backend: tuple[str, str],
    reject: Callable[..., None],
) -> list[tuple[int, Task]]:
    """Evolve, judge and answer `items`; (position in `items`, new task) for each survivor."""
    evolutions = []
    for position, item in enumerate(items):
        operation, data_format = plan_evolution(seed, round_number, item.id, settings.operations)
        evolutions.append(_Evolution(item, round_number, operation, data_format, evolution_source(item), position))
    # one sampling seed per (run seed, round): a parent retried with the same operation in a
    # later round is a new request, not a cache hit on its failed rewrite
    round_seed = seed * 1_000_003 + round_number
    rewrite_params = settings.rewrite_sampling.model_copy(update={"seed": round_seed})
    answer_params = settings.answer_sampling.model_copy(update={"seed": round_seed})
    lineage_args = (backend, settings, seed, rewrite_params, answer_params)

    replies = teacher.complete(
        [evolution_messages(e.operation, e.source, e.data_format) for e in evolutions], rewrite_params
    )
    judged = []
    for evolution, [reply] in zip(evolutions, replies):
        evolution.completions.append(reply)
        where = f"{evolution.operation} round {round_number} of {evolution.parent.id}: rewriter reply"
        if not reply.ok:
            reject(TEACHER_ERROR, STAGE_EVOL, detail=f"{where}: {reply.error}")
            continue
        if reply.finish_reason == "length":
            reject(REWRITE_CUT_OFF, STAGE_EVOL, raw=reply.text, detail=where)
            continue
        instruction = parse_rewrite(reply.text)
        if instruction is None:
            reject(PARSE_FAILURE, STAGE_EVOL, raw=reply.text, detail=where)
            continue
        evolution.instruction = instruction
        reason = copied_words_reason(instruction)
        if reason is None and instruction.split() == evolution.source.split():
            reason, where = NO_GAIN, f"{where} (identical to its parent)"
        if reason:
            reject(reason, STAGE_EVOL, raw=reply.text, detail=where, task=_to_task(evolution, *lineage_args))
            continue
        judged.append(evolution)

    verdicts = teacher.complete([judge_messages(e.source, e.instruction) for e in judged], settings.judge_sampling)
    answering = []
    for evolution, [verdict] in zip(judged, verdicts):
        evolution.completions.append(verdict)
        if not verdict.ok:
            task = _to_task(evolution, *lineage_args)
            reject(TEACHER_ERROR, STAGE_EVOL, detail=f"judge reply: {verdict.error}", task=task)
            continue
        reason = information_gain_reason(verdict.text)
        if reason:
            reject(reason, STAGE_EVOL, raw=verdict.text, detail="judge reply", task=_to_task(evolution, *lineage_args))
            continue
        answering.append(evolution)

    answers = teacher.complete([answer_messages(e.instruction) for e in answering], answer_params)
    survivors = []
    for evolution, [answer] in zip(answering, answers):
        evolution.completions.append(answer)
        if not answer.ok:
            reject(TEACHER_ERROR, STAGE_EVOL, detail=f"answer: {answer.error}", task=_to_task(evolution, *lineage_args))
            continue
        evolution.answer = answer
        task = _to_task(evolution, *lineage_args)
        # a cut-off answer is half an answer: not training data
        reason = (ANSWER_CUT_OFF if answer.finish_reason == "length" else None) or sorry_reason(
            answer.text, settings.min_answer_words_for_sorry) or stop_words_reason(answer.text)
        if reason:
            reject(reason, STAGE_EVOL, raw=answer.text, detail="answer", task=task)
            continue
        survivors.append((evolution.position, task))
    return survivors


def _to_task(
    evolution: _Evolution,
    backend: tuple[str, str],
    settings: EvolInstructConfig,
    seed: int,
    rewrite_params: SamplingParams,
    answer_params: SamplingParams,
) -> Task:
    """The task an evolution makes (also the candidate recorded with a reject)."""
    task_id = stable_id("evol", evolution.parent.id, str(evolution.round), evolution.operation, evolution.instruction)
    answer = evolution.answer
    extra: dict[str, Any] = {
        "answer_sampling": answer_params.model_dump(exclude={"n"}),
        "judge_sampling": settings.judge_sampling.model_dump(exclude={"n"}),
    }
    if evolution.data_format:
        extra["data_format"] = evolution.data_format
    if answer is not None:
        extra["answer_finish_reason"] = answer.finish_reason
    return Task(
        id=task_id,
        name=task_id,
        instruction=evolution.instruction,
        instances=[Instance(input="", output=answer.text.strip())] if answer is not None else [],
        is_classification=False,
        lineage=lineage(
            generator="evol-instruct",
            operation=evolution.operation,
            teacher_name=backend,
            templates=[rewrite_template(evolution.operation), load_template(JUDGE)],
            sampling=rewrite_params,
            seed=seed,
            completions=evolution.completions,
            round=evolution.round,
            parent_ids=[evolution.parent.id],
            **extra,
        ),
    )
