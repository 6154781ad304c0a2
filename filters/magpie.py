"""The `magpie` filter pass: Magpie's own filters over every turn of a conversation, and its tags.

Magpie (Xu et al. 2024) filters its conversations by instruction length, repetition and
language, and keeps by the judge's tags (its "high quality" subset: input quality good or
excellent). What `heuristics` already does (Self-Instruct's instruction rules, one word
repeated in an output) looks at the first turn only; this pass looks at every user and
assistant turn of a multi-turn record (`Instance.followups`):

- *length*: every user message within `min_user_words`..`max_user_words`;
- *repetition*: no turn whose word n-grams (`repeat_ngram`) repeat more than `max_repeat_share`
  of the time (a small teacher looping on a phrase; near-duplicate conversations are
  `near-dedup`'s, Magpie's "minimum neighbour distance");
- *language*: every turn with `min_language_letters` letters or more identified (py3langid,
  the maintained fork of langid.py) as one of `languages` (ISO 639-1 codes; empty: any);
- *tags*: with `task_categories`, `difficulties` or `min_quality` set, keep only records whose
  `tags` (written by `generate --method magpie`) match; `untagged` says what happens to a
  record without tags.

    filter:
      passes: [magpie, exact-dedup, near-dedup]
      magpie: {languages: [en], min_quality: good}
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Literal

from pydantic import Field, field_validator

from datagen.config import Strict
from datagen.filters.base import PassContext, PassResult, Rejection
from datagen.generators.magpie import DIFFICULTIES, QUALITIES, TASK_CATEGORIES
from datagen.records import Task

_WORD = re.compile(r"\w+")
_LETTER = re.compile(r"[^\W\d_]")


class MagpieFilterConfig(Strict):
    """Magpie's filters; the tag conditions are off until set."""

    min_user_words: int = Field(3, ge=0)
    """A user message shorter than this (in words) is no instruction."""
    max_user_words: int = Field(300, ge=1)
    repeat_ngram: int = Field(3, ge=1)
    """Word n-gram size for the repetition check."""
    max_repeat_share: float = Field(0.5, gt=0.0, le=1.0)
    """Reject a turn whose n-grams are repeats (not first occurrences) more than this share."""
    min_repeat_ngrams: int = Field(6, ge=1)
    """Turns with fewer n-grams than this are not checked for repetition."""
    languages: tuple[str, ...] = ("en",)
    """Keep turns in these languages (ISO 639-1, as py3langid names them); empty: any language."""
    min_language_letters: int = Field(20, ge=1)
    """Turns with fewer letters are not language-checked (identification on a few words is noise)."""
    task_categories: tuple[str, ...] | None = None
    """Keep only these task categories (Magpie's names, e.g. "math", "coding & debugging")."""
    difficulties: tuple[str, ...] | None = None
    """Keep only these difficulties ("very easy" .. "very hard")."""
    min_quality: Literal[QUALITIES] | None = None  # type: ignore[valid-type]
    """Keep input quality at this level or better (Magpie's high-quality subset: "good")."""
    untagged: Literal["keep", "reject"] = "reject"
    """A record without tags when a tag condition is set."""

    @field_validator("task_categories")
    @classmethod
    def _known_categories(cls, values: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return _known(values, TASK_CATEGORIES)

    @field_validator("difficulties")
    @classmethod
    def _known_difficulties(cls, values: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return _known(values, DIFFICULTIES)

    @property
    def by_tags(self) -> bool:
        return bool(self.task_categories or self.difficulties or self.min_quality)


def _known(values: tuple[str, ...] | None, allowed: tuple[str, ...]) -> tuple[str, ...] | None:
    unknown = [value for value in values or () if value not in allowed]
    if unknown:
        raise ValueError(f"unknown value {unknown[0]!r} (known: {', '.join(allowed)})")
    return values


def turns(task: Task) -> Iterator[tuple[str, str]]:
    """(role, text) of every turn of a task's conversations: the instruction (with its input),
    each output, and each follow-up's user message and reply."""
    for instance in task.instances or [None]:
        yield "user", task.instruction + (f"\n{instance.input}" if instance and instance.input else "")
        if instance is None:
            continue
        yield "assistant", instance.output
        for turn in instance.followups or ():
            yield "user", turn.user
            yield "assistant", turn.assistant


def repeat_share(text: str, n: int) -> tuple[float, int]:
    """(share of the word n-grams of `text` that repeat an earlier one, how many n-grams)."""
    words = _WORD.findall(text.casefold())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0, 0
    return 1 - len(set(grams)) / len(grams), len(grams)


def language_of(text: str) -> str:
    """The ISO 639-1 code py3langid gives `text`."""
    import py3langid

    return py3langid.classify(text)[0]


def conversation_reason(task: Task, settings: MagpieFilterConfig) -> str | None:
    """Why a conversation fails Magpie's length, repetition or language filter; None if it passes."""
    for number, (role, text) in enumerate(turns(task)):
        where = f"{role} turn {number // 2 + 1}"
        if role == "user":
            words = len(text.split())
            if words < settings.min_user_words:
                return f"user message too short: {where} has {words} words"
            if words > settings.max_user_words:
                return f"user message too long: {where} has {words} words"
        share, count = repeat_share(text, settings.repeat_ngram)
        if count >= settings.min_repeat_ngrams and share > settings.max_repeat_share:
            return f"repetitive text: {share:.0%} of the {settings.repeat_ngram}-grams of the {where} repeat"
        if settings.languages and len(_LETTER.findall(text)) >= settings.min_language_letters:
            language = language_of(text)
            if language not in settings.languages:
                return f"language {language}: {where}"
    return None


def tag_reason(task: Task, settings: MagpieFilterConfig) -> str | None:
    """Why a record's tags do not match the tag conditions; None if they do (or none is set)."""
    if not settings.by_tags:
        return None
    tags = (task.model_extra or {}).get("tags")
    if not isinstance(tags, dict):
        return None if settings.untagged == "keep" else "no tags"
    if settings.task_categories and tags.get("task_category") not in settings.task_categories:
        return f"task category {tags.get('task_category')}"
    if settings.difficulties and tags.get("difficulty") not in settings.difficulties:
        return f"difficulty {tags.get('difficulty')}"
    if settings.min_quality:
        quality = tags.get("quality")
        if quality not in QUALITIES or QUALITIES.index(quality) < QUALITIES.index(settings.min_quality):
            return f"quality {quality} below {settings.min_quality}"
    return None


def magpie_pass(tasks: Sequence[Task], context: PassContext) -> PassResult:
    """The `magpie` pass: length, repetition and language over every turn, then the tags."""
    settings: MagpieFilterConfig = context.settings
    kept, rejected = [], []
    for task in tasks:
        reason = conversation_reason(task, settings) or tag_reason(task, settings)
        if reason is None:
            kept.append(task)
        else:
            rejected.append(Rejection(task, reason))
    return kept, rejected


def tag_counts(tasks: Sequence[Task]) -> dict[str, Counter]:
    """How many records carry each tag value (for reports and the benchmark)."""
    counts: dict[str, Counter] = {"task_category": Counter(), "difficulty": Counter(), "quality": Counter()}
    for task in tasks:
        tags = (task.model_extra or {}).get("tags") or {}
        for key, counter in counts.items():
            counter[tags.get(key, "-")] += 1
    return counts
