"""The reject vocabulary: the stage names and reasons written to `*.rejects.jsonl`.

Every generator and filter writes what it throws away with a `stage` (where) and a
`reason` (why). The ones more than one module writes or reads are named here once, so
export's choice of negative examples (which rejects show a wrong *output*) refers to the
same names the generators write, and a renamed reason cannot silently fall out of it.
Filter passes use their registry name (`datagen.filters.registry.PASSES`) as their stage.

    from datagen import rejects
    sink.reject(rejects.PARSE_FAILURE, rejects.STAGE_BOOTSTRAP, raw=reply.text)
"""

from __future__ import annotations

# -- stages -----------------------------------------------------------------------------------

STAGE_READ = "read"  # an input line that is not a task
STAGE_BOOTSTRAP = "bootstrap"  # Self-Instruct: new instructions
STAGE_INSTANCES = "instances"  # Self-Instruct: instances of a new instruction
STAGE_ALPACA = "alpaca"
STAGE_EVOL = "evol"
STAGE_ORCA = "orca"
STAGE_PREFERENCES = "preferences"  # preference pairs: responses and their ratings

# -- reasons every generator may give -----------------------------------------------------------

TEACHER_ERROR = "teacher error"
PARSE_FAILURE = "parse failure"
LENGTH_LIMIT = "reply hit the length limit"
PREAMBLE = "chat preamble"
SURPLUS = "surplus beyond num"
COPIED_DEMONSTRATION = "copies a demonstration"
SHARED_INPUT = "input shared by too many tasks"
INVALID_LINE = "invalid line"
TOO_SIMILAR = "too similar to an existing instruction"

# -- preference pairs (a response, its rating, or the prompt's set of responses) ---------------

EMPTY_RESPONSE = "empty response"
RATING_UNPARSEABLE = "rating unparseable"
FEWER_THAN_TWO_RATED = "fewer than two rated responses"
ALL_RATINGS_EQUAL = "all responses rated the same"
NO_RATING_MARGIN = "no response rated far enough below the best"
SAME_TEXT = "chosen and rejected say the same"
NO_CHOSEN_REPLY = "no usable reply from the chosen responder"
NO_OTHER_REPLY = "no usable reply from another responder"
# pairwise judging (`judging: pairwise`): each two replies compared in both orders
VERDICT_UNPARSEABLE = "verdict unparseable"
FEWER_THAN_TWO_USABLE = "fewer than two usable responses"
NO_PAIR_JUDGED = "no pair judged in both orders"
NO_PAIRWISE_WIN = "no response beat another in both orders"

# -- reasons about a task's instances as a whole ------------------------------------------------

NO_VALID_INSTANCES = "no valid instances"
CONFLICTING_OUTPUTS = "conflicting outputs for the same input"
DUPLICATE_INPUT_TASK_ID = "duplicate input task id"
NO_INSTANCE_ANSWERED = "no instance answered"

# A rejected Self-Instruct instance: "instance: <why>" (the instance JSON in `raw`).
INSTANCE_PREFIX = "instance: "
INPUT_ALREADY_PRESENT = "input already present"
INPUT_MISSING = "input missing"


def instance_reason(why: str) -> str:
    """The reason of a rejected instance: `instance: input already present`."""
    return INSTANCE_PREFIX + why


# -- what says nothing about an output being wrong (export's negative examples skip these) ------

# duplicates, novelty and contamination are about the task's text; bootstrap rejects have
# no output; a line that was not a task has nothing at all
NOT_ABOUT_OUTPUT_STAGES = frozenset(
    {"exact-dedup", "near-dedup", "novelty", "decontaminate", STAGE_BOOTSTRAP, STAGE_READ}
)
NOT_ABOUT_OUTPUT_REASONS = frozenset({
    CONFLICTING_OUTPUTS, SURPLUS, DUPLICATE_INPUT_TASK_ID, NO_VALID_INSTANCES, NO_INSTANCE_ANSWERED,
    TEACHER_ERROR, instance_reason(INPUT_ALREADY_PRESENT), instance_reason(INPUT_MISSING),
})
