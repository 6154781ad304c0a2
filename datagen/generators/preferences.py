"""AI-feedback preference pairs (UltraFeedback, MT-Bench judging, the Zephyr recipe): `--method preferences`.

    datagen generate --method preferences --seeds kept.jsonl --num 200 --out pairs.jsonl

Works on any task JSONL. Per task, in input order, for its first `max_instances_per_task`
distinct inputs (`orca.instances_to_answer`):

1. *Prompt*: the instance as the conversation SFT trains on (`datagen.chat.instance_messages`
   without its assistant turn), so the pairs ask exactly what the SFT data asked.
2. *Responses*: `responses_per_prompt` (K, default 4) replies, response k from responder
   `k mod len(responders)`. A responder is any backend (`teacher:` section, e.g. the local
   student) or, with no `teacher:`, the run's teacher, each with its own sampling (the
   default: the teacher at temperature 1.0). A responder's replies to one prompt are its
   samples 0, 1, … (`n`, seeds seed+i), each cached on its own.
3. *Ratings* (`judging: rating`): the run's teacher rates every response alone, one overall
   1–10 score and a rationale (`templates/preference_rating.jinja`, asking about helpfulness,
   honesty, instruction following and truthfulness). That is UltraFeedback's single-reply
   critique score, not its preference ratings. `parse_rating` reads the last `Rating: N` line
   (`8/10`, `**Rating:** 8` too); anything else, or a score outside 1–10, is a reject "rating
   unparseable" with the judge's raw text. Errors, empty replies and replies cut off at
   max_tokens are rejected before rating (a truncated reply taught as "chosen" would teach the
   student to stop mid-sentence).
   With `judging: ultrafeedback`, UltraFeedback's own preference annotation: the teacher sees
   all usable replies of a prompt together and rates each 1–5 on the four aspects
   (`templates/preference_ultrafeedback.jinja`, one request per prompt; `parse_aspect_ratings`);
   a reply's score is the mean of its four, as in UltraFeedback-binarized. A reply whose line
   is missing or incomplete is a "rating unparseable" reject; the others still count.
   With `chosen_responder` set, nothing is rated: chosen is that responder's first usable
   reply, rejected a usable reply of another one (the Orca-DPO-pairs recipe: the teacher's
   answer over the student's; `choose_by_responder`). Scores are then null. This is also what
   runs on a CPU with the embedded 135M model, which cannot follow any rating format.
   With `judging: pairwise`, nothing is rated alone: MT-Bench's pairwise comparison (Zheng et
   al. 2023), the teacher compares every two usable replies of a prompt
   (`templates/preference_pairwise.jinja`, the same four aspects, `Verdict: A|B|tie`;
   `parse_verdict`) twice, once in each order. A reply wins a comparison
   only when both orders prefer it; a tie, an unreadable verdict ("verdict unparseable") or
   two verdicts that disagree (a judge favouring the first position) is no win, so position
   bias becomes ties, not wins. K replies cost K(K-1) judge requests (12 for K = 4).
   The judge's token budget (`judge_sampling`, unset: `judge_budget`) leaves room for the
   rationale the rubric asks for before the score line, which comes last.
4. *Pair* (`choose_pair`): chosen = the best-rated response (equals: a seeded pick per
   prompt, so a tie does not always favour responder 0);
   rejected = one rated at least `margin` below it (`rejected_pick`: "random", seeded per
   prompt, as UltraFeedback-binarized; or "lowest"). Fewer than two ratings, all ratings
   equal, none far enough below, or a rejected text equal to the chosen one: the prompt
   is a reject with that reason (constants in `datagen.rejects`). Pairwise (`choose_by_wins`):
   chosen = the reply with most wins (equals: the same seeded pick), rejected = one it beat in
   both orders (`rejected_pick` "lowest": the one with fewest wins); scores are null, the wins
   and every comparison's two verdicts are in lineage. Fewer than two usable replies, no
   comparison readable in both orders, or no win at all: a reject with that reason.

Each pair is one JSONL line in TRL's conversational preference shape:

    {"id": "pref-…", "task_id": "…", "instance_index": 0,
     "prompt":   [{"role": "user", "content": "…"}],          (system first for Orca tasks)
     "chosen":   [{"role": "assistant", "content": "…"}],
     "rejected": [{"role": "assistant", "content": "…"}],
     "score_chosen": 9.0, "score_rejected": 4.0,
     "rationale_chosen": "…", "rationale_rejected": "…",
     "lineage": {"generator": "preferences", "template": "preference_rating.jinja",
                 "template_sha256": "…", "teacher_backend"/"teacher_model": the judge,
                 "sampling": the judge's, "responders": {"chosen": {...}, "rejected": {...}},
                 "judging": "rating", "candidates": [{"responder", "sample", "score"}, …], …}}

Pairwise lineage has `"judging": "pairwise"`, the pairwise template and its sha,
`candidates` with `wins` instead of `score`, `comparisons` (each `{"a", "b", "verdicts":
[with a shown first, with b shown first], "rationales", "winner"}`) and `decisive`, the
comparison of chosen with rejected.

Resume is replay, as for Orca: ids are `stable_id("pref", task id, instance index)`, a
rerun skips prompts already in OUT, answers everything else from the request cache (same
seeds, so the same requests), and writes no reject already in OUT's rejects file.

On `engine: ray` (`RunContext.lookahead` > 0) the loop first answers a window of whole
batches (at least `lookahead` prompts, no more than `--num` still needs) stage by stage —
responses, then ratings or comparisons, each one teacher call, so one Ray pipeline — into
the request caches, then runs its batches exactly as on `engine: local`, from the caches.
Responders with a backend of their own answer in this process. Without a cache on every
teacher involved it does not look ahead (it would pay twice).
"""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from datagen.chat import instance_messages
from datagen.config import SamplingParams, Strict
from datagen.generators.common import ReplayedRejects, RunContext, lineage, normalised_text, stable_id
from datagen.generators.orca import instances_to_answer
from datagen.prompts import load_template
from datagen.records import Instance, Lineage, Task
from datagen.rejects import (
    ALL_RATINGS_EQUAL,
    EMPTY_RESPONSE,
    FEWER_THAN_TWO_RATED,
    FEWER_THAN_TWO_USABLE,
    LENGTH_LIMIT,
    NO_CHOSEN_REPLY,
    NO_OTHER_REPLY,
    NO_PAIR_JUDGED,
    NO_PAIRWISE_WIN,
    NO_RATING_MARGIN,
    RATING_UNPARSEABLE,
    SAME_TEXT,
    STAGE_PREFERENCES,
    TEACHER_ERROR,
    VERDICT_UNPARSEABLE,
)
from datagen.structured import RATING_SCHEMA, VERDICT_SCHEMA, json_field, json_rationale, looks_like_json
from datagen.teachers.base import Completion, Message
from datagen.teachers.teacher import Teacher, TeacherConfig, make_teacher

