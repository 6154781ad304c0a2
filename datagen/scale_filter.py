"""`datagen filter --engine datatrove|ray|slurm`: the filter passes as datatrove stages over shards.

The same outputs as the single-process `run_filter` (kept tasks and their order, rejects with
their stage, reason, detail and keeper, in the order `run_filter` writes them, the per-pass
counts in stats.json), computed by datatrove tasks that each stream one byte-range shard of
the input, so no process holds the whole input:

    datagen filter raw.jsonl --out kept.jsonl --passes heuristics,decontaminate,exact-dedup,near-dedup \\
        --eval mmlu.jsonl --engine datatrove --tasks 8
    datagen filter raw.jsonl --out kept.jsonl --passes heuristics,judge --engine ray --tasks 64
    datagen filter raw.jsonl --out kept.jsonl --engine slurm --tasks 256 --partition cpu

    from datagen.scale_filter import ScaleFilterPlan, run_scaled_filter
    stats = run_scaled_filter(ScaleFilterPlan(source, out, rejects, work, config, tasks=4), "datatrove")

Stages (datatrove `PipelineStep`s; files, logs and completion marks under the work folder,
`KEPT.work/` by default, so a rerun after a kill skips the tasks that finished):

1. check (N): parse each line of the shard; per task a blake2b of its id and of the task.
2. lines (1): invalid lines and repeated ids over all shards, worded and ordered as
   `read_tasks_lenient` does (`scale_dedup.invalid_lines`): the run stops with one error
   line, or (skip_invalid) they become `read` rejects. 32 bytes a task, no text.
3. the passes, in the configured order, as segments:
   - per-record passes (heuristics, decontaminate, judge, manual) in one stage of N tasks:
     each streams its shard in chunks of `chunk` tasks through our checks (the passes'
     own functions; the eval n-gram index built once a task; the judge with a teacher each
     task builds from the config, sharing the on-disk request cache), writing kept tasks and
     each pass's rejects;
   - exact-dedup / near-dedup: `scale_dedup`'s stages on what the passes before kept
     (memory: its bound, growing with the candidate pairs, not the tasks);
   - a segment that is not the last joins its kept shards into one file (streamed) for the
     next one to shard again.
   Passes that compare each task with the whole set kept so far (novelty) cannot be sharded:
   the run is refused with one error line before anything starts.
4. collect (1): kept.jsonl, the rejects file (invalid lines, then each pass's rejects in
   input order) and stats.json, concatenating the shards' files.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from datatrove.pipeline.base import PipelineStep

from datagen.errors import ConfigError, DatagenError, InputError
from datagen.filtering import PASSES, FilterConfig, LazyTeacher
from datagen.filters.base import PassContext
from datagen.filters.decontaminate import EvalIndex, decontaminate_pass
from datagen.filters.manual import read_overrides
from datagen.io import atomic_write_json, spend_path, stats_path
from datagen.records import Reject, Task
from datagen.rejects import INVALID_LINE, STAGE_READ
from datagen.scale_dedup import (
    STAGE_EXACT,
    STAGE_NEAR,
    DedupStage,
    EngineOptions,
    ScaleDedupPlan,
    ShardTasks,
    _check_engine,
    _concatenate,
    _decode,
    _key,
    _load_json,
    _load_npz,
    _read_at,
    _save_json,
    _save_npz,
    check_work_folder,
    executors_for,
    first_lines,
    invalid_lines,
    report_stage_error,
    run_executors,
    shard_lines,
    stage_tasks,
    start_ray,
)
from datagen.teachers.spending import SpendingCapReached, SpendingLedger, check_priced

PER_RECORD = ("heuristics", "decontaminate", "judge", "manual")  # a task's fate depends on it alone
CAP_FILE = "cap.txt"  # a shard's judge reached the spending cap: the driver stops the run with it
DEDUP = (STAGE_EXACT, STAGE_NEAR)  # run by scale_dedup's stages
WHOLE_SET = ("novelty",)  # each task against every task kept before it: refused
RECORDS, DEDUP_SEGMENT = "records", "dedup"


@dataclass
class ScaleFilterPlan:
    """One sharded filter run: where it reads and writes, the config (`filter` and `teacher`
    sections, kept as data: workers rebuild them), the shard count and chunk size."""

    source: Path
    out: Path
    rejects: Path
    work: Path
    config: InitVar[Any]  # the loaded Config: its filter and teacher sections are kept
    tasks: int = 2
    command: str = ""
    chunk: int = 1000  # tasks a per-record stage hands its passes at once
    filter_settings: dict = field(default_factory=dict, init=False)
    teacher: Any = field(default=None, init=False)
    skip_invalid: bool = field(default=False, init=False)
    # 1: the shards share the teacher's rate budget and spending ledger through files locked on
    # one machine; N: they run on several machines, each with 1/N of every limit
    limit_shares: int = field(default=1, init=False)

    def __post_init__(self, config) -> None:
        self.source, self.out, self.rejects, self.work = map(Path, (self.source, self.out, self.rejects, self.work))
        if self.tasks < 1:
            raise ConfigError(f"--tasks: must be at least 1, got {self.tasks}")
        # FilterConfig is built at import time and cannot be pickled: workers rebuild it from data
        self.filter_settings = config.filter.model_dump(mode="json")
        self.teacher = config.teacher
        self.skip_invalid = config.filter.skip_invalid

    def settings(self):
        return FilterConfig.model_validate(self.filter_settings)

    def segments(self) -> list[tuple[str, list[str]]]:
        return segments_of(self.filter_settings["passes"])

    def dir(self, name: str) -> Path:
        return self.work / name

    def shard_teacher(self, rank: int) -> LazyTeacher:
        """The judge's teacher in shard `rank`, made on first use, within its share of the limits
        and reserving in the run's spending ledger (one per shard when the limits are split)."""
        config = self.teacher.share(self.limit_shares)
        return LazyTeacher(config, self.spend_file(rank) if config.max_cost else None)

    def spend_file(self, rank: int) -> Path:
        shared = spend_path(self.out)
        return shared if self.limit_shares == 1 else shared.with_suffix(f".{rank:05d}.json")

    def dedup_plan(self, segment: int) -> ScaleDedupPlan:
        """scale_dedup's plan for a dedup segment: it reads what the segment before kept."""
        kind, passes = self.segments()[segment]
        assert kind == DEDUP_SEGMENT
        work = self.dir(f"seg{segment}")
        return ScaleDedupPlan(self.segment_source(segment), work / "kept.jsonl", work / "rejects.jsonl", work,
                              self.settings().dedup, tasks=self.tasks, skip_invalid=True, passes=tuple(passes))

    def segment_source(self, segment: int) -> Path:
        return self.source if segment == 0 else self.dir(f"seg{segment - 1}") / "kept.jsonl"


