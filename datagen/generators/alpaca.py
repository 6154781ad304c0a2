"""Alpaca (Taori et al. 2023): Self-Instruct in one pass, following tatsu-lab/stanford_alpaca.

The reference is `generate_instruction.py` and `prompt.txt` of that repository. One batch:

1. *Prompt*: each prompt shows 3 seed tasks sampled from the seeds only (never from
   generated tasks), each with the instruction, input and output of its first instance,
   in the numbered format below (`<noinput>` for an empty input), asks for a list of 20
   tasks and ends with the label of the next one. The teacher continues the list; it
   stops at item 20 (stop sequences "\\n20" and "20."), so a reply holds up to 16 tasks.

       ###
       1. Instruction: Give three tips for staying healthy.
       1. Input:
       <noinput>
       1. Output:
       Eat a balanced diet, ...
       ###
       4. Instruction:

2. *Parse*: the reply is split at "###"; each piece must hold "N. Instruction:",
   "N. Input:" and "N. Output:" once each, in that order. `<noinput>` becomes "". When the
   reply hit the length limit its last piece is dropped (it is likely cut off).
3. *Filter* with Self-Instruct's rules (`self_instruct.instruction_reject_reason`: more
   than 3 and at most 150 words, a whole-word keyword blacklist, not starting with "Write
   a program", with punctuation or with a non-ASCII character), Alpaca's longer blacklist
   (adds video, audio, music, flowchart, diagram), and the ROUGE-L rule: F1 > 0.7 against
   any seed or accepted instruction rejects it. The 10 most similar instructions and the
   mean similarity go into lineage, as the reference stores them.

4. *Copying* (not in the reference): an item whose instruction equals one of its prompt's
   tasks, or whose input or output equals the input or output shown with them (texts of
   three words or more; whitespace, case and final punctuation folded) or holds
   `copy_overlap` (0.7 by default; null for whole copies only) of the word trigrams of one of their
   sentences, is rejected as
   "copies a demonstration"; an item whose non-empty input more than `max_other_tasks_per_input`
   other tasks of the run already carry (tasks on disk, counted again on resume, and items
   kept earlier in the batch) is rejected as "input shared by too many tasks".

Unlike Self-Instruct, there is no classification step and no second request for
instances: one reply gives whole tasks, each with exactly one instance, so
`instances_per_task` does not apply. Every task gets `is_classification=False`.

Every thrown-away item goes to the rejects file (stage "alpaca") with its reason and raw
text: a chat model's opening line ("chat preamble", as in Self-Instruct), unparseable
pieces ("parse failure"), the cut-off last item ("reply hit the length
limit"), every filter rule, and valid tasks beyond `--num` ("surplus beyond num").

Where we differ from the reference, on purpose:
- the prompt (`templates/alpaca_generate.jinja`) is our own wording of the reference's
  requirements (varied verbs, phrasing and kinds of task, text-only, English, 1-2
  sentences, realistic inputs under ~100 words, `<noinput>`, outputs under 100 words), and
  it also spells out the "###" / "N. Instruction:" format, which the reference leaves to
  the examples;
- its pieces must be numbered by position (the k-th piece must carry number 3 + k); we
  accept any number as long as a piece's three labels share it, so a reply that skips
  or repeats a number loses nothing but what is actually malformed;
- a reply that itself starts with an "N. Instruction:" label or with "###" (chat models
  repeat the label they were given, or start a fresh item) gets no label prepended;
- an item with an empty output is rejected ("empty output"); the reference keeps it;
- the reference drops its failures silently; we keep each one as a reject;
- its stop list `["\\n20", "20.", "20."]` repeats "20." and is sent deduplicated, and it
  follows `tasks_per_prompt` when that is changed and `sampling` is left at its default;
- its `logit_bias` against `<|endoftext|>` (a GPT-3 token id) is not sent: no backend-neutral
  equivalent exists;
- a batch adds at most the tasks still missing from `num` (the reference keeps the whole
  last batch; the surplus goes to the rejects here);
- the reference's unseeded global `random.sample` becomes a per-batch
  `random.Random(f"alpaca:{seed}:{batch}")` and every request carries a per-batch sampling
  seed, so a resumed run repeats its prompts, hits the request cache and repeats its
  decisions; the ROUGE-L pool is the seeds plus the tasks on disk plus a batch-local pool,
  which gives the reference's decisions while nothing half-done leaks into a resume.

Keeping the engine busy: a batch's prompts and sampling seed depend only on (seed, batch),
never on the pool, so with the request cache on (`teacher.cache: use`) the loop answers a
window of `batches_ahead` whole batches (default 4: 20 requests at once, inside the
default `max_concurrency` of 32, and at most 3 batches answered past the end of the run)
in ONE teacher call (`Teacher.complete_many`: one vLLM batch, one HTTP burst, one Ray
pipeline), each reply cached as it arrives, and then runs those batches exactly as above,
from the cache: the same tasks, rejects, batch numbers and resume as `batches_ahead: 1`
with a teacher whose reply depends on the request alone (an API at a fixed seed); a batched
engine (vLLM, the local backend) answers a request a little differently in another batch, so
there the window changes the text, not the method. Windows start at multiples of the window
(batches 0-3, 4-7, ...), so a resumed or extended run sends the same groups as an
uninterrupted one.
What a window answers past the batch where the run stops stays in the cache (for a rerun
with a larger `num`). With `cache: off` there is no window (its replies would be paid for
twice); with `cache: only` neither (a replay asks for nothing more than the run needs). On
`engine: ray` the window is at least `RunContext.lookahead` requests (replicas x
batch_size), so each pipeline is full.

    datagen generate --method alpaca --num 100 --out alpaca.jsonl
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import Field, model_validator

from datagen.config import SamplingParams, Strict
from datagen.errors import DatagenError
from datagen.generators.common import (
    COPY_OVERLAP,
    InputTally,
    InstructionPool,
    RunContext,
    TaskSink,
    lineage,
    normalised_text,
    shared_input_reason,
    stable_id,
)
from datagen.generators.self_instruct import (
    CHAT_OPENER,
    REFERENCE_BLACKLIST,
    GenerationStalled,
    clean_instruction,
    copied_demonstration,
    copied_instruction,
    instruction_reject_reason,
    sample_prompt_tasks,
    user,
)
from datagen.prompts import Template, load_template
from datagen.records import Instance, Task
from datagen.rejects import (
    COPIED_DEMONSTRATION,
    LENGTH_LIMIT,
    PARSE_FAILURE,
    PREAMBLE,
    STAGE_ALPACA,
    SURPLUS,
    TEACHER_ERROR,
    TOO_SIMILAR,
)
from datagen.teachers.base import Completion, Message

__all__ = [
    "ALPACA_BLACKLIST",
    "ALPACA_EXTRA_BLACKLIST",
    "AlpacaConfig",
    "AlpacaItem",
    "GenerationStalled",
    "ParsedReply",
    "alpaca_messages",
    "batch_prompts",
    "batches_window",
    "item_reject_reason",
    "parse_alpaca_reply",
    "reference_stop",
    "run_alpaca",
]

ALPACA_EXTRA_BLACKLIST = ("video", "audio", "music", "flowchart", "diagram")
ALPACA_BLACKLIST = REFERENCE_BLACKLIST + ALPACA_EXTRA_BLACKLIST
NO_INPUT = "<noinput>"
SEPARATOR = "###"
GENERATE = "alpaca_generate.jinja"


def reference_stop(tasks_per_prompt: int = 20) -> tuple[str, ...]:
    """The reference's stop sequences (it hard-codes them for 20 tasks), deduplicated."""
    return (f"\n{tasks_per_prompt}", f"{tasks_per_prompt}.")


