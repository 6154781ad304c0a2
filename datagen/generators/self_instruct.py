"""Self-Instruct (Wang et al. 2022), following the reference code yizhongw/self-instruct.

One batch of the loop:

1. *Bootstrap*: each prompt lists 8 instructions, 6 sampled from the seeds and 2 from the
   tasks generated so far (fewer while that pool is small), numbered, and asks the teacher
   to continue the list; it stops at the reference stop sequences, and a reply that hit
   the length limit is dropped whole.
2. *Filter* every new instruction with the reference rules (`instruction_reject_reason`)
   and the ROUGE-L novelty rule: F1 > 0.7 against any seed or accepted instruction
   rejects it. The 10 most similar instructions and the mean similarity go into lineage.
3. *Classify*: a few-shot "is this a classification task?" prompt.
4. *Instances*: output-first for classification tasks, input-first otherwise; invalid
   instances are dropped (input == output, empty output, input/output ending in ':'),
   and a task whose identical inputs map to different outputs is dropped whole.
5. *More instances* (ours, for `instances_per_task` > 1): later rounds show the task its own
   instances (a few, sampled) and ask for new ones, several requests per task, until it
   has `instances_per_task` or `max_instance_rounds` run out. The reference asks once per
   task, which rarely yields the 28 distinct inputs a Natural-Instructions task needs. A
   new instance whose input the task already has is rejected; for classification tasks
   each request names the label to write, the rarest first, so labels stay balanced.
   Tasks without inputs get the reference prompt again, resampled.

Batches in flight (`batches_ahead`, ours): with the request cache on, up to that many
batches are between their bootstrap and their decision at once, and each teacher call
carries one step of each (bootstrap, classify, an instance round), so a serving engine gets
hundreds of requests a call instead of a batch's few. A batch's demonstrations then come
from the tasks decided when it started (up to `batches_ahead` batches old), and its novelty
check also covers the candidates of every batch in flight. `batches_ahead: 1` (the default)
is the loop above, request for request.

Copying from the prompt (not in the reference; weak teachers do it often, strong ones
sometimes): a new instruction equal to one the bootstrap prompt listed, and an instance
(of any round) whose input or output equals a text of the instance prompts'
demonstrations (texts of three words or more; whitespace, case and final punctuation
folded) or (`copy_overlap`, 0.7 by default; null for whole copies only) holds that share of the word trigrams
of one of their sentences of four words or more, are rejected as
"copies a demonstration"; an instance whose non-empty input more than
`max_other_tasks_per_input` other tasks of the run already carry (accepted tasks, counted
again from OUT on resume, and candidates of the same batch) is rejected as "input shared
by too many tasks".

Every rejected instruction, instance and unparseable reply goes to the rejects file with
its reason, and so do valid candidates beyond `num` ("surplus beyond num"; the reference
keeps the whole last batch). Where we differ from the reference, on purpose: a new
instruction gets its first letter upper-cased (the reference's `str.capitalize()` also
lower-cases every other letter, mangling names and acronyms); a chat model's preamble
("Here are more tasks:" before the list, or a reply such as "Sure! Here are more tasks:"
that the "\\n\\n" stop cut right after) is rejected as "chat preamble"; the reference's
presence penalty is not sent (not every backend supports it); the prompts are our own
wording with fewer demonstrations; the classification check accepts any reply containing
"yes" (`classification_match: reference` for the exact match); and a candidate that fails
at the instance step leaves the novelty pool (`novelty_pool: reference` keeps it there).
README.md ("Generating tasks") lists every difference.

    datagen generate --method self-instruct --num 20 --out raw.jsonl
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field

from datagen.config import SamplingParams, Strict
from datagen.errors import DatagenError
from datagen.filters.heuristics import (  # the reference rules live with the other filters
    REFERENCE_BLACKLIST,
    has_conflicting_outputs,
    instance_reject_reason,
    instruction_reject_reason,
)
from datagen.generators.common import (
    COPY_OVERLAP,
    InputTally,
    InstructionPool,
    RunContext,
    TaskSink,
    copied_text,
    instances_toward_target,
    lineage,
    normalised_text,
    shared_input_reason,
    stable_id,
)
from datagen.io import read_records, rejects_path
from datagen.prompts import load_template
from datagen.records import Instance, Reject, Task, takes_input
from datagen.rejects import (
    CONFLICTING_OUTPUTS,
    COPIED_DEMONSTRATION,
    INPUT_ALREADY_PRESENT,
    INPUT_MISSING,
    LENGTH_LIMIT,
    NO_VALID_INSTANCES,
    PARSE_FAILURE,
    PREAMBLE,
    STAGE_BOOTSTRAP,
    STAGE_INSTANCES,
    SURPLUS,
    TEACHER_ERROR,
    TOO_SIMILAR,
    instance_reason,
)
from datagen.rouge import RougeLIndex
from datagen.teachers.base import Completion, Message
from datagen.teachers.teacher import Teacher

REFERENCE_STOP = ("\n\n", "\n16", "16.", "16 .")
# the reference asks for at most 5 instances per reply and stops before a next task
INSTANCE_STOP = ("Example 6", "Task:")

BOOTSTRAP = "self_instruct_bootstrap.jinja"
IS_CLASSIFICATION = "self_instruct_is_classification.jinja"
INPUT_FIRST = "self_instruct_instances_input_first.jinja"
OUTPUT_FIRST = "self_instruct_instances_output_first.jinja"
MORE_INSTANCES = "self_instruct_instances_more.jinja"


# The instance prompts' demonstrations (our own), rendered by the templates and compared with
# every instance those prompts produce: a teacher that copies one is rejected.
INPUT_FIRST_DEMONSTRATIONS: tuple[Task, ...] = (
    Task(id="demo-celsius", instruction="Convert the temperature from Celsius to Fahrenheit.",
         instances=[Instance(input="25 °C", output="77 °F"), Instance(input="-10 °C", output="14 °F")]),
    Task(id="demo-tips", instruction="Give three tips for staying focused while studying at home.",
         instances=[Instance(output="1. Keep your phone in another room. 2. Work in blocks of 25 minutes with "
                                    "short breaks. 3. Tidy your desk before you start.")]),
    Task(id="demo-longest", instruction="Find the longest word in the sentence.",
         instances=[Instance(input="The elephant walked slowly across the field.", output="elephant"),
                    Instance(input="Curiosity drives discovery.", output="Curiosity")]),
)
OUTPUT_FIRST_DEMONSTRATIONS: tuple[Task, ...] = (
    Task(id="demo-mood", instruction="Decide whether the sentence expresses happiness or sadness.",
         is_classification=True,
         instances=[Instance(input="We finally moved into the house we had dreamed about for years.",
                             output="happiness"),
                    Instance(input="The little café where we first met closed down last week.", output="sadness")]),
    Task(id="demo-parity", instruction="Is the number even or odd?", is_classification=True,
         instances=[Instance(input="48", output="even"), Instance(input="17", output="odd")]),
    Task(id="demo-weight", instruction="Which of the two is heavier, a kilogram of feathers or a kilogram of iron?",
         is_classification=True, instances=[Instance(output="Neither, they weigh the same.")]),
)


class SelfInstructConfig(Strict):
    """Self-Instruct settings; defaults are the reference's."""

    prompt_instructions: int = Field(8, ge=1)
    machine_per_prompt: int = Field(2, ge=0)
    prompts_per_batch: int = Field(8, ge=1)
    # batches per window: their bootstrap prompts go out in one teacher call and their
    # candidates' classification and instance requests in one call per step, so a serving
    # engine gets hundreds of requests at once; demonstrations lag by up to a window. 1 is
    # the reference's loop
    batches_ahead: int = Field(1, ge=1)
    similarity_threshold: float = Field(0.7, gt=0.0, le=1.0)
    most_similar_kept: int = Field(10, ge=0)
    min_words: int = 3  # an instruction needs more than this many words
    max_words: int = 150
    blacklist: tuple[str, ...] = REFERENCE_BLACKLIST
    max_instance_rounds: int = Field(3, ge=1)
    # rounds after the first, for tasks with inputs: prompts per task (fewer when it lacks
    # less), samples per prompt, and how many of its own instances each prompt shows
    more_prompts_per_task: int = Field(2, ge=1)
    more_samples_per_prompt: int = Field(4, ge=1)
    more_examples_shown: int = Field(4, ge=1)
    # give up (with a message) after this many batches in a row add no task
    max_stalled_batches: int = Field(20, ge=1)
    bootstrap_sampling: SamplingParams = SamplingParams(
        temperature=0.7, top_p=0.5, max_tokens=1024, stop=REFERENCE_STOP
    )
    classify_sampling: SamplingParams = SamplingParams(
        temperature=0.0, max_tokens=3, stop=("\n", "Task:")
    )
    instance_sampling: SamplingParams = SamplingParams(temperature=0.0, max_tokens=350, stop=INSTANCE_STOP)
    # later rounds sample at this temperature so they do not repeat round one
    extra_round_temperature: float = Field(0.7, ge=0.0, le=2.0)
    # an instance whose non-empty input more than this many other tasks of the run already
    # carry is rejected (weak teachers paste one input into every task); not in the reference
    max_other_tasks_per_input: int = Field(2, ge=0)
    # an instance holding this share of the word trigrams of a sentence of its prompt's
    # demonstrations copies it ("copies a demonstration"; not in the reference); None: whole copies only
    copy_overlap: float | None = Field(COPY_OVERLAP, gt=0.0, le=1.0)
    # "lenient": any reply containing "yes" marks a classification task, so a chat teacher's
    # "Yes." counts; "reference": only "Yes", "yes" or "YES" after stripping, as the reference
    classification_match: Literal["lenient", "reference"] = "lenient"
    # "accepted": only accepted tasks join the ROUGE-L novelty pool, so a candidate that failed
    # at the instance step leaves it; "reference": such candidates stay in it, as in the
    # reference (which screens all instructions before it generates any instance)
    novelty_pool: Literal["accepted", "reference"] = "accepted"