RATING = "preference_rating.jinja"
PAIRWISE = "preference_pairwise.jinja"
ULTRAFEEDBACK = "preference_ultrafeedback.jinja"
MIN_SCORE, MAX_SCORE = 1.0, 10.0
ASPECTS = ("helpfulness", "honesty", "instruction following", "truthfulness")  # UltraFeedback's, 1-5 each
# how chosen and rejected are decided: lineage's `judging`
JUDGING_RATING, JUDGING_PAIRWISE, JUDGING_RESPONDER = "rating", "pairwise", "responder"
JUDGING_ULTRAFEEDBACK = "ultrafeedback"


def judge_budget(judging: str, responses: int) -> int:
    """Default max_tokens of a judge reply. The score line comes last, after a rationale of
    one or two sentences (about 60-80 tokens, and judges overrun it), so the old 160 could
    cut off the very line being asked for; ultrafeedback writes one line per response."""
    return 64 + 96 * responses if judging == JUDGING_ULTRAFEEDBACK else 320


class Responder(Strict):
    """One source of responses: a backend (None: the run's teacher) and its sampling."""

    name: str = Field(min_length=1)
    teacher: TeacherConfig | None = None
    sampling: SamplingParams = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=256)

    @field_validator("sampling")
    @classmethod
    def _one_sample(cls, params: SamplingParams) -> SamplingParams:
        if params.n != 1:
            raise ValueError("n must be 1: responses_per_prompt says how many replies each prompt gets")
        return params


class PreferencesConfig(Strict):
    """Preference-pair settings: who answers, how many times, how the teacher rates."""

    responders: list[Responder] = Field(default_factory=lambda: [Responder(name="teacher")], min_length=1)
    responses_per_prompt: int = Field(4, ge=2)
    # rejected must be rated at least this far below chosen
    margin: float = Field(1.0, gt=0)
    rejected_pick: Literal["random", "lowest"] = "random"
    max_instances_per_task: int = Field(1, ge=1)
    items_per_batch: int = Field(16, ge=1)  # prompts per round of teacher calls (and per flush)
    # show the judge the task's own output as a reference answer (UltraFeedback shows none)
    show_reference: bool = False
    # unset: greedy, with max_tokens sized for the rubric (`judge_budget`)
    judge_sampling: SamplingParams | None = None
    # rating: each reply rated 1-10 alone; pairwise: every two replies compared in both orders;
    # ultrafeedback: all replies rated together, 1-5 on each of four aspects
    judging: Literal["rating", "pairwise", "ultrafeedback"] = JUDGING_RATING
    # no judging: this responder's reply is chosen over another responder's (see the module doc)
    chosen_responder: str | None = None

    @model_validator(mode="after")
    def _chosen_responder_named(self) -> PreferencesConfig:
        names = [r.name for r in self.responders]
        if self.chosen_responder is not None:
            if self.judging != JUDGING_RATING:
                raise ValueError(f"chosen_responder judges nothing, so judging: {self.judging} has no effect; "
                                 "drop one")
            if self.chosen_responder not in names:
                raise ValueError(f"chosen_responder {self.chosen_responder!r} is not a responder "
                                 f"(responders: {', '.join(names)})")
            if len(names) < 2:
                raise ValueError("chosen_responder needs a second responder to give the rejected replies")
        return self

    @property
    def judging_mode(self) -> Judging:
        """The judging mode in force: `chosen_responder` judges nothing, else `judging`."""
        return JUDGINGS[JUDGING_RESPONDER if self.chosen_responder is not None else self.judging]

    def judge_params(self, seed: int) -> SamplingParams:
        """The judge's sampling: `judge_sampling`, or greedy with a budget sized for the rubric."""
        params = self.judge_sampling or SamplingParams(
            temperature=0.0, top_p=1.0, max_tokens=judge_budget(self.judging, self.responses_per_prompt))
        return params.model_copy(update={"seed": seed})

    @field_validator("responders")
    @classmethod
    def _distinct_names(cls, responders: list[Responder]) -> list[Responder]:
        names = [r.name for r in responders]
        if len(set(names)) != len(names):
            raise ValueError("responder names must be distinct")
        return responders


