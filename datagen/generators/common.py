"""What every generator shares: the output sink, run counters, lineage stamping, ids, and
the text normalisation and input tally behind the "copies a demonstration" and "input shared
by too many tasks" rules.

A generation run appends accepted tasks to OUT and everything it threw away to
OUT's rejects file (`raw.jsonl` -> `raw.rejects.jsonl`), each flushed per batch, so a
killed run loses nothing it finished. A rerun reads OUT back and continues.

    with TaskSink(Path("raw.jsonl")) as sink:
        sink.reject(PARSE_FAILURE, STAGE_BOOTSTRAP, raw=reply.text)
        sink.accept([task]); sink.flush()
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from datagen.config import SamplingParams
from datagen.io import JsonlAppender, read_lines_tolerant, read_records, rejects_path
from datagen.prompts import Template
from datagen.records import Instance, Lineage, Reject, Task, Usage, takes_input
from datagen.rejects import PARSE_FAILURE, SHARED_INPUT
from datagen.rouge import RougeLIndex
from datagen.teachers.base import Completion, Message

if TYPE_CHECKING:
    from datagen.teachers.teacher import Teacher, TeacherConfig


def instances_toward_target(instances: Sequence[Instance]) -> int:
    """How many of `instances` count towards `instances_per_task`: in a task that takes
    input, those with one (a Natural-Instructions instance needs an input)."""
    if takes_input(instances):
        return sum(1 for instance in instances if instance.input)
    return len(instances)


def normalised_text(text: str) -> str:
    """`text` with whitespace folded, case removed and final punctuation (.:;!?) dropped: what
    "the same text" means when a reply is compared with the demonstrations of its prompt or
    with other tasks' inputs."""
    return re.sub(r"\s+", " ", text).strip().rstrip(".:;!?").rstrip().casefold()


# "copies a demonstration": a text holding this share of the word trigrams of a sentence of
# its prompt's demonstrations (the default `copy_overlap` of the generators that show them)
COPY_OVERLAP = 0.7
COPY_NGRAM = 3  # words per n-gram
_COPY_MIN_WORDS = COPY_NGRAM + 1  # shorter sentences ("Curiosity drives discovery.") count only whole
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+|\n+")
_COPY_WORD = re.compile(r"\w+")


def _ngrams(words: Sequence[str]) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + COPY_NGRAM]) for i in range(len(words) - COPY_NGRAM + 1)}


def copied_text(texts: Iterable[str], demonstrations: Iterable[str], overlap: float | None = None) -> str | None:
    """The demonstration, or the sentence of one, that one of `texts` copies; None if none.

    A text copies a demonstration when it equals it (normalised: `normalised_text`), or when
    it contains at least `overlap` of the word trigrams of one of its sentences of four words
    or more, anywhere and in any casing: "1. Keep your phone in another room." inside a longer
    list copies the demonstration it comes from, a text sharing a few common words does not.
    `overlap` None: whole copies only. Callers leave out demonstrations too short to count
    (labels, numbers)."""
    shown = [d for d in demonstrations if normalised_text(d)]
    sentences = [(sentence, grams) for d in shown for sentence in _SENTENCE_END.split(d.strip())
                 if len(words := _COPY_WORD.findall(sentence.casefold())) >= _COPY_MIN_WORDS
                 and (grams := _ngrams(words))]
    for text in texts:
        folded = normalised_text(text)
        if not folded:
            continue
        equal = next((d for d in shown if normalised_text(d) == folded), None)
        if equal is not None or overlap is None:
            if equal is not None:
                return equal
            continue
        present = _ngrams(_COPY_WORD.findall(folded))
        copied = next((sentence for sentence, grams in sentences if len(grams & present) >= overlap * len(grams)),
                      None)
        if copied is not None:
            return copied
    return None


class InputTally:
    """How many tasks of a run carry each (normalised, non-empty) input.

    Built from the tasks on disk, so a resumed run starts from the same counts and decides
    the same; `add` counts a task that was just accepted.
    """

    def __init__(self, tasks: Iterable[Task] = ()):
        self.counts: Counter[str] = Counter()
        for task in tasks:
            self.add(task.instances)

    def add(self, instances: Iterable[Instance]) -> None:
        self.counts.update({normalised_text(i.input) for i in instances} - {""})

    def tasks_with(self, text: str) -> int:
        return self.counts[normalised_text(text)]


def shared_input_reason(text: str, other_tasks: int, limit: int) -> str | None:
    """SHARED_INPUT when a non-empty input is already carried by more than `limit`
    other tasks of the run (a teacher copying one input into every task it writes)."""
    if text.strip() and other_tasks > limit:
        return SHARED_INPUT
    return None