class GenerationStalled(DatagenError):
    """The teacher keeps producing nothing usable; what it did produce is on disk."""


# -- pure functions: prompts and parsing ------------------------------------------------------


def user(text: str) -> list[Message]:
    return [{"role": "user", "content": text}]


def clean_instruction(text: str) -> str:
    """Whitespace folded, trailing ':' removed: how instructions are shown in the prompt."""
    return re.sub(r"\s+", " ", text).strip().rstrip(":")


def sample_prompt_tasks(
    seeds: Sequence[Task], machine: Sequence[Task], rng: random.Random, total: int, from_machine: int
) -> list[Task]:
    """`from_machine` generated tasks (fewer while the pool is small) topped up with seeds, shuffled."""
    chosen = rng.sample(list(machine), min(from_machine, len(machine)))
    chosen += rng.sample(list(seeds), min(total - len(chosen), len(seeds)))
    rng.shuffle(chosen)
    return chosen


def bootstrap_messages(instructions: Sequence[str]) -> list[Message]:
    text = load_template(BOOTSTRAP).render(instructions=[clean_instruction(i) for i in instructions])
    return user(text)


# A chat model's opening line: "Sure!", "Certainly, ...", "Here are more tasks:".
CHAT_OPENER = re.compile(
    r"(?:sure|certainly|of course|absolutely|okay|ok|alright|great|no problem)\b\s*[!,.:]"
    r"|here(?:\s+are|\s+is|'s)\b.*:$",
    re.IGNORECASE,
)