class PreferencePair(BaseModel):
    """One preference pair in TRL's conversational shape, with scores and lineage."""

    model_config = ConfigDict(extra="allow")

    id: str
    task_id: str
    instance_index: int
    prompt: list[dict[str, str]]
    chosen: list[dict[str, str]]
    rejected: list[dict[str, str]]
    score_chosen: float | None = None  # None when chosen by responder, not rated (and left out of the JSON)
    score_rejected: float | None = None
    rationale_chosen: str = ""
    rationale_rejected: str = ""
    lineage: Lineage | None = None

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=True)


# -- pure functions: prompts, rating parse, pair choice ----------------------------------------


def prompt_messages(task: Task, instance: Instance) -> list[Message]:
    """The conversation the student is asked: the SFT example without its assistant turn."""
    return instance_messages(task, instance)[:-1]


def rating_messages(prompt: Sequence[Message], response: str, reference: str | None = None) -> list[Message]:
    """What the judge is sent to rate `response` to `prompt`."""
    system = next((m["content"] for m in prompt if m["role"] == "system"), None)
    request = "\n\n".join(m["content"] for m in prompt if m["role"] == "user")
    text = load_template(RATING).render(system=system, request=request, response=response.strip(),
                                        reference=(reference or "").strip())
    return [{"role": "user", "content": text}]


@dataclass(frozen=True)
class Rating:
    score: float
    rationale: str
    aspects: dict[str, float] | None = None  # judging: ultrafeedback, each aspect's 1-5


_RATING_LINE = re.compile(
    r"^[ \t>#*_]*(?:overall[ \t]+)?(?:rating|score)[ \t*_]*[:：][ \t*_]*(-?\d+(?:\.\d+)?)[ \t*_]*(/[ \t]*10)?",
    flags=re.IGNORECASE | re.MULTILINE,
)
_RATIONALE = re.compile(r"^[ \t>#*_]*rationale[ \t*_]*[:：][ \t*_]*", flags=re.IGNORECASE | re.MULTILINE)
_RATIONALE_INLINE = re.compile(r"rationale[ \t*_]*[:：][ \t*_]*", flags=re.IGNORECASE)


def parse_rating(text: str) -> Rating | str:
    """The score and rationale of a judge reply, or why none can be read.

    The score is the last line starting `Rating:` (or `Score:`, `Overall rating:`; markdown
    marks and `/10` allowed) and must lie in 1..10. The rationale is the text after
    `Rationale:` up to the rating line, else the text before the rating line. A JSON reply
    (asked for with RATING_SCHEMA) is read as JSON: `{"rating": N, "rationale": "..."}`.
    """
    if looks_like_json(text):
        value = json_field(text, "rating")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and MIN_SCORE <= value <= MAX_SCORE:
            return Rating(float(value), json_rationale(text))
    matches = list(_RATING_LINE.finditer(text))
    if not matches:
        return 'no "rating" from 1 to 10 in the JSON reply' if looks_like_json(text) else 'no "Rating: N" line'
    last = matches[-1]
    score = float(last.group(1))
    if not MIN_SCORE <= score <= MAX_SCORE:
        return f"rating {last.group(1)} outside 1-10"
    before = text[: last.start()]
    label = list(_RATIONALE.finditer(before))
    rationale = before[label[-1].end():] if label else before
    return Rating(score, rationale.strip())


def ultrafeedback_messages(prompt: Sequence[Message], responses: Sequence[str],
                           reference: str | None = None) -> list[Message]:
    """What the judge is sent to rate all of `responses` to `prompt` together (numbered from 1)."""
    system = next((m["content"] for m in prompt if m["role"] == "system"), None)
    request = "\n\n".join(m["content"] for m in prompt if m["role"] == "user")
    text = load_template(ULTRAFEEDBACK).render(system=system, request=request,
                                               responses=[r.strip() for r in responses],
                                               reference=(reference or "").strip())
    return [{"role": "user", "content": text}]


_RESPONSE_LINE = re.compile(r"^[ \t>#*_-]*response[ \t*_]*(\d+)[ \t*_]*[:：.)](.*)$",
                            flags=re.IGNORECASE | re.MULTILINE)
_ASPECT = {aspect: re.compile(aspect.replace(" ", r"[ \t_-]*")
                              + r"[ \t*_]*[:=]?[ \t*_]*(\d+(?:\.\d+)?)(?:[ \t]*/[ \t]*5)?",
                              flags=re.IGNORECASE) for aspect in ASPECTS}