class AlpacaConfig(Strict):
    """Alpaca settings; defaults are the reference's (`generate_instruction.py`)."""

    seeds_per_prompt: int = Field(3, ge=1)  # num_prompt_instructions=3
    tasks_per_prompt: int = Field(20, ge=2)  # "List of 20 tasks", stop at "\n20"
    prompts_per_batch: int = Field(5, ge=1)  # request_batch_size=5
    similarity_threshold: float = Field(0.7, gt=0.0, le=1.0)
    most_similar_kept: int = Field(10, ge=0)
    min_words: int = 3  # an instruction needs more than this many words
    max_words: int = 150
    blacklist: tuple[str, ...] = ALPACA_BLACKLIST
    sampling: SamplingParams = SamplingParams(
        temperature=1.0, top_p=1.0, max_tokens=3072, stop=reference_stop(20)
    )
    # give up (with a message) after this many batches in a row add no task
    max_stalled_batches: int = Field(20, ge=1)
    # an item whose non-empty input more than this many other tasks of the run already carry
    # is rejected (weak teachers paste one input into every task); not in the reference
    max_other_tasks_per_input: int = Field(2, ge=0)
    # an item holding this share of the word trigrams of a sentence of the input or output
    # shown in its prompt copies it ("copies a demonstration"); not in the reference; None: whole copies only
    copy_overlap: float | None = Field(COPY_OVERLAP, gt=0.0, le=1.0)
    # answer this many whole batches in one teacher call (into the request cache) before
    # running them one by one from there, so the engine gets prompts_per_batch x batches_ahead
    # requests at once; 1 = one batch at a time. Only with `teacher.cache: use` (else 1). The
    # last window may answer up to batches_ahead - 1 batches the run does not need (they stay
    # cached, for a rerun with a larger num)
    batches_ahead: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _check_counts(self) -> AlpacaConfig:
        if self.tasks_per_prompt <= self.seeds_per_prompt + 1:
            raise ValueError(
                f"tasks_per_prompt ({self.tasks_per_prompt}) must exceed seeds_per_prompt + 1 "
                f"({self.seeds_per_prompt + 1}), or the teacher has no task left to write"
            )
        if "sampling" not in self.model_fields_set and self.tasks_per_prompt != 20:
            self.sampling = self.sampling.model_copy(update={"stop": reference_stop(self.tasks_per_prompt)})
        return self


