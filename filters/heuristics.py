"""Quality heuristics: pure checks that return the reason a task fails, or None.

The Self-Instruct / Alpaca reference rules for a new instruction (word bounds, keyword
blacklist, "Write a program", punctuation / non-ASCII start) and for instances (input ==
output, empty output, ending in ':', one input with two outputs), plus what those
references leave to chance: refusals ("As an AI language model", or a reply that opens by
declining: "I'm sorry, but"), degenerate outputs (only punctuation, one word repeated) and
length limits.

    from datagen.filters.heuristics import HeuristicsConfig, checks_for
    kept, rejected = check_pass(checks_for(HeuristicsConfig(preset="alpaca")))(tasks)
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from datagen.filters.base import Check, PassContext, PassResult, check_pass
from datagen.records import Instance, Task

REFERENCE_BLACKLIST = (
    "image", "images", "graph", "graphs", "picture", "pictures",
    "file", "files", "map", "maps", "draw", "plot", "go to",
)
ALPACA_EXTRA_BLACKLIST = ("video", "audio", "music", "flowchart", "diagram")
# an assistant speaking of itself as one: a refusal (or a disclaimer) wherever it stands
AI_SELF_REFERENCES = ("as an ai language model", "as a language model", "as an ai assistant")
# declining: a refusal only when the reply opens with it; inside content (a character in a
# dialogue, a letter of apology) it is what was asked for
DECLINES = (
    "i'm sorry, but", "i am sorry, but", "i'm sorry, i", "i apologize, but",
    "i cannot fulfill", "i can't fulfill", "i cannot assist", "i can't assist",
    "i'm unable to", "i am unable to", "i'm not able to provide",
)
REFUSALS = AI_SELF_REFERENCES + DECLINES
OPENING_CHARS = 200  # how far into its first sentence a decline still opens a reply
_FIRST_SENTENCE = re.compile(r"(?<=[.!?])\s|\n")


def _has_word(word: str, text: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text, flags=re.IGNORECASE) is not None


def instruction_reject_reason(
    instruction: str, blacklist: Sequence[str] = REFERENCE_BLACKLIST, min_words: int = 3, max_words: int = 150
) -> str | None:
    """The reference's rules for a new instruction, in its order; None when it passes."""
    words = len(instruction.split())
    if words <= min_words:
        return "too short"
    if words > max_words:
        return "too long"
    hit = next((word for word in blacklist if _has_word(word, instruction)), None)
    if hit:
        return f"blacklisted word: {hit}"
    if instruction.startswith("Write a program"):
        return "starts with 'Write a program'"
    if instruction[0] in string.punctuation:
        return "starts with punctuation"
    if not instruction[0].isascii():
        return "starts with a non-ASCII character"
    return None


def instance_reject_reason(instance: Instance) -> str | None:
    """The reference's rules for one instance; None when it passes. An empty output is named
    first: with an empty input too the reference's own order would call it "input equals
    output" (the same decision, a misleading reason)."""
    if instance.output == "":
        return "empty output"
    if instance.input == instance.output:
        return "input equals output"
    if instance.input.strip().endswith(":") or instance.output.strip().endswith(":"):
        return "input or output ends with ':'"
    return None


def has_conflicting_outputs(instances: Sequence[Instance]) -> bool:
    """True when one non-empty input maps to two different outputs."""
    seen: dict[str, str] = {}
    for instance in instances:
        if instance.input and seen.setdefault(instance.input, instance.output) != instance.output:
            return True
    return False


def refusal_phrase(text: str) -> str | None:
    """The phrase that makes `text` a refusal: an AI self-reference anywhere, or a decline in
    the reply's first sentence; None otherwise."""
    lowered = text.lower().replace("’", "'")
    opening = _FIRST_SENTENCE.split(lowered.strip(), maxsplit=1)[0][:OPENING_CHARS]
    return (next((phrase for phrase in AI_SELF_REFERENCES if phrase in lowered), None)
            or next((phrase for phrase in DECLINES if phrase in opening), None))


_WORD = re.compile(r"\w{2,}")  # a word: two letters or digits at least


def degenerate_reason(output: str, max_repeat_share: float = 0.5, min_tokens: int = 8) -> str | None:
    """Output that is only punctuation/whitespace, or one word repeated most of the time.
    Only words count: a table's `|` and `---`, code's operators and single-letter notation
    (the notes of a melody, `C D D E`) are structure, not repetition."""
    if output.strip() and all(ch in string.punctuation or ch.isspace() for ch in output):
        return "output is only punctuation"
    words = _WORD.findall(output.lower())
    if len(words) >= min_tokens:
        word, count = Counter(words).most_common(1)[0]
        if count / len(words) > max_repeat_share:
            return f"degenerate output (repeats {word!r})"
    return None


class HeuristicsConfig(BaseModel):
    """Which checks run. `preset` picks the blacklist; the rest are shared limits."""

    model_config = ConfigDict(extra="forbid")

    preset: Literal["self-instruct", "alpaca"] = "self-instruct"
    blacklist: tuple[str, ...] | None = None  # replaces the preset's list when set
    min_instruction_words: int = Field(3, ge=0)
    max_instruction_words: int = Field(150, ge=1)
    reference_instruction_rules: bool = True
    min_output_words: int = Field(0, ge=0)
    max_output_words: int | None = Field(None, ge=1)
    refusals: bool = True
    degenerate: bool = True

    def blacklisted_words(self) -> tuple[str, ...]:
        if self.blacklist is not None:
            return self.blacklist
        extra = ALPACA_EXTRA_BLACKLIST if self.preset == "alpaca" else ()
        return REFERENCE_BLACKLIST + extra


def checks_for(config: HeuristicsConfig) -> list[Check]:
    """The configured checks, in the order their reasons are reported."""
    checks: list[Check] = []
    if config.reference_instruction_rules:
        blacklist = config.blacklisted_words()
        checks.append(lambda task: instruction_reject_reason(
            task.instruction, blacklist, config.min_instruction_words, config.max_instruction_words))
    checks.append(_instances_check)
    if config.refusals:
        checks.append(_refusal_check)
    if config.degenerate:
        checks.append(_degenerate_check)
    if config.min_output_words or config.max_output_words:
        checks.append(lambda task: _length_check(task, config.min_output_words, config.max_output_words))
    return checks


def _instances_check(task: Task) -> str | None:
    if not task.instances:
        return "no instances"
    for instance in task.instances:
        reason = instance_reject_reason(instance)
        if reason:
            return reason
    if has_conflicting_outputs(task.instances):
        return "conflicting outputs for the same input"
    return None


def _refusal_check(task: Task) -> str | None:
    phrase = next((p for i in task.instances if (p := refusal_phrase(i.output))), None)
    return f"refusal: {phrase!r}" if phrase else None


def _degenerate_check(task: Task) -> str | None:
    return next((r for i in task.instances if (r := degenerate_reason(i.output))), None)


def _length_check(task: Task, min_words: int, max_words: int | None) -> str | None:
    for instance in task.instances:
        words = len(instance.output.split())
        if words < min_words:
            return f"output shorter than {min_words} words"
        if max_words is not None and words > max_words:
            return f"output longer than {max_words} words"
    return None


def heuristics_pass(tasks: Sequence[Task], context: PassContext) -> PassResult:
    """The `heuristics` pass: every configured check, first failing reason reported."""
    return check_pass(checks_for(context.settings))(tasks)