def parse_aspect_ratings(text: str, count: int) -> list[Rating | str]:
    """Each of `count` responses' four aspect ratings from an ultrafeedback judge reply, or
    why none can be read for it.

    Response i's ratings are on the last line starting `Response i:` (markdown marks allowed);
    it must name all four aspects with a number in 1..5. The score is their mean; the
    rationale is the text after `Rationale:` on that line.
    """
    lines: dict[int, str] = {}
    for match in _RESPONSE_LINE.finditer(text):
        lines[int(match.group(1))] = match.group(2)
    results: list[Rating | str] = []
    for number in range(1, count + 1):
        line = lines.get(number)
        if line is None:
            results.append(f'no "Response {number}: helpfulness N, ..." line')
            continue
        ratings, body = {}, _RATIONALE_INLINE.split(line, maxsplit=1)[0]
        for aspect, pattern in _ASPECT.items():
            found = pattern.search(body)
            if found is not None:
                ratings[aspect] = float(found.group(1))
        missing = [aspect for aspect in ASPECTS if aspect not in ratings]
        outside = [f"{aspect} {value:g}" for aspect, value in ratings.items() if not 1 <= value <= 5]
        if missing or outside:
            why = f"no {', '.join(missing)}" if missing else f"{', '.join(outside)} outside 1-5"
            results.append(f"response {number}: {why}")
            continue
        label = list(_RATIONALE_INLINE.finditer(line))
        rationale = line[label[-1].end():].strip() if label else ""
        results.append(Rating(sum(ratings.values()) / len(ratings), rationale,
                              {aspect: int(value) if value.is_integer() else value
                               for aspect, value in ratings.items()}))
    return results


@dataclass(frozen=True)
class PairChoice:
    chosen: int
    rejected: int


def choose_pair(
    scores: Sequence[float | None], texts: Sequence[str], margin: float, rng: random.Random,
    pick: str = "random",
) -> PairChoice | str:
    """Indexes of chosen (best score; equals: `rng` picks) and rejected (a score at least
    `margin` below, by `pick`), or the reject reason when the ratings make no pair."""
    rated = [i for i, score in enumerate(scores) if score is not None]
    if len(rated) < 2:
        return FEWER_THAN_TWO_RATED
    best = _pick_best(rated, lambda i: scores[i], rng)
    if all(scores[i] == scores[best] for i in rated):
        return ALL_RATINGS_EQUAL
    below = [i for i in rated if scores[best] - scores[i] >= margin]
    if not below:
        return NO_RATING_MARGIN
    below = [i for i in below if normalised_text(texts[i]) != normalised_text(texts[best])]
    if not below:
        return SAME_TEXT
    if pick == "lowest":
        return PairChoice(best, min(below, key=lambda i: (scores[i], i)))
    return PairChoice(best, rng.choice(below))


def _pick_best(indexes: Sequence[int], value: Callable[[int], float], rng: random.Random) -> int:
    """The index with the highest value; a tie is drawn with `rng` (seeded per prompt by the
    run's seed). `rng` is only drawn from on a tie, so untied choices keep their sequence."""
    top = max(value(i) for i in indexes)
    tied = [i for i in indexes if value(i) == top]
    return tied[0] if len(tied) == 1 else rng.choice(tied)


def choose_by_responder(responders: Sequence[str], usable: Sequence[bool], texts: Sequence[str], chosen_name: str,
                        rng: random.Random, pick: str = "random") -> PairChoice | str:
    """Indexes of chosen (the first usable reply of `chosen_name`) and rejected (a usable
    reply of another responder saying something else: seeded pick, or the first with
    `pick="lowest"`), or the reject reason."""
    mine = [i for i, name in enumerate(responders) if name == chosen_name and usable[i]]
    if not mine:
        return NO_CHOSEN_REPLY
    others = [i for i, name in enumerate(responders) if name != chosen_name and usable[i]]
    if not others:
        return NO_OTHER_REPLY
    others = [i for i in others if normalised_text(texts[i]) != normalised_text(texts[mine[0]])]
    if not others:
        return SAME_TEXT
    return PairChoice(mine[0], others[0] if pick == "lowest" else rng.choice(others))


# -- pairwise judging: two replies side by side, in both orders ---------------------------------


def pairwise_messages(prompt: Sequence[Message], response_a: str, response_b: str,
                      reference: str | None = None) -> list[Message]:
    """What the judge is sent to compare `response_a` (shown first, as A) with `response_b`."""
    system = next((m["content"] for m in prompt if m["role"] == "system"), None)
    request = "\n\n".join(m["content"] for m in prompt if m["role"] == "user")
    text = load_template(PAIRWISE).render(system=system, request=request, response_a=response_a.strip(),
                                          response_b=response_b.strip(), reference=(reference or "").strip())
    return [{"role": "user", "content": text}]


@dataclass(frozen=True)
class Verdict:
    better: Literal["A", "B", "tie"]
    rationale: str


_VERDICT_LINE = re.compile(
    r"^[ \t>#*_]*verdict[ \t*_]*[:：][ \t*_\[]*(?:response[ \t]+)?(a|b|tie)[ \t*_\].]*$",
    flags=re.IGNORECASE | re.MULTILINE,
)
_ANY_VERDICT_LINE = re.compile(r"^[ \t>#*_]*verdict[ \t*_]*[:：]", flags=re.IGNORECASE | re.MULTILINE)