def parse_bootstrap_reply(text: str) -> tuple[list[str], str | None]:
    """(new instructions, chat preamble if any) from a reply continuing the numbered list.

    A first line that does not continue the list is a chat preamble when a numbered line
    follows it and it ends with ':', or when it opens like a chat reply ("Sure! Here are
    more tasks:"): the "\\n\\n" stop often cuts a reply right after such a line.
    """
    text = text.strip()
    preamble = None
    if not re.match(r"\d+\s?\.", text):
        first, newline, rest = text.partition("\n")
        before_list = newline and first.rstrip().endswith(":") and re.match(r"\s*\d+\s?\. ", rest)
        if before_list or CHAT_OPENER.match(first.strip()):
            preamble, text = first.strip(), rest.strip()
    text = re.sub(r"^\d+\s?\.\s*", "", text)  # a chat model may repeat the number it was given
    instructions = []
    for piece in re.split(r"\n\d+\s?\. ", text):
        piece = re.sub(r"\s+", " ", piece).strip()
        if piece:
            instructions.append(piece[0].upper() + piece[1:])
    return instructions, preamble


def classification_messages(instruction: str) -> list[Message]:
    return user(load_template(IS_CLASSIFICATION).render(instruction=clean_instruction(instruction)))


def parse_classification_reply(text: str, match: str = "lenient") -> bool:
    """Whether the teacher said "yes": anywhere in the reply ("lenient"), or as the whole
    stripped reply in one of the reference's three spellings ("reference")."""
    if match == "reference":
        return text.strip() in ("Yes", "yes", "YES")
    return "yes" in text.lower()


def instance_demonstrations(is_classification: bool) -> tuple[Task, ...]:
    return OUTPUT_FIRST_DEMONSTRATIONS if is_classification else INPUT_FIRST_DEMONSTRATIONS


def instance_messages(instruction: str, is_classification: bool) -> list[Message]:
    template = OUTPUT_FIRST if is_classification else INPUT_FIRST
    text = load_template(template).render(
        instruction=instruction.strip(), demonstrations=instance_demonstrations(is_classification)
    )
    return user(text)


def copied_demonstration(
    instance: Instance, demonstrations: Sequence[Task], overlap: float | None = None
) -> str | None:
    """The text of `demonstrations` (an input or output of theirs, or a sentence of one) that
    the input or output of `instance` copies, whole or in part (`copied_text`), or None.
    Texts under three words (labels such as "even", numbers such as "48") are shared by design
    and never count as copies."""
    shown = [text for demo in demonstrations for i in demo.instances for text in (i.input, i.output)
             if len(text.split()) >= 3]
    return copied_text([instance.input, instance.output], shown, overlap)


def copied_instruction(instruction: str, shown: Sequence[str]) -> str | None:
    """The instruction of `shown` (the prompt's list) that `instruction` repeats, or None. Only
    whole copies count (normalised): instructions share their frames ("Suggest a name for ...")
    by design, and near copies are the ROUGE-L novelty rule's."""
    folded = normalised_text(clean_instruction(instruction))
    return next((s for s in shown if normalised_text(clean_instruction(s)) == folded), None)