def stable_id(prefix: str, *parts: str) -> str:
    """A content-derived id, so a resumed run gives the same task the same id."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:16]
    return f"{prefix}-{digest}"


class TaskSink:
    """Accepted tasks and rejects of one run, buffered per batch and flushed together."""

    def __init__(self, output: str | Path, record: type[BaseModel] = Task):
        self.output = Path(output)
        # the appenders first: opening cuts a line a kill left half-written, which would
        # otherwise stop the read of OUT below
        self._tasks = JsonlAppender(self.output)
        self._rejects = JsonlAppender(rejects_path(self.output))
        # `record`: what OUT holds (tasks; preference pairs for `--method preferences`)
        self.existing: list[Task] = list(read_records(self.output, record))
        self._known_ids = {task.id for task in self.existing}
        self._pending_tasks: list[Task] = []
        self._pending_rejects: list[Reject] = []
        self.produced = 0
        self.parse_failures = 0
        self._batch: int | None = None
        self._round: int | None = None
        self.reject_reasons: Counter[str] = Counter()
        # a run replaying its first batches from the cache (a resumed pipeline) wrote their
        # rejects before: rejects stamped with a batch below this are neither kept nor counted
        self.replaying_before = 0

    def accept(self, tasks: list[Task]) -> list[Task]:
        """Queue new tasks; ones already on disk (same id, after a resume) are skipped."""
        fresh = [task for task in tasks if task.id not in self._known_ids]
        self._known_ids.update(task.id for task in fresh)
        self._pending_tasks.extend(fresh)
        self.produced += len(fresh)
        return fresh

    def at(self, batch: int, round: int | None = None) -> None:
        """Stamp the rejects that follow with the batch (and round) producing them, so a
        resumed run's rejects file tells a repeated reject from a line written twice."""
        self._batch, self._round = batch, round

    def reject(self, reason: str, stage: str, **fields: Any) -> None:
        if self._batch is not None and self._batch < self.replaying_before:
            return
        if reason == PARSE_FAILURE:
            self.parse_failures += 1
        self.reject_reasons[reason] += 1
        self._pending_rejects.append(Reject(reason=reason, stage=stage, batch=self._batch, round=self._round, **fields))

    def flush(self, before_batch: int | None = None) -> None:
        """Write the batch: rejects first, then tasks, each fsynced. With `before_batch`, the
        rejects of later batches (still being decided) stay queued."""
        queued = self._pending_rejects
        written = [r for r in queued if before_batch is None or (r.batch or 0) < before_batch]
        self._pending_rejects = [r for r in queued if before_batch is not None and (r.batch or 0) >= before_batch]
        self._rejects.write_many(written)
        self._tasks.write_many(self._pending_tasks)
        self._pending_tasks = []

    def forget_from(self, batch: int) -> None:
        """Drop the queued rejects of `batch` and later (undecided when a run stops: a rerun
        decides those batches again)."""
        self._pending_rejects = [r for r in self._pending_rejects if (r.batch or 0) < batch]

    def close(self) -> None:
        self.flush()
        self._tasks.close()
        self._rejects.close()

    def __enter__(self) -> TaskSink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def lineage(
    *,
    generator: str,
    operation: str,
    teacher_name: tuple[str, str],
    templates: list[Template],
    sampling: SamplingParams,
    seed: int | None,
    completions: list[Completion],
    round: int | None = None,
    parent_ids: list[str] | None = None,
    **extra: Any,
) -> Lineage:
    """The lineage of a record made from `completions` with `templates` (the first is the main one)."""
    usage = Usage()
    for completion in completions:
        usage.add(completion.prompt_tokens, completion.completion_tokens)
    return Lineage(
        generator=generator,
        operation=operation,
        round=round,
        parent_ids=parent_ids or [],
        template=templates[0].name if templates else None,
        template_sha256=templates[0].sha256 if templates else None,
        templates={t.name: t.sha256 for t in templates},
        teacher_backend=teacher_name[0],
        teacher_model=teacher_name[1],
        sampling=sampling.model_dump(exclude={"n"}),
        seed=seed,
        usage=usage,
        **extra,
    )