def parse_verdict(text: str) -> Verdict | str:
    """Which response a pairwise judge reply prefers ("A", "B" or "tie") and its rationale, or
    why none can be read.

    The verdict is the last line starting `Verdict:` (markdown marks, `[[A]]`, `Response A`
    and a final full stop allowed) and must name exactly one of A, B, tie; a later `Verdict:`
    line that names none (`Verdict: A or B`) makes the reply unreadable rather than falling
    back to an earlier one. The rationale is read as `parse_rating` reads it. A JSON reply
    (asked for with VERDICT_SCHEMA) is read as JSON: `{"verdict": "A", "rationale": "..."}`.
    """
    if looks_like_json(text):
        value = json_field(text, "verdict")
        if isinstance(value, str) and value.strip().lower() in ("a", "b", "tie"):
            word = value.strip().lower()
            return Verdict("tie" if word == "tie" else word.upper(), json_rationale(text))  # type: ignore[arg-type]
    lines = list(_ANY_VERDICT_LINE.finditer(text))
    if not lines:
        return 'no "verdict" of A, B, tie in the JSON reply' if looks_like_json(text) else 'no "Verdict: A|B|tie" line'
    last = _VERDICT_LINE.match(text, lines[-1].start())
    if last is None:
        shown = text[lines[-1].start():].splitlines()[0].strip()
        return f"verdict names none of A, B, tie: {shown!r}"
    word = last.group(1).lower()
    before = text[: last.start()]
    label = list(_RATIONALE.finditer(before))
    rationale = before[label[-1].end():] if label else before
    return Verdict("tie" if word == "tie" else word.upper(), rationale.strip())  # type: ignore[arg-type]


@dataclass(frozen=True)
class Comparison:
    """Responses `first` and `second` of one prompt judged twice: `forward` with `first` shown
    as A, `backward` with `second` shown as A (None: that verdict was unreadable)."""

    first: int
    second: int
    forward: Verdict | None
    backward: Verdict | None

    @property
    def judged(self) -> bool:
        return self.forward is not None and self.backward is not None

    @property
    def winner(self) -> int | None:
        """The response both orders prefer; None for a tie, a disagreement (position bias) or
        an unreadable verdict."""
        if not self.judged:
            return None
        orders = (self.forward.better, self.backward.better)  # type: ignore[union-attr]
        if orders == ("A", "B"):
            return self.first
        if orders == ("B", "A"):
            return self.second
        return None

    @property
    def loser(self) -> int | None:
        winner = self.winner
        return None if winner is None else self.second if winner == self.first else self.first


def pairwise_wins(comparisons: Sequence[Comparison], count: int) -> list[int]:
    """How many comparisons each of `count` responses won in both orders."""
    wins = [0] * count
    for comparison in comparisons:
        if comparison.winner is not None:
            wins[comparison.winner] += 1
    return wins


def choose_by_wins(comparisons: Sequence[Comparison], texts: Sequence[str], usable: int, rng: random.Random,
                   pick: str = "random") -> PairChoice | str:
    """Indexes of chosen (most wins; equals: `rng` picks) and rejected (one chosen beat in both
    orders, saying something else: seeded pick, or with `pick="lowest"` the one with fewest
    wins), or the reject reason."""
    if usable < 2:
        return FEWER_THAN_TWO_USABLE
    if not any(c.judged for c in comparisons):
        return NO_PAIR_JUDGED
    wins = pairwise_wins(comparisons, len(texts))
    if not any(wins):
        return NO_PAIRWISE_WIN
    best = _pick_best(range(len(texts)), lambda i: wins[i], rng)
    beaten = sorted({c.loser for c in comparisons if c.winner == best})  # type: ignore[type-var]
    beaten = [i for i in beaten if normalised_text(texts[i]) != normalised_text(texts[best])]
    if not beaten:
        return SAME_TEXT
    if pick == "lowest":
        return PairChoice(best, min(beaten, key=lambda i: (wins[i], i)))
    return PairChoice(best, rng.choice(beaten))


# -- the loop ---------------------------------------------------------------------------------


@dataclass
class _Candidate:
    responder: str
    sample: int
    reply: Completion
    rating: Rating | None = None
    judge_reply: Completion | None = None
    usable: bool = False


@dataclass
class _Job:
    task: Task
    index: int  # instance index within the task's answered instances
    instance: Instance
    prompt: list[Message]
    candidates: list[_Candidate] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)  # pairwise judging
    verdict_replies: list[Completion] = field(default_factory=list)  # pairwise or ultrafeedback judge's, for usage

    @property
    def pair_id(self) -> str:
        return stable_id("pref", self.task.id, str(self.index))

    @property
    def where(self) -> str:
        return f"task {self.task.id}, instance {self.index}"


def responder_plan(responders: Sequence[Responder], k: int) -> list[tuple[int, int]]:
    """(responder number, its sample number) for responses 0..k-1: round-robin over responders."""
    counts: Counter[int] = Counter()
    plan = []
    for position in range(k):
        which = position % len(responders)
        plan.append((which, counts[which]))
        counts[which] += 1
    return plan