def more_instances_messages(
    instruction: str, shown: Sequence[Instance], is_classification: bool, label: str | None
) -> tuple[list[Message], str]:
    """A prompt showing the task's own instances that ends where the next one starts, and that
    opening (the reply continues it). A classification prompt opens with `label` if given."""
    if is_classification:
        opening = f"Class label: {label}\nInput:" if label else "Class label:"
    else:
        opening = f"Example {len(shown) + 1}\nInput:"
    text = load_template(MORE_INSTANCES).render(
        instruction=instruction.strip(), examples=shown, is_classification=is_classification, opening=opening
    )
    return user(text), opening


def continue_opening(text: str, opening: str) -> str:
    """The reply read as a continuation of the prompt's `opening`, unless it restarts the
    example itself (strong chat models often do)."""
    text = text.strip()
    if re.match(r"(Example\b|Input\s*\d*\s*:|Class label\s*:)", text):
        return text
    return f"{opening} {text}"


def _split_input_output(text: str) -> tuple[str, str]:
    """(input, output) from 'Input: ... Output: ...' text, as the reference parses it."""
    if re.search(r"Output\s*\d*\s*:", text):
        before, after = re.split(r"Output\s*\d*\s*:", text, maxsplit=1)
        instance_input, output = before.strip(), after.strip()
    else:
        instance_input, output = "", text.strip()
    output = re.split(r"Input\s*\d*\s*:", output)[0].strip()  # a second pair ran on
    instance_input = re.sub(r"^Input\s*\d*\s*:", "", instance_input).strip()
    return instance_input, output


def parse_instances(text: str, is_classification: bool, finish_reason: str) -> list[Instance] | None:
    """Instances in the reply (the last one dropped if the reply was cut off); None if unparseable."""
    text = text.strip()
    pairs: list[tuple[str, str]] = []
    if is_classification:
        if "Class label:" not in text:
            return None
        for chunk in text.split("Class label:")[1:]:
            label, _newline, rest = chunk.strip().partition("\n")
            rest = re.sub(r"^Input\s*\d*\s*:", "", rest.strip()).strip()
            pairs.append((rest, label.strip()))
    elif re.search(r"Example\s?\d*\.?", text):
        chunks = [c.strip() for c in re.split(r"Example\s?\d*\.?", text) if c.strip()]
        pairs = [_split_input_output(chunk) for chunk in chunks]
    elif re.search(r"Output\s*\d*\s*:", text):
        pairs = [_split_input_output(text)]
    else:
        return None
    if finish_reason == "length":
        pairs = pairs[:-1]
    return [Instance(input=i, output=o) for i, o in pairs]


# -- the loop ---------------------------------------------------------------------------------


@dataclass
class _Candidate:
    instruction: str
    parents: list[str]
    bootstrap: Completion
    share: int  # how many instructions the bootstrap reply yielded (its usage is split)
    most_similar: dict[str, float]
    mean_similarity: float
    completions: list[Completion] = field(default_factory=list)
    instances: list[Instance] = field(default_factory=list)
    is_classification: bool = False
    asked_for_more: bool = False
    batch: int = 0  # the batch whose bootstrap reply proposed it


@dataclass
class _InputUse:
    """Which inputs the tasks of the run carry: the accepted ones (`run`, rebuilt from OUT on
    resume) and the candidates of the batch being built (in reply order, so a replayed batch
    decides the same), for the `max_other_tasks_per_input` rule."""

    run: InputTally
    limit: int
    batch: dict[str, set[int]] = field(default_factory=dict)  # normalised input -> candidate ids

    def reason(self, candidate: _Candidate, text: str) -> str | None:
        holders = self.batch.get(normalised_text(text), set()) - {id(candidate)}
        return shared_input_reason(text, self.run.tasks_with(text) + len(holders), self.limit)

    def hold(self, candidate: _Candidate, text: str) -> None:
        if text.strip():
            self.batch.setdefault(normalised_text(text), set()).add(id(candidate))


@dataclass
class _Batch:
    """One batch in flight: its candidates and the step they take next (0: classification;
    k > 0: instance round k - 1), until it is decided."""

    number: int
    candidates: list[_Candidate]
    inputs: _InputUse
    step: int = 0
    finished: bool = False
    counts_as_stall: bool = True


# a request for instances: the candidate, the prompt, and the opening its reply continues
_Ask = tuple[_Candidate, list[Message], str]
# one request group of a teacher call and what to do with its replies
_Job = tuple[tuple[list[list[Message]], SamplingParams], Callable[[list[list[Completion]]], None]]


