"""The Natural-Instructions category of a task, always a name from upstream's hierarchy
(`datagen.export.hierarchy.CATEGORIES`), never an invented one.

Three sources, in order of precedence:

1. `export.category` (`--category NAME`): one category for every task, checked against
   the list when the config is loaded.
2. `export.category_from_teacher`: the teacher picks one from the list
   (`templates/ni_category.jinja`); a reply that is not exactly a listed name (case and a
   wrapping quote or backtick aside) is not used, and the task falls back to the rules.
3. `rule_category(task)`: the first rule of `CATEGORY_RULES` that fits what the task does.

| rule | category |
| --- | --- |
| the instruction asks to translate | `Translation` |
| classification with labels positive/negative (neutral/mixed allowed), or the instruction says sentiment | `Sentiment Analysis` |
| any other classification task | `Text Categorization` |
| summarise / summary | `Summarization` |
| paraphrase / rephrase / reword / rewrite | `Paraphrasing` |
| a title or headline | `Title Generation` |
| a poem / haiku / limerick | `Poem Generation` |
| a story | `Story Composition` |
| answer a question | `Question Answering` |
| anything else | `Misc.` |

    from datagen.export.categories import rule_category
    rule_category(task)   # "Sentiment Analysis"
"""  # noqa: E501 - markdown table rows cannot be wrapped

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from datagen.config import SamplingParams
from datagen.export.hierarchy import CATEGORIES
from datagen.prompts import load_template
from datagen.records import Task

CATEGORY_TEMPLATE = "ni_category.jinja"
FALLBACK_CATEGORY = "Misc."
SENTIMENT_LABELS = frozenset({"positive", "negative", "neutral", "mixed"})

SOURCE_OPTION = "--category"
SOURCE_TEACHER = "teacher"
SOURCE_RULES = "rules"


def _says(pattern: str) -> Callable[[Task], bool]:
    compiled = re.compile(pattern, re.IGNORECASE)
    return lambda task: bool(compiled.search(task.instruction))


def _labels(task: Task) -> set[str]:
    return {instance.output.strip().rstrip(".").casefold() for instance in task.instances if instance.output.strip()}


def _is_sentiment(task: Task) -> bool:
    labels = _labels(task)
    if task.is_classification and {"positive", "negative"} <= labels <= SENTIMENT_LABELS:
        return True
    return bool(re.search(r"\bsentiments?\b", task.instruction, re.IGNORECASE))


# (category, test, what the rule says); the first that fits wins
CATEGORY_RULES: tuple[tuple[str, Callable[[Task], bool], str], ...] = (
    ("Translation", _says(r"\btranslat(?:e|es|ed|ing|ion)\b"), "the instruction asks to translate"),
    ("Sentiment Analysis", _is_sentiment, "sentiment labels (positive/negative) or the word sentiment"),
    ("Text Categorization", lambda task: task.is_classification, "another classification task"),
    ("Summarization", _says(r"\bsummar(?:y|ies|ise|ize|ised|ized|ising|izing)\b"), "summarise"),
    ("Paraphrasing", _says(r"\b(?:paraphras\w*|rephras\w*|reword\w*|rewrit\w*)\b"), "paraphrase or rewrite"),
    ("Title Generation", _says(r"\b(?:title|headline)s?\b"), "a title or headline"),
    ("Poem Generation", _says(r"\b(?:poem|poetry|haiku|limerick)s?\b"), "a poem"),
    ("Story Composition", _says(r"\bstor(?:y|ies)\b"), "a story"),
    ("Question Answering", _says(r"\banswer\b.*\bquestions?\b|\bquestions?\b.*\banswer"), "answer a question"),
)


def rule_category(task: Task) -> str:
    """The category the rule table gives `task` (`Misc.` when no rule fits)."""
    return next((category for category, fits, _why in CATEGORY_RULES if fits(task)), FALLBACK_CATEGORY)


def category_prompt(task: Task, examples: Sequence[dict]) -> list[dict[str, str]]:
    """What the teacher is asked: the list, the task's instruction and up to two examples."""
    text = load_template(CATEGORY_TEMPLATE).render(
        categories=CATEGORIES, instruction=task.instruction.strip(),
        examples=[{"input": e["input"].strip(), "output": e["output"].strip()} for e in examples[:2]],
    )
    return [{"role": "user", "content": text}]


_BY_KEY = {name.rstrip(".").casefold(): name for name in CATEGORIES}
_PREFIX = re.compile(r"^\W*category\W*:\s*", re.IGNORECASE)


def parse_category(text: str) -> str | None:
    """The listed category a reply names, or None. Only its first non-empty line counts,
    with a "Category:" prefix, list marker, quotes, backticks, bold and a final period
    removed; the rest must be a name of the list (case aside)."""
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    line = _PREFIX.sub("", line).strip()
    line = re.sub(r"^[-*]\s+", "", line).strip().strip("*`\"'").strip()
    return _BY_KEY.get(line.rstrip(".").casefold())


def teacher_categories(
    tasks: Sequence[Task], examples: dict[str, list[dict]], complete: Callable, params: SamplingParams
) -> dict[str, str]:
    """Task id -> the category the teacher picked, for the replies that name a listed one.
    `examples[task.id]` are the examples shown; `complete` is `Teacher.complete`."""
    if not tasks:
        return {}
    replies = complete([category_prompt(task, examples.get(task.id, [])) for task in tasks], params)
    picked = {}
    for task, [reply] in zip(tasks, replies):
        category = parse_category(reply.text) if reply.ok else None
        if category is not None:
            picked[task.id] = category
    return picked
