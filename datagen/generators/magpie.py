"""Magpie (Xu et al. 2024, "Magpie: Alignment Data Synthesis from Scratch by Prompting Aligned
LLMs with Nothing"): seedless instructions from an aligned teacher's own chat template.

An instruction-tuned model has learnt that after its template's "user turn opens" tokens comes
a user's message. Given only that *pre-query prefix*, as raw text to continue, it writes one.

The method, per conversation:

1. *Instruction*: the teacher continues the pre-query prefix (`pre_query_prefix`): its chat
   template rendered for a conversation whose only user message is a sentinel, cut at the
   sentinel. The prefix therefore comes from the teacher's tokenizer (`apply_chat_template`),
   never from a table of models; it includes the system message the template adds by itself
   when none is given (SmolLM2's "You are a helpful AI assistant named SmolLM..."), as the model
   saw it in training, or `system_prompt` when set. Sampling stops at the template's end of
   turn (`end_of_turn`) and, like Magpie's default, at the first newline (`single_line`).
2. *Response*: the same teacher, or `responder` (any backend), answers it as a plain chat.
3. *More turns* (`turns: N`): the next user message is written the same way, from the
   conversation so far rendered by the template (under `followup_system`, Magpie's multi-turn
   system message of our own wording) plus the opened user turn; then answered. A conversation
   is kept only with all N exchanges.
4. *Tags*: the judge (`judge`, default the run's teacher) tags the first instruction with a task
   category, a difficulty and an input quality, asked for as one JSON object under a JSON schema
   (`Request.schema`: backends that constrain decoding keep to it, the others are parsed as text).
   The tags go in the record's `tags` column (`datagen filter`'s `magpie` pass keeps by them,
   `datagen view` shows them); a reply that cannot be parsed leaves `tags` out and keeps the raw
   text in `lineage.tags_raw`.

Records: one task per conversation, id `stable_id("magpie", seed, number)`; `instruction` is the
first user message, its one instance's `output` the first reply and `followups` the later
exchanges (`datagen.records.Turn`), so export's `messages` format and finetune see every turn.
An empty instruction, a reply cut at `max_tokens` (`reject_cut_replies`) or a teacher error
rejects the conversation, with the raw text and the conversation so far, in OUT's rejects file
(stage "magpie").

Resume is replay: conversation k of the run always uses the same sampling seeds, so a rerun
skips the batches it finished (`batches_done`), answers the interrupted one from the request
cache and writes no reject twice (`ReplayedRejects`).

    datagen generate --method magpie --num 100 --out magpie.jsonl   # turns etc.: generate.magpie in a -c YAML
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from datagen.config import SamplingParams, Strict
from datagen.errors import ConfigError, TeacherError
from datagen.generators.common import ReplayedRejects, RunContext, lineage, stable_id
from datagen.model_paths import resolve_model
from datagen.prompts import load_template
from datagen.records import Instance, Task, Turn
from datagen.rejects import LENGTH_LIMIT, TEACHER_ERROR
from datagen.teachers.base import Completion, Message
from datagen.teachers.teacher import Teacher, TeacherConfig, make_teacher

STAGE_MAGPIE = "magpie"
EMPTY_INSTRUCTION = "empty instruction"
TAGS = "magpie_tags.jinja"
# no whitespace: templates that trim the content must not change it
SENTINEL = "MAGPIEQUERYSENTINEL"
# Magpie's multi-turn system message, in our words: the user follows up on what was said
FOLLOWUP_SYSTEM = ("You are a helpful AI assistant. The user talks with you over several rounds: a first "
                   "question, then follow-up questions about your answers. Give thorough, relevant and "
                   "insightful answers.")

# Magpie's tag vocabularies (its task categories, difficulty and input-quality scales)
TASK_CATEGORIES = ("information seeking", "reasoning", "planning", "editing", "coding & debugging", "math",
                   "role playing", "data analysis", "creative writing", "advice seeking", "brainstorming", "others")
DIFFICULTIES = ("very easy", "easy", "medium", "hard", "very hard")
QUALITIES = ("very poor", "poor", "average", "good", "excellent")
TAG_VALUES = {"task_category": TASK_CATEGORIES, "difficulty": DIFFICULTIES, "quality": QUALITIES}
TAG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {key: {"type": "string", "enum": list(values)} for key, values in TAG_VALUES.items()},
    "required": list(TAG_VALUES),
    "additionalProperties": False,
}


class MagpieConfig(Strict):
    """Magpie settings. The samplings are Magpie's defaults: instructions at temperature 1.0
    (variety comes only from sampling: there is no seed task), replies greedy."""

    turns: int = Field(1, ge=1)
    """User/assistant exchanges per conversation (Magpie-MT: 2 or more)."""
    system_prompt: str | None = None
    """A system message for the pre-query prefix and the replies; None: whatever the template adds
    by itself (SmolLM2's default system message, or none)."""
    followup_system: str = FOLLOWUP_SYSTEM
    """The system message under which later user turns are written (not the replies)."""
    tokenizer: str | None = None
    """Where the teacher's chat template comes from: a local model folder or alias
    (`datagen.model_paths`); None: the teacher's model name, which must resolve locally (an API
    teacher's name often does not: set this; nothing is downloaded)."""
    single_line: bool = True
    """Stop an instruction at its first newline (Magpie's default "early stopping")."""
    instruction_sampling: SamplingParams = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=128)
    response_sampling: SamplingParams = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=512)
    reject_cut_replies: bool = True
    """Reject a conversation whose reply hit `max_tokens` (Magpie keeps them; a cut answer teaches
    the student to stop mid-sentence)."""
    responder: TeacherConfig | None = None
    """Another teacher to answer the instructions; None: the run's teacher."""
    tags: bool = True
    """Ask the judge for task category, difficulty and quality tags."""
    judge: TeacherConfig | None = None
    """The teacher that tags; None: the run's teacher."""
    tag_sampling: SamplingParams = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=96)
    items_per_batch: int = Field(16, ge=1)
    """Conversations per batch (one teacher call per step, one flush of OUT)."""
    max_attempts: float = Field(4.0, ge=1.0)
    """Give up after `num` x this many prefixes (a teacher that writes no usable instruction)."""

    @field_validator("instruction_sampling", "response_sampling", "tag_sampling")
    @classmethod
    def _one_sample(cls, params: SamplingParams) -> SamplingParams:
        if params.n != 1:
            raise ValueError("n must be 1: each conversation is sampled on its own")
        return params