def _open_responders(stack: ExitStack, settings: PreferencesConfig, teacher: Teacher,
                     open_teacher: Callable[[str, TeacherConfig], Teacher] | None = None) -> list[Teacher]:
    """A Teacher per responder; those without a backend of their own share the run's, and
    the others (opened by `open_teacher(name, config)`, by default `make_teacher`) cache where
    the run's teacher caches unless they say otherwise."""
    open_teacher = open_teacher or (lambda _name, config: make_teacher(config))
    opened = []
    for responder in settings.responders:
        if responder.teacher is None:
            opened.append(teacher)
            continue
        config = responder.teacher
        if config.cache_dir is None and teacher.config.cache_dir is not None:
            config = config.model_copy(update={"cache_dir": teacher.config.cache_dir})
        opened.append(stack.enter_context(open_teacher(responder.name, config)))
    return opened


def run_preferences(seeds: Sequence[Task], settings: PreferencesConfig, run: RunContext) -> None:
    """Make preference pairs for the instances of `seeds` (in order) until OUT holds `num`."""
    judge, sink, seed = run.teacher, run.sink, run.seed
    judging = settings.judging_mode
    template = load_template(judging.template) if judging.template else None
    judge_params = settings.judge_params(seed)
    reject = ReplayedRejects(sink, STAGE_PREFERENCES)
    done = {pair.id for pair in sink.existing}
    have = len(sink.existing)
    jobs_all = [
        _Job(task, index, instance, prompt_messages(task, instance))
        for task in seeds
        for index, instance in enumerate(instances_to_answer(task, settings.max_instances_per_task))
    ]
    pending = [job for job in jobs_all if job.pair_id not in done]
    plan = responder_plan(settings.responders, settings.responses_per_prompt)
    with ExitStack() as stack:
        teachers = _open_responders(stack, settings, judge, run.open_teacher)
        # engine: ray answers a window of whole batches ahead, stage by stage (a pipeline each),
        # into the request caches; the batches below then run exactly as on engine: local
        look_ahead = run.lookahead > 0 and all(t.cache is not None for t in [judge, *teachers])
        window = run.lookahead_batches(settings.items_per_batch) * settings.items_per_batch
        batch, taken, answered_to = run.batches_done, 0, 0
        while have < run.num:
            jobs = pending[taken : taken + min(settings.items_per_batch, run.num - have)]
            if not jobs:
                break
            if look_ahead and taken >= answered_to:
                answered_to = taken + min(window, run.num - have)
                ahead = [_Job(j.task, j.index, j.instance, j.prompt) for j in pending[taken:answered_to]]
                with ExitStack() as answering:
                    for each in {id(t): t for t in [judge, *teachers]}.values():
                        answering.enter_context(each.answering_ahead())
                    _judge_batch(ahead, settings, teachers, plan, seed, judge, judge_params, _ignore)
            taken += len(jobs)
            sink.at(batch)
            _judge_batch(jobs, settings, teachers, plan, seed, judge, judge_params, reject)
            pairs = [pair for job in jobs if (pair := _pair(job, settings, seed, judge, judge_params, template,
                                                              teachers, reject)) is not None]
            fresh = sink.accept(pairs)
            sink.flush()
            have += len(fresh)
            batch += 1
            run.on_batch_done(batch)
            run.progress(len(fresh))
    sink.flush()


Reject = Callable[..., None]


def _judge_batch(jobs: list[_Job], settings: PreferencesConfig, teachers: list[Teacher],
                 plan: list[tuple[int, int]], seed: int, judge: Teacher, judge_params: SamplingParams,
                 reject: Reject) -> None:
    """Responses, then what the judging mode asks the judge, for `jobs`."""
    _respond(jobs, settings, teachers, plan, seed)
    _mark_usable(jobs, reject)
    settings.judging_mode.ask(jobs, settings, judge, judge_params, reject)


def _ignore(_reason: str, **_fields: Any) -> None:
    """Stands in for the rejects while answering ahead: the batch itself writes them."""


def _respond(jobs: list[_Job], settings: PreferencesConfig, teachers: list[Teacher],
             plan: list[tuple[int, int]], seed: int) -> None:
    prompts = [job.prompt for job in jobs]
    replies: dict[int, list[list[Completion]]] = {}
    for which, responder in enumerate(settings.responders):
        samples = sum(1 for r, _s in plan if r == which)
        if samples:
            params = responder.sampling.model_copy(update={"n": samples, "seed": seed})
            replies[which] = teachers[which].complete(prompts, params)
    for position, job in enumerate(jobs):
        job.candidates = [_Candidate(settings.responders[which].name, sample, replies[which][position][sample])
                          for which, sample in plan]


def _where(job: _Job, number: int) -> str:
    return f"{job.where}, response {number} ({job.candidates[number].responder})"


def _mark_usable(jobs: list[_Job], reject: Reject) -> None:
    """Mark the usable replies; reject the others (errors, cut off, empty) with the reason."""
    for job in jobs:
        for number, candidate in enumerate(job.candidates):
            reply = candidate.reply
            if not reply.ok:
                reject(TEACHER_ERROR, detail=f"{_where(job, number)}: {reply.error}")
            elif reply.finish_reason == "length":
                reject(LENGTH_LIMIT, detail=_where(job, number), raw=reply.text)
            elif not reply.text.strip():
                reject(EMPTY_RESPONSE, detail=_where(job, number))
            else:
                candidate.usable = True


def _reference(job: _Job, settings: PreferencesConfig) -> str | None:
    return job.instance.output if settings.show_reference else None