def segments_of(passes: list[str]) -> list[tuple[str, list[str]]]:
    """The passes grouped into stages: runs of per-record passes; exact then near dedup together.

    A pass that needs the whole set (novelty, or one this module does not know) is refused.
    """
    segments: list[tuple[str, list[str]]] = []
    for name in passes:
        if name in PER_RECORD:
            kind = RECORDS
        elif name in DEDUP:
            kind = DEDUP_SEGMENT
        else:
            why = ("compares each task with the whole set kept before it" if name in WHOLE_SET
                   else "is not one this engine knows how to shard")
            raise ConfigError(f"--engine: the {name} pass {why} and cannot run sharded; run it with --engine local "
                              f"(e.g. `datagen filter KEPT --passes {name}` on this run's output)")
        last = segments[-1] if segments else None
        if last and last[0] == kind and (kind == RECORDS or (last[1] == [STAGE_EXACT] and name == STAGE_NEAR)):
            last[1].append(name)
        else:
            segments.append((kind, [name]))
    return segments


# -- stage 1: check; stage 2: lines ----------------------------------------------------------------


def check_shard(plan: ScaleFilterPlan, rank: int, world_size: int) -> None:
    """Which lines of the shard are tasks; the id and task hashes the `lines` stage compares."""
    indexes, offsets, ident, whole = [], [], [], []
    shard = ShardTasks(plan.source, rank, world_size)
    for offset, index, task in shard:
        indexes.append(index)
        offsets.append(offset)
        ident.append(_key(task.id))
        whole.append(_key(task.to_json()))
    out = plan.dir("check")
    _save_npz(out / f"{rank:05d}.npz", index=np.array(indexes, dtype=np.int64),
              offset=np.array(offsets, dtype=np.int64), ident=np.array(ident, dtype="<u8").reshape(-1, 2),
              whole=np.array(whole, dtype="<u8").reshape(-1, 2))
    _save_json(out / f"{rank:05d}.json", {"lines": shard.lines, "errors": shard.errors, "fatal": shard.fatal})


