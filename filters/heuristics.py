"""Quality heuristics: pure checks that return the reason a task fails, or None.

The Self-Instruct / Alpaca reference rules for a new instruction (word bounds, keyword
blacklist, "Write a program", punctuation / non-ASCII start) and for instances (input ==
output, empty output, ending in ':', one input with two outputs), plus what those
references leave to chance: refusals ("As an AI language model", or a reply that opens by
declining: "I'm sorry, but", "This task cannot be performed"), placeholders in place of an
answer ("<nooutput>", "<image attached>"), degenerate outputs (only punctuation, one word
repeated) and length limits. The reply checks (and empty output) look at every assistant turn
of a multi-turn conversation; a reject names the turn ("refusal: 'i cannot' (turn 2)").
Each rule's precision and recall on real teacher data (a labelled Alpaca sample,
tests/data/filter_precision/) is measured by bench/filter_precision.py.

    from datagen.filters.heuristics import HeuristicsConfig, checks_for
    kept, rejected = check_pass(checks_for(HeuristicsConfig(preset="alpaca")))(tasks)
"""

from __future__ import annotations

import re
import string
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
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
# declining: a refusal only when the reply starts with it (after an "Unfortunately,"); inside
# content (a character's line in a dialogue, "- Agent: I'm sorry, but ...", a letter of
# apology) it is what was asked for
DECLINES = (
    "i'm sorry, but", "i am sorry, but", "i'm sorry, i", "i apologize, but",
    "i cannot fulfill", "i can't fulfill", "i cannot assist", "i can't assist",
    "i'm unable to", "i am unable to", "i'm not able to provide",
    # text-davinci-003 declining an Alpaca task it cannot do ("This task cannot be performed
    # by a GPT model as it requires creating a flow chart.")
    "this task cannot", "this instruction cannot", "this request cannot", "the task cannot",
)
REFUSALS = AI_SELF_REFERENCES + DECLINES
_LEAD_IN = re.compile(r"^(?:unfortunately|sorry|apologies)[,.!]?\s+")
# an instruction that asks for an apology or a decline: its reply may open with one
ASKS_FOR_DECLINE = re.compile(r"\b(?:apolog\w*|sorry|declin\w*|refus\w*|reject\w*)", re.IGNORECASE)
# a placeholder where the answer should be: "<nooutput>", "<noinput>", "No Output",
# "<cropped image attached>", "<No output, cannot design a graphical user interface>"; a
# tag with attributes ("<meta name=...>") is HTML, not a placeholder
_PLACEHOLDER_LINE = re.compile(
    r"<\s*[^<>=/]*\b(?:no ?output|no ?input|image|photo|picture|video|audio|file|attached)\b[^<>=]*>"
    r"|\(?no ?output\)?\.?|\(?n/a\)?\.?", re.IGNORECASE)


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


def refusal_phrase(text: str, instruction: str = "") -> str | None:
    """The phrase that makes `text` a refusal: an AI self-reference anywhere, or a decline the
    reply starts with (unless `instruction` asks for an apology or a decline); None otherwise."""
    lowered = text.lower().replace("’", "'")
    opening = _LEAD_IN.sub("", lowered.strip())
    declines = () if ASKS_FOR_DECLINE.search(instruction) else DECLINES
    return (next((phrase for phrase in AI_SELF_REFERENCES if phrase in lowered), None)
            or next((phrase for phrase in declines if opening.startswith(phrase)), None))