# -- pure functions: the template's prefixes, tags ---------------------------------------------------


def open_user_turn(tokenizer, messages: Sequence[Message]) -> str:
    """The chat template rendered for `messages` followed by a user turn opened and left empty:
    the raw text after which the model writes the user's next message. With no messages this is
    Magpie's pre-query prefix (with the system message the template adds by itself, if any)."""
    rendered = tokenizer.apply_chat_template([*messages, {"role": "user", "content": SENTINEL}], tokenize=False)
    if rendered.count(SENTINEL) != 1:
        raise ConfigError(f"the chat template of {tokenizer.name_or_path} does not render a user message as "
                          "given, so no pre-query prefix can be cut from it")
    return rendered[: rendered.index(SENTINEL)]


def end_of_turn(tokenizer) -> str:
    """What the template writes after a user message (SmolLM2 `<|im_end|>`, Llama 3 `<|eot_id|>`),
    up to the next turn: the stop string of a written user message. Empty if it writes nothing."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}], tokenize=False)
    return rendered[rendered.index(SENTINEL) + len(SENTINEL):].strip()


def pre_query_prefix(tokenizer, system_prompt: str | None = None) -> str:
    """Magpie's pre-query prefix from the teacher's own template (see `open_user_turn`)."""
    return open_user_turn(tokenizer, [{"role": "system", "content": system_prompt}] if system_prompt else [])


def followup_prefix(tokenizer, conversation: Sequence[Message], system: str) -> str:
    """The prefix for the next user message: the conversation so far under `system`, rendered by
    the template, then the user turn opened."""
    return open_user_turn(tokenizer, [{"role": "system", "content": system}, *conversation])


@cache
def load_tokenizer(name: str):
    """The tokenizer of a local model folder or alias (loaded once a process); a ConfigError, not a
    download, otherwise."""
    from transformers import AutoTokenizer

    try:
        path = resolve_model(name)
    except TeacherError as error:
        raise ConfigError(f"generate.magpie.tokenizer: {error}") from None
    if not Path(path).exists():
        raise ConfigError(f"generate.magpie.tokenizer: {name!r} is not a local model folder or alias, and the "
                          "chat template is read from the teacher's own tokenizer with no download; set "
                          "generate.magpie.tokenizer to a folder holding it")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.chat_template:
        raise ConfigError(f"generate.magpie.tokenizer: {name!r} has no chat template (Magpie needs an aligned, "
                          "chat-tuned teacher)")
    return tokenizer


def tag_prompt(instruction: str) -> list[Message]:
    template = load_template(TAGS)
    text = template.render(instruction=instruction, categories=TASK_CATEGORIES, difficulties=DIFFICULTIES,
                           qualities=QUALITIES)
    return [{"role": "user", "content": text}]


def _tag_value(key: str, value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    folded = re.sub(r"\s+", " ", value.replace("_", " ")).strip().strip(".").casefold()
    return folded if folded in TAG_VALUES[key] else None


def parse_tags(text: str) -> dict[str, str] | None:
    """The three tags from a judge reply: a JSON object (the first `{...}` in the text), else
    `key: value` lines; None unless all three carry a known value."""
    found: dict[str, str] = {}
    match = re.search(r"\{.*?\}", text, flags=re.DOTALL)
    if match:
        try:
            data = json.loads(match.group(0))
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict):
            found = {key: tag for key in TAG_VALUES if (tag := _tag_value(key, data.get(key))) is not None}
    if len(found) < len(TAG_VALUES):
        for key in TAG_VALUES:
            line = re.search(rf'"?{key.replace("_", "[_ ]")}"?\s*[:=]\s*"?([^"\n,}}]+)', text, flags=re.IGNORECASE)
            if key not in found and line and (tag := _tag_value(key, line.group(1))) is not None:
                found[key] = tag
    return found if len(found) == len(TAG_VALUES) else None


def sampling_seed(seed: int, number: int, turn: int, step: str) -> int:
    """A fixed sampling seed for one step of conversation `number` (so a rerun asks the cache the
    same requests, and no two prefixes of the run are the same request)."""
    digest = hashlib.sha256(f"magpie:{seed}:{number}:{turn}:{step}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


# -- the loop ---------------------------------------------------------------------------------------


@dataclass
class _Conversation:
    number: int
    messages: list[Message] = field(default_factory=list)  # user/assistant turns so far
    completions: list[Completion] = field(default_factory=list)
    failed: bool = False


@dataclass
class _Run:
    settings: MagpieConfig
    seed: int
    tokenizer: Any
    teacher: Teacher
    responder: Teacher
    judge: Teacher
    reject: ReplayedRejects
    stops: tuple[str, ...]

    def instruction_params(self, number: int, turn: int) -> SamplingParams:
        return self.settings.instruction_sampling.model_copy(update={
            "seed": sampling_seed(self.seed, number, turn, "user"),
            "stop": tuple(dict.fromkeys([*self.settings.instruction_sampling.stop, *self.stops]))})

    def response_params(self, number: int, turn: int) -> SamplingParams:
        return self.settings.response_sampling.model_copy(update={"seed": sampling_seed(self.seed, number, turn,
                                                                                          "assistant")})

    def system(self) -> list[Message]:
        prompt = self.settings.system_prompt
        return [{"role": "system", "content": prompt}] if prompt else []

    def prefix(self, conversation: _Conversation) -> str:
        if not conversation.messages:
            return pre_query_prefix(self.tokenizer, self.settings.system_prompt)
        return followup_prefix(self.tokenizer, conversation.messages, self.settings.followup_system)

    def fail(self, conversation: _Conversation, reason: str, turn: int, who: str, reply: Completion) -> None:
        conversation.failed = True
        where = f"conversation {conversation.number}, turn {turn}, {who}"
        messages = conversation.messages
        # the conversation so far, as a task, so the reject shows what it was about
        task = None if not messages else Task(
            id=stable_id("magpie", str(self.seed), str(conversation.number)), instruction=messages[0]["content"],
            instances=[Instance(output=messages[1]["content"])] if len(messages) > 1 else [])
        if reason == TEACHER_ERROR:
            self.reject(reason, detail=f"{where}: {reply.error}", task=task)
        else:
            self.reject(reason, detail=where, raw=reply.text, task=task)

    def step(self, conversations: list[_Conversation], turn: int) -> None:
        """One exchange for each live conversation: the user's message, then the reply."""
        live = [c for c in conversations if not c.failed]
        jobs = [([self.prefix(c)], self.instruction_params(c.number, turn)) for c in live]
        for conversation, [[reply]] in zip(live, self.teacher.complete_many(jobs) if jobs else []):
            conversation.completions.append(reply)
            text = reply.text.strip()
            if not reply.ok:
                self.fail(conversation, TEACHER_ERROR, turn, "user", reply)
            elif not text:
                self.fail(conversation, EMPTY_INSTRUCTION, turn, "user", reply)
            elif reply.finish_reason == "length":
                self.fail(conversation, LENGTH_LIMIT, turn, "user", reply)
            else:
                conversation.messages.append({"role": "user", "content": text})
        live = [c for c in conversations if not c.failed]
        jobs = [([[*self.system(), *c.messages]], self.response_params(c.number, turn)) for c in live]
        for conversation, [[reply]] in zip(live, self.responder.complete_many(jobs) if jobs else []):
            conversation.completions.append(reply)
            if not reply.ok:
                self.fail(conversation, TEACHER_ERROR, turn, "assistant", reply)
            elif reply.finish_reason == "length" and self.settings.reject_cut_replies:
                self.fail(conversation, LENGTH_LIMIT, turn, "assistant", reply)
            elif not reply.text.strip():
                self.fail(conversation, "empty reply", turn, "assistant", reply)
            else:
                conversation.messages.append({"role": "assistant", "content": reply.text.strip()})

    def tag(self, conversations: list[_Conversation]) -> list[Completion | None]:
        if not self.settings.tags or not conversations:
            return [None] * len(conversations)
        prompts = [tag_prompt(c.messages[0]["content"]) for c in conversations]
        replies = self.judge.complete(prompts, self.settings.tag_sampling, schema=TAG_SCHEMA)
        return [samples[0] for samples in replies]

    def record(self, conversation: _Conversation, tag_reply: Completion | None) -> Task:
        messages = conversation.messages
        followups = [Turn(user=messages[i]["content"], assistant=messages[i + 1]["content"])
                     for i in range(2, len(messages), 2)]
        task_id = stable_id("magpie", str(self.seed), str(conversation.number))
        extra: dict[str, Any] = {}
        tags = parse_tags(tag_reply.text) if tag_reply is not None and tag_reply.ok else None
        if tag_reply is not None and tags is None:
            extra["tags_raw"] = tag_reply.text if tag_reply.ok else f"teacher error: {tag_reply.error}"
        completions = conversation.completions + ([tag_reply] if tag_reply is not None else [])
        return Task(
            id=task_id,
            name=task_id,
            instruction=messages[0]["content"],
            instances=[Instance(output=messages[1]["content"], followups=followups or None)],
            lineage=lineage(
                generator="magpie",
                operation=f"magpie:turns={self.settings.turns}",
                teacher_name=(self.teacher.backend.name, self.teacher.backend.model),
                templates=[load_template(TAGS)] if tag_reply is not None else [],
                sampling=self.settings.instruction_sampling,
                seed=self.seed,
                completions=completions,
                pre_query_prefix=pre_query_prefix(self.tokenizer, self.settings.system_prompt),
                **({"system_prompt": self.settings.system_prompt} if self.settings.system_prompt else {}),
                responder=f"{self.responder.backend.name}:{self.responder.backend.model}",
                **extra,
            ),
            **({"tags": tags} if tags is not None else {}),  # a record column (Task keeps extra keys)
        )