def check_lines(plan: ScaleFilterPlan, world_size: int, engine: str) -> None:
    """Invalid lines and repeated ids over all shards: stop (error.txt) or one `read` reject each."""
    out = plan.dir("check")
    metas = [_load_json(out / f"{rank:05d}.json") for rank in range(world_size)]
    try:
        first_line = first_lines(plan.source, metas)
        shards = [_load_npz(out / f"{rank:05d}.npz") for rank in range(world_size)]
        shard = np.concatenate([np.full(len(s["index"]), rank, dtype=np.int64) for rank, s in enumerate(shards)])
        index = np.concatenate([s["index"] for s in shards])
        offset = np.concatenate([s["offset"] for s in shards])
        line = first_line[shard] + index + 1

        def id_of(row: int) -> str:
            return Task.model_validate_json(_read_at(plan.source, [int(offset[row])])[int(offset[row])]).id

        invalid, repeated, _ = invalid_lines(plan.source, metas, first_line, line,
                                             np.concatenate([s["ident"] for s in shards]),
                                             np.concatenate([s["whole"] for s in shards]), id_of, plan.skip_invalid)
    except InputError as error:
        report_stage_error(out / "error.txt", error, engine)
        return
    problems = dict(invalid)
    bad: list[dict[str, str]] = [{} for _ in range(world_size)]  # shard -> index in shard -> detail
    for rank, meta in enumerate(metas):
        for at, _problem in meta["errors"]:
            number = int(first_line[rank]) + at + 1
            bad[rank][str(at)] = f"{plan.source}:{number}: {problems[number]}"
    for row in repeated.tolist():
        bad[int(shard[row])][str(int(index[row]))] = f"{plan.source}:{line[row]}: {problems[int(line[row])]}"
    for rank in range(world_size):
        _save_json(out / f"{rank:05d}.bad.json", bad[rank])
    _save_json(out / "summary.json", {"in": len(line) - len(repeated) + len(invalid), "invalid_lines": len(invalid)})


# -- stage 3: per-record passes ----------------------------------------------------------------------


def _pass_functions(plan: ScaleFilterPlan, passes: list[str], teacher: LazyTeacher) -> dict:
    """name -> tasks -> (kept, rejections): the registered passes, with what is costly to build
    (the decontamination index) built once."""
    settings, functions = plan.settings(), {}
    for name in passes:
        entry = PASSES[name]
        section = getattr(settings, entry.section) if entry.section else None
        if name == "decontaminate":
            index = EvalIndex.from_files(section.eval_files, section.ngram)
            functions[name] = lambda tasks, index=index, fields=section.fields: decontaminate_pass(tasks, index, fields)
        else:
            functions[name] = lambda tasks, entry=entry, section=section: entry.run(
                tasks, PassContext(settings=section, teacher=teacher))
    return functions