def placeholder_reason(output: str) -> str | None:
    """An output that is only placeholders ("<nooutput>", "No Output", "<image attached>"):
    the teacher wrote a marker where the answer should be."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    if lines and all(_PLACEHOLDER_LINE.fullmatch(line) for line in lines):
        return f"placeholder output: {lines[0][:60]!r}"
    return None


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
    placeholders: bool = True
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
    if config.placeholders:
        checks.append(_placeholder_check)
    if config.degenerate:
        checks.append(_degenerate_check)
    if config.min_output_words or config.max_output_words:
        checks.append(lambda task: _length_check(task, config.min_output_words, config.max_output_words))
    return checks


def _replies(task: Task) -> Iterator[tuple[str, str, str]]:
    """(what the user said, the reply, "" or " (turn N)") for every assistant turn: each
    instance's output, then a multi-turn instance's later replies, named by turn."""
    for instance in task.instances:
        yield task.instruction, instance.output, ""
        for number, turn in enumerate(instance.followups or (), start=2):
            yield turn.user, turn.assistant, f" (turn {number})"


def _instances_check(task: Task) -> str | None:
    if not task.instances:
        return "no instances"
    for instance in task.instances:
        reason = instance_reject_reason(instance)
        if reason:
            return reason
        for number, turn in enumerate(instance.followups or (), start=2):
            if turn.assistant.strip() == "":
                return f"empty output (turn {number})"
    if has_conflicting_outputs(task.instances):
        return "conflicting outputs for the same input"
    return None


def _refusal_check(task: Task) -> str | None:
    return next((f"refusal: {phrase!r}{turn}" for asked, reply, turn in _replies(task)
                 if (phrase := refusal_phrase(reply, asked))), None)


def _placeholder_check(task: Task) -> str | None:
    return next((r + turn for _asked, reply, turn in _replies(task) if (r := placeholder_reason(reply))), None)


def _degenerate_check(task: Task) -> str | None:
    return next((r + turn for _asked, reply, turn in _replies(task) if (r := degenerate_reason(reply))), None)


def _length_check(task: Task, min_words: int, max_words: int | None) -> str | None:
    for _asked, reply, turn in _replies(task):
        words = len(reply.split())
        if words < min_words:
            return f"output shorter than {min_words} words{turn}"
        if max_words is not None and words > max_words:
            return f"output longer than {max_words} words{turn}"
    return None


# the rules' names (`reason_name` of their reasons): ours, then the Self-Instruct reference's
OUR_REASONS = ("no instances", "refusal", "placeholder output", "output is only punctuation", "degenerate output")
REFERENCE_REASONS = (
    "too short", "too long", "blacklisted word", "starts with 'Write a program'", "starts with punctuation",
    "starts with a non-ASCII character", "empty output", "input equals output", "input or output ends with ':'",
    "conflicting outputs for the same input",
)


def reason_name(reason: str) -> str:
    """The rule a reason names, without its detail: "blacklisted word: image" -> "blacklisted
    word", "degenerate output (repeats 'very')" -> "degenerate output"."""
    return re.split(r": | \(", reason, maxsplit=1)[0]


def fired_rules(task: Task, checks: Sequence[Check]) -> set[str]:
    """Every rule of `checks` that rejects `task` (not only the first, as the pass reports)."""
    return {reason_name(reason) for check in checks if (reason := check(task)) is not None}


@dataclass
class RuleScore:
    """How one rule did on labelled tasks: firings, right firings, tasks with its defect."""

    fired: int = 0
    correct: int = 0
    defective: int = 0

    @property
    def precision(self) -> float | None:
        return self.correct / self.fired if self.fired else None

    @property
    def recall(self) -> float | None:
        return self.correct / self.defective if self.defective else None


def score_rules(labelled: Iterable[tuple[Task, Collection[str]]], checks: Sequence[Check]) -> dict[str, RuleScore]:
    """Each rule's score over (task, the rules whose defect the task really has) pairs: a
    firing is right when the task has the defect the rule names."""
    scores: dict[str, RuleScore] = defaultdict(RuleScore)
    for task, defects in labelled:
        fired = fired_rules(task, checks)
        for rule in fired | set(defects):
            score = scores[rule]
            score.fired += rule in fired
            score.defective += rule in defects
            score.correct += rule in fired and rule in defects
    return dict(scores)


def heuristics_pass(tasks: Sequence[Task], context: PassContext) -> PassResult:
    """The `heuristics` pass: every configured check, first failing reason reported."""
    return check_pass(checks_for(context.settings))(tasks)