def _cut_off(reply: Completion, params: SamplingParams) -> str:
    """A note for an unreadable judge reply that ran out of tokens (the score line comes last)."""
    return f" (the reply was cut off at max_tokens {params.max_tokens})" if reply.finish_reason == "length" else ""


# -- the judging modes: what each asks the judge, how it picks the pair, what lineage keeps -----


def _ask_nothing(jobs: list[_Job], settings: PreferencesConfig, judge: Teacher, params: SamplingParams,
                 reject: Reject) -> None:
    """`chosen_responder`: nothing is judged."""


def _rate_each(jobs: list[_Job], settings: PreferencesConfig, judge: Teacher, params: SamplingParams,
               reject: Reject) -> None:
    """Rate every usable reply alone, all in one judge call; reject the unreadable ratings."""
    asks = [(job, number) for job in jobs for number, candidate in enumerate(job.candidates) if candidate.usable]
    verdicts = judge.complete([rating_messages(job.prompt, job.candidates[number].reply.text,
                                               _reference(job, settings)) for job, number in asks], params,
                              schema=RATING_SCHEMA)
    for (job, number), [verdict] in zip(asks, verdicts):
        candidate = job.candidates[number]
        candidate.judge_reply = verdict
        parsed = parse_rating(verdict.text) if verdict.ok else f"judge error: {verdict.error}"
        if isinstance(parsed, Rating):
            candidate.rating = parsed
        else:
            reject(RATING_UNPARSEABLE, detail=f"{_where(job, number)}: {parsed}{_cut_off(verdict, params)}",
                   raw=verdict.text or None)


def _rate_together(jobs: list[_Job], settings: PreferencesConfig, judge: Teacher, params: SamplingParams,
                   reject: Reject) -> None:
    """UltraFeedback's annotation: each prompt's usable replies rated together on the four
    aspects, one judge request per prompt with at least two (fewer make no pair), one call."""
    asks = [(job, [n for n, c in enumerate(job.candidates) if c.usable]) for job in jobs]
    asks = [(job, usable) for job, usable in asks if len(usable) >= 2]
    replies = judge.complete([ultrafeedback_messages(job.prompt, [job.candidates[n].reply.text for n in usable],
                                                     _reference(job, settings)) for job, usable in asks],
                             params) if asks else []
    for (job, usable), [reply] in zip(asks, replies):
        job.verdict_replies.append(reply)
        parsed = (parse_aspect_ratings(reply.text, len(usable)) if reply.ok
                  else [f"judge error: {reply.error}"] * len(usable))
        for number, rating in zip(usable, parsed):
            if isinstance(rating, Rating):
                job.candidates[number].rating = rating
            else:
                reject(RATING_UNPARSEABLE, detail=f"{_where(job, number)}: {rating}{_cut_off(reply, params)}",
                       raw=reply.text or None)


def _compare(jobs: list[_Job], settings: PreferencesConfig, judge: Teacher, params: SamplingParams,
             reject: Reject) -> None:
    """Judge every two usable replies of each prompt in both orders, in one judge call; reject
    the unreadable verdicts."""
    asks: list[tuple[_Job, int, int]] = []
    conversations: list[list[Message]] = []
    for job in jobs:
        reference = _reference(job, settings)
        usable = [number for number, candidate in enumerate(job.candidates) if candidate.usable]
        for first, second in itertools.combinations(usable, 2):
            a, b = job.candidates[first].reply.text, job.candidates[second].reply.text
            asks.append((job, first, second))
            conversations += [pairwise_messages(job.prompt, a, b, reference),
                              pairwise_messages(job.prompt, b, a, reference)]
    replies = judge.complete(conversations, params, schema=VERDICT_SCHEMA) if conversations else []
    for number, (job, first, second) in enumerate(asks):
        verdicts: list[Verdict | None] = []
        for reply, (shown_a, shown_b) in ((replies[2 * number][0], (first, second)),
                                          (replies[2 * number + 1][0], (second, first))):
            job.verdict_replies.append(reply)
            parsed = parse_verdict(reply.text) if reply.ok else f"judge error: {reply.error}"
            if isinstance(parsed, str):
                reject(VERDICT_UNPARSEABLE, detail=f"{job.where}, response {shown_a} (A) vs {shown_b} (B): {parsed}",
                       raw=reply.text or None)
                verdicts.append(None)
            else:
                verdicts.append(parsed)
        job.comparisons.append(Comparison(first, second, verdicts[0], verdicts[1]))


Choice = PairChoice | tuple[str, str]  # the pair, or (reject reason, detail)


def _by_scores(job: _Job, settings: PreferencesConfig, rng: random.Random) -> Choice:
    scores = [c.rating.score if c.rating else None for c in job.candidates]
    choice = choose_pair(scores, [c.reply.text for c in job.candidates], settings.margin, rng, settings.rejected_pick)
    if isinstance(choice, str):
        return choice, f"{job.where}: ratings [{', '.join('-' if s is None else f'{s:g}' for s in scores)}]"
    return choice


def _by_wins(job: _Job, settings: PreferencesConfig, rng: random.Random) -> Choice:
    choice = choose_by_wins(job.comparisons, [c.reply.text for c in job.candidates],
                            sum(c.usable for c in job.candidates), rng, settings.rejected_pick)
    if isinstance(choice, str):
        shown = ", ".join(f"{c.first}-{c.second}: " + "/".join(v.better if v else "?" for v in (c.forward, c.backward))
                          for c in job.comparisons)
        return choice, f"{job.where}: verdicts [{shown}]" if shown else job.where
    return choice