def run_records(plan: ScaleFilterPlan, segment: int, rank: int, world_size: int, engine: str) -> None:
    """Stream this shard through the segment's per-record passes, `plan.chunk` tasks at a time."""
    passes = plan.segments()[segment][1]
    source, out = plan.segment_source(segment), plan.dir(f"seg{segment}")
    out.mkdir(parents=True, exist_ok=True)
    bad = _load_json(plan.dir("check") / f"{rank:05d}.bad.json") if segment == 0 else {}
    marks = read_overrides(plan.settings().manual.overrides) if "manual" in passes else {}
    teacher = plan.shard_teacher(rank)
    counts = {name: {"in": 0, "reasons": Counter()} for name in passes}
    marked_seen: set[str] = set()
    parts = {part: (out / f"{rank:05d}.{part}.jsonl").open("w", encoding="utf-8")
             for part in ("kept", STAGE_READ, *passes)}
    try:
        functions = _pass_functions(plan, passes, teacher)

        def flush(chunk: list[Task]) -> None:
            for name in passes:
                counts[name]["in"] += len(chunk)
                if name == "manual":
                    marked_seen.update(task.id for task in chunk if task.id in marks)
                chunk, rejected = functions[name](chunk)
                for r in rejected:
                    counts[name]["reasons"][r.reason] += 1
                    parts[name].write(Reject(reason=r.reason, stage=name, detail=r.detail, task=r.task,
                                             duplicate_of=r.duplicate_of).to_json() + "\n")
            parts["kept"].writelines(task.to_json() + "\n" for task in chunk)

        chunk: list[Task] = []
        for offset, index, raw in shard_lines(source, rank, world_size):
            line = _decode(raw, offset)
            if not line or not line.strip():
                continue
            detail = bad.get(str(index))
            if detail is not None:
                parts[STAGE_READ].write(Reject(reason=INVALID_LINE, stage=STAGE_READ, detail=detail,
                                               raw=line).to_json() + "\n")
                continue
            chunk.append(Task.model_validate_json(line))
            if len(chunk) >= plan.chunk:
                flush(chunk)
                chunk = []
        if chunk:
            flush(chunk)
    except SpendingCapReached as stop:  # the driver stops the run with it; a rerun redoes every shard
        report_stage_error(out / CAP_FILE, stop, engine)
        return
    finally:
        for handle in parts.values():
            handle.close()
        if teacher.teacher is not None:
            teacher_stats = teacher.teacher.stats.as_dict()
            teacher.teacher.close()
        else:
            teacher_stats = None
    _save_json(out / f"{rank:05d}.json", {
        "passes": {name: {"in": c["in"], "reasons": dict(c["reasons"])} for name, c in counts.items()},
        "teacher": teacher_stats, "marked_seen": sorted(marked_seen)})


def join_kept(plan: ScaleFilterPlan, segment: int, world_size: int) -> None:
    """The segment's kept shards as one file, for the next segment to shard again."""
    out = plan.dir(f"seg{segment}")
    _concatenate([out / f"{rank:05d}.kept.jsonl" for rank in range(world_size)], out / "kept.jsonl")


# -- stage 4: collect -------------------------------------------------------------------------------


def _merge_teacher_stats(found: list[dict], prices: bool) -> dict[str, Any]:
    from datagen.teachers.teacher import RunStats

    merged = RunStats(cost=0.0 if prices else None).as_dict()
    for stats in found:
        for key, value in stats.items():
            if key == "retry_reasons":
                for reason, count in value.items():
                    merged[key][reason] = merged[key].get(reason, 0) + count
            elif key == "failure_examples":
                merged[key] = (merged[key] + value)[:5]
            elif value is not None:
                merged[key] = (merged[key] or 0) + value
    return merged


def _parts(plan: ScaleFilterPlan, segment: int, part: str, world_size: int) -> list[Path]:
    kind = plan.segments()[segment][0]
    folder = plan.dir(f"seg{segment}") / ("write" if kind == DEDUP_SEGMENT else "")
    return [folder / f"{rank:05d}.{part}.jsonl" for rank in range(world_size)]