# -- pure functions: prompt, parse, rules -----------------------------------------------------


def alpaca_messages(shown: Sequence[Task], tasks_per_prompt: int = 20) -> list[Message]:
    """The prompt showing `shown` (their first instance each) and asking for the next task."""
    examples = []
    for task in shown:
        first = task.instances[0] if task.instances else Instance(output="")
        examples.append({
            "instruction": clean_instruction(task.instruction),
            "input": first.input if first.input.strip() else NO_INPUT,
            "output": first.output,
        })
    return user(load_template(GENERATE).render(tasks=examples, total=tasks_per_prompt))


@dataclass(frozen=True)
class AlpacaItem:
    """One generated task: instruction, input ("" for `<noinput>`) and output."""

    instruction: str
    input: str
    output: str
    raw: str = field(default="", compare=False)  # the piece of the reply it came from


@dataclass
class ParsedReply:
    items: list[AlpacaItem] = field(default_factory=list)
    malformed: list[tuple[str, str]] = field(default_factory=list)  # (raw piece, what is wrong)
    cut_off: str | None = None  # the last piece, dropped because the reply hit the length limit
    preamble: str | None = None  # a chat model's opening line ("Sure! Here are more tasks:")


_LABEL = re.compile(r"(\d+)\.\s+(Instruction|Input|Output):")
_OWN_START = re.compile(r"\s*(\d+\.\s+Instruction:|###)")
_FIELDS = ["Instruction", "Input", "Output"]


def parse_item(piece: str) -> AlpacaItem | str:
    """One "###"-separated piece as an item, or what is wrong with it.

    Text before the first label is ignored, as the reference ignores it.
    """
    parts = _LABEL.split(piece)
    numbers, labels = parts[1::3], parts[2::3]
    if labels != _FIELDS:
        found = ", ".join(f"'{n}. {label}:'" for n, label in zip(numbers, labels)) or "none"
        return f"expected 'N. Instruction:', 'N. Input:', 'N. Output:' once each in that order; found {found}"
    if len(set(numbers)) != 1:
        return f"the fields carry different numbers: {', '.join(numbers)}"
    instruction, instance_input, output = (parts[i].strip() for i in (3, 6, 9))
    if instance_input.lower() == NO_INPUT:
        instance_input = ""
    return AlpacaItem(instruction, instance_input, output, raw=piece)


def parse_alpaca_reply(text: str, first_number: int, finish_reason: str) -> ParsedReply:
    """Items in a reply that continues the list at `first_number` ("N. Instruction:" was the prompt's end)."""
    parsed = ParsedReply()
    if not text.strip():
        parsed.malformed.append((text, "empty reply"))
        return parsed
    first, _newline, rest = text.strip().partition("\n")
    if not _OWN_START.match(text) and CHAT_OPENER.match(first):
        parsed.preamble, text = first, rest
        if not text.strip():
            return parsed
    body = text if _OWN_START.match(text) else f"{first_number}. Instruction:{text}"
    pieces = body.split(SEPARATOR)
    if finish_reason == "length":
        last = pieces.pop()
        if last.strip():
            parsed.cut_off = last
    for piece in pieces:
        if not piece.strip():
            continue
        item = parse_item(piece)
        if isinstance(item, str):
            parsed.malformed.append((piece, item))
        else:
            parsed.items.append(item)
    if not (parsed.items or parsed.malformed or parsed.cut_off):
        parsed.malformed.append((text, "no items in the reply"))
    return parsed