def _by_responder(job: _Job, settings: PreferencesConfig, rng: random.Random) -> Choice:
    choice = choose_by_responder([c.responder for c in job.candidates], [c.usable for c in job.candidates],
                                 [c.reply.text for c in job.candidates], settings.chosen_responder or "", rng,
                                 settings.rejected_pick)
    return (choice, job.where) if isinstance(choice, str) else choice


def _scores_record(job: _Job, choice: PairChoice, settings: PreferencesConfig) -> dict:
    return {"margin": settings.margin,
            "candidates": [{"responder": c.responder, "sample": c.sample, "score": c.rating.score if c.rating else None}
                           | ({"aspects": c.rating.aspects} if c.rating and c.rating.aspects else {})
                           for c in job.candidates]}


def _comparison_record(comparison: Comparison) -> dict:
    """A comparison in lineage: who was A in each order, both verdicts and rationales, the winner."""
    return {"a": comparison.first, "b": comparison.second,
            "verdicts": [v.better if v else None for v in (comparison.forward, comparison.backward)],
            "rationales": [v.rationale if v else None for v in (comparison.forward, comparison.backward)],
            "winner": comparison.winner}


def _wins_record(job: _Job, choice: PairChoice, settings: PreferencesConfig) -> dict:
    wins = pairwise_wins(job.comparisons, len(job.candidates))
    decisive = next(c for c in job.comparisons if {c.first, c.second} == {choice.chosen, choice.rejected})
    return {"comparisons": [_comparison_record(c) for c in job.comparisons], "decisive": _comparison_record(decisive),
            "candidates": [{"responder": c.responder, "sample": c.sample, "wins": wins[n]}
                           for n, c in enumerate(job.candidates)]}


@dataclass(frozen=True)
class Judging:
    """How chosen and rejected are decided (lineage's `judging`): what the judge is asked
    (`ask`, one call for a batch of prompts), how a prompt's pair is picked (`choose`) and
    what lineage keeps of it (`record`). `template` is None when nothing is judged."""

    name: str
    operation: str
    template: str | None
    ask: Callable[[list[_Job], PreferencesConfig, Teacher, SamplingParams, Reject], None]
    choose: Callable[[_Job, PreferencesConfig, random.Random], Choice]
    record: Callable[[_Job, PairChoice, PreferencesConfig], dict]


JUDGINGS = {judging.name: judging for judging in (
    Judging(JUDGING_RATING, "preferences:rate", RATING, _rate_each, _by_scores, _scores_record),
    Judging(JUDGING_ULTRAFEEDBACK, "preferences:ultrafeedback", ULTRAFEEDBACK, _rate_together, _by_scores,
            _scores_record),
    Judging(JUDGING_PAIRWISE, "preferences:pairwise", PAIRWISE, _compare, _by_wins, _wins_record),
    Judging(JUDGING_RESPONDER, "preferences:responder", None, _ask_nothing, _by_responder, _scores_record),
)}


def _pair(job: _Job, settings: PreferencesConfig, seed: int, judge: Teacher, judge_params: SamplingParams,
          template, teachers: list[Teacher], reject: ReplayedRejects) -> PreferencePair | None:
    judging = settings.judging_mode
    choice = judging.choose(job, settings, random.Random(f"pref:{seed}:{job.task.id}:{job.index}"))
    if not isinstance(choice, PairChoice):
        reason, detail = choice
        reject(reason, detail=detail)
        return None
    chosen, rejected = job.candidates[choice.chosen], job.candidates[choice.rejected]
    names = [r.name for r in settings.responders]

    def about(candidate: _Candidate) -> dict:
        which = names.index(candidate.responder)
        backend = teachers[which].backend
        return {"name": candidate.responder, "backend": backend.name, "model": backend.model,
                "sample": candidate.sample,
                "sampling": settings.responders[which].sampling.model_dump(exclude={"n"}) | {"seed": seed}}

    completions = ([c.reply for c in job.candidates] + [c.judge_reply for c in job.candidates if c.judge_reply]
                   + job.verdict_replies)
    return PreferencePair(
        id=job.pair_id,
        task_id=job.task.id,
        instance_index=job.index,
        prompt=job.prompt,
        chosen=[{"role": "assistant", "content": chosen.reply.text.strip()}],
        rejected=[{"role": "assistant", "content": rejected.reply.text.strip()}],
        score_chosen=chosen.rating.score if chosen.rating else None,
        score_rejected=rejected.rating.score if rejected.rating else None,
        rationale_chosen=chosen.rating.rationale if chosen.rating else "",
        rationale_rejected=rejected.rating.rationale if rejected.rating else "",
        lineage=lineage(
            generator="preferences", operation=judging.operation,
            teacher_name=(judge.backend.name, judge.backend.model) if template else ("", ""),
            templates=[template] if template else [], sampling=judge_params, seed=seed, completions=completions,
            parent_ids=[job.task.id], judging=judging.name, rejected_pick=settings.rejected_pick,
            responders={"chosen": about(chosen), "rejected": about(rejected)},
            **judging.record(job, choice, settings),
        ),
    )