def collect(plan: ScaleFilterPlan, world_size: int, engine: str) -> dict[str, Any]:
    """kept.jsonl, the rejects file and stats.json, in the shape `run_filter` writes them."""
    settings, segments = plan.settings(), plan.segments()
    summary = _load_json(plan.dir("check") / "summary.json")
    stats: dict[str, Any] = {"input": str(plan.source), "in": summary["in"], "invalid_lines": summary["invalid_lines"],
                             "passes": []}
    rejects = _parts(plan, 0, STAGE_READ, world_size)
    teacher_stats: list[dict] = []
    for segment, (kind, passes) in enumerate(segments):
        if kind == DEDUP_SEGMENT:
            stats["passes"] += _load_json(stats_path(plan.dedup_plan(segment).out))["passes"]
            rejects += [path for name in passes for path in _parts(plan, segment, name, world_size)]
            continue
        shards = [_load_json(plan.dir(f"seg{segment}") / f"{rank:05d}.json") for rank in range(world_size)]
        teacher_stats += [shard["teacher"] for shard in shards if shard["teacher"]]
        for name in passes:
            reasons = sum((Counter(shard["passes"][name]["reasons"]) for shard in shards), Counter())
            tasks_in = sum(shard["passes"][name]["in"] for shard in shards)
            rejected = sum(reasons.values())
            entry = {"pass": name, "in": tasks_in, "out": tasks_in - rejected, "rejected": rejected,
                     "reasons": dict(reasons.most_common())}
            if name == "manual":  # the report as run_manual_pass words it, over every shard's tasks
                context = PassContext(settings=settings.manual, teacher=None)
                PASSES[name].run([], context)
                seen = {task_id for shard in shards for task_id in shard["marked_seen"]}
                marks = read_overrides(settings.manual.overrides)
                context.report["marks_for_other_ids"] = sum(task_id not in seen for task_id in marks)
                entry.update(context.report)
            stats["passes"].append(entry)
            rejects += _parts(plan, segment, name, world_size)
    if "judge" in settings.passes:
        stats["teacher"] = _merge_teacher_stats(teacher_stats, plan.teacher.billed_prices is not None)
    _concatenate(_parts(plan, len(segments) - 1, "kept", world_size), plan.out)
    _concatenate(rejects, plan.rejects)
    kept_count = stats["passes"][-1]["out"]
    stats.update(kept=kept_count, rejected=stats["in"] - kept_count,
                 wall_seconds=round(time.time() - _load_json(plan.work / "run.json")["started"], 3),
                 command=plan.command, config=settings.model_dump(mode="json"),
                 engine={"name": engine, "tasks": world_size, "work": str(plan.work)})
    if "judge" in settings.passes:
        stats["engine"]["teacher_limits"] = teacher_limits(plan)
    atomic_write_json(stats_path(plan.out), stats)
    return stats


def teacher_limits(plan: ScaleFilterPlan) -> dict[str, Any]:
    """How the shards kept the judge within the configured limits, for the run's stats."""
    if plan.limit_shares == 1:
        return {"shared": "one rate budget and spending ledger, files locked on this machine"}
    share = plan.teacher.share(plan.limit_shares)
    return {"split_over_shards": plan.limit_shares,
            "each_shard": share.model_dump(include={"requests_per_minute", "tokens_per_minute", "max_concurrency",
                                                    "max_cost"})}


# -- datatrove steps and the driver -------------------------------------------------------------------


class FilterStage(PipelineStep):
    """One stage of the sharded filter as a datatrove step: datatrove gives it its rank."""

    type = "datagen filter"

    def __init__(self, plan: ScaleFilterPlan, stage: str, shards: int, engine: str, segment: int = -1) -> None:
        super().__init__()
        self.plan, self.stage, self.shards, self.engine, self.segment = plan, stage, shards, engine, segment
        self.name = stage

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        with self.track_time("task"):
            if self.stage == "check":
                check_shard(self.plan, rank, world_size)
            elif self.stage == "lines":
                check_lines(self.plan, self.shards, self.engine)
            elif self.stage.startswith("records"):
                run_records(self.plan, self.segment, rank, world_size, self.engine)
            elif self.stage.startswith("join"):
                join_kept(self.plan, self.segment, self.shards)
            elif self.stage == "collect":
                collect(self.plan, self.shards, self.engine)
        yield from ()


def executor_groups(plan: ScaleFilterPlan, engine: str,
                    options: EngineOptions) -> list[tuple[Path, list, dict[Path, type[DatagenError]]]]:
    """(work folder of their logs, executors, error files to check after each) in run order; on
    Slurm every job waits for the one before."""
    n, groups, last = plan.tasks, [], None

    def add(work: Path, steps: list, errors: dict[Path, type[DatagenError]]) -> None:
        nonlocal last
        executors = executors_for(steps, work, engine, options, job_prefix="datagen-filter", after=last)
        last = executors[-1]
        groups.append((work, executors, errors))

    add(plan.work, [(FilterStage(plan, "check", n, engine), n), (FilterStage(plan, "lines", n, engine), 1)],
        {plan.dir("check") / "error.txt": InputError})
    segments = plan.segments()
    for segment, (kind, _passes) in enumerate(segments):
        if kind == RECORDS:
            steps = [(FilterStage(plan, f"records{segment}", n, engine, segment), n)]
            if segment < len(segments) - 1:
                steps.append((FilterStage(plan, f"join{segment}", n, engine, segment), 1))
            add(plan.work, steps, {plan.dir(f"seg{segment}") / CAP_FILE: SpendingCapReached})
        else:
            dedup = plan.dedup_plan(segment)
            steps = [(DedupStage(dedup, stage, n, engine), tasks) for stage, tasks in stage_tasks(dedup).items()]
            add(dedup.work, steps, {dedup.dir("group") / "error.txt": InputError})
    add(plan.work, [(FilterStage(plan, "collect", n, engine), 1)], {})
    return groups


