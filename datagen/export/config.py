"""The `export:` config section (`ExportConfig`): split fractions, languages and the
Natural-Instructions fields every export format reads.

    from datagen.export.config import ExportConfig
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from datagen.config import SamplingParams, Strict
from datagen.export.hierarchy import CATEGORIES, DOMAINS, REASONING
from datagen.export.languages import iso_language_names


class ExportConfig(Strict):
    """The `export:` section. Split fractions are of tasks, not instances."""

    validation: float = Field(0.1, ge=0.0, lt=1.0)
    test: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 0
    # ISO 639 name ("English", "French", ...) for every task; None detects it per task
    language: str | None = None
    # Natural-Instructions: instances moved into "Positive Examples" per task (upstream needs 2)
    positive_examples: int = Field(2, ge=1)
    # most negative examples per task taken from the rejects
    negative_examples: int = Field(2, ge=1)
    # ask the teacher for a wrong answer when a task has no rejected output to show (and,
    # for a classification task, no other label to show)
    teacher_negatives: bool = True
    negative_sampling: SamplingParams = SamplingParams(temperature=0.7, top_p=1.0, max_tokens=256, seed=0)
    # teacher tries per task, each on a different example and sampling seed
    negative_attempts: int = Field(2, ge=1)
    # Natural-Instructions category for every task (a name of the upstream hierarchy);
    # None: the teacher's pick when category_from_teacher, else the rule table
    category: str | None = None
    category_from_teacher: bool = False
    category_sampling: SamplingParams = SamplingParams(temperature=0.0, max_tokens=16, seed=0)
    # names from the hierarchy's "Domain" and "Reasoning" lists, the same for every task
    domains: list[str] = Field(default_factory=lambda: ["Miscellaneous"])
    reasoning: list[str] = Field(default_factory=list)
    first_task_number: int = Field(1, ge=1)
    contributors: list[str] = Field(default_factory=lambda: ["datagen"])
    url: list[str] = Field(default_factory=list)
    instance_license: list[str] = Field(default_factory=lambda: ["Unknown"])

    @field_validator("language")
    @classmethod
    def _iso_name(cls, name: str | None) -> str | None:
        if name is not None and name not in iso_language_names():
            raise ValueError(f"{name!r} is not an ISO 639 language name (e.g. 'English', 'French')")
        return name

    @field_validator("category")
    @classmethod
    def _listed_category(cls, name: str | None) -> str | None:
        if name is not None and name not in CATEGORIES:
            raise ValueError(f"{name!r} is not a category of the Natural-Instructions task hierarchy "
                             "(e.g. 'Question Answering', 'Sentiment Analysis', 'Misc.')")
        return name

    @field_validator("domains")
    @classmethod
    def _listed_domains(cls, names: list[str]) -> list[str]:
        return _listed(names, DOMAINS, "domain", "'Miscellaneous', 'Reviews'")

    @field_validator("reasoning")
    @classmethod
    def _listed_reasoning(cls, names: list[str]) -> list[str]:
        return _listed(names, REASONING, "reasoning type", "'Commonsense Reasoning', 'Logical Reasoning'")

    @model_validator(mode="after")
    def _room_for_train(self) -> ExportConfig:
        if self.validation + self.test >= 1.0:
            raise ValueError("validation + test must leave some tasks for train")
        return self


def _listed(names: list[str], allowed: tuple[str, ...], kind: str, examples: str) -> list[str]:
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not a {kind} of the Natural-Instructions task hierarchy (e.g. {examples})")
    return names
