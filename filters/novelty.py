"""ROUGE-L novelty: the Self-Instruct rule as a standalone pass.

Tasks are taken in file order; a task is dropped when its text's ROUGE-L F1 against
any earlier kept task is above the threshold (0.7 in the reference), exactly the rule
the generator applies, with the same exact, fast ROUGE-L (`datagen.rouge`).

    kept, rejected = novelty_pass(tasks, NoveltyConfig(threshold=0.7))
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from datagen.filters.base import Fields, PassContext, PassResult, Rejection, text_of
from datagen.records import Task
from datagen.rouge import RougeLIndex


class NoveltyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(0.7, gt=0.0, le=1.0)
    fields: Fields = "instruction"


def novelty_pass(tasks: Sequence[Task], config: NoveltyConfig) -> PassResult:
    index = RougeLIndex()
    kept_ids: list[str] = []
    kept, rejected = [], []
    for task in tasks:
        text = text_of(task, config.fields)
        match = index.first_above(text, config.threshold)
        if match is None:
            index.add(text)
            kept_ids.append(task.id)
            kept.append(task)
        else:
            rejected.append(Rejection(task, "too similar (ROUGE-L)", detail=f"ROUGE-L {match.score:.3f}",
                                      duplicate_of=kept_ids[match.index]))
    return kept, rejected


def run_novelty_pass(tasks: Sequence[Task], context: PassContext) -> PassResult:
    """The `novelty` pass."""
    return novelty_pass(tasks, context.settings)