def run_self_instruct(seeds: Sequence[Task], settings: SelfInstructConfig, run: RunContext) -> None:
    """Generate tasks into `sink` until it holds `num` (tasks already there count).

    Each teacher call carries one step of every batch in flight: new batches' bootstrap
    prompts, classification, or an instance round (the more-instances prompts in a call of
    their own at `batches_ahead: 1`, as the reference loop sends them). Up to `batches_ahead`
    batches are in flight, a third of them started per call, so a serving engine gets every
    step's requests at once; a batch samples its demonstrations from the tasks decided when
    it starts, up to `batches_ahead` batches earlier. Batches are decided and flushed in
    order. `batches_ahead: 1` is the reference's loop and resumes at `batches_done`; a larger
    window needs the request cache and resumes by replaying the run from its first batch out
    of it (a batch in flight was sampled from an older pool than OUT holds), writing only
    what is not on disk yet.
    """
    _Loop(seeds, settings, run).run()


class _Loop:
    """The state of one Self-Instruct run: the decided tasks, the novelty pool, the input
    tally and the batches in flight."""

    def __init__(self, seeds: Sequence[Task], settings: SelfInstructConfig, run: RunContext):
        self.seeds, self.settings, self.run_context = seeds, settings, run
        self.teacher, self.sink = run.teacher, run.sink
        self.ahead = settings.batches_ahead if self.teacher.config.cache != "off" else 1
        replay = self.ahead > 1
        self.machine: list[Task] = [] if replay else list(self.sink.existing)
        self.pool = InstructionPool([t.instruction for t in seeds] + [t.instruction for t in self.machine])
        if settings.novelty_pool == "reference" and not replay:
            self.pool.accepted.extend(_failed_at_instances(self.sink))
        self.tally = InputTally(self.machine)
        self.next_batch = 0 if replay else run.batches_done
        self.sink.replaying_before = run.batches_done if replay else 0
        self.in_flight: list[_Batch] = []
        self.stalled = 0
        self.batches_seen = self.candidates_seen = 0  # screened so far in this process
        self.backend = (self.teacher.backend.name, self.teacher.backend.model)
        self.templates = [load_template(name) for name in (BOOTSTRAP, IS_CLASSIFICATION, INPUT_FIRST,
                                                           OUTPUT_FIRST, MORE_INSTANCES)]

    def run(self) -> None:
        try:
            self._run()
        except BaseException:
            # undecided batches are decided again by a rerun: their rejects must not be written twice
            self.sink.forget_from(self.in_flight[0].number if self.in_flight else self.next_batch)
            raise

    def _run(self) -> None:
        settings = self.settings
        started_per_call = -(-self.ahead // 3)  # a batch takes three calls or more
        while True:
            steps = [(batch, self._step_jobs(batch)) for batch in self.in_flight]
            self._decide_finished()
            if self.stalled >= settings.max_stalled_batches:
                raise GenerationStalled(
                    f"self-instruct: {self.stalled} batches in a row produced no task; "
                    f"see the rejects file for why ({len(self.machine)} of {self.run_context.num} tasks so far)"
                )
            starting = min(started_per_call, self.ahead - len(self.in_flight), self._batches_wanted())
            if not starting and not self.in_flight:
                return
            main: list[_Job] = []
            more: list[_Job] = []
            for _batch, (step_main, step_more) in steps:
                main += step_main
                more += step_more
            main += [self._bootstrap_job(self.next_batch + k) for k in range(starting)]
            self.next_batch += starting
            calls = [main, more] if self.ahead == 1 else [main + more]
            for call in calls:
                if call:
                    for (_, take), replies in zip(call, self.teacher.complete_many([job for job, _ in call])):
                        take(replies)
            for batch, _ in steps:
                batch.step += 1

    def _pending(self) -> int:
        return sum(len(batch.candidates) for batch in self.in_flight)

    def _batches_wanted(self) -> int:
        """How many new batches the tasks still missing call for, at the candidates per batch
        seen so far (a new batch whenever one is missing)."""
        missing = self.run_context.num - len(self.machine) - self._pending()
        if missing <= 0:
            return 0
        per_batch = self.candidates_seen / self.batches_seen if self.candidates_seen else 1.0
        return max(1, math.ceil(missing / per_batch))

    # -- starting a batch ---------------------------------------------------------------------

    def _bootstrap_job(self, number: int) -> _Job:
        """The batch's bootstrap prompts (demonstrations from the tasks decided so far); its
        replies are screened into a new batch in flight."""
        run, settings = self.run_context, self.settings
        rng = random.Random(f"self-instruct:{run.seed}:{number}")
        shown = [
            sample_prompt_tasks(self.seeds, self.machine, rng, settings.prompt_instructions,
                                settings.machine_per_prompt)
            for _ in range(settings.prompts_per_batch)
        ]
        params = settings.bootstrap_sampling.model_copy(update={"seed": run.seed * 1_000_003 + number})

        def screen(replies: list[list[Completion]]) -> None:
            self.sink.at(number)
            candidates: list[_Candidate] = []
            for tasks_shown, [reply] in zip(shown, replies):
                candidates += _screen_reply(reply, tasks_shown, settings, self.sink, self.pool, number)
            room = run.num - len(self.machine) - self._pending()
            self.batches_seen += 1
            self.candidates_seen += len(candidates)
            for surplus in candidates[room:]:
                self.sink.reject(SURPLUS, STAGE_BOOTSTRAP, raw=surplus.instruction,
                                 detail=f"{run.num} tasks were asked for")
            inputs = _InputUse(self.tally, settings.max_other_tasks_per_input)
            batch = _Batch(number, candidates[: max(room, 0)], inputs)
            batch.finished = not batch.candidates
            # started while other batches' candidates could still cover num: not a stall
            batch.counts_as_stall = room > 0
            self.in_flight.append(batch)

        return ([bootstrap_messages([t.instruction for t in s]) for s in shown], params), screen

    # -- the steps of a batch in flight -------------------------------------------------------

    def _step_jobs(self, batch: _Batch) -> tuple[list[_Job], list[_Job]]:
        """The batch's next step as (jobs, more-instances jobs); it is finished when it has none."""
        if batch.finished:
            return [], []
        settings = self.settings
        if batch.step == 0:
            return [_classify_job(batch.candidates, settings)], []
        round_number = batch.step - 1
        if round_number >= settings.max_instance_rounds:
            batch.finished = True
            return [], []
        reference_asks, more_asks = _instance_asks(batch.candidates, round_number, self.run_context.instances_per_task,
                                                   self.run_context.seed, settings)
        if not reference_asks and not more_asks:
            batch.finished = True
            return [], []
        reference_job = [self._instance_job(batch, reference_asks, round_number, False)] if reference_asks else []
        more_job = [self._instance_job(batch, more_asks, round_number, True)] if more_asks else []
        return reference_job, more_job

    def _instance_job(self, batch: _Batch, asks: list[_Ask], round_number: int, more: bool) -> _Job:
        params = _instance_params(self.settings, self.run_context.seed, batch.number, round_number, more)

        def take(replies: list[list[Completion]]) -> None:
            _take_round(asks, replies, round_number, batch.number, self.sink, batch.inputs,
                        self.settings.copy_overlap)

        return ([messages for _, messages, _ in asks], params), take

    # -- deciding -----------------------------------------------------------------------------

    def _decide_finished(self) -> None:
        """Decide the finished batches at the front, in order, and flush them."""
        decided = []
        while self.in_flight and self.in_flight[0].finished:
            decided.append(self.in_flight.pop(0))
        if not decided:
            return
        fresh_count = 0
        for batch in decided:
            accepted, fresh, failed = _decide(batch, self.backend, self.templates, self.settings,
                                              self.run_context.seed, self.sink)
            self.machine += accepted
            self.pool.accepted.extend(t.instruction for t in accepted)
            if self.settings.novelty_pool == "reference":
                self.pool.accepted.extend(failed)
            for task in accepted:
                self.tally.add(task.instances)
            if accepted or batch.counts_as_stall:
                self.stalled = 0 if accepted else self.stalled + 1
            fresh_count += fresh
        done = decided[-1].number + 1
        self.sink.flush(before_batch=done)
        # the novelty rule's batch part: the candidates still in flight
        self.pool.batch = RougeLIndex([c.instruction for b in self.in_flight for c in b.candidates])
        if done > self.run_context.batches_done:
            self.run_context.on_batch_done(done)
        self.run_context.progress(fresh_count)


def _failed_at_instances(sink: TaskSink) -> list[str]:
    """Instructions of earlier candidates that passed screening but failed at the instance
    step, read back from the rejects file (for `novelty_pool: reference` after a resume)."""
    path = rejects_path(sink.output)
    if not path.exists():
        return []
    return [
        reject.task.instruction
        for reject in read_records(path, Reject)
        if reject.stage == STAGE_INSTANCES
        and reject.task is not None
        and reject.reason in (NO_VALID_INSTANCES, CONFLICTING_OUTPUTS)
    ]


def _screen_reply(
    reply: Completion,
    shown: list[Task],
    settings: SelfInstructConfig,
    sink: TaskSink,
    pool: InstructionPool,
    batch: int = 0,
) -> list[_Candidate]:
    if not reply.ok:
        sink.reject(TEACHER_ERROR, STAGE_BOOTSTRAP, detail=reply.error)
        return []
    if reply.finish_reason == "length":
        sink.reject(LENGTH_LIMIT, STAGE_BOOTSTRAP, raw=reply.text)
        return []
    instructions, preamble = parse_bootstrap_reply(reply.text)
    if preamble:
        sink.reject(PREAMBLE, STAGE_BOOTSTRAP, raw=preamble)
    if not instructions:
        if not preamble:
            sink.reject(PARSE_FAILURE, STAGE_BOOTSTRAP, raw=reply.text, detail="no numbered instructions")
        return []
    kept = []
    for instruction in instructions:
        reason = instruction_reject_reason(instruction, settings.blacklist, settings.min_words, settings.max_words)
        if reason is None and (copied := copied_instruction(instruction, [t.instruction for t in shown])):
            sink.reject(COPIED_DEMONSTRATION, STAGE_BOOTSTRAP, raw=instruction, detail=f"shown in its prompt: {copied}")
            continue
        if reason is None and (detail := pool.too_similar(instruction, settings.similarity_threshold)):
            sink.reject(TOO_SIMILAR, STAGE_BOOTSTRAP, raw=instruction, detail=detail)
            continue
        if reason is not None:
            sink.reject(reason, STAGE_BOOTSTRAP, raw=instruction)
            continue
        similar, mean = pool.admit(instruction, settings.most_similar_kept)
        kept.append(_Candidate(instruction, [t.id for t in shown], reply, 0, similar, mean, batch=batch))
    for candidate in kept:
        candidate.share = len(kept)
    return kept


def _classify_job(candidates: list[_Candidate], settings: SelfInstructConfig) -> _Job:
    def take(replies: list[list[Completion]]) -> None:
        for candidate, [reply] in zip(candidates, replies):
            candidate.is_classification = reply.ok and parse_classification_reply(
                reply.text, settings.classification_match
            )
            candidate.completions.append(reply)

    return ([classification_messages(c.instruction) for c in candidates], settings.classify_sampling), take


def _instance_asks(
    candidates: list[_Candidate], round_number: int, target: int, seed: int, settings: SelfInstructConfig
) -> tuple[list[_Ask], list[_Ask]]:
    """A round's requests for the candidates short of `target`: the reference prompt (round
    one, and tasks without inputs), and the later rounds' prompts showing a task's own instances."""
    reference_asks: list[_Ask] = []
    more_asks: list[_Ask] = []
    for candidate in candidates:
        if instances_toward_target(candidate.instances) >= target:
            continue
        if round_number and takes_input(candidate.instances):
            rng = random.Random(f"self-instruct-more:{seed}:{candidate.instruction}:{round_number}")
            more_asks += [(candidate, *prompt) for prompt in _more_prompts(candidate, target, settings, rng)]
        else:
            messages = instance_messages(candidate.instruction, candidate.is_classification)
            reference_asks.append((candidate, messages, ""))
    return reference_asks, more_asks


def _take_round(
    asks: list[_Ask], replies: list[list[Completion]], round_number: int, batch: int, sink: TaskSink,
    inputs: _InputUse, copy_overlap: float | None = None,
) -> None:
    sink.at(batch)
    for (candidate, _, opening), samples in zip(asks, replies):
        # the fixed demonstrations count in every round: a later round's prompt shows the
        # task's own instances, which a weak teacher filled from them (its own inputs are
        # covered by the "input already present" rule)
        shown = instance_demonstrations(candidate.is_classification)
        for reply in samples:
            _take_instances(candidate, reply, opening, round_number > 0, sink, demonstrations=shown, inputs=inputs,
                            copy_overlap=copy_overlap)


def _add_instances(
    candidates: list[_Candidate],
    teacher: Teacher,
    settings: SelfInstructConfig,
    target: int,
    seed: int,
    sink: TaskSink,
    batch: int = 0,
    inputs: _InputUse | None = None,
) -> None:
    """All instance rounds for `candidates` of one batch, one call per round and prompt kind
    (the loop interleaves the same steps with other batches' steps)."""
    inputs = inputs or _InputUse(InputTally(), settings.max_other_tasks_per_input)
    for round_number in range(settings.max_instance_rounds):
        reference_asks, more_asks = _instance_asks(candidates, round_number, target, seed, settings)
        if not reference_asks and not more_asks:
            return
        for asks, more in ((reference_asks, False), (more_asks, True)):
            if asks:
                params = _instance_params(settings, seed, batch, round_number, more)
                [replies] = teacher.complete_many([([messages for _, messages, _ in asks], params)])
                _take_round(asks, replies, round_number, batch, sink, inputs, settings.copy_overlap)


def _decide(
    batch: _Batch, backend, templates, settings: SelfInstructConfig, seed: int, sink: TaskSink
) -> tuple[list[Task], int, list[str]]:
    """The batch's tasks, those without valid instances or with conflicting outputs rejected:
    (accepted, how many of them are new to OUT, instructions of the failed)."""
    sink.at(batch.number)
    accepted, failed = [], []
    for candidate in batch.candidates:
        task = _to_task(candidate, backend, templates, settings, seed)
        if not candidate.instances:
            sink.reject(NO_VALID_INSTANCES, STAGE_INSTANCES, task=task)
            failed.append(task.instruction)
        elif has_conflicting_outputs(candidate.instances):
            sink.reject(CONFLICTING_OUTPUTS, STAGE_INSTANCES, task=task)
            failed.append(task.instruction)
        else:
            accepted.append(task)
    return accepted, len(sink.accept(accepted)), failed


def _instance_params(settings: SelfInstructConfig, seed: int, batch: int, round_number: int,
                     more: bool) -> SamplingParams:
    """The instance requests' sampling: seeded per batch and round, warmer after round one;
    a later-round prompt takes several samples and numbers its examples after the ones it
    shows, so it has no "Example N" stop."""
    params = settings.instance_sampling
    if round_number:
        params = params.model_copy(update={"temperature": settings.extra_round_temperature})
    params = params.model_copy(update={"seed": seed * 1_000_003 + batch * 101 + round_number})
    if more:
        more_stop = tuple(stop for stop in params.stop if not stop.startswith("Example"))
        params = params.model_copy(update={"n": settings.more_samples_per_prompt, "stop": more_stop})
    return params


def _more_prompts(
    candidate: _Candidate, target: int, settings: SelfInstructConfig, rng: random.Random
) -> list[tuple[list[Message], str]]:
    """Distinct prompts asking `candidate` for new instances, each showing a different sample
    of its instances with inputs; a classification prompt names a label, the rarest first,
    and the last leaves it to the teacher so that labels not yet seen can appear."""
    with_input = [i for i in candidate.instances if i.input]
    missing = target - instances_toward_target(candidate.instances)
    count = min(settings.more_prompts_per_task, -(-missing // settings.more_samples_per_prompt))
    labels: list[str | None] = [None]
    if candidate.is_classification:
        tally = Counter(i.output for i in candidate.instances)
        labels = sorted(tally, key=lambda label: (tally[label], label))[: max(count - 1, 1)] + [None]
    prompts: list[tuple[list[Message], str]] = []
    for index in range(count):
        shown = rng.sample(with_input, min(settings.more_examples_shown, len(with_input)))
        prompt = more_instances_messages(
            candidate.instruction, shown, candidate.is_classification, labels[index % len(labels)]
        )
        if prompt not in prompts:  # the same prompt twice would be the same cached samples
            prompts.append(prompt)
    return prompts


def _take_instances(
    candidate: _Candidate,
    reply: Completion,
    opening: str,
    later_round: bool,
    sink: TaskSink,
    *,
    demonstrations: Sequence[Task] = (),
    inputs: _InputUse | None = None,
    copy_overlap: float | None = None,
) -> None:
    candidate.completions.append(reply)
    candidate.asked_for_more |= bool(opening)
    if not reply.ok:
        sink.reject(TEACHER_ERROR, STAGE_INSTANCES, detail=reply.error, raw=candidate.instruction)
        return
    text = continue_opening(reply.text, opening) if opening else reply.text
    parsed = parse_instances(text, candidate.is_classification, reply.finish_reason)
    if parsed is None:
        sink.reject(PARSE_FAILURE, STAGE_INSTANCES, raw=reply.text, detail=candidate.instruction)
        return
    known_inputs = {i.input for i in candidate.instances if i.input}
    for instance in parsed:
        reason = instance_reject_reason(instance)
        if reason is None and opening and not instance.input:
            reason = INPUT_MISSING  # the prompt asked for one
        if reason is None and later_round and instance.input in known_inputs:
            # a second output for a known input is a repeat, not a sign that the task is ambiguous
            reason = INPUT_ALREADY_PRESENT
        detail = candidate.instruction
        if reason is None and (copied := copied_demonstration(instance, demonstrations, copy_overlap)):
            reason, detail = COPIED_DEMONSTRATION, f"{candidate.instruction} | shown in its prompt: {copied}"
        if reason is None and inputs is not None:
            reason = inputs.reason(candidate, instance.input)
        if reason:
            sink.reject(instance_reason(reason), STAGE_INSTANCES, raw=instance.model_dump_json(), detail=detail)
        elif instance not in candidate.instances:
            candidate.instances.append(instance)
            if instance.input:
                known_inputs.add(instance.input)
                if inputs is not None:
                    inputs.hold(candidate, instance.input)


def _to_task(candidate: _Candidate, backend, templates, settings: SelfInstructConfig, seed: int) -> Task:
    bootstrap = candidate.bootstrap
    share = Completion(
        "", "stop", bootstrap.prompt_tokens // candidate.share, bootstrap.completion_tokens // candidate.share
    )
    used = [templates[0], templates[1], templates[3] if candidate.is_classification else templates[2]]
    if candidate.asked_for_more:
        used.append(templates[4])
    task_id = stable_id("si", candidate.instruction)
    return Task(
        id=task_id,
        name=task_id,
        instruction=candidate.instruction,
        instances=candidate.instances,
        is_classification=candidate.is_classification,
        lineage=lineage(
            generator="self-instruct",
            operation="bootstrap",
            teacher_name=backend,
            templates=used,
            sampling=settings.bootstrap_sampling,
            seed=seed,
            completions=[share, *candidate.completions],
            parent_ids=candidate.parents,
            most_similar=candidate.most_similar,
            mean_similarity=candidate.mean_similarity,
        ),
    )
