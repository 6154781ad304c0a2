"""The filter passes by name, and the `filter:` config section derived from them.

One line per pass in `PASSES`: its entry point, its settings section, how `--engine` shards
it and (where it matters) whether it asks the teacher and how a sharded run joins its report
(`datagen.filters.base.FilterPass`). Its name becomes a `--passes` choice, its section a
`filter:` key, and `datagen filter --engine datatrove|ray|slurm` runs it as it says.

    from datagen.filters.registry import PASSES, FilterConfig
    PASSES["short-output"] = FilterPass(short_output.short_output_pass, "short_output",
                                        short_output.ShortOutputConfig, sharding=PER_TASK)
"""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from datagen.config import Strict, with_sections
from datagen.filters import decontaminate, dedup, heuristics, judge, magpie, manual, novelty
from datagen.filters.base import DEDUP, PER_TASK, WHOLE_SET, FilterPass

# The passes by name, in no particular order (`filter.passes` gives the order). Adding a
# pass: write filters/NAME.py with its settings model and `run(tasks, context)`, add a
# line here; its name becomes a `--passes` choice and its section a `filter:` key.
PASSES: dict[str, FilterPass] = {
    "heuristics": FilterPass(heuristics.heuristics_pass, "heuristics", heuristics.HeuristicsConfig, PER_TASK),
    "exact-dedup": FilterPass(dedup.exact_dedup_pass, "dedup", dedup.DedupConfig, DEDUP),
    "near-dedup": FilterPass(dedup.near_dedup_pass, "dedup", dedup.DedupConfig, DEDUP),
    "novelty": FilterPass(novelty.run_novelty_pass, "novelty", novelty.NoveltyConfig, WHOLE_SET),
    "decontaminate": FilterPass(decontaminate.run_decontaminate_pass, "decontaminate",
                                decontaminate.DecontaminateConfig, PER_TASK),
    "judge": FilterPass(judge.run_judge_pass, "judge", judge.JudgeConfig, PER_TASK, uses_teacher=True),
    "manual": FilterPass(manual.run_manual_pass, "manual", manual.ManualConfig, PER_TASK,
                         merge_reports=manual.merge_manual_reports),
    "magpie": FilterPass(magpie.magpie_pass, "magpie", magpie.MagpieFilterConfig, PER_TASK),
}


def one_of(choices) -> str:
    """`'a', 'b' or 'c'`, as pydantic words a Literal mismatch."""
    quoted = [repr(choice) for choice in choices]
    return ", ".join(quoted[:-1]) + f" or {quoted[-1]}" if len(quoted) > 1 else quoted[0]


class _FilterBase(Strict):
    passes: list[str] = Field(default_factory=lambda: ["heuristics", "exact-dedup", "near-dedup"])
    skip_invalid: bool = False

    @field_validator("passes")
    @classmethod
    def _registered(cls, names: list[str]) -> list[str]:
        # checked against the registry when validated, not when imported, so a pass added
        # to PASSES at run time (a test's toy pass) is accepted too; its settings section,
        # if it has one, must be in PASSES when this module is imported (FilterConfig's fields)
        unknown = [name for name in names if name not in PASSES]
        if unknown:
            raise PydanticCustomError("literal_error", "Input should be {expected}, not {given}",
                                      {"expected": one_of(PASSES), "given": repr(unknown[0])})
        return names


FilterConfig = with_sections(
    "FilterConfig", _FilterBase, {entry.section: entry.settings for entry in PASSES.values()},
    "The `filter:` section: the passes to run, in order, and one settings section per pass.",
)