class InstructionPool:
    """The instructions a new one must differ from (the Self-Instruct novelty rule, shared
    by Self-Instruct and Alpaca): the seeds and every accepted instruction, plus those kept
    earlier in the current batch, each a `RougeLIndex`."""

    def __init__(self, instructions: Iterable[str] = ()):
        self.accepted = RougeLIndex(list(instructions))
        self.batch = RougeLIndex()

    def new_batch(self) -> None:
        self.batch = RougeLIndex()

    def too_similar(self, instruction: str, threshold: float) -> str | None:
        """The reject detail when `instruction` has ROUGE-L F1 above `threshold` with one in
        the pool (`ROUGE-L 0.812 with: <that instruction>`), else None."""
        close = next((m for index in (self.accepted, self.batch) if (m := index.first_above(instruction, threshold))),
                     None)
        return None if close is None else f"ROUGE-L {close.score:.3f} with: {close.text}"

    def admit(self, instruction: str, keep: int) -> tuple[dict[str, float], float]:
        """Add `instruction` to the batch; return its `keep` nearest instructions with their
        ROUGE-L and its mean ROUGE-L over the pool (for lineage), measured before adding."""
        matches, total, count = [], 0.0, 0
        for index in (self.accepted, self.batch):
            if len(index):
                found = index.nearest(instruction, keep)
                matches += found.matches
                total += found.mean * len(index)
                count += len(index)
        best = sorted(matches, key=lambda m: -m.score)[:keep]
        self.batch.add(instruction)
        return {m.text: m.score for m in best}, (total / count if count else 0.0)


@dataclass
class RunContext:
    """What a generation method gets besides its seeds and its settings: the teacher, where
    its output goes, how much to make, and the hooks the generate stage listens on."""

    teacher: Teacher
    sink: TaskSink
    num: int  # stop when the sink holds this many tasks (those already on disk count)
    seed: int = 0
    instances_per_task: int = 1  # methods that answer existing instances ignore it
    batches_done: int = 0  # batches a killed run flushed (resume)
    # engine: ray: how many items a method with `looks_ahead` answers ahead of its batches, one
    # teacher call per stage (one pipeline each), so the batches then read the request cache
    lookahead: int = 0
    progress: Callable[[int], None] = lambda _n: None  # called with the tasks a batch added
    on_batch_done: Callable[[int], None] = lambda _n: None  # called with the batch count after each flush
    # opens a further teacher by name (preferences' responders with a backend of their own), so
    # the run summary and --estimate count its requests; None: `make_teacher`, not counted
    open_teacher: Callable[[str, TeacherConfig], Teacher] | None = None

    def lookahead_batches(self, per_batch: int) -> int:
        """How many whole batches of `per_batch` items cover `lookahead` items (at least one)."""
        return max(1, -(-self.lookahead // per_batch))


Run = Callable[[Sequence[Task], Any, RunContext], None]


@dataclass(frozen=True)
class GenerationMethod:
    """A registered method: `run(seeds, settings, context)` and the `generate:` section
    (field name and settings model) that configures it.

    For `engine: ray` (a method with neither runs only on `engine: local`: it is iterative):
    `plan(seeds, settings, context)` yields every (messages, sampling) request `run` will send,
    in its order, so a pipeline can answer them ahead of the loop; `looks_ahead`: `run` answers
    `context.lookahead` items at a time ahead of its batches (e.g. a window of one round).
    """

    run: Run
    section: str
    settings: type[BaseModel]
    record: type[BaseModel] = Task  # the record OUT holds, read back on resume
    plan: Callable[[Sequence[Task], Any, RunContext], Iterable[tuple[list[Message], SamplingParams]]] | None = None
    looks_ahead: bool = False


class ReplayedRejects:
    """A stage's rejects for this run, minus those a previous run of the same OUT already wrote.

    A rerun replays the same decisions (from the request cache), so each reject it makes again
    matches one on disk (by reason, detail, raw text and task id) and is not written twice.
    """

    def __init__(self, sink: TaskSink, stage: str):
        self.sink, self.stage = sink, stage
        self.on_disk: Counter[tuple] = Counter()
        path = rejects_path(sink.output)
        if path.exists():
            for _number, line in read_lines_tolerant(path):
                try:
                    record = json.loads(line) if line is not None else None
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                if isinstance(record, dict) and record.get("stage") == stage:
                    task = record.get("task") or {}
                    self.on_disk[(record.get("reason"), record.get("detail"), record.get("raw"), task.get("id"))] += 1

    def __call__(self, reason: str, *, detail: str | None = None, raw: str | None = None,
                 task: Task | None = None) -> None:
        key = (reason, detail, raw, task.id if task else None)
        if self.on_disk[key] > 0:
            self.on_disk[key] -= 1
            return
        self.sink.reject(reason, self.stage, detail=detail, raw=raw, task=task)
