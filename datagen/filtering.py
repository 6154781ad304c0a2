"""`datagen filter` / `datagen dedup`: run filter passes over any task JSONL.

Passes run in the order given. Every removed task goes to the rejects file with the pass,
the reason and (for duplicates) the id it duplicates; `stats.json` and a closing table
give the counts in/out per pass and per reason. A malformed input line, or a task under
an id an earlier line already used (ids are what `duplicate_of`, lineage and splits refer
to), stops the run before anything is written (`error: in.jsonl:12: ...`), or with
`skip_invalid` becomes a reject carrying the parse error. Outputs are written atomically.

    datagen filter raw.jsonl --out kept.jsonl --rejects rejects.jsonl --passes heuristics,near-dedup
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from datagen.config import Strict, with_sections
from datagen.errors import InputError
from datagen.filters import decontaminate, dedup, heuristics, judge, manual, novelty
from datagen.filters.base import FilterPass, PassContext
from datagen.io import atomic_write_json, read_tasks_lenient, stats_path, write_jsonl_atomic
from datagen.records import Reject
from datagen.rejects import INVALID_LINE, STAGE_READ

# The passes by name, in no particular order (`filter.passes` gives the order). Adding a
# pass: write filters/NAME.py with its settings model and `run(tasks, context)`, add a
# line here; its name becomes a `--passes` choice and its section a `filter:` key.
PASSES: dict[str, FilterPass] = {
    "heuristics": FilterPass(heuristics.heuristics_pass, "heuristics", heuristics.HeuristicsConfig),
    "exact-dedup": FilterPass(dedup.exact_dedup_pass, "dedup", dedup.DedupConfig),
    "near-dedup": FilterPass(dedup.near_dedup_pass, "dedup", dedup.DedupConfig),
    "novelty": FilterPass(novelty.run_novelty_pass, "novelty", novelty.NoveltyConfig),
    "decontaminate": FilterPass(decontaminate.run_decontaminate_pass, "decontaminate",
                                decontaminate.DecontaminateConfig),
    "judge": FilterPass(judge.run_judge_pass, "judge", judge.JudgeConfig),
    "manual": FilterPass(manual.run_manual_pass, "manual", manual.ManualConfig),
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


class LazyTeacher:
    """The run's teacher, made on first use (only the judge needs one) and closed at the end.
    With `teacher.max_cost` it reserves in the run's ledger at `spend` (`KEPT.spend.json`)."""

    def __init__(self, config, spend: Path | None = None) -> None:
        self.config = config
        self.spend = spend
        self.teacher = None

    def __call__(self):
        if self.teacher is None:
            from datagen.teachers.spending import SpendingLedger, check_priced
            from datagen.teachers.teacher import make_teacher

            self.teacher = make_teacher(self.config)
            if self.config.max_cost and self.spend is not None:
                check_priced(self.config, self.teacher.backend.name, "the judge")
                self.teacher.ledger = SpendingLedger(self.spend, self.config.max_cost)
        return self.teacher


def start_spending(config, kept: Path) -> Path:
    """A filter run starts: its ledger's stale reservations dropped (once, by the driver)."""
    from datagen.io import spend_path
    from datagen.teachers.spending import SpendingLedger

    if config.max_cost:
        SpendingLedger(spend_path(kept), config.max_cost, fresh=True)
    return spend_path(kept)


def run_filter(config, source: Path, kept_path: Path, rejects_path: Path, command_line: str) -> dict[str, Any]:
    """Run `config.filter.passes` over `source`; write kept, rejects and stats; return the stats."""
    settings = config.filter
    started = time.monotonic()
    tasks, invalid = read_tasks_lenient(source)
    if invalid and not settings.skip_invalid:
        where, problem, _raw = invalid[0]
        more = f" (and {len(invalid) - 1} more bad lines)" if len(invalid) > 1 else ""
        raise InputError(f"{where}: {problem}{more}; fix it or pass --skip-invalid")
    rejects = [Reject(reason=INVALID_LINE, stage=STAGE_READ, detail=f"{where}: {problem}", raw=raw)
               for where, problem, raw in invalid]
    stats: dict[str, Any] = {"input": str(source), "in": len(tasks) + len(invalid), "invalid_lines": len(invalid),
                             "passes": []}
    teacher = LazyTeacher(config.teacher, start_spending(config.teacher, kept_path))
    try:
        for name in settings.passes:
            entry = PASSES[name]
            context = PassContext(settings=getattr(settings, entry.section) if entry.section else None,
                                  teacher=teacher)
            kept, rejected = entry.run(tasks, context)
            assert len(kept) + len(rejected) == len(tasks), f"pass {name} lost tasks"
            reasons = Counter(r.reason for r in rejected)
            stats["passes"].append({"pass": name, "in": len(tasks), "out": len(kept), "rejected": len(rejected),
                                    "reasons": dict(reasons.most_common()), **context.report})
            rejects += [Reject(reason=r.reason, stage=name, detail=r.detail, task=r.task, duplicate_of=r.duplicate_of)
                        for r in rejected]
            tasks = kept
    finally:
        if teacher.teacher is not None:
            stats["teacher"] = teacher.teacher.stats.as_dict()
            teacher.teacher.close()
    stats.update(kept=len(tasks), rejected=len(rejects), wall_seconds=round(time.monotonic() - started, 3),
                 command=command_line, config=settings.model_dump(mode="json"))
    write_jsonl_atomic(rejects_path, rejects)
    write_jsonl_atomic(kept_path, tasks)
    atomic_write_json(stats_path(kept_path), stats)
    return stats


def format_stats(stats: dict[str, Any]) -> str:
    lines = [f"{'pass':<16}{'in':>8}{'out':>8}  reasons"]
    if stats["invalid_lines"]:
        lines.append(f"{STAGE_READ:<16}{stats['in']:>8}{stats['in'] - stats['invalid_lines']:>8}  "
                     f"invalid line: {stats['invalid_lines']}")
    for entry in stats["passes"]:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in entry["reasons"].items()) or "-"
        lines.append(f"{entry['pass']:<16}{entry['in']:>8}{entry['out']:>8}  {reasons}")
    lines.append(f"kept {stats['kept']} of {stats['in']}, rejected {stats['rejected']} "
                 f"({stats['wall_seconds']:.1f} s)")
    return "\n".join(lines)