def _preflight(plan: ScaleFilterPlan) -> None:
    """Settings errors (no eval file, no overrides file, a bad one) as the single-process run
    gives them, before any stage starts. The judge's teacher is made by the workers."""
    settings = plan.settings()
    if "judge" in settings.passes and plan.teacher.max_cost:
        check_priced(plan.teacher, plan.teacher.backend, "the judge")
    for name in settings.passes:
        entry = PASSES[name]
        if name in PER_RECORD and name != "judge":
            entry.run([], PassContext(settings=getattr(settings, entry.section) if entry.section else None,
                                      teacher=None))


def _ray_nodes() -> int:
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def run_scaled_filter(plan: ScaleFilterPlan, engine: str, options: EngineOptions | None = None) -> dict[str, Any]:
    """Run every stage on `engine` and write kept, rejects and stats; return the stats.

    Slurm: submits the chained array jobs and returns {"submitted": [job ids], "work": folder}.
    """
    options = options or EngineOptions()
    _check_engine(engine, options)
    if not plan.segments():
        raise ConfigError("--passes: no passes to run")
    _preflight(plan)
    check_work_folder(plan, {"filter": plan.filter_settings, "teacher": plan.teacher.model_dump(mode="json")})
    if engine == "ray":
        start_ray()
    plan.limit_shares = plan.tasks if engine == "slurm" or (engine == "ray" and _ray_nodes() > 1) else 1
    if plan.teacher.max_cost:  # a run starts: what a killed run left reserved becomes spend
        share = plan.teacher.share(plan.limit_shares).max_cost
        for rank in range(plan.limit_shares):
            SpendingLedger(plan.spend_file(rank), share, fresh=True)
    groups = executor_groups(plan, engine, options)
    for segment, (kind, _passes) in enumerate(plan.segments()):
        if kind == DEDUP_SEGMENT and not (marker := plan.dedup_plan(segment).work / "run.json").exists():
            _save_json(marker, {"started": time.time()})  # scale_dedup's collect reads its start time
    if engine == "slurm":
        if shutil.which("sbatch") is None:
            raise ConfigError("--engine slurm: sbatch is not on PATH; run this on a Slurm login node")
        groups[-1][1][-1].run()  # launches the chain through `depends`
        return {"submitted": [executor.job_id for _, executors, _ in groups for executor in executors],
                "work": str(plan.work)}
    timings: dict[str, float] = {}
    for work, executors, errors in groups:
        try:
            for stage, seconds in run_executors(work, executors, "filter", errors).items():
                timings[f"{work.name}/{stage}" if work != plan.work else stage] = seconds
        except (InputError, SpendingCapReached):
            # the input or the cap must change before a rerun can succeed, and it redoes every shard
            shutil.rmtree(plan.work, ignore_errors=True)
            raise
    stats = _load_json(stats_path(plan.out))
    stats["engine"]["stage_seconds"] = timings
    atomic_write_json(stats_path(plan.out), stats)
    shutil.rmtree(plan.work)
    return stats


def filter_command(config, source: Path, out: Path, rejects: Path, engine: str, tasks: int | None,
                   options: EngineOptions, work: Path | None, command_line: str) -> str:
    """`datagen filter --engine ...`: run it, return what the command prints."""
    from datagen.filtering import format_stats

    plan = ScaleFilterPlan(source, out, rejects, work or out.with_name(out.name + ".work"), config,
                           tasks=tasks if tasks is not None else max(1, os.cpu_count() or 1), command=command_line)
    result = run_scaled_filter(plan, engine, options)
    if engine == "slurm":
        return (f"submitted Slurm jobs {', '.join(map(str, result['submitted']))}; the last one writes {out}; "
                f"logs in {plan.work} (a failed job's log ends with the cause, and the jobs after it are cancelled)")
    return format_stats(result)

