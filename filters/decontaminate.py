"""Decontamination: drop tasks that share a long word n-gram with an evaluation set.

The evaluation file is JSONL (every string value of each object counts, so any
benchmark layout works) or plain text (one item per line). Texts are lower-cased and
split into alphanumeric words; a task whose instruction or inputs share an n-gram
(default 13 words, the GPT-3 paper's choice) with an eval item is rejected, naming the
item it hit (`evals.jsonl:42`). An eval item shorter than n words counts when it
appears whole.

    index = EvalIndex.from_files(["mmlu.jsonl"], n=13)
    kept, rejected = decontaminate_pass(tasks, index)
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from datagen.errors import ConfigError, InputError
from datagen.filters.base import Fields, PassContext, PassResult, Rejection, text_of
from datagen.io import read_text_lines
from datagen.records import Task


class DecontaminateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    eval_files: list[str] = Field(default_factory=list)
    ngram: int = Field(13, ge=1)
    fields: Fields = "instruction+input"


def ngram_words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _eval_items(path: Path) -> Iterator[tuple[str, str]]:
    """(where, text) for every item of an eval file."""
    is_jsonl = path.suffix in {".jsonl", ".json"}
    for number, line in read_text_lines(path, "an eval file"):
        if not line.strip():
            continue
        if is_jsonl:
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(f"{path}:{number}: invalid JSON ({error.msg})") from None
            yield f"{path}:{number}", "\n".join(_strings(value))
        else:
            yield f"{path}:{number}", line


class EvalIndex:
    """n-grams of an evaluation set -> the first eval item that contains them."""

    def __init__(self, n: int):
        self.n = n
        self.grams: dict[tuple[str, ...], str] = {}
        self.short_lengths: set[int] = set()

    @classmethod
    def from_files(cls, paths: Sequence[str | Path], n: int) -> EvalIndex:
        index = cls(n)
        for path in paths:
            for where, text in _eval_items(Path(path)):
                index.add(where, text)
        return index

    def add(self, where: str, text: str) -> None:
        tokens = ngram_words(text)
        if not tokens:
            return
        if len(tokens) < self.n:
            self.short_lengths.add(len(tokens))
            self.grams.setdefault(tuple(tokens), where)
            return
        for start in range(len(tokens) - self.n + 1):
            self.grams.setdefault(tuple(tokens[start : start + self.n]), where)

    def hit(self, text: str) -> str | None:
        tokens = ngram_words(text)
        for length in (self.n, *sorted(self.short_lengths)):
            for start in range(len(tokens) - length + 1):
                where = self.grams.get(tuple(tokens[start : start + length]))
                if where:
                    return where
        return None


def decontaminate_pass(tasks: Sequence[Task], index: EvalIndex, fields: Fields = "instruction+input") -> PassResult:
    kept, rejected = [], []
    for task in tasks:
        where = index.hit(text_of(task, fields))
        if where is None:
            kept.append(task)
        else:
            rejected.append(Rejection(task, "contaminated", detail=f"shares a {index.n}-gram with {where}"))
    return kept, rejected


def run_decontaminate_pass(tasks: Sequence[Task], context: PassContext) -> PassResult:
    """The `decontaminate` pass: index the configured evaluation files, then check each task."""
    settings: DecontaminateConfig = context.settings
    if not settings.eval_files:
        raise ConfigError("--eval: the decontaminate pass needs at least one evaluation file")
    if "index" not in context.memo:  # built once a run (once a shard when sharded), not once a chunk
        context.memo["index"] = EvalIndex.from_files(settings.eval_files, settings.ngram)
    return decontaminate_pass(tasks, context.memo["index"], settings.fields)
