"""`datagen filter` / `datagen dedup`: run filter passes over any task JSONL.

Passes run in the order given. Every removed task goes to the rejects file with the pass,
the reason and (for duplicates) the id it duplicates; `stats.json` and a closing table
give the counts in/out per pass and per reason. A malformed input line, or a task under
an id an earlier line already used (ids are what `duplicate_of`, lineage and splits refer
to), stops the run before anything is written (`error: in.jsonl:12: ...`), or with
`skip_invalid` becomes a reject carrying the parse error. Outputs are written atomically.

    datagen filter raw.jsonl --out kept.jsonl --rejects rejects.jsonl --passes heuristics,near-dedup
    datagen filter raw.jsonl --out kept.jsonl --engine datatrove --tasks 8     # sharded: datagen.engines

The passes are registered in `datagen.filters.registry.PASSES` (each says how it shards);
`filter_on_engine` runs them in this process (`--engine local`) or sharded on datatrove's
executors (`datagen.engines.sharded_filter`, `datagen.engines.sharded_dedup`).
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

from datagen.errors import ConfigError, InputError
from datagen.filters.base import LazyTeacher, PassContext
from datagen.filters.registry import PASSES, FilterConfig  # noqa: F401 (FilterConfig: this stage's config section)
from datagen.io import atomic_write_json, stats_path, write_jsonl_atomic
from datagen.records import Reject
from datagen.rejects import INVALID_LINE, STAGE_READ


def start_spending(config, kept: Path) -> Path:
    """A filter run starts: its ledger's stale reservations dropped (once, by the driver)."""
    from datagen.io import spend_path
    from datagen.teachers.spending import SpendingLedger

    if config.max_cost:
        SpendingLedger(spend_path(kept), config.max_cost, fresh=True)
    return spend_path(kept)


def run_filter(config, source: Path, kept_path: Path, rejects_path: Path, command_line: str,
               input_format: str | None = None, split: str | None = None) -> dict[str, Any]:
    """Run `config.filter.passes` over `source` (any format `datagen.readers` reads; `input_format`
    and `split` as there); write kept, rejects and stats; return the stats."""
    from datagen.readers import load

    settings = config.filter
    started = time.monotonic()
    loaded = load(source, input_format, split)
    tasks, invalid = loaded.tasks, loaded.invalid
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
            context = PassContext(settings=entry.section_of(settings), teacher=teacher)
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


def sharded_route(engine: str, dedup_only: bool):
    """The sharded runner (`run(config, source, out, rejects, engine, tasks, options, work, command_line)`)
    and its options class, imported only when a run is sharded: datatrove and Ray are optional."""
    try:
        from datagen.engines.datatrove_run import EngineOptions

        if dedup_only:
            from datagen.engines.sharded_dedup import dedup_command as run
        else:
            from datagen.engines.sharded_filter import filter_command as run
    except ImportError as error:  # the `ray` extra is optional
        raise ConfigError(f"--engine {engine}: needs datatrove and ray[data] (pip install 'datagen[ray]'): {error}"
                          ) from error
    return run, EngineOptions


def filter_on_engine(config, source: Path, out: Path, rejects: Path, engine: str, tasks: int | None,
                     engine_options: dict[str, Any], work: Path | None, command_line: str,
                     dedup_only: bool = False, input_format: str | None = None, split: str | None = None) -> str:
    """`datagen filter` / `datagen dedup` (`dedup_only`): the passes in this process (`engine`
    local) or sharded on `engine` (datatrove, ray, slurm); returns what the command prints.
    `--engine ray` joins Ray as generation does: `engine.address`, else RAY_ADDRESS, else a local Ray."""
    if engine == "local":
        if tasks is not None:
            raise ConfigError("--tasks needs --engine datatrove, ray or slurm")
        return format_stats(run_filter(config, source, out, rejects, command_line, input_format, split))
    from datagen.readers import as_task_jsonl

    source = as_task_jsonl(source, input_format, split, out.with_name(f"{out.stem}.input.jsonl"))
    run, options_class = sharded_route(engine, dedup_only)
    options = options_class(**engine_options, ray_address=config.engine.address)
    result = run(config, source, out, rejects, engine, tasks, options, work, command_line)
    if "submitted" in result:
        return (f"submitted Slurm jobs {', '.join(map(str, result['submitted']))}; the last one writes {out}; "
                f"logs in {result['work']} (a failed job's log ends with the cause, and the jobs after it are "
                f"cancelled)")
    return format_stats(result)
