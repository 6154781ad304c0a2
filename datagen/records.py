"""Task records: the one shape every stage reads and writes, one JSONL line per task.

The shape is the Self-Instruct seed format (`id`, `name`, `instruction`,
`instances: [{input, output}]`, `is_classification`), so a standard `seed_tasks.jsonl`
loads unchanged, extended with an Orca `system` message, per-instance `explanation`
and a `lineage` that says exactly how the task was made. Flat SFT examples and
Natural-Instructions files are views derived from this record.

    from datagen.records import Task
    task = Task.model_validate_json(line)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_serializer


class Turn(BaseModel):
    """A later exchange of a multi-turn conversation: what the user said next and the reply."""

    model_config = ConfigDict(extra="allow")

    user: str
    assistant: str


class Instance(BaseModel):
    """One input/output pair of a task; `explanation` holds an Orca-style rationale.

    A multi-turn conversation is one instance: its first user turn is
    `datagen.chat.user_turn(instruction, input)`, its first reply `output`, and `followups`
    the exchanges after it, in order (None for a single-turn instance, so files of
    single-turn tasks are unchanged).
    """

    model_config = ConfigDict(extra="allow")

    input: str = ""
    output: str
    explanation: str | None = None
    followups: list[Turn] | None = None

    @model_serializer(mode="wrap")
    def _single_turn_as_before(self, serialize):
        # A single-turn instance serialises exactly as before followups existed (pinned outputs,
        # recorded rejects and request texts built from instance JSON stay byte for byte).
        data = serialize(self)
        if isinstance(data, dict) and data.get("followups", ()) is None:
            del data["followups"]
        return data


def takes_input(instances: Sequence[Instance]) -> bool:
    """Whether a task takes input: some instance has one (Self-Instruct also makes tasks
    that need none, whose instances are outputs only)."""
    return any(instance.input for instance in instances)


class Usage(BaseModel):
    """Tokens a teacher spent on a record (summed over every request that made it)."""

    model_config = ConfigDict(extra="forbid")

    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens


class Lineage(BaseModel):
    """How a task was produced: method, operation, round, parents, prompt and teacher."""

    model_config = ConfigDict(extra="allow")

    generator: str | None = None
    operation: str | None = None
    round: int | None = None
    parent_ids: list[str] = Field(default_factory=list)
    template: str | None = None
    template_sha256: str | None = None
    teacher_backend: str | None = None
    teacher_model: str | None = None
    sampling: dict[str, Any] | None = None
    seed: int | None = None
    usage: Usage = Field(default_factory=Usage)
    templates: dict[str, str] = Field(default_factory=dict)
    """Every template used to make the record: name -> sha256."""
    most_similar: dict[str, float] = Field(default_factory=dict)
    """Self-Instruct: the closest existing instructions and their ROUGE-L F1."""
    mean_similarity: float | None = None
    judge_score: float | None = None
    """LLM-judge score (0-5, mean over instances) and its rationale, set by the judge pass."""
    judge_rationale: str | None = None


class Task(BaseModel):
    """A task in the Self-Instruct seed shape plus `system` and `lineage`.

    Unknown keys from other people's files are kept (extra="allow") so that a
    filter pass never silently strips fields it does not understand.
    """

    model_config = ConfigDict(extra="allow")

    id: str
    name: str = ""
    instruction: str
    instances: list[Instance] = Field(default_factory=list)
    is_classification: bool = False
    system: str | None = None
    lineage: Lineage | None = None

    def to_json(self) -> str:
        """One compact JSONL line, leaving out unset optional fields."""
        return self.model_dump_json(exclude_none=True)


class Reject(BaseModel):
    """Something a generator or filter threw away, kept with its reason (never silently dropped).

    `raw` holds the teacher's text when a reply could not be parsed; `task` the task
    (or candidate) that was rejected; `duplicate_of` the id a duplicate repeats; `batch`
    and `round` where in a generation run it happened.
    """

    model_config = ConfigDict(extra="forbid")

    reason: str
    stage: str
    detail: str | None = None
    raw: str | None = None
    task: Task | None = None
    duplicate_of: str | None = None
    batch: int | None = None
    round: int | None = None

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=True)