def copied_from_prompt(item: AlpacaItem, shown: Sequence[Task], overlap: float | None = None) -> str | None:
    """What `item` copies of the tasks its prompt showed (their instruction, whole; or the
    input or output of the instance shown, three words or more, whole or in part), or None."""
    copied = copied_instruction(item.instruction, [task.instruction for task in shown])
    if copied is None:
        demonstrations = [task.model_copy(update={"instances": task.instances[:1]}) for task in shown]
        copied = copied_demonstration(Instance(input=item.input, output=item.output), demonstrations, overlap)
    return copied


def item_reject_reason(
    item: AlpacaItem,
    blacklist: Sequence[str] = ALPACA_BLACKLIST,
    min_words: int = 3,
    max_words: int = 150,
) -> str | None:
    """Self-Instruct's instruction rules with Alpaca's blacklist, then a non-empty output."""
    reason = instruction_reject_reason(item.instruction, blacklist, min_words, max_words)
    if reason is None and not item.output:
        reason = "empty output"
    return reason


# -- the loop ---------------------------------------------------------------------------------


def run_alpaca(seeds: Sequence[Task], settings: AlpacaConfig, run: RunContext) -> None:
    """Generate tasks into `sink` until it holds `num` (tasks already there count).

    `run.instances_per_task` is ignored: an Alpaca task
    comes with exactly one instance. Batches start at `batches_done`, each with its own
    `random.Random(f"alpaca:{seed}:{batch}")`; `on_batch_done(batches)` follows each flush.
    With the request cache on, a window of `batches_window(...)` batches is answered in one
    teacher call before the first of them runs (see `batches_window`).
    """
    teacher, sink, num, seed = run.teacher, run.sink, run.num, run.seed
    showable = [task for task in seeds if task.instances]
    if not showable:
        raise DatagenError("alpaca: no seed task has an instance to show the teacher")
    count = len(sink.existing)
    pool = InstructionPool([t.instruction for t in seeds] + [t.instruction for t in sink.existing])
    tally = InputTally(sink.existing)  # rebuilt from OUT, so a resumed run decides the same
    backend = (teacher.backend.name, teacher.backend.model)
    template = load_template(GENERATE)
    batch = run.batches_done
    stalled = 0
    window = batches_window(settings, run)
    answered_to = batch
    while count < num:
        if stalled >= settings.max_stalled_batches:
            raise GenerationStalled(
                f"alpaca: {stalled} batches in a row produced no task; "
                f"see the rejects file for why ({count} of {num} tasks so far)"
            )
        if window > 1 and batch >= answered_to:
            # the prompts of later batches do not depend on this one's outcome: answer the
            # window in one call into the cache; the batches below then read it back. Windows
            # start at multiples of `window`, so a resumed or extended run groups its requests
            # as an uninterrupted one (a batched engine's reply depends on its batch)
            start = batch - batch % window
            answered_to = start + window
            with teacher.answering_ahead():
                teacher.complete_many([batch_prompts(showable, settings, seed, b)[1:]
                                       for b in range(start, answered_to)])
        sink.at(batch)
        shown, conversations, params = batch_prompts(showable, settings, seed, batch)
        replies = teacher.complete(conversations, params)
        pool.new_batch()
        batch_inputs = InputTally()
        candidates: list[Task] = []
        for tasks_shown, [reply] in zip(shown, replies):
            candidates += _screen_reply(
                reply, tasks_shown, settings, sink, pool, (tally, batch_inputs),
                backend=backend, template=template, params=params, seed=seed,
            )
        keep = candidates[: num - count]
        for task in candidates[len(keep):]:
            sink.reject(SURPLUS, STAGE_ALPACA, task=task, detail=f"{num} tasks were asked for")
        fresh = sink.accept(keep)
        sink.flush()
        count += len(fresh)
        pool.accepted.extend(t.instruction for t in fresh)
        for task in fresh:
            tally.add(task.instances)
        batch += 1
        stalled = 0 if fresh else stalled + 1
        run.on_batch_done(batch)
        run.progress(len(fresh))