def _open(stack: ExitStack, name: str, config: TeacherConfig | None, teacher: Teacher, run: RunContext) -> Teacher:
    """The run's teacher, or another one (caching where the run's does unless it says otherwise)."""
    if config is None:
        return teacher
    if config.cache_dir is None and teacher.config.cache_dir is not None:
        config = config.model_copy(update={"cache_dir": teacher.config.cache_dir})
    opener = run.open_teacher or (lambda _name, c: make_teacher(c))
    return stack.enter_context(opener(name, config))


def run_magpie(seeds: Sequence[Task], settings: MagpieConfig, run: RunContext) -> None:
    """Write Magpie conversations into `run.sink` until it holds `run.num` (those already there
    count) or `num x max_attempts` prefixes were tried. `seeds` are not used: Magpie has none."""
    teacher, sink = run.teacher, run.sink
    tokenizer = load_tokenizer(settings.tokenizer or teacher.backend.model)
    stop = end_of_turn(tokenizer)
    stops = tuple(s for s in (stop, "\n" if settings.single_line else "") if s)
    have = len(sink.existing)
    batch = run.batches_done
    attempts = int(run.num * settings.max_attempts)
    with ExitStack() as stack:
        state = _Run(settings, run.seed, tokenizer, teacher,
                     _open(stack, "responder", settings.responder, teacher, run),
                     _open(stack, "judge", settings.judge, teacher, run) if settings.tags else teacher,
                     ReplayedRejects(sink, STAGE_MAGPIE), stops)
        while have < run.num and batch * settings.items_per_batch < attempts:
            sink.at(batch)
            first = batch * settings.items_per_batch
            numbers = range(first, min(first + settings.items_per_batch, attempts))
            conversations = [_Conversation(number) for number in numbers]
            for turn in range(1, settings.turns + 1):
                state.step(conversations, turn)
            kept = [c for c in conversations if not c.failed][: run.num - have]
            tasks = [state.record(c, tag) for c, tag in zip(kept, state.tag(kept))]
            fresh = sink.accept(tasks)
            sink.flush()
            have += len(fresh)
            batch += 1
            run.on_batch_done(batch)
            run.progress(len(fresh))
    sink.flush()
