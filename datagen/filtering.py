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
from typing import Any, Literal

from pydantic import Field

from datagen.config import Strict
from datagen.errors import ConfigError, InputError
from datagen.filters.base import PassResult, check_pass
from datagen.filters.dedup import DedupConfig, exact_dedup, near_dedup
from datagen.filters.decontaminate import DecontaminateConfig, EvalIndex, decontaminate_pass
from datagen.filters.heuristics import HeuristicsConfig, checks_for
from datagen.filters.judge import JudgeConfig, judge_pass
from datagen.filters.novelty import NoveltyConfig, novelty_pass
from datagen.io import atomic_write_json, read_tasks_lenient, stats_path, write_jsonl_atomic
from datagen.records import Reject, Task

PassName = Literal["heuristics", "exact-dedup", "near-dedup", "novelty", "decontaminate", "judge"]


class FilterConfig(Strict):
    passes: list[PassName] = Field(default_factory=lambda: ["heuristics", "exact-dedup", "near-dedup"])
    skip_invalid: bool = False
    heuristics: HeuristicsConfig = HeuristicsConfig()
    dedup: DedupConfig = DedupConfig()
    novelty: NoveltyConfig = NoveltyConfig()
    decontaminate: DecontaminateConfig = DecontaminateConfig()
    judge: JudgeConfig = JudgeConfig()


def _run_pass(name: str, tasks: list[Task], config, run_state: dict[str, Any]) -> PassResult:
    """One pass. `run_state` carries what outlives it: the teacher (made once, for the
    judge) and the near-dedup report for the stats."""
    settings = config.filter
    if name == "heuristics":
        return check_pass(checks_for(settings.heuristics))(tasks)
    if name == "exact-dedup":
        return exact_dedup(tasks, settings.dedup.fields, settings.dedup.keep)
    if name == "near-dedup":
        result, report = near_dedup(tasks, settings.dedup)
        run_state["near_dedup_report"] = report.summary()
        return result
    if name == "novelty":
        return novelty_pass(tasks, settings.novelty)
    if name == "decontaminate":
        if not settings.decontaminate.eval_files:
            raise ConfigError("--eval: the decontaminate pass needs at least one evaluation file")
        index = EvalIndex.from_files(settings.decontaminate.eval_files, settings.decontaminate.ngram)
        return decontaminate_pass(tasks, index, settings.decontaminate.fields)
    if name == "judge":
        from datagen.teachers.teacher import make_teacher

        if "teacher" not in run_state:
            run_state["teacher"] = make_teacher(config.teacher)
        return judge_pass(tasks, run_state["teacher"], settings.judge)
    raise ConfigError(f"--passes: unknown pass {name!r}")


def run_filter(config, source: Path, kept_path: Path, rejects_path: Path, command_line: str) -> dict[str, Any]:
    """Run `config.filter.passes` over `source`; write kept, rejects and stats; return the stats."""
    settings = config.filter
    started = time.monotonic()
    tasks, invalid = read_tasks_lenient(source)
    if invalid and not settings.skip_invalid:
        where, problem, _raw = invalid[0]
        more = f" (and {len(invalid) - 1} more bad lines)" if len(invalid) > 1 else ""
        raise InputError(f"{where}: {problem}{more}; fix it or pass --skip-invalid")
    rejects = [Reject(reason="invalid line", stage="read", detail=f"{where}: {problem}", raw=raw)
               for where, problem, raw in invalid]
    stats: dict[str, Any] = {"input": str(source), "in": len(tasks) + len(invalid), "invalid_lines": len(invalid),
                             "passes": []}
    run_state: dict[str, Any] = {}
    try:
        for name in settings.passes:
            kept, rejected = _run_pass(name, tasks, config, run_state)
            assert len(kept) + len(rejected) == len(tasks), f"pass {name} lost tasks"
            reasons = Counter(r.reason for r in rejected)
            entry = {"pass": name, "in": len(tasks), "out": len(kept),
                     "rejected": len(rejected), "reasons": dict(reasons.most_common())}
            if name == "near-dedup":
                entry["report"] = run_state.pop("near_dedup_report")
            stats["passes"].append(entry)
            rejects += [Reject(reason=r.reason, stage=name, detail=r.detail, task=r.task, duplicate_of=r.duplicate_of)
                        for r in rejected]
            tasks = kept
    finally:
        if "teacher" in run_state:
            stats["teacher"] = run_state["teacher"].stats.as_dict()
            run_state["teacher"].close()
    stats.update(kept=len(tasks), rejected=len(rejects), wall_seconds=round(time.monotonic() - started, 3),
                 command=command_line, config=settings.model_dump(mode="json"))
    write_jsonl_atomic(rejects_path, rejects)
    write_jsonl_atomic(kept_path, tasks)
    atomic_write_json(stats_path(kept_path), stats)
    return stats


def format_stats(stats: dict[str, Any]) -> str:
    lines = [f"{'pass':<16}{'in':>8}{'out':>8}  reasons"]
    if stats["invalid_lines"]:
        lines.append(f"{'read':<16}{stats['in']:>8}{stats['in'] - stats['invalid_lines']:>8}  "
                     f"invalid line: {stats['invalid_lines']}")
    for entry in stats["passes"]:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in entry["reasons"].items()) or "-"
        lines.append(f"{entry['pass']:<16}{entry['in']:>8}{entry['out']:>8}  {reasons}")
    lines.append(f"kept {stats['kept']} of {stats['in']}, rejected {stats['rejected']} "
                 f"({stats['wall_seconds']:.1f} s)")
    return "\n".join(lines)