def batch_prompts(
    showable: Sequence[Task], settings: AlpacaConfig, seed: int, batch: int
) -> tuple[list[list[Task]], list[list[Message]], SamplingParams]:
    """Batch `batch`'s prompts: the seeds each shows, the conversations and their sampling.

    A function of (seed, batch) only, never of the pool, so any batch can be asked for ahead.
    """
    rng = random.Random(f"alpaca:{seed}:{batch}")
    shown = [
        sample_prompt_tasks(showable, (), rng, settings.seeds_per_prompt, 0)
        for _ in range(settings.prompts_per_batch)
    ]
    params = settings.sampling.model_copy(update={"seed": seed * 1_000_003 + batch})
    return shown, [alpaca_messages(s, settings.tasks_per_prompt) for s in shown], params


def batches_window(settings: AlpacaConfig, run: RunContext) -> int:
    """How many batches one teacher call answers ahead: `batches_ahead`, on engine: ray at
    least `run.lookahead` requests' worth (replicas x batch_size, to fill the pipeline).

    1 unless the request cache reads and writes (`teacher.cache: use`): with `off` each
    window reply would be paid for twice, and `only` replays no more than the run asks.
    """
    window = max(settings.batches_ahead, run.lookahead_batches(settings.prompts_per_batch))
    return window if window > 1 and run.teacher.config.cache == "use" else 1


def _bare_task(item: AlpacaItem) -> Task:
    task_id = stable_id("alpaca", item.instruction)
    return Task(id=task_id, name=task_id, instruction=item.instruction,
                instances=[Instance(input=item.input, output=item.output)])


def _screen_reply(
    reply: Completion,
    shown: list[Task],
    settings: AlpacaConfig,
    sink: TaskSink,
    pool: InstructionPool,
    inputs: tuple[InputTally, InputTally],
    *,
    backend: tuple[str, str],
    template: Template,
    params: SamplingParams,
    seed: int,
) -> list[Task]:
    """The reply's tasks that pass every rule; everything else goes to the rejects."""
    if not reply.ok:
        sink.reject(TEACHER_ERROR, STAGE_ALPACA, detail=reply.error)
        return []
    parsed = parse_alpaca_reply(reply.text, len(shown) + 1, reply.finish_reason)
    if parsed.preamble is not None:
        sink.reject(PREAMBLE, STAGE_ALPACA, raw=parsed.preamble)
    for raw, why in parsed.malformed:
        sink.reject(PARSE_FAILURE, STAGE_ALPACA, raw=raw, detail=why)
    if parsed.cut_off is not None:
        sink.reject(LENGTH_LIMIT, STAGE_ALPACA, raw=parsed.cut_off,
                    detail="the last item of a reply cut off by max_tokens is dropped")
    kept: list[tuple[AlpacaItem, dict[str, float], float]] = []
    for item in parsed.items:
        reason = item_reject_reason(item, settings.blacklist, settings.min_words, settings.max_words)
        if reason is not None:
            sink.reject(reason, STAGE_ALPACA, raw=item.raw, task=_bare_task(item))
            continue
        copied = copied_from_prompt(item, shown, settings.copy_overlap)
        if copied is not None:
            sink.reject(COPIED_DEMONSTRATION, STAGE_ALPACA, raw=item.raw, task=_bare_task(item),
                        detail=f"shown in its prompt: {copied}")
            continue
        # other tasks: accepted ones and items kept earlier in this batch
        reason = shared_input_reason(item.input, sum(tally.tasks_with(item.input) for tally in inputs),
                                     settings.max_other_tasks_per_input)
        if reason is not None:
            sink.reject(reason, STAGE_ALPACA, raw=item.raw, task=_bare_task(item),
                        detail=f"input: {normalised_text(item.input)[:80]}")
            continue
        detail = pool.too_similar(item.instruction, settings.similarity_threshold)
        if detail is not None:
            sink.reject(TOO_SIMILAR, STAGE_ALPACA, raw=item.raw, task=_bare_task(item), detail=detail)
            continue
        similar, mean = pool.admit(item.instruction, settings.most_similar_kept)
        inputs[1].add([Instance(input=item.input, output=item.output)])
        kept.append((item, similar, mean))
    if not kept:
        return []
    # the reply's usage is split evenly over the tasks it yielded
    share = Completion("", "stop", reply.prompt_tokens // len(kept), reply.completion_tokens // len(kept))
    tasks = []
    for item, similar, mean in kept:
        task = _bare_task(item)
        task.lineage = lineage(
            generator="alpaca",
            operation="generate",
            teacher_name=backend,
            templates=[template],
            sampling=params,
            seed=seed,
            completions=[share],
            parent_ids=[t.id for t in shown],
            most_similar=similar,
            mean_similarity=mean,
        )
        tasks.append(task)
    return tasks
